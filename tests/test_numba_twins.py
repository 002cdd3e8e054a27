"""The numba backend's scalar activation twins (backends/numba/_ffn.py) equal the one reference definition of each
in tinymoe.activations, on drawn values and at the edges (0, ±large, NaN)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinymoe import activations as A

pytest.importorskip("numba")
from tinymoe.backends.numba import _ffn  # noqa: E402

TWINS = {  # numba scalar twin -> the reference function(s) it mirrors (the *_both twins return (act, act'))
    "_sigmoid": A.sigmoid, "_gelu": A.gelu, "_gelu_both": (A.gelu, A.gelu_grad), "_silu": A.silu,
    "_silu_both": (A.silu, A.silu_grad), "_relu": A.relu, "_relu_grad": A.relu_grad,
}
EDGES = [0.0, -0.0, 1e-300, -1e-300, 1.0, -1.0, 30.0, -30.0, 700.0, -700.0, 1e6, -1e6]


def check(name, values):
    twin, refs = getattr(_ffn, name), TWINS[name]
    refs = refs if isinstance(refs, tuple) else (refs,)
    got = np.array([twin(float(v)) for v in values]).reshape(len(values), len(refs))
    for i, ref in enumerate(refs):
        want = ref(np.asarray(values, dtype=np.float64))
        # the tanh form of GELU loses relative accuracy where gelu(v) ≈ 0 (1 + tanh z cancels): hence the atol
        np.testing.assert_allclose(got[:, i], want, rtol=1e-12, atol=1e-14, err_msg=f"{name}[{i}]")


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_equals_reference_at_edges(name):
    check(name, EDGES)


@pytest.mark.parametrize("name", sorted(TWINS))
@given(values=st.lists(st.floats(-40, 40, allow_nan=False), min_size=1, max_size=32))
def test_twin_equals_reference_on_drawn_values(name, values):
    check(name, values)


@pytest.mark.parametrize("name", ["_sigmoid", "_gelu", "_silu", "_relu"])
def test_twin_keeps_nan(name):
    assert np.isnan(getattr(_ffn, name)(float("nan")))
