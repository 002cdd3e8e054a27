"""The autodiff engine: every op's forward against NumPy and its gradient against central finite differences.

Gradients are checked in float64 on hypothesis-drawn shapes (sides 1..4) and bounded values ([-3, 3]; positive
where the op needs it; away from kinks for abs/relu/clip/max, where the derivative does not exist). A
non-scalar output is reduced with fixed random weights, never a plain sum: a plain sum sends a gradient of
ones, which a wrong permutation or a wrong scatter would pass.
"""
import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinymoe as tm
from tinymoe import Tensor
from tinymoe.gradcheck import check_grad, check_vjp

from strategies import FLOATS, NO_KINK_AT_ZERO, arrays, grad_of, scalarize, shapes  # noqa: F401

# ---------------------------------------------------------------- strategies and helpers

POSITIVE = st.floats(0.5, 3, allow_subnormal=False)
AWAY_FROM_ZERO = st.one_of(st.floats(0.5, 3), st.floats(-3, -0.5))


@st.composite
def broadcast_pair(draw, elements_a=FLOATS, elements_b=FLOATS):
    """Two arrays whose shapes broadcast (scalars, size-1 axes and missing leading axes included)."""
    sa, sb = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)).input_shapes
    a, b = draw(arrays(sa, elements_a)), draw(arrays(sb, elements_b))
    note(f"shapes {sa} and {sb}")
    return a, b


@st.composite
def distinct_values(draw, shape=None):
    """An array whose entries are pairwise at least 0.3 apart (so max has no ties and no near-ties)."""
    shape = draw(shape if shape is not None else shapes())
    n = int(np.prod(shape))
    perm = np.array(draw(st.permutations(range(n))), dtype=np.float64)
    jitter = draw(arrays((n,), st.floats(0, 0.2)))
    return ((perm + jitter) * (6.0 / max(n, 1)) - 3.0).reshape(shape)


# ---------------------------------------------------------------- elementwise binary ops (with broadcasting)

BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
}


@pytest.mark.parametrize("name", BINARY)
@given(pair=broadcast_pair())
def test_binary_op_forward_and_grad(name, pair):
    op, ref = BINARY[name]
    a, b = pair
    out = op(Tensor(a), Tensor(b))
    np.testing.assert_allclose(out.data, ref(a, b), rtol=1e-12, atol=0)
    assert out.shape == np.broadcast_shapes(a.shape, b.shape)
    grad_of(op, a, b)


@given(pair=broadcast_pair(FLOATS, AWAY_FROM_ZERO))
def test_div_forward_and_grad(pair):
    a, b = pair
    np.testing.assert_allclose((Tensor(a) / Tensor(b)).data, a / b, rtol=1e-12)
    grad_of(lambda x, y: x / y, a, b)


@given(x=arrays(elements=AWAY_FROM_ZERO), c=st.floats(0.5, 2))
def test_reflected_ops_with_python_scalars(x, c):
    """c - x, c / x, c * x, c + x with the scalar on the left (the __r*__ methods)."""
    for op in (lambda t: c - t, lambda t: c / t, lambda t: c * t, lambda t: c + t):
        np.testing.assert_allclose(op(Tensor(x)).data, op(x), rtol=1e-12)
        grad_of(op, x)


@given(x=arrays())
def test_neg(x):
    np.testing.assert_array_equal((-Tensor(x)).data, -x)
    grad_of(lambda t: -t, x)


@pytest.mark.parametrize("exponent", [2, 3, 1])
@given(x=arrays())
def test_pow_integer_exponent_any_sign(exponent, x):
    np.testing.assert_allclose((Tensor(x) ** exponent).data, x**exponent, rtol=1e-12)
    grad_of(lambda t: t**exponent, x)


@pytest.mark.parametrize("exponent", [-1, -2])
@given(x=arrays(elements=AWAY_FROM_ZERO))
def test_pow_negative_exponent(exponent, x):
    np.testing.assert_allclose((Tensor(x) ** exponent).data, x**exponent, rtol=1e-12)
    grad_of(lambda t: t**exponent, x)


@pytest.mark.parametrize("exponent", [0.5, 1.5, -0.5, 2.5])
@given(x=arrays(elements=POSITIVE))
def test_pow_fractional_exponent_positive_base(exponent, x):
    np.testing.assert_allclose((Tensor(x) ** exponent).data, x**exponent, rtol=1e-12)
    grad_of(lambda t: t**exponent, x)


@given(pair=broadcast_pair(POSITIVE, st.floats(-2, 2)))
def test_pow_tensor_exponent(pair):
    base, exponent = pair
    np.testing.assert_allclose((Tensor(base) ** Tensor(exponent)).data, base**exponent, rtol=1e-12)
    grad_of(lambda a, b: a**b, base, exponent)


@given(x=arrays(elements=st.floats(-2, 2)))
def test_rpow_scalar_base(x):
    np.testing.assert_allclose((2.0 ** Tensor(x)).data, 2.0**x, rtol=1e-12)
    grad_of(lambda t: 2.0**t, x)


def test_pow_zero_exponent_has_zero_gradient_everywhere():
    """d/dx x**0 = 0, also at x = 0 (where x**(0-1) is inf and 0·inf would give NaN)."""
    x = Tensor(np.array([0.0, 1.5, -2.0]), requires_grad=True)
    (x**0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 0.0])


def test_pow_rejects_a_non_number_exponent():
    with pytest.raises(TypeError, match="pow"):
        Tensor([1.0, 2.0]) ** "2"


# ---------------------------------------------------------------- matmul

MATMUL_CASES = {  # name -> (shape of a, shape of b) from the sides (b, n, k, m)
    "2d": lambda b, n, k, m: ((n, k), (k, m)),
    "batched": lambda b, n, k, m: ((b, n, k), (b, k, m)),
    "broadcast batch": lambda b, n, k, m: ((b, 1, n, k), (2, k, m)),
    "2d with batch": lambda b, n, k, m: ((n, k), (b, k, m)),
    "1d @ 2d": lambda b, n, k, m: ((k,), (k, m)),
    "2d @ 1d": lambda b, n, k, m: ((n, k), (k,)),
    "1d @ 1d": lambda b, n, k, m: ((k,), (k,)),
    "1d @ 3d": lambda b, n, k, m: ((k,), (b, k, m)),
    "3d @ 1d": lambda b, n, k, m: ((b, n, k), (k,)),
}


@pytest.mark.parametrize("case", MATMUL_CASES)
@given(sides=st.tuples(*[st.integers(1, 3)] * 4), data=st.data())
def test_matmul_forward_and_grad(case, sides, data):
    sa, sb = MATMUL_CASES[case](*sides)
    a, b = data.draw(arrays(sa)), data.draw(arrays(sb))
    out = Tensor(a) @ Tensor(b)
    expected = np.matmul(a, b)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-12)
    grad_of(lambda x, y: x @ y, a, b)


def test_matmul_with_a_constant_ndarray_on_either_side():
    a = np.arange(6.0).reshape(2, 3)
    w = Tensor(np.ones((3, 2)), requires_grad=True)
    (a @ w).sum().backward()  # ndarray @ Tensor -> __rmatmul__
    np.testing.assert_allclose(w.grad, np.repeat(a.sum(0)[:, None], 2, axis=1))


# ---------------------------------------------------------------- unary ops


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


UNARY = {  # name -> (engine, reference, elements)
    "exp": (lambda t: t.exp(), np.exp, FLOATS),
    "log": (lambda t: t.log(), np.log, POSITIVE),
    "tanh": (lambda t: t.tanh(), np.tanh, FLOATS),
    "sigmoid": (lambda t: t.sigmoid(), _sigmoid, FLOATS),
    "sqrt": (lambda t: t.sqrt(), np.sqrt, POSITIVE),
    "abs": (lambda t: t.abs(), np.abs, NO_KINK_AT_ZERO),
    "relu": (lambda t: t.relu(), lambda x: np.maximum(x, 0), NO_KINK_AT_ZERO),
}


@pytest.mark.parametrize("name", UNARY)
@given(data=st.data())
def test_unary_forward_and_grad(name, data):
    op, ref, elements = UNARY[name]
    x = data.draw(arrays(elements=elements))
    np.testing.assert_allclose(op(Tensor(x)).data, ref(x), rtol=1e-12, atol=1e-15)
    grad_of(op, x)


@given(x=arrays(), low=st.floats(-2, 0), width=st.floats(0.5, 3))
def test_clip_forward_and_grad(x, low, width):
    high = low + width
    assume(np.all(np.abs(x - low) > 1e-3) and np.all(np.abs(x - high) > 1e-3))  # no kink within eps
    np.testing.assert_array_equal(Tensor(x).clip(low, high).data, np.clip(x, low, high))
    grad = grad_of(lambda t: t.clip(low, high), x)[0]
    assert np.all(grad[(x < low) | (x > high)] == 0)  # clipped entries pass no gradient


def test_clip_one_sided():
    x = Tensor(np.array([-2.0, 0.5, 3.0]), requires_grad=True)
    y = x.clip(low=0.0)
    np.testing.assert_array_equal(y.data, [0.0, 0.5, 3.0])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 1.0, 1.0])


def test_sigmoid_is_stable_in_both_tails():
    x = Tensor(np.array([-1000.0, -100.0, 0.0, 100.0, 1000.0]), requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine; overflow is not
        y = x.sigmoid()
        y.sum().backward()
    np.testing.assert_allclose(y.data, [0.0, np.exp(-100.0), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)
    # σ' = σ(1 - σ): exact in the left tail; 1 - σ(100) rounds to 0 in float64, so only "tiny" on the right
    np.testing.assert_allclose(x.grad, [0.0, np.exp(-100.0), 0.25, 0.0, 0.0], rtol=1e-6, atol=1e-40)


# ---------------------------------------------------------------- reductions


@st.composite
def array_and_axis(draw, elements=FLOATS, values=None):
    x = draw(values) if values is not None else draw(arrays(elements=elements))
    axis = draw(st.one_of(st.none(), st.integers(-x.ndim, x.ndim - 1), hnp.valid_tuple_axes(x.ndim, min_size=1)))
    keepdims = draw(st.booleans())
    note(f"shape {x.shape}, axis {axis}, keepdims {keepdims}")
    return x, axis, keepdims


REDUCTIONS = {
    "sum": (lambda t, axis, kd: t.sum(axis=axis, keepdims=kd), lambda x, axis, kd: x.sum(axis=axis, keepdims=kd)),
    "mean": (lambda t, axis, kd: t.mean(axis=axis, keepdims=kd), lambda x, axis, kd: x.mean(axis=axis, keepdims=kd)),
    "var": (lambda t, axis, kd: t.var(axis=axis, keepdims=kd), lambda x, axis, kd: x.var(axis=axis, keepdims=kd)),
}


@pytest.mark.parametrize("name", REDUCTIONS)
@given(case=array_and_axis())
def test_reduction_forward_and_grad(name, case):
    op, ref = REDUCTIONS[name]
    x, axis, kd = case
    out = op(Tensor(x), axis, kd)
    expected = ref(x, axis, kd)
    assert out.shape == np.shape(expected)
    np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12)
    grad_of(lambda t: op(t, axis, kd), x)


@given(case=array_and_axis(values=distinct_values()))
def test_max_forward_and_grad(case):
    x, axis, kd = case
    out = Tensor(x).max(axis=axis, keepdims=kd)
    expected = x.max(axis=axis, keepdims=kd)
    assert out.shape == np.shape(expected)
    np.testing.assert_array_equal(out.data, expected)
    grad = grad_of(lambda t: t.max(axis=axis, keepdims=kd), x)[0]
    # exactly one winner per reduced slice gets a nonzero gradient
    assert np.count_nonzero(grad) <= np.size(expected)


def test_max_ties_share_the_gradient_equally():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-12)


# ---------------------------------------------------------------- shape ops


@given(x=arrays(), data=st.data())
def test_reshape_forward_and_grad(x, data):
    target = data.draw(st.sampled_from([x.shape[::-1], (-1,), (x.size, 1), (1, *x.shape), (x.size,)]))
    np.testing.assert_array_equal(Tensor(x).reshape(target).data, x.reshape(target))
    np.testing.assert_array_equal(Tensor(x).reshape(*target).data, x.reshape(target))  # varargs form
    grad_of(lambda t: t.reshape(target), x)


@given(x=arrays(shape=shapes(1, 4)), data=st.data())
def test_permute_forward_and_grad(x, data):
    axes = tuple(data.draw(st.permutations(range(x.ndim))))
    axes = tuple(a - x.ndim if data.draw(st.booleans()) else a for a in axes)  # negative axes too
    note(f"axes {axes}")
    np.testing.assert_array_equal(Tensor(x).permute(axes).data, x.transpose(axes))
    np.testing.assert_array_equal(Tensor(x).transpose(*axes).data, x.transpose(axes))
    grad_of(lambda t: t.permute(axes), x)


@given(x=arrays())
def test_transpose_without_axes_reverses_them(x):
    np.testing.assert_array_equal(Tensor(x).transpose().data, x.T)
    np.testing.assert_array_equal(Tensor(x).T.data, x.T)
    grad_of(lambda t: t.T, x)


@given(x=arrays(shape=shapes(2, 4)), data=st.data())
def test_swapaxes_forward_and_grad(x, data):
    a, b = data.draw(st.integers(-x.ndim, x.ndim - 1)), data.draw(st.integers(-x.ndim, x.ndim - 1))
    np.testing.assert_array_equal(Tensor(x).swapaxes(a, b).data, np.swapaxes(x, a, b))
    grad_of(lambda t: t.swapaxes(a, b), x)


# ---------------------------------------------------------------- indexing


@given(x=arrays(shape=shapes(1, 3)), data=st.data())
def test_basic_indexing_forward_and_grad(x, data):
    """Integers, slices (negative steps too), Ellipsis and None."""
    index = data.draw(hnp.basic_indices(x.shape, allow_newaxis=True))
    note(f"index {index!r}")
    np.testing.assert_array_equal(np.asarray(Tensor(x)[index].data), x[index])
    grad = grad_of(lambda t: t[index], x)[0]
    untouched = np.ones(x.shape, bool)
    untouched[index] = False
    assert np.all(grad[untouched] == 0)


@given(x=arrays(shape=shapes(1, 3)), data=st.data())
def test_integer_array_indexing_forward_and_grad(x, data):
    """Integer arrays, with repeated and negative indices: the adjoint scatter-adds."""
    index = data.draw(hnp.integer_array_indices(x.shape, result_shape=hnp.array_shapes(max_dims=2, max_side=5)))
    note(f"index {index!r}")
    np.testing.assert_array_equal(Tensor(x)[index].data, x[index])
    grad_of(lambda t: t[index], x)


def test_duplicate_indices_sum_their_gradients():
    x = Tensor(np.array([10.0, 20.0, 30.0]), requires_grad=True)
    y = x[np.array([0, 0, 2, 0])]
    (y * Tensor(np.array([1.0, 2.0, 3.0, 4.0]))).sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0 + 2.0 + 4.0, 0.0, 3.0])


@given(x=arrays(shape=shapes(2, 3)), data=st.data())
def test_mixed_indexing_and_bool_masks(x, data):
    rows = data.draw(hnp.arrays(np.int64, st.integers(1, 4), elements=st.integers(-x.shape[0], x.shape[0] - 1)))
    mask = data.draw(hnp.arrays(np.bool_, x.shape))
    np.testing.assert_array_equal(Tensor(x)[rows, 1:].data, x[rows, 1:])
    grad_of(lambda t: t[rows, 1:], x)
    np.testing.assert_array_equal(Tensor(x)[mask].data, x[mask])
    grad_of(lambda t: t[mask], x)
    grad_of(lambda t: t[Tensor(rows)], x)  # an integer Tensor as the index


# ---------------------------------------------------------------- concatenate, stack, where


@given(base=shapes(1, 3), data=st.data())
def test_concatenate_forward_and_grad(base, data):
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    pieces = []
    for _ in range(data.draw(st.integers(1, 3))):
        shape = list(base)
        shape[axis] = data.draw(st.integers(1, 3))
        pieces.append(data.draw(arrays(tuple(shape))))
    note(f"axis {axis}, shapes {[p.shape for p in pieces]}")
    np.testing.assert_array_equal(tm.concatenate([Tensor(p) for p in pieces], axis=axis).data,
                                  np.concatenate(pieces, axis=axis))
    check_grad(lambda *ts: scalarize(tm.concatenate(list(ts), axis=axis)), pieces)


@given(shape=shapes(0, 3), data=st.data())
def test_stack_forward_and_grad(shape, data):
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    pieces = [data.draw(arrays(shape)) for _ in range(data.draw(st.integers(1, 3)))]
    np.testing.assert_array_equal(tm.stack([Tensor(p) for p in pieces], axis=axis).data, np.stack(pieces, axis=axis))
    check_grad(lambda *ts: scalarize(tm.stack(list(ts), axis=axis)), pieces)


def test_concatenate_with_a_constant_passes_gradient_only_to_tensors_that_need_it():
    a = Tensor(np.ones((2, 2)), requires_grad=True)
    b = Tensor(np.zeros((1, 2)))
    out = tm.concatenate([a, b], axis=0)
    (out * Tensor(np.arange(6.0).reshape(3, 2))).sum().backward()
    np.testing.assert_array_equal(a.grad, [[0, 1], [2, 3]])
    assert b.grad is None


@given(data=st.data())
def test_where_forward_and_grad(data):
    sc, sa, sb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=4)).input_shapes
    cond = data.draw(hnp.arrays(np.bool_, sc))
    a, b = data.draw(arrays(sa)), data.draw(arrays(sb))
    np.testing.assert_array_equal(tm.where(cond, Tensor(a), Tensor(b)).data, np.where(cond, a, b))
    grad_of(lambda x, y: tm.where(cond, x, y), a, b)
    grad_of(lambda x: tm.where(Tensor(cond), x, -1.5), a)  # a Tensor condition, a Python scalar branch
    grad_of(lambda y: tm.where(cond, 2.5, y), b)


def test_where_routes_each_gradient_to_the_branch_it_picked():
    a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = Tensor(np.array([10.0, 20.0, 30.0]), requires_grad=True)
    tm.where(np.array([True, False, True]), a, b).sum().backward()
    np.testing.assert_array_equal(a.grad, [1, 0, 1])
    np.testing.assert_array_equal(b.grad, [0, 1, 0])


# ---------------------------------------------------------------- broadcasting edge cases


def test_broadcast_scalar_with_matrix():
    s = Tensor(np.array(2.0), requires_grad=True)
    m = Tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    (s * m).sum().backward()
    assert s.grad.shape == () and m.grad.shape == (3, 4)
    assert s.grad == pytest.approx(np.arange(12.0).sum())
    np.testing.assert_array_equal(m.grad, np.full((3, 4), 2.0))


def test_broadcast_row_with_column():
    row = Tensor(np.array([[1.0, 2.0, 3.0]]), requires_grad=True)  # (1, 3)
    col = Tensor(np.array([[10.0], [20.0]]), requires_grad=True)  # (2, 1)
    out = row * col
    assert out.shape == (2, 3)
    out.sum().backward()
    np.testing.assert_array_equal(row.grad, [[30.0, 30.0, 30.0]])  # summed over the broadcast rows
    np.testing.assert_array_equal(col.grad, [[6.0], [6.0]])
    check_grad(lambda r, c: scalarize(r * c + r / (c * c)), [row.data, col.data])


def test_broadcast_missing_leading_dims():
    x = Tensor(np.ones((2, 3, 4)), requires_grad=True)
    b = Tensor(np.arange(4.0), requires_grad=True)  # (4,) against (2, 3, 4)
    (x + b).sum().backward()
    np.testing.assert_array_equal(b.grad, np.full(4, 6.0))
    np.testing.assert_array_equal(x.grad, np.ones((2, 3, 4)))
    check_grad(lambda u, v: scalarize(u * v - v), [np.random.default_rng(0).standard_normal((2, 1, 4)), np.arange(4.0)])


# ---------------------------------------------------------------- graph behaviour


def test_tensor_used_several_times_in_one_graph():
    x0 = np.array([-1.0, 0.5, 2.0])
    x = Tensor(x0, requires_grad=True)
    (x * x + x * 3.0 + x.exp() * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x0 + 3 + np.exp(x0) * (1 + x0), rtol=1e-12)
    # a diamond: y feeds z twice, so y's gradient must be complete before it flows to x
    check_grad(lambda t: ((t * 2.0) * (t * 2.0) + (t * 2.0).tanh() * t).sum(), [x0])


def test_a_deep_chain_does_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.backward()
    assert x.grad == pytest.approx(1.0001**5000, rel=1e-3)


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with tm.no_grad():
        assert not tm.is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert tm.is_grad_enabled()
    assert y.requires_grad is False and y._parents == ()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    assert x.grad is None


def test_no_grad_restores_the_previous_state_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with tm.no_grad():
            1 / 0
    assert tm.is_grad_enabled()


def test_gradients_accumulate_across_two_backward_calls_on_two_graphs():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x).sum().backward()  # 2x
    (x * 3.0).sum().backward()  # 3
    np.testing.assert_array_equal(x.grad, [2.0 + 3.0, 4.0 + 3.0])
    x.zero_grad()
    assert x.grad is None


def test_a_second_backward_on_the_same_graph_is_not_silently_ignored():
    """Either it raises (as PyTorch does once the graph is freed) or it accumulates a second time."""
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward()
    try:
        y.backward()
    except RuntimeError:
        return
    np.testing.assert_array_equal(x.grad, [4.0, 8.0])


def test_backward_with_an_explicit_output_gradient():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    (x * x).backward(np.array([1.0, 0.0, -1.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 0.0, -6.0])
    with pytest.raises(ValueError, match=r"\(2,\)"):
        (x * x).backward(np.ones(2))


def test_detach_cuts_the_graph():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x * x.detach()  # the detached factor is a constant
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 2.0])


# ---------------------------------------------------------------- dtypes


def test_dtype_defaults():
    assert Tensor(1.5).dtype == np.float32  # Python float
    assert Tensor([1.0, 2.0]).dtype == np.float32  # list of Python floats
    assert Tensor(np.ones(2, np.float16)).dtype == np.float32
    assert Tensor(np.ones(2, np.float32)).dtype == np.float32
    assert Tensor(np.ones(2, np.float64)).dtype == np.float64  # float64 kept (gradient checks)
    assert Tensor(np.arange(3)).dtype == np.int64  # indices stay integers
    assert Tensor(np.array([True])).dtype == np.bool_
    assert tm.tensor([1.0], dtype=np.float64).dtype == np.float64


FLOAT32_OPS = {
    "add scalar": lambda t: t + 1.5,
    "mul ndarray64": lambda t: t * np.full(t.shape, 2.0),
    "rsub": lambda t: 1.0 - t,
    "div": lambda t: t / 3.0,
    "pow": lambda t: t**2.5,
    "rpow": lambda t: 2.0**t,
    "exp": lambda t: t.exp(),
    "log": lambda t: t.log(),
    "sqrt": lambda t: t.sqrt(),
    "tanh": lambda t: t.tanh(),
    "sigmoid": lambda t: t.sigmoid(),
    "mean": lambda t: t.mean(axis=0),
    "var": lambda t: t.var(),
    "max": lambda t: t.max(axis=-1),
    "matmul": lambda t: t @ np.ones((3, 2)),
    "where": lambda t: tm.where(t.data > 1, t, 0.0),
    "getitem": lambda t: t[[0, 0]],
    "clip": lambda t: t.clip(0.5, 1.5),
}


@pytest.mark.parametrize("name", FLOAT32_OPS)
def test_float32_stays_float32_through_forward_and_backward(name):
    x = Tensor(np.linspace(0.5, 2.0, 6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    y = FLOAT32_OPS[name](x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.shape == x.shape


def test_float64_stays_float64():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = ((x * 2.5).exp() @ np.ones((3, 2), np.float32)).mean()
    assert y.dtype == np.float64
    y.backward()
    assert x.grad.dtype == np.float64


def test_integer_tensor_mixed_with_a_float_is_not_truncated():
    """An integer tensor (e.g. counts) times 0.5 must not silently round the 0.5 to 0 (NumPy promotes)."""
    counts = Tensor(np.arange(3))
    np.testing.assert_allclose((counts * 0.5).data, [0.0, 0.5, 1.0])
    np.testing.assert_allclose((counts + 0.5).data, [0.5, 1.5, 2.5])


def test_comparisons_return_bool_tensors_without_grad():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    other = np.array([2.0, 2.0, 2.0])
    for result, expected in [(x < 2.0, [1, 0, 0]), (x <= 2.0, [1, 1, 0]), (x > Tensor(other), [0, 0, 1]),
                             (x >= 2.0, [0, 1, 1]), (x.eq(2.0), [0, 1, 0]), (x.ne(2.0), [1, 0, 1])]:
        assert isinstance(result, Tensor)
        assert result.dtype == np.bool_ and result.requires_grad is False
        np.testing.assert_array_equal(result.data, np.array(expected, bool))


# ---------------------------------------------------------------- bad input


def test_requires_grad_on_an_integer_tensor_is_refused():
    with pytest.raises(TypeError, match="float"):
        Tensor(np.arange(3), requires_grad=True)


@pytest.mark.parametrize("op, name", [(lambda a, b: a + b, "add"), (lambda a, b: a * b, "mul"),
                                      (lambda a, b: a / b, "div")])
def test_mismatched_shapes_name_the_op_and_both_shapes(op, name):
    with pytest.raises(ValueError) as info:
        op(Tensor(np.ones((2, 3))), Tensor(np.ones((4,))))
    message = str(info.value)
    assert name in message and "(2, 3)" in message and "(4,)" in message


def test_matmul_mismatch_names_the_op_and_both_shapes():
    with pytest.raises(ValueError) as info:
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    message = str(info.value)
    assert "matmul" in message and "(2, 3)" in message and "(4, 5)" in message
    with pytest.raises(ValueError, match="matmul"):
        Tensor(np.ones((2, 2, 3))) @ Tensor(np.ones((3, 3, 1)))  # batch dims 2 and 3 do not broadcast
    with pytest.raises(ValueError, match="matmul"):
        Tensor(np.ones(())) @ Tensor(np.ones((3,)))


def test_backward_on_a_non_scalar_without_grad_names_the_shape():
    y = Tensor(np.ones((2, 3)), requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        y.backward()


def test_float_index_arrays_are_refused_by_getitem():
    x = Tensor(np.ones((3, 2)), requires_grad=True)
    with pytest.raises(TypeError, match="getitem"):
        x[np.array([0.0, 1.0])]
    with pytest.raises(TypeError, match="getitem"):
        x[Tensor([0.0, 1.0])]
    with pytest.raises(TypeError, match="getitem"):
        x[[0.5, 1.0]]


def test_bad_reshape_and_permutation_name_the_op():
    with pytest.raises(ValueError, match=r"reshape.*\(2, 3\)"):
        Tensor(np.ones((2, 3))).reshape(4, 2)
    with pytest.raises(ValueError, match="transpose"):
        Tensor(np.ones((2, 3))).permute(0, 0)
    with pytest.raises(ValueError, match="stack"):
        tm.stack([Tensor(np.ones(2)), Tensor(np.ones(3))])
    with pytest.raises(ValueError, match="concatenate"):
        tm.concatenate([Tensor(np.ones((2, 2))), Tensor(np.ones((2, 3)))], axis=0)


# ---------------------------------------------------------------- the gradient checkers themselves
# `t * t.detach()` has the value of t² but the gradient of a linear function (t instead of 2t): a wrong
# gradient built from public ops, which both checkers must catch.


def test_check_grad_accepts_a_right_gradient_and_returns_it():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    (g,) = check_grad(lambda t: (t * t).sum(), [x])
    np.testing.assert_allclose(g, 2 * x, rtol=1e-12)


def test_check_grad_names_the_input_the_element_and_both_values():
    a, b = np.array([1.0, 2.0]), np.array([0.5, -3.0])
    with pytest.raises(AssertionError) as info:
        check_grad(lambda s, t: (s * t + t * t.detach()).sum(), [a, b])
    message = str(info.value)
    # engine a + b = [1.5, -1.0], finite differences a + 2b = [2.0, -4.0]: the worst element is b[1]
    assert "input 1" in message and "element (1,)" in message
    assert "engine -1.0" in message and "finite differences -4.0" in message


def test_check_vjp_accepts_a_right_vjp_and_rejects_a_wrong_one():
    x = np.random.default_rng(0).standard_normal((3, 4))
    engine, numeric = check_vjp(lambda t: (t * t).tanh(), [x], seed=1)
    assert engine == pytest.approx(numeric, rel=1e-6)
    with pytest.raises(AssertionError, match="check_vjp"):
        check_vjp(lambda t: t * t.detach(), [x], seed=1)


def test_checkers_refuse_float32_inputs_and_non_scalar_outputs():
    with pytest.raises(TypeError, match="float64"):
        check_grad(lambda t: t.sum(), [np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="scalar"):
        check_grad(lambda t: t * 2.0, [np.ones(3)])


def test_backward_frees_each_intermediate_once_it_has_passed_it():
    """Peak memory: an intermediate nobody else holds is freed as soon as backward has run its node, not at
    the end of backward (the topological order list must not keep it)."""
    import weakref

    x = Tensor(np.ones(4), requires_grad=True)
    a = x * 2.0
    b = a.exp()
    c = b.sum()
    b_alive = weakref.ref(b)
    del b
    inner, seen = a._backward, []

    def spy(g):  # a's node runs after b's
        seen.append(b_alive() is not None)
        inner(g)

    a._backward = spy
    c.backward()
    assert seen == [False]
    np.testing.assert_allclose(x.grad, 2 * np.exp(2.0))
