"""Fused optimizer kernel: one Adam/AdamW step as a single pass over p, g, m and v.

The NumPy form in `tinymoe.optim.Adam` makes ~10 passes over memory (each in-place ufunc reads and writes whole
arrays); here each element is loaded once, updated in registers (in float64, rounded once to the array dtype) and
stored once. Elementwise, so the result does not depend on the thread count.
"""
from __future__ import annotations

import math

from numba import prange

from ._jit import njit

PARALLEL_MIN = 1 << 16  # elements: below this a parallel launch costs more than it saves


@njit(inline="always")
def _adam_element(p, g, m, v, i, b1, b2, eps, step_size, inv_root_bc2, decay):
    gi = float(g[i])
    mi = b1 * float(m[i]) + (1.0 - b1) * gi
    vi = b2 * float(v[i]) + (1.0 - b2) * gi * gi
    m[i] = mi
    v[i] = vi
    p[i] = decay * float(p[i]) - step_size * mi / (math.sqrt(vi) * inv_root_bc2 + eps)


@njit()
def adam_serial(p, g, m, v, b1, b2, eps, step_size, inv_root_bc2, decay):
    """m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; p ← decay·p − step_size·m / (√v·inv_root_bc2 + ε). All (n,)."""
    for i in range(p.shape[0]):
        _adam_element(p, g, m, v, i, b1, b2, eps, step_size, inv_root_bc2, decay)


@njit(parallel=True)
def adam_parallel(p, g, m, v, b1, b2, eps, step_size, inv_root_bc2, decay):
    """adam_serial over the threads."""
    for i in prange(p.shape[0]):
        _adam_element(p, g, m, v, i, b1, b2, eps, step_size, inv_root_bc2, decay)
