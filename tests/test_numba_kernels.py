"""The numba backend's elementwise kernels against tinymoe.activations, value by value.

The expert FFN computes its activation in the arrays' precision (float32 arrays in float32, with a float32 exp)
and, in backward, act(h) and act'(h) in one pass from one exp. The layer-level tests (test_backends.py) compare
whole FFN outputs; these check the activation values themselves over a wide range, including the tails where
exp underflows, and NaN / inf.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe.activations import ACTIVATIONS

pytestmark = pytest.mark.skipif("numba" not in tm.backends.available(), reason="needs the numba backend")

# float32: a few ulp of the value, with an absolute floor for values near 0 (e.g. gelu' crossing zero)
TOL = {np.float32: (4e-6, 1e-6), np.float64: (1e-12, 1e-13)}


@pytest.fixture(scope="module")
def ffn():
    from tinymoe.backends.numba import _ffn

    return _ffn


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(scale=st.sampled_from([0.1, 1.0, 5.0, 30.0, 300.0]), seed=st.integers(0, 2**16))
def test_activation_and_derivative_match_the_reference(ffn, activation, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((7, 33)) * scale).astype(dtype)
    h[0, :6] = [0.0, -0.0, np.nan, np.inf, -np.inf, -0.7517916]  # gelu' ≈ 0 near -0.75
    code = ffn.ACT_CODES[activation]
    a, a2, d = np.empty_like(h), np.empty_like(h), np.empty_like(h)
    ffn.act_rows(h, a, 0, h.shape[0], code)
    ffn.act_both_rows(h, a2, d, 0, h.shape[0], code)
    fwd, grad = ACTIVATIONS[activation]
    with np.errstate(all="ignore"):
        want_a, want_d = fwd(h.astype(np.float64)), grad(h.astype(np.float64))  # the reference, in float64
    rtol, atol = TOL[dtype]
    np.testing.assert_array_equal(a, a2)  # one pass or two: the same values
    finite = np.isfinite(want_a)
    np.testing.assert_allclose(a[finite], want_a[finite], rtol=rtol, atol=atol)
    assert np.array_equal(np.isnan(a), np.isnan(want_a.astype(dtype)))
    assert np.array_equal(a[np.isinf(want_a)], want_a[np.isinf(want_a)].astype(dtype))
    finite = np.isfinite(want_d)
    np.testing.assert_allclose(d[finite], want_d[finite], rtol=rtol, atol=atol)
