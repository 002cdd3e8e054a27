"""Multi-head attention and the pre-norm transformer block (Vaswani et al. 2017; pre-norm as GPT-2)."""
from __future__ import annotations

import numpy as np

from .. import functional as F
from .layers import Dropout, FeedForward, LayerNorm, Linear
from ..engine import Tensor
from .module import Module, make_rng

_MASKED = -1e9  # a large finite number, so a fully masked row gives a uniform softmax instead of NaN


class MultiHeadAttention(Module):
    """softmax(Q Kᵀ / sqrt(d_head) + mask) V over `num_heads` heads (Vaswani et al. 2017, eq. 1).

    `causal=True` lets position i see positions ≤ i. `padding_mask` (B, T) bool marks padded *keys* (True = pad),
    for bidirectional use on padded batches.
    """

    def __init__(self, d_model, num_heads, causal=False, dropout=0.0, seed=None, dtype=np.float32):
        if d_model % num_heads:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by num_heads={num_heads}")
        rng = make_rng(seed)
        self.d_model, self.num_heads, self.causal = d_model, num_heads, causal
        self.qkv = Linear(d_model, 3 * d_model, seed=rng, dtype=dtype)
        self.proj = Linear(d_model, d_model, seed=rng, dtype=dtype)
        self.attn_drop = Dropout(dropout, seed=rng)

    def forward(self, x, padding_mask=None):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: expected (B, T, {self.d_model}), got {x.shape}")
        B, T, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        qkv = self.qkv(x).reshape(B, T, 3, h, hd).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.swapaxes(-1, -2)) * (1.0 / np.sqrt(hd))  # (B, h, T, T)
        blocked = self._blocked(x, T, padding_mask)
        if blocked is not None:
            scores = F.where(blocked, _MASKED, scores)
        att = self.attn_drop(F.softmax(scores, axis=-1))
        y = (att @ v).permute(0, 2, 1, 3).reshape(B, T, d)  # (B, T, d)
        return self.proj(y)

    def _blocked(self, x, T, padding_mask):
        """Bool mask broadcastable to (B, h, T, T): True where a query may not look."""
        xp = x.xp
        blocked = None
        if self.causal:
            blocked = xp.triu(xp.ones((T, T), dtype=bool), k=1)  # (T, T)
        if padding_mask is not None:
            F.check_device("MultiHeadAttention (padding_mask)", x, padding_mask)
            pad = padding_mask.data if isinstance(padding_mask, Tensor) else xp.asarray(padding_mask)
            if pad.shape != (x.shape[0], T):
                raise ValueError(f"MultiHeadAttention: padding_mask must be (B, T) = {(x.shape[0], T)}, got {pad.shape}")
            pad = pad.astype(bool)[:, None, None, :]  # (B, 1, 1, T): padded keys
            blocked = pad if blocked is None else (blocked | pad)
        return blocked


class TransformerBlock(Module):
    """Pre-norm block: x + attn(ln1(x)), then x + ffn(ln2(x)). `ffn` may be any module (an MoE layer)."""

    def __init__(self, d_model, num_heads, d_ff=None, causal=False, dropout=0.0, activation="gelu", ffn=None,
                 seed=None, dtype=np.float32):
        rng = make_rng(seed)
        self.ln1 = LayerNorm(d_model, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, num_heads, causal=causal, dropout=dropout, seed=rng, dtype=dtype)
        self.ln2 = LayerNorm(d_model, dtype=dtype)
        self.ffn = ffn if ffn is not None else FeedForward(d_model, d_ff or 4 * d_model, activation, rng, dtype)
        self.drop = Dropout(dropout, seed=rng)

    def forward(self, x, padding_mask=None, **ffn_kwargs):
        x = x + self.drop(self.attn(self.ln1(x), padding_mask=padding_mask))
        return x + self.drop(self.ffn(self.ln2(x), **ffn_kwargs))
