"""The cupy backend's CUDA kernels, run on the CPU: the very source in backends/cupy/_kernels.py, compiled as C++
with a few lines standing in for CUDA (blockIdx, threadIdx, ...) and launched one thread at a time.

That executes every kernel's index arithmetic, the inverse-map handling, the expert-of-row search, the activation
formulas, the warp-shuffle reduction and the shared-memory sums against the NumPy reference, on drawn shapes and
routings, with grids smaller than the work so the grid-stride loops wrap. Each CUDA thread of a block is a host
thread (a barrier stands in for __syncthreads, a per-warp barrier and a slot array for the shuffles), so the
cooperative kernels run too. It needs a C++20 compiler (skipped with the reason without one), not a GPU; it says
nothing about speed, memory coalescing or what NVRTC makes of the source (the NVRTC test and the GPU tests do).
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from tinymoe import dispatch as D
from tinymoe.activations import ACTIVATIONS, get_activation
from tinymoe.backends.cupy import _kernels
from test_backends import routings  # noqa: E402

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

SHIM = r"""
// just enough CUDA to run the kernels on the host: one std::thread per CUDA thread of a block (blocks in turn),
// a barrier for __syncthreads, and warp shuffles through a shared slot array and a per-warp barrier
#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>
using std::exp; using std::tanh; using std::fabs;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static thread_local unsigned linear_id;
static Dim3 blockDim, gridDim;
static std::barrier<>* block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static double slots[1024];
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <typename F> F __shfl_down_sync(unsigned, F v, int offset) {  // lane + offset past the warp: own value
    unsigned warp = linear_id / 32, lane = linear_id % 32;
    slots[linear_id] = (double)v;
    warp_barriers[warp]->arrive_and_wait();
    F r = lane + offset < 32 ? (F)slots[warp * 32 + lane + offset] : v;
    warp_barriers[warp]->arrive_and_wait();
    return r;
}

template <typename K, typename... A>
void launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, K kernel, A... args) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    unsigned n = bx * by;  // a multiple of 32 here
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            std::barrier<> block(n);
            block_barrier = &block;
            warp_barriers.clear();
            for (unsigned w = 0; w < n / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
            std::vector<std::thread> threads;
            for (unsigned ty = 0; ty < by; ++ty)
                for (unsigned tx = 0; tx < bx; ++tx)
                    threads.emplace_back([=] {
                        threadIdx = {tx, ty, 0};
                        blockIdx = {x, y, 0};
                        linear_id = ty * bx + tx;
                        kernel(args...);
                    });
            for (auto& t : threads) t.join();
        }
}
"""

WRAPPERS = r"""
#define LL long long
#define WRAPPERS(F, S) \
extern "C" void gather_rows_##S(unsigned g, unsigned b, const F* x, const LL* order, LL k, LL R, LL d, F* xs) \
    { launch(g, 1, b, 1, gather_rows<F>, x, order, k, R, d, xs); } \
extern "C" void gather_rows_backward_##S(unsigned g, unsigned b, const F* dxs, const LL* inv, LL k, LL T, LL d, F* dx) \
    { launch(g, 1, b, 1, gather_rows_backward<F>, dxs, inv, k, T, d, dx); } \
extern "C" void combine_rows_##S(unsigned g, unsigned b, const F* out, const F* w, const LL* inv, LL k, LL T, LL d, \
                                 F* y) { launch(g, 1, b, 1, combine_rows<F>, out, w, inv, k, T, d, y); } \
extern "C" void combine_backward_rows_##S(unsigned g, unsigned b, const F* dy, const F* w, const LL* inv, LL k, \
                                          LL n, LL d, F* dout) \
    { launch(g, 1, b, 1, combine_backward_rows<F>, dy, w, inv, k, n, d, dout); } \
extern "C" void combine_backward_weights_##S(unsigned g, unsigned b, const F* dy, const F* out, const LL* inv, LL k, \
                                             LL n, LL d, F* dw) \
    { launch(g, 1, b, 1, combine_backward_weights<F>, dy, out, inv, k, n, d, dw); } \
extern "C" void bias_act_##S(unsigned g, unsigned b, const F* in, const F* bias, const LL* offsets, int E, LL R, LL n, \
                             int act, F* pre, F* post) \
    { launch(g, 1, b, 1, bias_act<F>, in, bias, offsets, E, R, n, act, pre, post); } \
extern "C" void act_grad_mul_##S(unsigned g, unsigned b, F* gr, const F* h, LL n, int act) \
    { launch(g, 1, b, 1, act_grad_mul<F>, gr, h, n, act); } \
extern "C" void segment_column_sums_##S(unsigned gx, unsigned gy, const F* x, const LL* offsets, LL n, F* out) \
    { launch(gx, gy, 32, 8, segment_column_sums<F>, x, offsets, n, out); }
WRAPPERS(float, f32)
WRAPPERS(double, f64)
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) to run the CUDA kernels on the host")
    folder = tmp_path_factory.mktemp("kernels")
    src, so = folder / "kernels_host.cpp", folder / "kernels_host.so"
    src.write_text(SHIM + _kernels.SOURCE + WRAPPERS)
    done = subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(src), "-o", str(so)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return ctypes.CDLL(str(so))


def _c_args(args):
    """ctypes arguments: arrays by address, None as a null pointer, np.int32 as int, other numbers as long long."""
    converted = []
    for a in args:
        if a is None:
            converted.append(ctypes.c_void_p(0))
        elif isinstance(a, np.ndarray):
            assert a.flags.c_contiguous
            converted.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, np.int32):
            converted.append(ctypes.c_int(int(a)))
        else:
            converted.append(ctypes.c_longlong(int(a)))
    return converted


def call(lib, name, dtype, n, *args, block=32, max_grid=3):
    """Launch grid-stride kernel `name` for `dtype` over n items with at most max_grid blocks (so the loops wrap)."""
    grid = max(1, min(-(-n // block), max_grid))
    getattr(lib, f"{name}_{SUFFIX[np.dtype(dtype)]}")(ctypes.c_uint(grid), ctypes.c_uint(block), *_c_args(args))


def call_dims(lib, name, dtype, dims, *args):
    """Launch kernel `name` with its wrapper's leading launch dimensions `dims` as given."""
    getattr(lib, f"{name}_{SUFFIX[np.dtype(dtype)]}")(*(ctypes.c_uint(v) for v in dims), *_c_args(args))


SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
TOL = {np.float32: 2e-6, np.float64: 1e-13}


@given(routing=routings(), dtype=st.sampled_from([np.float32, np.float64]), d=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_dispatch_kernels_match_reference(lib, routing, dtype, d, seed):
    idx, keep, priority, E = routing
    T, k = idx.shape
    order, offsets, inverse = D.route(idx, E, keep)
    R = order.size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d)).astype(dtype)
    note(f"T={T} k={k} E={E} R={R} d={d}")

    xs = np.full((R, d), np.nan, dtype)
    call(lib, "gather_rows", dtype, R * d, x, order, k, R, d, xs)  # grids of at most 3 blocks of 32: loops wrap
    np.testing.assert_array_equal(xs, D.gather(x, order, k))

    dxs = rng.standard_normal((R, d)).astype(dtype)
    dx = np.full((T, d), np.nan, dtype)
    call(lib, "gather_rows_backward", dtype, T * d, dxs, inverse, k, T, d, dx)
    np.testing.assert_allclose(dx, D.gather_backward(dxs, inverse, k, T), rtol=TOL[dtype], atol=TOL[dtype])

    weights = priority.astype(dtype)
    y = np.full((T, d), np.nan, dtype)
    call(lib, "combine_rows", dtype, T * d, dxs, weights, inverse, k, T, d, y)
    np.testing.assert_allclose(y, D.combine(dxs, weights, inverse), rtol=TOL[dtype], atol=TOL[dtype])

    dy = rng.standard_normal((T, d)).astype(dtype)
    dout = np.zeros((R, d), dtype)  # the backend zero-fills it: rows no assignment claims stay 0
    call(lib, "combine_backward_rows", dtype, T * k * d, dy, weights, inverse, k, T * k, d, dout)
    np.testing.assert_allclose(dout, D.combine_backward(dy, dxs, weights, inverse)[0], rtol=TOL[dtype],
                               atol=TOL[dtype])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=6), n=st.integers(1, 7),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_bias_activation_kernels_match_reference(lib, activation, counts, n, dtype, seed):
    """bias_act adds each row's own expert's bias (empty experts skipped) and applies the activation; act_grad_mul
    multiplies by the derivative; the identity code adds the bias alone; with no bias it is act(h) on every row."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    E, R = len(counts), int(offsets[-1])
    rng = np.random.default_rng(seed)
    h0 = (3 * rng.standard_normal((R, n))).astype(dtype)
    bias = rng.standard_normal((E, n)).astype(dtype)
    code = _kernels.ACT_CODES[activation]
    act, act_grad = get_activation(activation)
    want_h = h0 + bias[np.repeat(np.arange(E), counts)]

    h, a = h0.copy(), np.full((R, n), np.nan, dtype)
    call(lib, "bias_act", dtype, R * n, h, bias, offsets, np.int32(E), R, n, np.int32(code), h, a)
    np.testing.assert_allclose(h, want_h, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(a, act(want_h), rtol=10 * TOL[dtype], atol=10 * TOL[dtype])

    out = h0.copy()
    call(lib, "bias_act", dtype, R * n, out, bias, offsets, np.int32(E), R, n, np.int32(_kernels.IDENTITY), out, None)
    np.testing.assert_allclose(out, want_h, rtol=TOL[dtype], atol=TOL[dtype])

    a2 = np.full((R, n), np.nan, dtype)
    call(lib, "bias_act", dtype, R * n, h0, None, offsets, np.int32(E), R, n, np.int32(code), None, a2)
    np.testing.assert_allclose(a2, act(h0), rtol=10 * TOL[dtype], atol=10 * TOL[dtype])

    g0 = rng.standard_normal((R, n)).astype(dtype)
    g = g0.copy()
    call(lib, "act_grad_mul", dtype, R * n, g, h0, R * n, np.int32(code))
    np.testing.assert_allclose(g, g0 * act_grad(h0), rtol=10 * TOL[dtype], atol=10 * TOL[dtype])


def test_relu_keeps_nan_and_rows_outside_the_experts_are_left_alone(lib):
    offsets = np.array([1, 3], np.int64)  # row 0 and row 3 belong to no expert
    h = np.array([[5.0], [np.nan], [-1.0], [7.0]], np.float32)
    a = np.full((4, 1), -9.0, np.float32)
    bias = np.zeros((1, 1), np.float32)
    call(lib, "bias_act", np.float32, 4, h, bias, offsets, np.int32(1), 4, 1, np.int32(0), h, a)
    assert np.isnan(h[1, 0]) and np.isnan(a[1, 0]) and a[2, 0] == 0.0
    assert a[0, 0] == -9.0 and a[3, 0] == -9.0 and h[0, 0] == 5.0 and h[3, 0] == 7.0


@given(T=st.integers(1, 12), E=st.integers(1, 6), k_frac=st.floats(0, 1), d=st.integers(1, 70), masked=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_combine_weight_gradient_kernel_matches_reference(lib, T, E, k_frac, d, masked, dtype, seed):
    """One warp per assignment, lanes striding the columns, a shuffle tree (d crosses 32 and 64 columns)."""
    k = 1 + int(k_frac * (E - 1))
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    keep = rng.random((T, k)) < 0.7 if masked else None
    order, _, inverse = D.route(idx, E, keep)
    out = rng.standard_normal((order.size, d)).astype(dtype)
    dy = rng.standard_normal((T, d)).astype(dtype)
    weights = rng.random((T, k)).astype(dtype)
    dw = np.full((T, k), np.nan, dtype)
    warps = 2  # per block of 64 threads
    call_dims(lib, "combine_backward_weights", dtype, (-(-(T * k) // warps), 32 * warps), dy, out, inverse, k, T * k,
              d, dw)
    ref = D.combine_backward(dy, out, weights, inverse)[1]
    np.testing.assert_allclose(dw, ref, rtol=10 * TOL[dtype], atol=10 * TOL[dtype] * np.sqrt(d))


@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=5), n=st.integers(1, 70),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_segment_column_sums_kernel_matches_reference(lib, counts, n, dtype, seed):
    """Per-expert column sums: blocks of 32 columns x 8 row lanes, a barrier, lanes added in order; 0 when empty."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    E = len(counts)
    x = np.random.default_rng(seed).standard_normal((int(offsets[-1]), n)).astype(dtype)
    out = np.full((E, n), np.nan, dtype)
    call_dims(lib, "segment_column_sums", dtype, (-(-n // 32), E), x, offsets, n, out)
    ref = np.stack([x[offsets[e]:offsets[e + 1]].sum(axis=0) for e in range(E)])
    np.testing.assert_allclose(out, ref, rtol=10 * TOL[dtype], atol=10 * TOL[dtype])
