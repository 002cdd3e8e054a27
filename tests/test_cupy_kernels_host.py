"""The cupy backend's CUDA kernels, run on the CPU: the very source in backends/cupy/_kernels.py, compiled as C++
with a few lines standing in for CUDA (blockIdx, threadIdx, ...) and launched one thread at a time.

That executes the index arithmetic, the inverse-map handling, the expert-of-row search and the activation formulas
of the element-wise kernels (gather_rows, gather_rows_backward, combine_rows, combine_backward_rows, bias_act,
act_grad_mul) against the NumPy reference, on drawn shapes and routings, with grids smaller than the work so the
grid-stride loops wrap. It needs a C++ compiler (skipped with the reason without one), not a GPU. The two kernels
whose threads cooperate (combine_backward_weights: warp shuffles; segment_column_sums: shared memory and a
barrier) cannot run one thread at a time: only the GPU tests (tests/test_cupy_backend.py) run them.
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
// just enough CUDA for the element-wise kernels to compile and run on the host, one thread at a time
#include <cmath>
using std::exp; using std::tanh; using std::fabs;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() {}
template <typename F> F __shfl_down_sync(unsigned, F v, int) { return v; }  // compiled, never run here

template <typename K, typename... A>
void launch(unsigned grid, unsigned block, K kernel, A... args) {
    gridDim.x = grid; blockDim.x = block; blockDim.y = 1;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) { blockIdx.x = b; threadIdx.x = t; kernel(args...); }
}
"""

WRAPPERS = r"""
#define LL long long
#define WRAPPERS(F, S) \
extern "C" void gather_rows_##S(unsigned g, unsigned b, const F* x, const LL* order, LL k, LL R, LL d, F* xs) \
    { launch(g, b, gather_rows<F>, x, order, k, R, d, xs); } \
extern "C" void gather_rows_backward_##S(unsigned g, unsigned b, const F* dxs, const LL* inv, LL k, LL T, LL d, F* dx) \
    { launch(g, b, gather_rows_backward<F>, dxs, inv, k, T, d, dx); } \
extern "C" void combine_rows_##S(unsigned g, unsigned b, const F* out, const F* w, const LL* inv, LL k, LL T, LL d, \
                                 F* y) { launch(g, b, combine_rows<F>, out, w, inv, k, T, d, y); } \
extern "C" void combine_backward_rows_##S(unsigned g, unsigned b, const F* dy, const F* w, const LL* inv, LL k, \
                                          LL n, LL d, F* dout) \
    { launch(g, b, combine_backward_rows<F>, dy, w, inv, k, n, d, dout); } \
extern "C" void bias_act_##S(unsigned g, unsigned b, const F* in, const F* bias, const LL* offsets, int E, LL R, LL n, \
                             int act, F* pre, F* post) \
    { launch(g, b, bias_act<F>, in, bias, offsets, E, R, n, act, pre, post); } \
extern "C" void act_grad_mul_##S(unsigned g, unsigned b, F* gr, const F* h, LL n, int act) \
    { launch(g, b, act_grad_mul<F>, gr, h, n, act); }
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
    done = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", str(src), "-o", str(so)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return ctypes.CDLL(str(so))


SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


def call(lib, name, dtype, n, *args, block=32, max_grid=3):
    """Launch kernel `name` for `dtype` over n items with at most max_grid blocks (so grid-stride loops wrap)."""
    grid = max(1, min(-(-n // block), max_grid))
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
    getattr(lib, f"{name}_{SUFFIX[np.dtype(dtype)]}")(ctypes.c_uint(grid), ctypes.c_uint(block), *converted)


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
    call(lib, "gather_rows", dtype, R * d, x, order, k, R, d, xs)
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
