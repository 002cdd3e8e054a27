"""Hypothesis strategies and helpers shared by the gradient tests (float64, small sides, bounded values)."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinymoe.gradcheck import check_grad

FLOATS = st.floats(-3, 3, allow_nan=False, allow_infinity=False, allow_subnormal=False)
NO_KINK_AT_ZERO = FLOATS.filter(lambda v: abs(v) > 1e-3)  # away from the kink of abs / relu / clip


def shapes(min_dims=1, max_dims=3, max_side=4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)


def arrays(shape=None, elements=FLOATS):
    return hnp.arrays(np.float64, shape if shape is not None else shapes(), elements=elements)


def scalarize(t):
    """sum(t * w) with fixed random weights w: every element matters, each with its own weight (a plain sum would
    send a gradient of ones, which a wrong permutation or scatter would pass)."""
    w = np.random.default_rng(int(np.prod(t.shape)) + 7 * t.ndim).standard_normal(t.shape)
    return (t * w).sum()


def grad_of(fn, *inputs):
    """check_grad on fn's output, reduced by `scalarize`."""
    return check_grad(lambda *ts: scalarize(fn(*ts)), inputs)
