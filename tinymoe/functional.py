"""Functional ops: one lowercase function per op, on Tensors.

Most are compositions of the engine's primitives (so their gradients come for free and are right by
construction). Fused, with a hand-written gradient, only where stability, speed or memory needs it:
* softmax, log_softmax, logsumexp: subtract the max first (stability), and one-pass gradients (speed);
* layer_norm: one node that keeps only x̂ and 1/σ for backward (memory: the composed form kept five arrays);
* gelu, silu, softplus: elementwise with their closed-form derivative (speed; see `tinymoe.activations`).
"""
from __future__ import annotations

import numpy as np

from . import activations as A
from .arrays import host_min_max
from .engine import (Tensor, check_device, concatenate, linear, maximum, stack, tensor, unbroadcast,  # noqa: F401
                     where)  # (re-exported)


def _elementwise(x, forward, derivative, name):
    """A fused elementwise op y = forward(x) with dy/dx = derivative(x)."""
    x = tensor(x)
    out = x._make(forward(x.data), (x,), name)
    out._backward = lambda g: x._accumulate(g * derivative(x.data))
    return out


def relu(x):
    return tensor(x).relu()


def gelu(x):
    """GELU, tanh approximation (see `tinymoe.activations`)."""
    return _elementwise(x, A.gelu, A.gelu_grad, "gelu")


def silu(x):
    return _elementwise(x, A.silu, A.silu_grad, "silu")


def softplus(x):
    return _elementwise(x, A.softplus, A.sigmoid, "softplus")


def normal_cdf(x):
    """Φ(x), the standard normal CDF (forward by Abramowitz & Stegun, gradient the exact pdf)."""
    return _elementwise(x, A.normal_cdf, A.normal_pdf, "normal_cdf")


def sigmoid(x):
    return tensor(x).sigmoid()


def tanh(x):
    return tensor(x).tanh()


def activation(name):
    """The activation function called `name` (relu | gelu | silu)."""
    A.get_activation(name)  # validates the name
    return {"relu": relu, "gelu": gelu, "silu": silu}[name]


def softmax(x, axis=-1):
    x = tensor(x)
    xp = x.xp
    e = xp.exp(x.data - x.data.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    out = x._make(y, (x,), "softmax")
    out._backward = lambda g: x._accumulate(y * (g - (g * y).sum(axis=axis, keepdims=True)))
    return out


def log_softmax(x, axis=-1):
    x = tensor(x)
    xp = x.xp
    shifted = x.data - x.data.max(axis=axis, keepdims=True)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    out = x._make(y, (x,), "log_softmax")
    out._backward = lambda g: x._accumulate(g - xp.exp(y) * g.sum(axis=axis, keepdims=True))
    return out


def logsumexp(x, axis=-1, keepdims=False):
    x = tensor(x)
    xp = x.xp
    m = x.data.max(axis=axis, keepdims=True)
    lse = m + xp.log(xp.exp(x.data - m).sum(axis=axis, keepdims=True))  # keepdims shape
    out = x._make(lse if keepdims else lse.squeeze(axis=axis), (x,), "logsumexp")

    def _backward(g):
        g = g if keepdims else xp.expand_dims(g, axis)
        x._accumulate(g * xp.exp(x.data - lse))

    out._backward = _backward
    return out


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) over the last axis, then * weight + bias (Ba et al. 2016, eq. 4 and 5).

    One graph node with the closed-form gradient, as PyTorch's layer_norm: it keeps x̂ = (x - μ)·r, r = 1/σ, for
    backward, where the composed form kept five full-size intermediates alive until backward. With ĝ = g·weight,

        dx = r · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂)),   dweight = Σ g·x̂,   dbias = Σ g   (Σ over the leading axes)
    """
    x = tensor(x)
    weight = None if weight is None else tensor(weight)
    bias = None if bias is None else tensor(bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_device(f"layer_norm ({name})", x, t)
    xp = x.xp
    xhat = x.data - x.data.mean(axis=-1, keepdims=True)  # centred, normalised in place below
    r = 1.0 / xp.sqrt((xhat * xhat).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat *= r
    y = xhat if weight is None else xhat * weight.data
    if bias is not None:
        y = y + bias.data if y is xhat else _add_into(y, bias.data)
    out = x._make(y, tuple(t for t in (x, weight, bias) if t is not None), "layer_norm")

    def _backward(g):
        if x.requires_grad:
            gw = g if weight is None else g * weight.data
            dx = gw - gw.mean(axis=-1, keepdims=True)
            dx -= xhat * (gw * xhat).mean(axis=-1, keepdims=True)
            dx *= r
            x._accumulate(unbroadcast(dx, x.shape))
        if weight is not None and weight.requires_grad:
            weight._accumulate(unbroadcast(g * xhat, weight.shape))
        if bias is not None and bias.requires_grad:
            bias._accumulate(unbroadcast(g, bias.shape))

    out._backward = _backward
    return out


def _add_into(y, b):
    """y + b, in place when the result keeps y's shape and dtype (y is a fresh array of this op)."""
    if np.result_type(y.dtype, b.dtype) == y.dtype and np.broadcast_shapes(y.shape, b.shape) == y.shape:
        y += b
        return y
    return y + b


def rms_norm(x, weight=None, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the last axis, then * weight (Zhang & Sennrich 2019)."""
    x = tensor(x)
    y = x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt()
    return y * weight if weight is not None else y


def dropout(x, p=0.1, training=True, rng=None):
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p).

    `rng` is a `np.random.Generator` (seeded dropout, no global state); identity when not training or p == 0.
    """
    x = tensor(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    if rng is None:
        raise ValueError("dropout: pass rng=np.random.default_rng(seed) so that dropout is reproducible")
    keep = x.xp.asarray(rng.random(x.shape) >= p)
    return x * (keep.astype(x.dtype) / (1 - p))


def embedding(ids, weight):
    """Rows of `weight` (V, d) picked by integer `ids` (any shape) -> (*ids.shape, d)."""
    check_device("embedding", weight, ids)
    ids = ids.data if isinstance(ids, Tensor) else weight.xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if ids.size:
        low, high = host_min_max(ids)  # one copy of two numbers to the host (a sync on a GPU)
        if low < 0 or high >= weight.shape[0]:
            raise IndexError(f"embedding: ids must lie in [0, {weight.shape[0]}), got [{low}, {high}]")
    return weight[ids]


def _reduce(loss, reduction, op):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy. logits (..., C), integer targets (...).

    Targets equal to `ignore_index` contribute nothing; 'mean' averages over the others. With label smoothing
    eps the target distribution is (1 - eps) on the label plus eps / C everywhere (Szegedy et al. 2016, §7).
    """
    logits = tensor(logits)
    check_device("cross_entropy", logits, targets)
    t = targets.data if isinstance(targets, Tensor) else logits.xp.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, got {t.shape}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    num_classes = logits.shape[-1]
    xp = logits.xp
    keep = t != ignore_index
    if t.size:  # ignored targets read as 0, a valid class; one copy of two numbers to the host
        low, high = host_min_max(xp.where(keep, t, 0))
        if low < 0 or high >= num_classes:
            raise IndexError(f"cross_entropy: targets must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")

    logp = log_softmax(logits.reshape(-1, num_classes))  # (N, C)
    flat_t, flat_keep = t.reshape(-1), keep.reshape(-1)
    safe_t = xp.where(flat_keep, flat_t, 0)
    nll = -logp[xp.arange(len(safe_t)), safe_t]  # (N,)
    if label_smoothing:
        nll = nll * (1 - label_smoothing) - logp.mean(axis=-1) * label_smoothing
    nll = nll * flat_keep.astype(logits.dtype)
    if reduction == "mean":  # 1 / (targets kept), computed where they are (no sync): float64, then our dtype
        return nll.sum() * Tensor((1.0 / xp.maximum(flat_keep.sum(), 1)).astype(logits.dtype), _fresh=True)
    return _reduce(nll.reshape(t.shape), reduction, "cross_entropy")


def mse_loss(pred, target, reduction="mean"):
    pred, target = tensor(pred), tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"mse_loss: pred {pred.shape} and target {target.shape} must have the same shape")
    diff = pred - target
    return _reduce(diff * diff, reduction, "mse_loss")


def binary_cross_entropy_with_logits(logits, targets, reduction="mean"):
    """-(y log σ(x) + (1-y) log(1-σ(x))), fused: max(x,0) - x·y + log1p(exp(-|x|)) forward, σ(x) - y backward.

    Fused for stability: the forward never exponentiates a large number and keeps exp(-100) at x = ±100 (the
    softplus(x) - x·y form cancels it away), and the gradient is σ(x) - y everywhere (composing relu and abs would
    take a one-sided derivative at x = 0). The targets' gradient is -x.
    """
    logits, targets = tensor(logits), tensor(targets)
    if logits.shape != targets.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: logits {logits.shape} and targets {targets.shape} differ")
    xp, x, y = logits.xp, logits.data, targets.data
    loss = logits._make(xp.maximum(x, 0) - x * y + xp.log1p(xp.exp(-xp.abs(x))), (logits, targets), "bce_logits")

    def _backward(g):
        if logits.requires_grad:
            logits._accumulate(g * (A.sigmoid(x) - y))
        if targets.requires_grad:
            targets._accumulate(g * -x)

    loss._backward = _backward
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


# the engine's primitives, under their functional names
def exp(x):
    return tensor(x).exp()


def log(x):
    return tensor(x).log()


def sqrt(x):
    return tensor(x).sqrt()


def clip(x, low=None, high=None):
    return tensor(x).clip(low, high)
