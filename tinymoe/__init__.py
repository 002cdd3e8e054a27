"""tinymoe: a small, readable Mixture-of-Experts library on a from-scratch NumPy autodiff.

    import tinymoe as tm
    x = tm.Tensor(np.random.randn(4, 8), requires_grad=True)
"""
from . import functional, nn, optim
from .tensor import Tensor, concatenate, is_grad_enabled, no_grad, stack, tensor, where

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "concatenate", "stack", "where", "functional", "nn",
           "optim"]
