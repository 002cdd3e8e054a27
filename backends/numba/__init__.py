"""Numba CPU backend of the MoE hot path: the 8 primitives of `tinymoe.dispatch`, same signatures and results.

    import tinymoe as tm
    tm.set_backend("numba")   # or TINYMOE_BACKEND=numba; loaded only when asked for (tinymoe never imports numba)

Design (docs/design.md §6, "The CPU design"):
1. route: counting sort — count per expert, prefix sum into offsets (E + 1,), stable scatter into order (R,) and
   its inverse (T·k,) (-1 where dropped). Equal to the reference's stable argsort, in O(T·k).
2. gather: prange over rows, xs[r] = x[order[r] // k]; its adjoint sums the k rows of each token (prange over
   tokens, no atomics).
3. expert FFN: per-expert BLAS GEMMs (SciPy's sgemm/dgemm through Numba's np.dot) on contiguous row slices
   `buf[s:t]` of the expert-sorted buffers, bias + activation in a jitted loop; backward recomputes act(h) and
   act'(h) in one pass (one exp per element) from the saved pre-activation h. Experts without rows get zero weight
   gradients. The activations (relu, gelu (tanh form), silu) are computed in the arrays' precision (float32 in
   float32, ~1 ns per element) with a vectorisable exp (see _ffn.py), which keeps them a small part of the layer;
   tinymoe.activations' registry decides which names are accepted.
   Small calls run on one thread (PARALLEL_MIN_FLOPS, PARALLEL_MIN_ELEMENTS): below those sizes waking a second
   worker costs more than it saves.
   The (R, f) intermediates (act(h); dh and act'(h)) live in one per-thread scratch buffer kept between calls
   (`_scratch`): fresh arrays of that size were mapped and zeroed inside the kernel, 12-13 % of a backward.
4. combine: prange over tokens, y[t] = Σ_j w[t, j]·out[inverse[t·k + j]]; its adjoint computes dout and dweights
   in one pass.
No atomics and sums in a fixed order: the same input gives bitwise the same output. No fastmath.

Thread choice for the expert GEMMs (P = numba.get_num_threads()): always `prange` over the P threads with BLAS
pinned to one thread (threadpoolctl), never BLAS threads under or beside numba's pool. The work is cut into tiles:
an expert's rows, where an expert with more than ⌈R / (TILES_PER_THREAD·P)⌉ rows (TILES_PER_THREAD = 2; never less
than MIN_TILE_ROWS = 128) is cut into row tiles of that size; the tiles are packed onto the threads longest first
(LPT). So many experts run in parallel, one per thread at a time, and a few large experts (E < 2P, or one expert
holding most rows) are split across the threads instead of run in turn with multi-threaded BLAS, which is much
slower (benchmarks/README.md has the measurements): OpenBLAS's workers busy-wait after each GEMM, stealing the
cores from numba's OpenMP threads. An expert cut into several tiles gets its weight gradients as partial sums,
added in a fixed order (deterministic for a given P).

Threads under load: numba's OpenMP workers are told to sleep when idle (OMP_WAIT_POLICY=PASSIVE, set on import
unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT). libgomp's default spins after every parallel region; on a
machine where other processes want the cores, a spinning worker holds a core the other worker needs to finish the
next region, and a training step made of many short regions ran 25x slower than with sleeping workers.

Between the kernels (`session`, held while numba is the current backend): NumPy's BLAS runs on one thread and the
engine's dense products (Linear, attention projections, router, head) run on numba's threads instead (`_gemm.py`,
row blocks and split sums; about as fast as OpenBLAS's own two threads on the products of the benchmark models).
OpenBLAS's idle workers busy-wait ~0.1 s after each multi-threaded call; an expert kernel started in that window
ran at half speed on 2 cores, which made the public tm.nn.MoE layer 1.44x a dense FFN called before it when the
user had not entered a session (0.81-0.89x once set_backend held it).

Compilation: kernels are compiled on first use (~15-30 s for all of them, both dtypes) and cached on disk (numba
`cache=True`, in __pycache__ or NUMBA_CACHE_DIR; a warm start loads them in ~0.5 s). Set TINYMOE_NUMBA_CACHE=0 to
turn the disk cache off (read-only installs: every process then compiles). `warmup()` compiles (or loads) every
kernel for float32 and float64 on tiny inputs; call it before timing. Numba invalidates a cached kernel when the
file that defines it changes, not when _jit.py's settings do: clear __pycache__ after editing _jit.py.

Inputs may be non-contiguous or hold int32 ids: the wrappers below coerce them (np.ascontiguousarray / astype).
Floats are computed in float32 or float64 (other float dtypes in float64, returned in their own dtype).
"""
from __future__ import annotations

import contextlib
import os
import threading

# Idle OpenMP workers sleep instead of spinning (set before numba first starts its OpenMP pool; a user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins). With the default spin, a step whose kernels are many short parallel
# regions collapses whenever another process wants the cores: the demo step measured 451 ms against 17 ms with
# PASSIVE on a 2-core machine at load 6, and 33 ms single-threaded. See "Threads" in the docstring above.
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba's np.dot calls before threadpoolctl looks)
from threadpoolctl import ThreadpoolController  # noqa: E402

from ...activations import get_activation
from ...engine import gemm_hook
from . import _ffn, _gemm, _optim, _routing  # noqa: E402
from ._jit import cache_enabled  # noqa: E402

__all__ = ["capacity_keep", "route", "gather", "gather_backward", "expert_ffn", "expert_ffn_backward", "combine",
           "combine_backward", "adam_step", "dense_matmul", "warmup", "session", "cache_enabled", "TILES_PER_THREAD",
           "MIN_TILE_ROWS"]

PARALLEL_MIN_ELEMENTS = 1 << 16  # gather / combine on fewer floats than this run on one thread
PARALLEL_MIN_FLOPS = 1 << 24  # an expert FFN call of fewer FLOPs than this runs on one thread
TILES_PER_THREAD = 2  # an expert with more than R / (this × threads) rows is cut into tiles of that many rows
MIN_TILE_ROWS = 128  # ... but never into tiles smaller than this (GEMM efficiency); tests lower it
_blas = ThreadpoolController()


# ---------------------------------------------------------------------------------------------------- coercion
def _ints(a):
    """C-contiguous int64 copy-if-needed."""
    return np.ascontiguousarray(a, dtype=np.int64)


def _work_dtype(dtype):
    """float32 and float64 run as they are; anything else in float64."""
    return np.dtype(dtype) if np.dtype(dtype) in (np.float32, np.float64) else np.dtype(np.float64)


def _floats(a, dtype):
    return np.ascontiguousarray(a, dtype=dtype)


@contextlib.contextmanager
def _threads_for(size, threshold):
    """Run the kernels inside on one thread when `size` < `threshold`: waking the other workers for a parallel
    region costs tens of microseconds on a quiet machine and milliseconds on a busy one, more than small work
    gains (a d=16, 4-expert layer step took 3.2 ms on numba against 0.7 ms on numpy before this)."""
    threads = numba.get_num_threads()
    if size >= threshold or threads == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


_scratch_memory = threading.local()  # .buffer: this thread's scratch bytes, kept between calls
_ALIGN = 64  # bytes: each scratch array starts on a cache line


def _scratch(count, shape, dtype):
    """`count` C-contiguous arrays of `shape` and `dtype` for the kernels' intermediate values, carved out of one
    buffer per thread that is kept between calls and grown when a call needs more. Their contents are whatever the
    last call left: every element is written before it is read.

    Why: a fresh 16-32 MB array is memory the OS must map and zero on first touch, inside the kernel; that was 12-13 %
    of an expert backward at the medium and big training shapes (71.3 against 62.6 ms, 234.0 against 202.6). The
    buffer holds the largest call's scratch (two (R, f) arrays of the backward: 64 MB at R 4096, f 2048, float32)
    for as long as the thread lives. Scratch never leaves the call that takes it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    stride = -(-nbytes // _ALIGN) * _ALIGN
    buffer = getattr(_scratch_memory, "buffer", None)
    if buffer is None or buffer.nbytes < count * stride + _ALIGN:
        buffer = _scratch_memory.buffer = np.empty(count * stride + _ALIGN, dtype=np.uint8)
    start = -buffer.ctypes.data % _ALIGN
    return [buffer[start + i * stride:start + i * stride + nbytes].view(dtype).reshape(shape) for i in range(count)]


def _bools(a, shape):
    """A C-contiguous bool mask of `shape`; all True when a is None."""
    if a is None:
        return np.ones(shape, dtype=np.bool_)
    return np.ascontiguousarray(np.asarray(a, dtype=np.bool_).reshape(shape))


# ---------------------------------------------------------------------------------------------------- routing
def capacity_keep(expert_idx, num_experts, capacity, priority_weights=None, keep=None):
    """Which assignments fit: keep (T, k) bool, at most `capacity` kept per expert (see tinymoe.dispatch).

    Served slot-major and in token order, or by descending `priority_weights` (T, k) (ties: slot-major order).
    """
    idx = _ints(expert_idx)
    T, k = idx.shape
    if priority_weights is None:
        serve = np.arange(T * k, dtype=np.int64)
    else:  # the reference's own stable sort: identical tie and NaN handling
        serve = np.argsort(-np.asarray(priority_weights).T.reshape(-1), kind="stable").astype(np.int64)
    return _routing.capacity_keep_kernel(idx, _bools(keep, (T, k)), serve, int(num_experts), int(capacity))


def route(expert_idx, num_experts, keep=None):
    """Counting sort of the kept assignments by expert -> order (R,), offsets (E + 1,), inverse (T·k,); int64."""
    flat = _ints(expert_idx).reshape(-1)
    return _routing.route_kernel(flat, _bools(keep, flat.shape), int(num_experts))


# ---------------------------------------------------------------------------------------------------- dispatch
# Outputs are allocated here with NumPy (huge pages for big arrays) and filled by the kernels: see _routing.py.
def gather(x, order, k):
    """xs[r] = x[order[r] // k]. (T, d) -> (R, d)"""
    x, order = np.ascontiguousarray(x), _ints(order)
    if x.dtype not in (np.float32, np.float64):
        return x[order // k]  # other dtypes: plain NumPy indexing
    xs = np.empty((order.shape[0], x.shape[1]), dtype=x.dtype)
    with _threads_for(xs.size, PARALLEL_MIN_ELEMENTS):
        _routing.gather_kernel(x, order, int(k), xs)
    return xs


def gather_backward(dxs, inverse, k, num_tokens):
    """dx[t] = Σ_j dxs[inverse[t·k + j]] over kept assignments. (R, d) -> (T, d)"""
    dtype = np.asarray(dxs).dtype
    dxs = _floats(dxs, _work_dtype(dtype))
    dx = np.empty((int(num_tokens), dxs.shape[1]), dtype=dxs.dtype)
    with _threads_for(dxs.size, PARALLEL_MIN_ELEMENTS):
        _routing.gather_backward_kernel(dxs, _ints(inverse), int(k), dx)
    return dx.astype(dtype, copy=False)


def combine(out, weights, inverse):
    """y[t] = Σ_j weights[t, j] · out[inverse[t·k + j]] over kept assignments. (R, d) -> (T, d)"""
    dtype = np.asarray(out).dtype
    work = _work_dtype(dtype)
    out, weights = _floats(out, work), _floats(weights, work)
    y = np.empty((weights.shape[0], out.shape[1]), dtype=work)
    with _threads_for(out.size, PARALLEL_MIN_ELEMENTS):
        _routing.combine_kernel(out, weights, _ints(inverse), y)
    return y.astype(dtype, copy=False)


def combine_backward(dy, out, weights, inverse):
    """Adjoint of combine -> dout (R, d) in out's dtype, dweights (T, k) in weights' dtype."""
    out_dtype, w_dtype = np.asarray(out).dtype, np.asarray(weights).dtype
    work = _work_dtype(out_dtype)
    dy, out, weights, inverse = _floats(dy, work), _floats(out, work), _floats(weights, work), _ints(inverse)
    claimed = np.count_nonzero(inverse >= 0) == out.shape[0]  # a plan from route: every row claimed once
    dout = np.empty_like(out) if claimed else np.zeros_like(out)
    dweights = np.zeros_like(weights)
    with _threads_for(out.size, PARALLEL_MIN_ELEMENTS):
        _routing.combine_backward_kernel(dy, out, weights, inverse, dout, dweights)
    return dout.astype(out_dtype, copy=False), dweights.astype(w_dtype, copy=False)


# ---------------------------------------------------------------------------------------------------- expert FFN
def _plan(offsets):
    """The thread rule of the module docstring -> tiles, bins, slot_start (see _ffn.plan_tiles)."""
    threads = numba.get_num_threads()
    rows = int(offsets[-1] - offsets[0])
    tile_rows = rows if threads == 1 else max(-(-rows // (TILES_PER_THREAD * threads)), MIN_TILE_ROWS)
    return _ffn.plan_tiles(offsets, threads, max(tile_rows, 1))


def _act_code(activation):
    get_activation(activation)  # the reference's registry decides which names exist (same ValueError)
    return _ffn.ACT_CODES[activation]


def expert_ffn(xs, offsets, w1, b1, w2, b2, activation="gelu"):
    """Each expert's FFN on its rows: out = act(xs·W1[e] + b1[e])·W2[e] + b2[e].

    xs (R, d), offsets (E + 1,), w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out)
    -> out (R, d_out) and the pre-activation h (R, f), both in xs's dtype.
    """
    code = _act_code(activation)
    dtype = np.asarray(xs).dtype
    work = _work_dtype(dtype)
    xs, w1, b1, w2, b2 = (_floats(a, work) for a in (xs, w1, b1, w2, b2))
    offsets = _ints(offsets)
    R, f, d_out = xs.shape[0], w1.shape[2], w2.shape[2]
    h = np.empty((R, f), dtype=work)
    (a,) = _scratch(1, (R, f), work)  # act(h)
    out = np.empty((R, d_out), dtype=work)
    with _threads_for(4 * R * w1.shape[1] * f, PARALLEL_MIN_FLOPS):
        tiles, bins, _ = _plan(offsets)
        with _blas.limit(limits=1, user_api="blas"):  # BLAS threads inside prange would oversubscribe
            _ffn.ffn_forward(xs, w1, b1, w2, b2, code, tiles, bins, h, a, out)
    return out.astype(dtype, copy=False), h.astype(dtype, copy=False)


def expert_ffn_backward(dout, xs, h, offsets, w1, w2, activation="gelu"):
    """Adjoint of expert_ffn -> dxs (R, d), dw1 (E, d, f), db1 (E, f), dw2 (E, f, d_out), db2 (E, d_out).

    Weight gradients of experts with no rows are zero. dxs has xs's dtype, the weight gradients the weights'.
    """
    code = _act_code(activation)
    x_dtype, w_dtype = np.asarray(xs).dtype, np.asarray(w1).dtype
    work = _work_dtype(x_dtype)
    dout, xs, h, w1, w2 = (_floats(a, work) for a in (dout, xs, h, w1, w2))
    offsets = _ints(offsets)
    E, d, f = w1.shape
    d_out = w2.shape[2]
    g, slope = _scratch(2, h.shape, h.dtype)  # act(h), then dh; act'(h), computed with act(h) in one pass
    dxs = np.empty_like(xs) if offsets[0] == 0 and offsets[-1] == xs.shape[0] else np.zeros_like(xs)
    dw1, db1 = np.zeros((E, d, f), dtype=work), np.zeros((E, f), dtype=work)
    dw2, db2 = np.zeros((E, f, d_out), dtype=work), np.zeros((E, d_out), dtype=work)
    with _threads_for(4 * xs.shape[0] * d * f, PARALLEL_MIN_FLOPS):
        tiles, bins, slot_start = _plan(offsets)
        n = int(slot_start[-1])  # partial weight gradients of experts cut into several tiles
        sw1, sb1 = np.empty((n, d, f), dtype=work), np.empty((n, f), dtype=work)
        sw2, sb2 = np.empty((n, f, d_out), dtype=work), np.empty((n, d_out), dtype=work)
        with _blas.limit(limits=1, user_api="blas"):
            _ffn.ffn_backward(dout, xs, h, w1, w2, code, tiles, bins, g, slope, dxs, dw1, db1, dw2, db2, sw1, sb1,
                              sw2, sb2)
        if n:
            _ffn.reduce_slots(slot_start, dw1, db1, dw2, db2, sw1, sb1, sw2, sb2)
    return (dxs.astype(x_dtype, copy=False), *(a.astype(w_dtype, copy=False) for a in (dw1, db1, dw2, db2)))


# ---------------------------------------------------------------------------------------------------- dense GEMM
def dense_matmul(a, b):
    """The engine's 2-D product a @ b on numba's threads (see _gemm.py), or None for what it leaves to NumPy:
    other dtypes or layouts, mixed dtypes, one thread, or fewer than PARALLEL_MIN_FLOPS (NumPy's one-thread BLAS
    then, which is faster for small products than waking a worker).

    a (N, k) C-contiguous times b (k, n) C- or F-contiguous: row blocks. a an F-contiguous (k, N) view, i.e. xᵀ of
    a C-contiguous x (N, k), times g (N, n) C-contiguous: the weight gradient xᵀ·g, as split sums.
    Meant for inside `session()`, which routes the engine's products here with NumPy's BLAS already on one thread
    (BLAS threads inside numba's blocks would oversubscribe the cores)."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.ndim == 2 and b.ndim == 2
            and a.dtype == b.dtype and a.dtype in (np.float32, np.float64) and a.shape[1] == b.shape[0]):
        return None
    threads = numba.get_num_threads()
    m, inner, n = a.shape[0], a.shape[1], b.shape[1]
    if threads == 1 or 2.0 * m * inner * n < PARALLEL_MIN_FLOPS:
        return None
    if a.flags.c_contiguous and (b.flags.c_contiguous or b.flags.f_contiguous) and m >= threads:
        out = np.empty((m, n), dtype=a.dtype)
        _gemm.rows_kernel(a, b, out, _blocks(m, threads))
        return out
    if a.flags.f_contiguous and b.flags.c_contiguous and inner >= threads:  # xᵀ·g: split the sum over N = inner
        (parts,) = _scratch(1, (threads, m, n), a.dtype)  # every part is written whole before the sum reads it
        out = np.empty((m, n), dtype=a.dtype)
        _gemm.split_sum_kernel(a.T, b, parts, _blocks(inner, threads))
        _gemm.sum_parts(parts, out)
        return out
    return None


def _blocks(rows, count):
    """count + 1 block bounds over rows, as even as can be: [0, ..., rows]."""
    return (np.arange(count + 1, dtype=np.int64) * rows) // count


# ---------------------------------------------------------------------------------------------------- optimizer
def adam_step(p, g, m, v, b1, b2, eps, step_size, inv_root_bc2, decay) -> bool:
    """One fused in-place Adam(W) step on C-contiguous float32/float64 arrays of one shape and dtype:

        m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,  p ← decay·p − step_size·m / (√v·inv_root_bc2 + ε)

    (`tinymoe.optim.Adam` passes step_size = lr/(1 − β₁ᵗ), inv_root_bc2 = 1/√(1 − β₂ᵗ), decay = 1 − lr·wd.)
    Returns False, touching nothing, for arrays it does not take; the caller then runs the NumPy form."""
    arrays = (p, g, m, v)
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype == p.dtype and a.shape == p.shape
               for a in arrays) or p.dtype not in (np.float32, np.float64) or not p.flags.writeable:
        return False
    p, g, m, v = (a.reshape(-1) for a in arrays)
    kernel = _optim.adam_parallel if p.shape[0] >= _optim.PARALLEL_MIN else _optim.adam_serial
    kernel(p, g, m, v, float(b1), float(b2), float(eps), float(step_size), float(inv_root_bc2), float(decay))
    return True


# ---------------------------------------------------------------------------------------------------- session
@contextlib.contextmanager
def session():
    """The numba backend's context, held while it is the current backend (`tm.set_backend("numba")`,
    `tm.use_backend`): NumPy's BLAS pinned to one thread, and the engine's dense 2-D products
    (`Linear`, the attention projections, the router, the head) run on numba's threads (`dense_matmul`).

    Why: after each multi-threaded call OpenBLAS's worker threads busy-wait for about 0.1 s, and a numba expert
    kernel that starts in that window shares a core with the spinning worker: on 2 cores it ran at half speed, and a
    whole tm.nn.MoE layer called after a dense FFN at 1.44x that FFN's time (benchmarks/README.md). With NumPy's
    BLAS on one thread no worker spins, and the dense products keep every core through numba's pool, whose idle
    workers sleep.
    """
    with _blas.limit(limits=1, user_api="blas"), gemm_hook(dense_matmul):
        yield


# ---------------------------------------------------------------------------------------------------- warmup
_warm = False


def warmup():
    """Compile (or load from the disk cache) every kernel for float32 and float64 on tiny inputs; runs once."""
    global _warm, MIN_TILE_ROWS, PARALLEL_MIN_FLOPS, PARALLEL_MIN_ELEMENTS
    if _warm:
        return
    rng = np.random.default_rng(0)
    T, k, E, d, f = 4, 2, 2, 3, 5
    expert_idx = np.array([[0, 1], [1, 0], [0, 1], [1, 0]])
    order, offsets, inverse = route(expert_idx, E)
    capacity_keep(expert_idx, E, 3)
    capacity_keep(expert_idx, E, 3, np.ones((T, k)))
    saved = MIN_TILE_ROWS, PARALLEL_MIN_FLOPS, PARALLEL_MIN_ELEMENTS
    MIN_TILE_ROWS, PARALLEL_MIN_FLOPS, PARALLEL_MIN_ELEMENTS = 1, 0, 0  # tiles on all threads: compiles reduce_slots
    try:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((T, d)).astype(dtype)
            weights = rng.random((T, k)).astype(dtype)
            w1, b1 = rng.standard_normal((E, d, f)).astype(dtype), np.zeros((E, f), dtype)
            w2, b2 = rng.standard_normal((E, f, d)).astype(dtype), np.zeros((E, d), dtype)
            xs = gather(x, order, k)
            gather_backward(xs, inverse, k, T)
            out, h = expert_ffn(xs, offsets, w1, b1, w2, b2)
            expert_ffn_backward(out, xs, h, offsets, w1, w2)
            combine_backward(combine(out, weights, inverse), out, weights, inverse)
            a, g = rng.standard_normal((4, 3)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
            w = rng.standard_normal((3, 5)).astype(dtype)
            for b in (w, np.asfortranarray(w)):  # a·b with b C- or F-contiguous (the a·W and dy·Wᵀ products)
                _gemm.rows_kernel(a, b, np.empty((4, 5), dtype), _blocks(4, 2))
            parts = np.empty((2, 3, 5), dtype)
            _gemm.split_sum_kernel(a, g, parts, _blocks(4, 2))  # xᵀ·dy
            _gemm.sum_parts(parts, np.empty((3, 5), dtype))
            for kernel in (_optim.adam_serial, _optim.adam_parallel):
                kernel(*(np.zeros(4, dtype) for _ in range(4)), 0.9, 0.999, 1e-8, 1e-3, 1.0, 1.0)
    finally:
        MIN_TILE_ROWS, PARALLEL_MIN_FLOPS, PARALLEL_MIN_ELEMENTS = saved
    _warm = True
