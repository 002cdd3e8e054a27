"""tinymoe: a small, readable Mixture-of-Experts library on a from-scratch NumPy autodiff.

    import tinymoe as tm
    x = tm.Tensor(np.random.randn(4, 8), requires_grad=True)
    moe = tm.nn.MoE(d_model=8, d_ff=16, num_experts=4, gate="top_k", k=2)

Map: tensor.py (autodiff) · functional.py (ops) · nn/ (modules, MoE layers) · routers.py · gates.py ·
dispatch.py (the hot path, NumPy reference) · moe_ops.py (its gradients) · losses.py · model.py ·
train.py (fit / evaluate) · checkpoint.py (save / load) · config.py, runs.py, cli.py (the `tinymoe` command).
"""
from . import backends, checkpoint, functional, nn, optim
from .backends import get_backend, set_backend, use_backend
from .checkpoint import CheckpointError, load, save
from .model import ModelConfig, MoETransformer
from .tensor import Tensor, concatenate, is_grad_enabled, no_grad, stack, tensor, where

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "concatenate", "stack", "where", "functional", "nn",
           "optim", "backends", "checkpoint", "set_backend", "get_backend", "use_backend", "ModelConfig", "MoETransformer",
           "save", "load", "CheckpointError"]
