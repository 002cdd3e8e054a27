"""The cupy backend's own code, end to end, on the CPU: NumPy standing in for CuPy, its CUDA kernels compiled for
the host (tests/cupy_standin.py) and a host stand-in for cuBLAS — the same checks as the GPU tests of
tests/test_cupy_backend.py (every primitive against the NumPy reference on drawn routings and shapes, the
strided-batched and per-expert GEMM paths, bitwise reruns).

This proves the backend's Python (routing by stable sort and binary search, the host offsets, the kernel argument
lists and launch shapes, the GEMM bookkeeping) and its kernels' arithmetic agree with the reference. It proves
nothing about CuPy's real behaviour, NVRTC, cuBLAS or the GPU: those only the GPU tests can show.
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np
from cupy_standin import build_kernels, standin  # noqa: E402
from test_backends import routings  # noqa: E402
from test_cupy_backend import EXPERT_COUNTS, check_bitwise, check_expert_counts, check_primitives, primitive_cases


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_kernels(tmp_path_factory.mktemp("kernels"))


@given(**primitive_cases)
@settings(max_examples=15)
def test_primitives_match_reference(lib, routing, cf, by_weight, dtype, d, f, d_out, activation, seed):
    with standin(lib):
        check_primitives(routing, cf, by_weight, dtype, d, f, d_out, activation, seed)


@pytest.mark.parametrize("counts", EXPERT_COUNTS)
def test_expert_ffn_equal_and_uneven_experts(lib, counts):
    with standin(lib):
        check_expert_counts(counts)


@given(routing=routings(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
@settings(max_examples=5)
def test_two_runs_are_bitwise_equal(lib, routing, dtype, seed):
    with standin(lib):
        check_bitwise(routing, dtype, seed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adam_step_matches_the_formula(lib, dtype):
    """The adam_step kernel: m, v and p as tinymoe.optim.Adam's formula computes them in float64; host arrays are
    refused (False, untouched) so the optimizer falls back to its own form."""
    from tinymoe.backends import cupy as cupy_backend

    rng = np.random.default_rng(0)
    p, g, m = (rng.standard_normal(1000).astype(dtype) for _ in range(3))
    v = rng.random(1000).astype(dtype)
    b1, b2, eps, step, inv, decay = 0.9, 0.999, 1e-8, 1e-3 / (1 - 0.9**3), 1 / np.sqrt(1 - 0.999**3), 1 - 1e-3 * 0.01
    mm = b1 * m.astype(np.float64) + (1 - b1) * g
    vv = b2 * v.astype(np.float64) + (1 - b2) * g.astype(np.float64) ** 2
    want_p = decay * p.astype(np.float64) - step * mm / (np.sqrt(vv) * inv + eps)
    with standin(lib) as fake:
        assert cupy_backend.adam_step(p, g, m, v, b1, b2, eps, step, inv, decay) is False  # host arrays
        dp, dg, dm, dv = (fake.asarray(a) for a in (p, g, m, v))
        assert cupy_backend.adam_step(dp, dg, dm, dv, b1, b2, eps, step, inv, decay) is True
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(dm, mm, rtol=tol)
    np.testing.assert_allclose(dv, vv, rtol=tol)
    np.testing.assert_allclose(dp, want_p, rtol=tol, atol=tol)
