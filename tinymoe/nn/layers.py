"""Basic layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout, FeedForward."""
from __future__ import annotations

import numpy as np

from .. import functional as F
from .module import Module, Parameter, make_rng


def _check_width(op, x, expected):
    if x.shape[-1] != expected:
        raise ValueError(f"{op}: input has width {x.shape[-1]} (shape {x.shape}), expected {expected}")


class Linear(Module):
    """y = x @ weight + bias, weight (in, out) — stored input-major so the matmul needs no transpose.

    Init: U(-1/sqrt(in), 1/sqrt(in)) as PyTorch's default, from `seed` (int or Generator).
    """

    def __init__(self, in_features, out_features, bias=True, seed=None, dtype=np.float32):
        rng = make_rng(seed)
        bound = 1 / np.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(rng.uniform(-bound, bound, (in_features, out_features)).astype(dtype))
        self.bias = Parameter(np.zeros(out_features, dtype)) if bias else None

    def forward(self, x):
        _check_width("Linear", x, self.in_features)
        return F.linear(x, self.weight, self.bias)  # one node: x @ weight + bias

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table (num, dim), init N(0, 0.02) as GPT-2."""

    def __init__(self, num_embeddings, dim, seed=None, dtype=np.float32):
        self.weight = Parameter((make_rng(seed).standard_normal((num_embeddings, dim)) * 0.02).astype(dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5, dtype=np.float32):
        self.dim, self.eps = dim, eps
        self.weight = Parameter(np.ones(dim, dtype))
        self.bias = Parameter(np.zeros(dim, dtype))

    def forward(self, x):
        _check_width("LayerNorm", x, self.dim)
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    def __init__(self, dim, eps=1e-6, dtype=np.float32):
        self.dim, self.eps = dim, eps
        self.weight = Parameter(np.ones(dim, dtype))

    def forward(self, x):
        _check_width("RMSNorm", x, self.dim)
        return F.rms_norm(x, self.weight, self.eps)


class Dropout(Module):
    """Inverted dropout with its own seeded Generator; the identity in eval mode."""

    def __init__(self, p=0.1, seed=None):
        self.p, self.rng = p, make_rng(seed)

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)


class FeedForward(Module):
    """The transformer MLP: Linear(d, f) -> activation -> Linear(f, d) (Vaswani et al. 2017, eq. 2)."""

    def __init__(self, d_model, d_ff, activation="gelu", seed=None, dtype=np.float32):
        rng = make_rng(seed)
        self.fc1 = Linear(d_model, d_ff, seed=rng, dtype=dtype)
        self.fc2 = Linear(d_ff, d_model, seed=rng, dtype=dtype)
        self.act = F.activation(activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
