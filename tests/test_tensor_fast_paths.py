"""The engine's fast paths against their plain definitions.

* getitem's backward with a basic index (ints, slices, Ellipsis, None: qkv[0], x[:, 1:]) adds into a view
  instead of calling np.add.at; it must give np.add.at's result for every such index.
* An op's result is wrapped without a copy, while a float32 array handed to Tensor() by the user is still copied
  (the optimizer updates parameters in place, and must never write into the caller's array).
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import Tensor


@st.composite
def basic_indices(draw):
    """A shape and a basic index into it: ints (also negative), slices with steps, Ellipsis, None."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    items, used_ellipsis = [], False
    for n in shape:
        kind = draw(st.sampled_from(["int", "slice", "full", "none", "ellipsis"]))
        if kind == "int":
            items.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            items.append(slice(draw(st.integers(-n, n)), draw(st.integers(-n, n)), draw(st.sampled_from([1, 2, -1]))))
        elif kind == "none":
            items.extend([None, slice(None)])
        elif kind == "ellipsis" and not used_ellipsis:
            items.append(Ellipsis)
            used_ellipsis = True
            break
        else:
            items.append(slice(None))
    index = tuple(items) if draw(st.booleans()) or len(items) != 1 else items[0]
    return shape, index


@given(case=basic_indices(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_basic_getitem_backward_equals_add_at(case, dtype, seed):
    shape, index = case
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)
    y = x[index]
    g = rng.standard_normal(y.shape).astype(dtype)
    y.backward(g)
    want = np.zeros(shape, dtype)
    np.add.at(want, index, g)
    np.testing.assert_array_equal(x.grad, want)


def test_qkv_slices_send_each_gradient_to_its_own_slice():
    rng = np.random.default_rng(0)
    qkv = Tensor(rng.standard_normal((3, 2, 4)).astype(np.float32), requires_grad=True)
    q, k, v = qkv[0], qkv[1], qkv[2]
    (q * k + v * 2.0).sum().backward()
    np.testing.assert_allclose(qkv.grad, np.stack([qkv.data[1], qkv.data[0], np.full((2, 4), 2.0)]), rtol=1e-6)


def test_repeated_integer_array_indices_still_sum():
    x = Tensor(np.zeros((3, 2), np.float32), requires_grad=True)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [[3, 3], [0, 0], [1, 1]])


def test_user_arrays_are_copied_and_op_results_are_not():
    source = np.ones((4, 3), np.float32)
    p = tm.nn.Parameter(source)
    p.data -= 1.0  # an in-place optimizer update
    np.testing.assert_array_equal(source, 1.0)  # the caller's array is untouched
    x = Tensor(source, requires_grad=True)
    y = x.reshape(3, 4)
    assert np.shares_memory(y.data, x.data)  # a view, not a copy of every op output
    assert Tensor(np.ones(2, np.float16)).dtype == np.float32  # float16 still becomes float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(np.ones(2)).dtype == np.float64  # float64 kept (gradient checks)


@given(shape=st.sampled_from([(5, 4), (3, 4, 2), (6,)]), seed=st.integers(0, 2**16), negative=st.booleans())
def test_integer_array_tuple_backward_equals_add_at(shape, seed, negative):
    """t[rows, idx] (the gates' pick) with repeats, negative ids and broadcasting: the sort-and-sum path."""
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    n_arrays = min(len(shape), 2)
    index = tuple(rng.integers(-shape[i] if negative else 0, shape[i], (7, 1) if i == 0 else (1, 3))
                  for i in range(n_arrays))
    y = x[index]
    g = rng.standard_normal(y.shape)
    y.backward(g)
    want = np.zeros(shape)
    np.add.at(want, index, g)
    np.testing.assert_allclose(x.grad, want, rtol=1e-12, atol=1e-12)
