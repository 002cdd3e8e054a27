"""The hot path of an MoE layer, as plain NumPy on arrays: the reference every backend must match.

A routing gives each token t up to k assignments a = t·k + j: (expert_idx[t, j], weights[t, j]), optionally with
a `keep` mask (capacity drops, or zero weights skipped for sparse execution). The layer then runs

    order, offsets, inverse = route(expert_idx, E, keep)   # sort kept assignments by expert (stable)
    xs       = gather(x, order, k)                          # (R, d)   row r holds token order[r] // k
    out, h   = expert_ffn(xs, offsets, w1, b1, w2, b2, act) # (R, d_out); rows offsets[e]:offsets[e+1] are expert e
    y        = combine(out, weights, inverse)               # (T, d_out) y[t] = Σ_j w[t,j] · out[inverse[t·k+j]]

and backward runs each step's adjoint in reverse (`*_backward`). `tinymoe.backends.numba` (and later CuPy)
implement these same functions with the same signatures; gradients are written once, in `tinymoe.moe_ops`.

Semantics (docs/design.md §3-4): capacity C = ⌈c·T·k/E⌉ assignments per expert, served slot-major (all j = 0 choices
first, then j = 1, ...) and in token order within a slot (GShard, Lepikhin et al. 2021 §2.2; Switch, Fedus et
al. 2022 §2.2), or highest weight first with priority="weight" (batch-prioritised routing, Riquelme et al. 2021).
Dropped assignments contribute nothing; weights are not renormalised.
"""
from __future__ import annotations

import math

import numpy as np

from .activations import VALUE_AND_GRAD, get_activation
from .arrays import array_module


def capacity(capacity_factor, num_tokens, k, num_experts):
    """C = ⌈c·T·k/E⌉ assignments per expert."""
    return int(math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_keep(expert_idx, num_experts, capacity, priority_weights=None, keep=None):
    """Which assignments fit: keep (T, k) bool, at most `capacity` kept per expert.

    Served slot-major and in token order, or by descending `priority_weights` (T, k) when given
    (ties: slot-major order). Assignments already excluded by `keep` take no place in any queue.
    """
    T, k = expert_idx.shape
    slot_major = expert_idx.T.reshape(-1).astype(np.int64)  # (k·T,) position p = j·T + t
    if keep is not None:
        slot_major = np.where(keep.T.reshape(-1), slot_major, num_experts)  # bucket E: never served
    if priority_weights is None:
        serve = np.arange(T * k)
    else:
        serve = np.argsort(-priority_weights.T.reshape(-1), kind="stable")
    by_expert = serve[np.argsort(slot_major[serve], kind="stable")]  # served order, grouped by expert
    counts = np.bincount(slot_major, minlength=num_experts + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(T * k) - starts[slot_major[by_expert]]  # position in its expert's queue
    keep_slot_major = np.zeros(T * k, dtype=bool)
    keep_slot_major[by_expert] = (rank < capacity) & (slot_major[by_expert] < num_experts)
    return keep_slot_major.reshape(k, T).T.copy()  # (T, k)


def route(expert_idx, num_experts, keep=None):
    """Sort the kept assignments by expert, stably (equal to a stable argsort of expert ids).

    Returns order (R,) assignment ids t·k + j grouped by expert, offsets (E + 1,) the start of each expert's rows,
    and inverse (T·k,) the row of each assignment, -1 where it was not kept.
    """
    flat = expert_idx.reshape(-1).astype(np.int64)  # (T·k,)
    ids = np.arange(flat.size) if keep is None else np.flatnonzero(keep.reshape(-1))
    order = ids[np.argsort(flat[ids], kind="stable")]  # (R,)
    counts = np.bincount(flat[ids], minlength=num_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (E + 1,)
    inverse = np.full(flat.size, -1, dtype=np.int64)
    inverse[order] = np.arange(order.size)
    return order, offsets, inverse


def gather(x, order, k):
    """xs[r] = x[order[r] // k]: each kept assignment's token row. (T, d) -> (R, d)"""
    return x[order // k]


def gather_backward(dxs, inverse, k, num_tokens):
    """Adjoint of gather: dx[t] = Σ_j dxs[inverse[t·k + j]] over kept assignments. (R, d) -> (T, d)"""
    inv = inverse.reshape(num_tokens, k)
    dx = np.zeros((num_tokens, dxs.shape[1]), dtype=dxs.dtype)
    for j in range(k):
        kept = inv[:, j] >= 0
        dx[kept] += dxs[inv[kept, j]]
    return dx


def expert_ffn(xs, offsets, w1, b1, w2, b2, activation="gelu"):
    """Each expert's FFN on its contiguous rows: out = act(xs·W1[e] + b1[e])·W2[e] + b2[e].

    xs (R, d), w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out) -> out (R, d_out) and the pre-activation
    h (R, f), saved for backward. Experts with no rows are skipped. Each GEMM writes into its rows of h and out
    (`out=`), and the bias is added there in place: no temporary the size of an expert's rows, no copy.
    """
    act, _ = get_activation(activation)
    xp = array_module(xs)
    h = xp.empty((xs.shape[0], w1.shape[2]), dtype=xs.dtype)
    out = xp.empty((xs.shape[0], w2.shape[2]), dtype=xs.dtype)
    for e in range(w1.shape[0]):
        s, t = offsets[e], offsets[e + 1]
        if s == t:
            continue
        xp.matmul(xs[s:t], w1[e], out=h[s:t])
        h[s:t] += b1[e]  # h = xs·W1 + b1
        xp.matmul(act(h[s:t]), w2[e], out=out[s:t])
        out[s:t] += b2[e]  # out = act(h)·W2 + b2
    return out, h


def expert_ffn_backward(dout, xs, h, offsets, w1, w2, activation="gelu"):
    """Adjoint of expert_ffn. Returns dxs (R, d), dw1, db1, dw2, db2 (zeros for experts with no rows)."""
    get_activation(activation)  # validates the name
    act_and_grad = VALUE_AND_GRAD[activation]
    xp = array_module(xs)
    dxs = xp.empty_like(xs)
    E, f, d_out = w2.shape
    dw1, db1 = xp.zeros_like(w1), xp.zeros((E, f), dtype=w1.dtype)
    dw2, db2 = xp.zeros_like(w2), xp.zeros((E, d_out), dtype=w2.dtype)
    for e in range(E):
        s, t = offsets[e], offsets[e + 1]
        if s == t:
            continue
        a, slope = act_and_grad(h[s:t])  # act(h) and act'(h), recomputed from the saved pre-activation
        xp.matmul(a.T, dout[s:t], out=dw2[e])  # dW2 = aᵀ·dout
        db2[e] = dout[s:t].sum(axis=0)
        dh = dout[s:t] @ w2[e].T
        dh *= slope  # dh = (dout·W2ᵀ) ⊙ act'(h)
        xp.matmul(xs[s:t].T, dh, out=dw1[e])  # dW1 = xsᵀ·dh
        db1[e] = dh.sum(axis=0)
        xp.matmul(dh, w1[e].T, out=dxs[s:t])  # dxs = dh·W1ᵀ
    return dxs, dw1, db1, dw2, db2


def combine(out, weights, inverse):
    """y[t] = Σ_j weights[t, j] · out[inverse[t·k + j]] over kept assignments. (R, d) -> (T, d)"""
    T, k = weights.shape
    inv = inverse.reshape(T, k)
    y = np.zeros((T, out.shape[1]), dtype=out.dtype)
    for j in range(k):
        kept = inv[:, j] >= 0
        y[kept] += weights[kept, j, None] * out[inv[kept, j]]
    return y


def combine_backward(dy, out, weights, inverse):
    """Adjoint of combine: dout[inverse[t·k+j]] = w[t,j]·dy[t] and dweights[t,j] = ⟨dy[t], out[inverse[t·k+j]]⟩."""
    T, k = weights.shape
    inv = inverse.reshape(T, k)
    dout = np.zeros_like(out)
    dweights = np.zeros_like(weights)
    for j in range(k):
        kept = inv[:, j] >= 0
        rows = inv[kept, j]
        dout[rows] = weights[kept, j, None] * dy[kept]  # each row belongs to exactly one assignment
        dweights[kept, j] = (dy[kept] * out[rows]).sum(axis=1)
    return dout, dweights
