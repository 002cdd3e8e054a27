"""The numba expert kernels' scratch memory is reused between calls (backends/numba `_scratch`): whatever a previous
call left there must never reach a result. Drawn shapes are run after the scratch is filled with NaN bytes, and
after calls of other shapes, and must give bitwise what a fresh buffer gives."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm

pytestmark = pytest.mark.skipif("numba" not in tm.backends.available(),
                                reason=tm.backends.unavailable().get("numba", ""))


@pytest.fixture(scope="module")
def nb():
    module = tm.backends.load("numba")
    module.warmup()
    return module


def _layer(seed, R, d, f, E, dtype):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(rng.multinomial(R, np.ones(E) / E))])
    arrays = [rng.standard_normal(s).astype(dtype) for s in ((R, d), (E, d, f), (E, f), (E, f, d), (E, d), (R, d))]
    return offsets, arrays


def _both(nb, offsets, arrays, activation):
    xs, w1, b1, w2, b2, dout = arrays
    out, h = nb.expert_ffn(xs, offsets, w1, b1, w2, b2, activation)
    return [out, h, *nb.expert_ffn_backward(dout, xs, h, offsets, w1, w2, activation)]


@given(R=st.integers(0, 300), d=st.integers(1, 24), f=st.integers(1, 40), E=st.integers(1, 6),
       dtype=st.sampled_from([np.float32, np.float64]), activation=st.sampled_from(["relu", "gelu", "silu"]),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_stale_scratch_never_reaches_a_result(nb, R, d, f, E, dtype, activation, seed):
    offsets, arrays = _layer(seed, R, d, f, E, dtype)
    nb._scratch_memory.buffer = None  # a fresh buffer
    fresh = _both(nb, offsets, arrays, activation)
    nb._scratch_memory.buffer.fill(0xFF)  # NaN in every float the last call left behind
    poisoned = _both(nb, offsets, arrays, activation)
    other_offsets, other = _layer(seed + 1, R + 7, d + 1, f + 3, E, dtype)
    _both(nb, other_offsets, other, activation)  # a call of another shape in between
    again = _both(nb, offsets, arrays, activation)
    for a, b, c in zip(fresh, poisoned, again):
        assert np.array_equal(a, b, equal_nan=True) and np.array_equal(a, c, equal_nan=True)
        assert not np.isnan(a).any()


def test_the_buffer_is_kept_and_grows_only_when_a_call_needs_more(nb):
    nb._scratch_memory.buffer = None
    big = _layer(0, 256, 8, 64, 4, np.float32)
    small = _layer(1, 32, 8, 16, 4, np.float32)
    _both(nb, *big, "gelu")
    kept = nb._scratch_memory.buffer
    assert kept.nbytes >= 2 * 256 * 64 * 4  # the backward's two (R, f) arrays
    _both(nb, *small, "gelu")
    assert nb._scratch_memory.buffer is kept
    a, b = nb._scratch(2, (5, 3), np.float64)
    assert a.ctypes.data % nb._ALIGN == 0 and b.ctypes.data % nb._ALIGN == 0 and a.flags.c_contiguous
    assert not np.shares_memory(a, b)
