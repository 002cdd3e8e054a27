"""tinymoe: a small, readable Mixture-of-Experts library on a from-scratch NumPy autodiff.

    import tinymoe as tm
    x = tm.Tensor(np.random.randn(4, 8).astype(np.float32), requires_grad=True)
    moe = tm.nn.MoE(d_model=8, d_ff=16, num_experts=4, gate="top_k", k=2)
    y = moe(x)                                    # (4, 8)

Map, in import order (each module imports only those before it; tests/test_imports.py holds it so):
arrays.py, activations.py (raw-array math) · engine.py (autodiff: `Tensor`) · functional.py (ops) ·
dispatch.py (the MoE hot path, NumPy reference) and backends/ (its accelerated twins) · moe_ops.py (their
gradients) · gates.py, losses.py · nn/ (modules, routers, the MoE layer, multi-task models) · model.py ·
distributed/ (expert parallelism on MPI) · checkpoint.py (save / load), interop.py (PyTorch state_dicts) ·
train.py (fit / evaluate) · config.py, config_docs.py, plots.py, runs.py · cli.py (the `tinymoe` command).
experiments/ sits above them all and nothing in the library imports it. The design is written out in
docs/design.md; benchmarks/ (beside the package) measures it.

`tm.tensor(data)` is the function that makes a Tensor (as torch.tensor); the engine module is `tinymoe.engine`
(it was `tinymoe.tensor`, a name the function shadowed).
"""
from . import backends, checkpoint, functional, nn, optim
from .backends import get_backend, set_backend, use_backend
from .checkpoint import CheckpointError, load, save
from .model import ModelConfig, MoETransformer
from .engine import Tensor, concatenate, is_grad_enabled, no_grad, stack, tensor, where
from .version import __version__ as __version__  # noqa: F401 (the package version)

__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "concatenate", "stack", "where", "functional", "nn",
           "optim", "backends", "checkpoint", "set_backend", "get_backend", "use_backend", "ModelConfig", "MoETransformer",
           "save", "load", "CheckpointError"]
