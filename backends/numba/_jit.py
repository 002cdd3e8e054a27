"""The one `njit` decorator every kernel of this backend uses: caching on unless TINYMOE_NUMBA_CACHE=0.

Caching writes compiled machine code next to the sources (or in NUMBA_CACHE_DIR); turn it off for read-only
installs with TINYMOE_NUMBA_CACHE=0 (each process then compiles on first use, ~1 s per kernel and dtype).
Never fastmath: the tests compare these kernels with the NumPy reference, and fastmath may reassociate sums.
"""
from __future__ import annotations

import os

import numba


def cache_enabled() -> bool:
    """False when TINYMOE_NUMBA_CACHE is 0 / false / no / off (case-insensitive); True otherwise."""
    return os.environ.get("TINYMOE_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def njit(parallel=False, inline="never"):
    """numba.njit with this backend's settings: cache per TINYMOE_NUMBA_CACHE, no fastmath, nogil, and
    error_model="numpy" (x / 0 gives inf or nan as in NumPy; Python's error model checks every division for zero,
    and that branch kept LLVM from vectorising the activation loops: 60 ms instead of ~10 for GELU on 4M floats).

    inline="always" inlines a small scalar helper into its callers at Numba's IR level, which lets LLVM
    vectorise the loops that call it (a call left to LLVM's own inliner was not vectorised).
    """
    return numba.njit(cache=cache_enabled(), parallel=parallel, fastmath=False, nogil=True, inline=inline,
                      error_model="numpy")
