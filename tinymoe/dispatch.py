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

Devices: every function takes its array module from its inputs (`xp = array_module(x)`), so this reference runs
as it is on CuPy arrays too. Only `route` talks to the host: it copies the E + 1 expert offsets there once (one
synchronisation on a GPU), because the expert loops below slice rows by them; everything else stays on the
device, and nothing selects rows with a boolean mask (on a GPU that is a hidden synchronisation too).
"""
from __future__ import annotations

import math

import numpy as np

from .activations import VALUE_AND_GRAD, get_activation
from .arrays import array_module, to_host


def capacity(capacity_factor, num_tokens, k, num_experts):
    """C = ⌈c·T·k/E⌉ assignments per expert."""
    return int(math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_keep(expert_idx, num_experts, capacity, priority_weights=None, keep=None):
    """Which assignments fit: keep (T, k) bool, at most `capacity` kept per expert.

    Served slot-major and in token order, or by descending `priority_weights` (T, k) when given
    (ties: slot-major order). Assignments already excluded by `keep` take no place in any queue.
    """
    T, k = expert_idx.shape
    xp = array_module(expert_idx)
    slot_major = expert_idx.T.reshape(-1).astype(np.int64)  # (k·T,) position p = j·T + t
    if keep is not None:
        slot_major = xp.where(keep.T.reshape(-1), slot_major, num_experts)  # bucket E: never served
    if priority_weights is None:
        serve = xp.arange(T * k)
    else:
        serve = xp.argsort(-priority_weights.T.reshape(-1), kind="stable")
    by_expert = serve[xp.argsort(slot_major[serve], kind="stable")]  # served order, grouped by expert
    counts = xp.bincount(slot_major, minlength=num_experts + 1)
    starts = xp.cumsum(counts) - counts  # (E + 1,) where each expert's queue starts
    rank = xp.arange(T * k) - starts[slot_major[by_expert]]  # position in its expert's queue
    keep_slot_major = xp.zeros(T * k, dtype=bool)
    keep_slot_major[by_expert] = (rank < capacity) & (slot_major[by_expert] < num_experts)
    return keep_slot_major.reshape(k, T).T.copy()  # (T, k)


def route(expert_idx, num_experts, keep=None):
    """Sort the kept assignments by expert, stably (equal to a stable argsort of expert ids).

    Returns order (R,) assignment ids t·k + j grouped by expert, offsets (E + 1,) the start of each expert's rows,
    and inverse (T·k,) the row of each assignment, -1 where it was not kept. order and inverse are on the inputs'
    device; offsets is a NumPy array on the host (one copy of E + 1 numbers), since the expert loops slice by it.
    """
    xp = array_module(expert_idx)
    flat = expert_idx.reshape(-1).astype(np.int64)  # (T·k,)
    if keep is not None:
        flat = xp.where(keep.reshape(-1), flat, num_experts)  # bucket E: not kept, sorted after every expert
    counts = xp.bincount(flat, minlength=num_experts + 1)[:num_experts]  # (E,)
    offsets = to_host(xp.concatenate([xp.zeros(1, dtype=np.int64), xp.cumsum(counts)])).astype(np.int64)  # (E + 1,)
    order = xp.argsort(flat, kind="stable")[: int(offsets[-1])]  # (R,) the kept ones, grouped by expert
    inverse = xp.full(flat.size, -1, dtype=np.int64)
    inverse[order] = xp.arange(order.size)
    return order, offsets, inverse


def gather(x, order, k):
    """xs[r] = x[order[r] // k]: each kept assignment's token row. (T, d) -> (R, d)"""
    return x[order // k]


def gather_backward(dxs, inverse, k, num_tokens):
    """Adjoint of gather: dx[t] = Σ_j dxs[inverse[t·k + j]] over kept assignments. (R, d) -> (T, d)"""
    xp = array_module(dxs)
    inv = inverse.reshape(num_tokens, k)
    dx = xp.zeros((num_tokens, dxs.shape[1]), dtype=dxs.dtype)
    if dxs.shape[0] == 0:
        return dx
    for j in range(k):
        kept = inv[:, j, None] >= 0  # (T, 1)
        dx += xp.where(kept, dxs[xp.maximum(inv[:, j], 0)], 0)  # row 0 stands in where nothing was kept
    return dx


def expert_ffn(xs, offsets, w1, b1, w2, b2, activation="gelu"):
    """Each expert's FFN on its contiguous rows: out = act(xs·W1[e] + b1[e])·W2[e] + b2[e].

    xs (R, d), w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out) -> out (R, d_out) and the pre-activation
    h (R, f), saved for backward. Experts with no rows are skipped. Each GEMM writes into its rows of h and out
    (`out=`), and the bias is added there in place: no temporary the size of an expert's rows, no copy.
    """
    act, _ = get_activation(activation)
    xp, bounds = array_module(xs), to_host(offsets).tolist()  # offsets: host ints (see route)
    h = xp.empty((xs.shape[0], w1.shape[2]), dtype=xs.dtype)
    out = xp.empty((xs.shape[0], w2.shape[2]), dtype=xs.dtype)
    for e in range(w1.shape[0]):
        s, t = bounds[e], bounds[e + 1]
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
    xp, bounds = array_module(xs), to_host(offsets).tolist()
    dxs = xp.empty_like(xs)
    E, f, d_out = w2.shape
    dw1, db1 = xp.zeros_like(w1), xp.zeros((E, f), dtype=w1.dtype)
    dw2, db2 = xp.zeros_like(w2), xp.zeros((E, d_out), dtype=w2.dtype)
    for e in range(E):
        s, t = bounds[e], bounds[e + 1]
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
    xp = array_module(out)
    inv = inverse.reshape(T, k)
    y = xp.zeros((T, out.shape[1]), dtype=out.dtype)
    if out.shape[0] == 0:
        return y
    for j in range(k):
        kept = inv[:, j, None] >= 0  # (T, 1)
        y += xp.where(kept, weights[:, j, None] * out[xp.maximum(inv[:, j], 0)], 0)  # row 0 stands in if not kept
    return y


def combine_backward(dy, out, weights, inverse):
    """Adjoint of combine: dout[inverse[t·k+j]] = w[t,j]·dy[t] and dweights[t,j] = ⟨dy[t], out[inverse[t·k+j]]⟩."""
    T, k = weights.shape
    xp, R = array_module(out), out.shape[0]
    inv = inverse.reshape(T, k)
    dout = xp.zeros((R + 1, out.shape[1]), dtype=out.dtype)  # row R: a sink for the assignments not kept
    dweights = xp.zeros_like(weights)
    if R == 0:
        return dout[:R], dweights
    for j in range(k):
        kept = inv[:, j] >= 0  # (T,)
        rows = xp.where(kept, inv[:, j], R)  # (T,) each kept row belongs to exactly one assignment
        dout[rows] = weights[:, j, None] * dy
        dweights[:, j] = xp.where(kept, (dy * out[xp.minimum(rows, R - 1)]).sum(axis=1), 0)
    return dout[:R], dweights
