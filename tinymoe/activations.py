"""Activation functions on raw arrays, each with its derivative: the one definition of each in the library.

These are shared by the engine (`Tensor.sigmoid`, `Tensor.relu`), `tinymoe.functional` (which wraps them as
differentiable Tensor ops) and the grouped expert FFN in `tinymoe.dispatch` (which recomputes the activation and
its derivative from the saved pre-activation in backward, both at once through `VALUE_AND_GRAD`). GELU is the tanh
approximation (Hendrycks & Gimpel 2016, eq. in §2; the form GPT-2 and BERT use): NumPy has no erf, and the tanh form is within 1e-3 of the exact one. The numba backend
keeps scalar twins of gelu, silu, relu and sigmoid for its fused loops (backends/numba/_ffn.py);
tests/test_numba_twins.py checks each equals the one here.
"""
import math

from .arrays import array_module

_GELU_C = math.sqrt(2.0 / math.pi)


def relu(x):
    return array_module(x).maximum(x, 0)


def relu_grad(x):
    return (x > 0).astype(x.dtype)


def gelu(x):
    xp = array_module(x)
    return 0.5 * x * (1 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))  # x*x*x: NumPy's x**3 is ~100x slower


def gelu_grad(x):
    xp = array_module(x)
    t = xp.tanh(_GELU_C * (x + 0.044715 * x * x * x))  # x*x*x: NumPy's x**3 is ~100x slower
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)


def gelu_and_grad(x):
    """(gelu(x), gelu'(x)) from one tanh: the expert FFN's backward needs both (about 17 passes instead of 27)."""
    xp = array_module(x)
    x2 = x * x
    t = xp.tanh(_GELU_C * x * (1 + 0.044715 * x2))
    half = 0.5 * (1 + t)
    return x * half, half + 0.5 * _GELU_C * x * (1 - t * t) * (1 + 3 * 0.044715 * x2)


def sigmoid(x):
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))  # exp of a non-positive number only: stable in both tails
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


def silu(x):
    return x * sigmoid(x)


def silu_grad(x):
    s = sigmoid(x)
    return s * (1 + x * (1 - s))


def silu_and_grad(x):
    s = sigmoid(x)
    return x * s, s * (1 + x * (1 - s))


def relu_and_grad(x):
    return relu(x), relu_grad(x)


def softplus(x):
    xp = array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


# name -> (forward, derivative), for modules that take `activation="gelu"`
ACTIVATIONS = {"relu": (relu, relu_grad), "gelu": (gelu, gelu_grad), "silu": (silu, silu_grad)}


# name -> function returning (act(x), act'(x)) with their shared work done once (the expert FFN's backward)
VALUE_AND_GRAD = {"relu": relu_and_grad, "gelu": gelu_and_grad, "silu": silu_and_grad}


def get_activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def normal_cdf(x):
    """Φ(x) = ½(1 + erf(x/√2)), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7; NumPy has no erf)."""
    xp = array_module(x)
    z = xp.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * xp.exp(-z * z)
    return (0.5 * (1.0 + xp.sign(x) * erf)).astype(x.dtype)


def normal_pdf(x):
    xp = array_module(x)
    return (xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)).astype(x.dtype)
