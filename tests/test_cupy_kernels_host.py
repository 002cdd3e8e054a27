"""The cupy backend's CUDA kernels, run on the CPU: the very source in backends/cupy/_kernels.py, compiled as C++
with a few lines standing in for CUDA (blockIdx, threadIdx, ...) and launched one thread at a time.

That executes every kernel's index arithmetic, the inverse-map handling, the expert-of-row search, the activation
formulas, the warp-shuffle reduction and the shared-memory sums against the NumPy reference, on drawn shapes and
routings, with grids smaller than the work so the grid-stride loops wrap. Each CUDA thread of a block is a host
thread (a barrier stands in for __syncthreads, a per-warp barrier and a slot array for the shuffles), so the
cooperative kernels run too. It needs a C++20 compiler (skipped with the reason without one), not a GPU; it says
nothing about speed, memory coalescing or what NVRTC makes of the source (the NVRTC test and the GPU tests do).
"""
import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from tinymoe import dispatch as D
from tinymoe.activations import ACTIVATIONS, get_activation
from tinymoe.backends.cupy import _kernels
from cupy_standin import build_kernels, launch  # noqa: E402
from test_backends import routings  # noqa: E402



@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_kernels(tmp_path_factory.mktemp("kernels"))


def call(lib, name, dtype, n, *args, block=32, max_grid=3):
    """Launch grid-stride kernel `name` for `dtype` over n items with at most max_grid blocks (so the loops wrap)."""
    launch(lib, name, dtype, (max(1, min(-(-n // block), max_grid)),), (block,), args)


def call_dims(lib, name, dtype, dims, *args):
    """Launch kernel `name` with grid dims[0] and block dims[1] (segment_column_sums: grid (dims), block (32, 8))."""
    if name == "segment_column_sums":
        launch(lib, name, dtype, dims, (32, _kernels.SUM_LANES), args)
    else:
        launch(lib, name, dtype, (dims[0],), (dims[1],), args)


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
