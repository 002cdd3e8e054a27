"""The engine's dense 2-D products on numba's threads: row blocks for a·b, split sums for aᵀ·g.

While the numba backend is current, NumPy's BLAS is pinned to one thread (see `session` in __init__.py), and the
engine's (N, k)·(k, n) products of `Linear` and friends come here instead (tinymoe.engine.gemm_hook). Each thread
runs single-threaded BLAS (SciPy's sgemm/dgemm through Numba's np.dot) on its block:

* a·b, a (N, k) C-contiguous, b (k, n) C- or F-contiguous (bᵀ of an F-contiguous view goes through the BLAS
  transpose flag): thread i computes rows bounds[i]:bounds[i + 1] of the output. BLAS blocks a product by its
  shape, so the last bits of a row can depend on the block it fell in: the same thread count gives bitwise the same
  result, another thread count (or NumPy's own product) may differ in the last bits.
* aᵀ·g (the weight gradient xᵀ·dy), x (N, k) and g (N, n) C-contiguous: the sum over N is split into blocks, thread i
  computes xᵀ·g over its block into parts[i], and `sum_parts` adds the parts in block order (deterministic for a
  given thread count, like the expert kernels' split weight gradients).

Why: OpenBLAS's own threads busy-wait ~0.1 s after every multi-threaded call, and a numba kernel that starts in that
window shares a core with the spinning worker (2x slower on 2 cores). Running the dense products on numba's pool,
whose idle workers sleep, keeps both cores for the dense layers and leaves no spinner behind (benchmarks/README.md).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import njit


@njit(parallel=True)
def rows_kernel(a, b, out, bounds):
    """out[s:t] = a[s:t]·b for each row block s:t = bounds[i]:bounds[i + 1], the blocks in parallel.
    a (N, k), out (N, n) C-contiguous; b (k, n) C- or F-contiguous."""
    for i in prange(bounds.shape[0] - 1):
        s, t = bounds[i], bounds[i + 1]
        np.dot(a[s:t], b, out[s:t])


@njit(parallel=True)
def split_sum_kernel(x, g, parts, bounds):
    """parts[i] = x[s:t]ᵀ·g[s:t] for each block s:t = bounds[i]:bounds[i + 1] of the rows, in parallel.
    x (N, k), g (N, n) C-contiguous; parts (blocks, k, n)."""
    for i in prange(bounds.shape[0] - 1):
        s, t = bounds[i], bounds[i + 1]
        np.dot(x[s:t].T, g[s:t], parts[i])


@njit(parallel=True)
def sum_parts(parts, out):
    """out = parts[0] + parts[1] + ..., added in that order for every element; parallel over the rows of out."""
    for r in prange(out.shape[0]):
        for c in range(out.shape[1]):
            acc = parts[0, r, c]
            for p in range(1, parts.shape[0]):
                acc += parts[p, r, c]
            out[r, c] = acc
