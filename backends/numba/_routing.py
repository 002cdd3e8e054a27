"""Routing and dispatch kernels: counting-sort route, capacity queues, gather / combine and their adjoints.

Every kernel writes each output element from exactly one loop iteration (no atomics), and sums in a fixed order,
so results are bitwise reproducible; the sums run in the same order as `tinymoe.dispatch` (j = 0, 1, ...).
Large outputs are allocated by the caller with NumPy and filled in place: NumPy asks the kernel for huge pages
(madvise) on big arrays, Numba's allocator does not, and 4 KiB page faults on fresh output made gather and
combine ~5× slower inside a training step than in isolation.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import njit


# ---------------------------------------------------------------------------------------------------- routing
@njit()
def route_kernel(flat, keep, num_experts):
    """Counting sort of the kept assignments by expert (stable: equal to a stable argsort).

    flat (n,) int64 expert ids of the assignments t·k + j, keep (n,) bool.
    Returns order (R,) assignment ids grouped by expert, offsets (E + 1,), inverse (n,) row or -1.
    """
    n = flat.shape[0]
    counts = np.zeros(num_experts, dtype=np.int64)
    for a in range(n):
        if keep[a]:
            e = flat[a]
            if e < 0 or e >= num_experts:
                raise ValueError("route: expert index out of range [0, num_experts)")
            counts[e] += 1
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    cursor = offsets[:-1].copy()  # (E,) next free row of each expert
    order = np.empty(offsets[num_experts], dtype=np.int64)
    inverse = np.full(n, -1, dtype=np.int64)
    for a in range(n):  # in assignment order: stable
        if keep[a]:
            r = cursor[flat[a]]
            order[r] = a
            inverse[a] = r
            cursor[flat[a]] = r + 1
    return order, offsets, inverse


@njit()
def capacity_keep_kernel(expert_idx, keep, serve, num_experts, capacity):
    """Serve slot-major positions p = j·T + t in the order `serve`; each expert accepts up to `capacity`.

    expert_idx (T, k) int64, keep (T, k) bool (assignments that take part), serve (T·k,) int64.
    Returns the kept mask (T, k) bool.
    """
    T = expert_idx.shape[0]
    taken = np.zeros(num_experts, dtype=np.int64)
    out = np.zeros(expert_idx.shape, dtype=np.bool_)
    for p in serve:
        j, t = p // T, p % T
        if not keep[t, j]:
            continue
        e = expert_idx[t, j]
        if e < 0 or e >= num_experts:
            raise ValueError("capacity_keep: expert index out of range [0, num_experts)")
        if taken[e] < capacity:
            taken[e] += 1
            out[t, j] = True
    return out


# ---------------------------------------------------------------------------------------------------- gather
@njit(parallel=True)
def gather_kernel(x, order, k, xs):
    """xs[r] = x[order[r] // k]. x (T, d) -> xs (R, d), filled in place."""
    R, d = order.shape[0], x.shape[1]
    for r in prange(R):
        src = order[r] // k
        for c in range(d):
            xs[r, c] = x[src, c]


@njit(parallel=True)
def gather_backward_kernel(dxs, inverse, k, dx):
    """dx[t] = Σ_j dxs[inverse[t·k + j]] over kept j, summed in j order. dxs (R, d) -> dx (T, d), in place."""
    num_tokens, d = dx.shape
    for t in prange(num_tokens):
        for c in range(d):  # zeroed here, by the thread that sums the row: one pass over memory, not two
            dx[t, c] = 0
        for j in range(k):
            r = inverse[t * k + j]
            if r >= 0:
                for c in range(d):
                    dx[t, c] += dxs[r, c]


# ---------------------------------------------------------------------------------------------------- combine
@njit(parallel=True)
def combine_kernel(out, weights, inverse, y):
    """y[t] = Σ_j w[t, j] · out[inverse[t·k + j]] over kept j, in j order. out (R, d) -> y (T, d), in place."""
    T, k = weights.shape
    d = out.shape[1]
    for t in prange(T):
        for c in range(d):
            y[t, c] = 0
        for j in range(k):
            r = inverse[t * k + j]
            if r >= 0:
                w = weights[t, j]
                for c in range(d):
                    y[t, c] += w * out[r, c]


@njit(parallel=True)
def combine_backward_kernel(dy, out, weights, inverse, dout, dweights):
    """One pass over tokens: dout[row] = w[t, j]·dy[t] and dweights[t, j] = ⟨dy[t], out[row]⟩.

    dy (T, d), out (R, d), weights (T, k) -> dout (R, d), dweights (T, k), filled in place: each row of dout
    claimed by an assignment is written once; dweights of dropped assignments must be zero on entry. The dot
    product accumulates in float64 (at least as accurate as the reference's pairwise sum; not bitwise equal).
    """
    T, k = weights.shape
    d = out.shape[1]
    for t in prange(T):
        for j in range(k):
            r = inverse[t * k + j]
            if r < 0:
                continue
            w = weights[t, j]
            for c in range(d):
                dout[r, c] = w * dy[t, c]
            dweights[t, j] = dot_row(dy[t], out[r])


@njit()
def dot_row(a, b):
    """⟨a, b⟩ in float64 with four interleaved partial sums (fixed order: deterministic, and not one long
    dependency chain, which a reduction without fastmath would otherwise be)."""
    n = a.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    n4 = n - n % 4
    for c in range(0, n4, 4):
        s0 += np.float64(a[c]) * np.float64(b[c])
        s1 += np.float64(a[c + 1]) * np.float64(b[c + 1])
        s2 += np.float64(a[c + 2]) * np.float64(b[c + 2])
        s3 += np.float64(a[c + 3]) * np.float64(b[c + 3])
    for c in range(n4, n):
        s0 += np.float64(a[c]) * np.float64(b[c])
    return (s0 + s1) + (s2 + s3)
