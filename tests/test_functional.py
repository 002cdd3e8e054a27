"""Functional ops against independent definitions (direct float64 NumPy / math formulas, PyTorch's documented
definitions), their invariants, and their gradients: finite differences on hypothesis shapes for every op,
random-projection VJP checks for the big ones (layer_norm, cross_entropy, multi-head attention)."""
import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinymoe.functional as F
from tinymoe import Tensor
from tinymoe.gradcheck import check_grad, check_vjp

from strategies import FLOATS, NO_KINK_AT_ZERO, arrays, grad_of, scalarize, shapes  # noqa: F401
from tinymoe.nn import MultiHeadAttention


def elementwise(f):
    """Apply a math.* scalar function elementwise (an implementation independent of NumPy's vector code)."""
    return np.vectorize(f, otypes=[np.float64])


# ---------------------------------------------------------------- activations

GELU_TANH = elementwise(lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))))
GELU_ERF = elementwise(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
SILU = elementwise(lambda v: v / (1 + math.exp(-v)))
SOFTPLUS = elementwise(lambda v: math.log1p(math.exp(v)))
NORMAL_CDF = elementwise(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))

ACTIVATIONS = {  # name -> (op, independent reference, elements)
    "relu": (F.relu, elementwise(lambda v: max(v, 0.0)), NO_KINK_AT_ZERO),
    "gelu": (F.gelu, GELU_TANH, FLOATS),
    "silu": (F.silu, SILU, FLOATS),
    "softplus": (F.softplus, SOFTPLUS, FLOATS),
    "sigmoid": (F.sigmoid, elementwise(lambda v: 1 / (1 + math.exp(-v))), FLOATS),
    "tanh": (F.tanh, elementwise(math.tanh), FLOATS),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
@given(data=st.data())
def test_activation_forward_and_grad(name, data):
    op, ref, elements = ACTIVATIONS[name]
    x = data.draw(arrays(elements=elements))
    np.testing.assert_allclose(op(Tensor(x)).data, ref(x), rtol=1e-12, atol=1e-14)
    grad_of(op, x)


def test_gelu_is_close_to_the_exact_erf_gelu():
    x = np.linspace(-8, 8, 4001)
    np.testing.assert_allclose(F.gelu(Tensor(x)).data, GELU_ERF(x), rtol=0, atol=1e-3)


@given(x=arrays(elements=st.floats(-5, 5)))
def test_normal_cdf_against_math_erf(x):
    np.testing.assert_allclose(F.normal_cdf(Tensor(x)).data, NORMAL_CDF(x), rtol=0, atol=2e-7)
    # its gradient is the exact pdf, and the forward is accurate to 1.5e-7, so finite differences agree
    # to about 1.5e-7 / eps: compare with a coarser eps
    check_grad(lambda t: scalarize(F.normal_cdf(t)), [x], eps=1e-3, atol=1e-3, rtol=1e-3)


def test_softplus_and_silu_are_stable_in_the_tails():
    x = Tensor(np.array([-1000.0, -50.0, 50.0, 1000.0]), requires_grad=True)
    with np.errstate(over="raise", invalid="raise"):
        sp = F.softplus(x)
        si = F.silu(x)
    np.testing.assert_allclose(sp.data, [0.0, math.exp(-50.0), 50.0, 1000.0], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(si.data, [0.0, -50.0 * math.exp(-50.0), 50.0, 1000.0], rtol=1e-12, atol=1e-300)


def test_activation_by_name():
    x = Tensor(np.array([-1.0, 2.0]))
    for name, fn in [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu)]:
        np.testing.assert_array_equal(F.activation(name)(x).data, fn(x).data)
    with pytest.raises(ValueError, match="swish"):
        F.activation("swish")


# ---------------------------------------------------------------- softmax family


@st.composite
def array_and_axis(draw, elements=FLOATS):
    x = draw(arrays(elements=elements))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    note(f"shape {x.shape}, axis {axis}")
    return x, axis


def softmax_ref(x, axis):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


@given(case=array_and_axis(), shift=st.floats(-50, 50))
def test_softmax_properties_and_grad(case, shift):
    x, axis = case
    y = F.softmax(Tensor(x), axis=axis).data
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)
    assert np.all((y >= 0) & (y <= 1))
    np.testing.assert_allclose(y, softmax_ref(x, axis), rtol=1e-12)
    np.testing.assert_allclose(F.softmax(Tensor(x + shift), axis=axis).data, y, rtol=1e-9, atol=1e-15)
    grad_of(lambda t: F.softmax(t, axis=axis), x)


def test_softmax_and_log_softmax_are_stable_for_large_inputs():
    x = Tensor(np.array([[1000.0, 1000.0, 0.0], [-1000.0, -1000.0, -1000.0]]), requires_grad=True)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = F.softmax(x, axis=-1)
        ly = F.log_softmax(x, axis=-1)
        lse = F.logsumexp(x, axis=-1)
    np.testing.assert_allclose(y.data, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-300)
    np.testing.assert_allclose(ly.data[0, :2], [-math.log(2), -math.log(2)], rtol=1e-12)
    assert ly.data[0, 2] == pytest.approx(-1000 - math.log(2), rel=1e-12)
    np.testing.assert_allclose(lse.data, [1000 + math.log(2), -1000 + math.log(3)], rtol=1e-12)
    (y[0, 0] + ly.sum() + lse.sum()).backward()
    assert np.all(np.isfinite(x.grad))


@given(case=array_and_axis())
def test_log_softmax_forward_and_grad(case):
    x, axis = case
    ref = x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
    np.testing.assert_allclose(F.log_softmax(Tensor(x), axis=axis).data, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.exp(F.log_softmax(Tensor(x), axis=axis).data).sum(axis=axis), 1.0, rtol=1e-12)
    grad_of(lambda t: F.log_softmax(t, axis=axis), x)


@given(case=array_and_axis(), keepdims=st.booleans())
def test_logsumexp_against_the_direct_formula(case, keepdims):
    x, axis = case
    ref = np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))  # safe for |x| <= 3 in float64
    out = F.logsumexp(Tensor(x), axis=axis, keepdims=keepdims)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.data, ref, rtol=1e-12, atol=1e-12)
    grad_of(lambda t: F.logsumexp(t, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu"])
@given(x=arrays(shapes(1, 2)))
def test_value_and_grad_equals_the_activation_and_its_derivative(name, x):
    """The expert FFN's backward takes act(h) and act'(h) together (shared work done once): the same values as
    the two separate functions, in float64 and float32."""
    from tinymoe.activations import ACTIVATIONS, VALUE_AND_GRAD

    fwd, grad = ACTIVATIONS[name]
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        v = x.astype(dtype)
        value, slope = VALUE_AND_GRAD[name](v)
        assert value.dtype == dtype and slope.dtype == dtype
        np.testing.assert_allclose(value, fwd(v), rtol=tol, atol=tol)
        np.testing.assert_allclose(slope, grad(v), rtol=tol, atol=tol)


# ---------------------------------------------------------------- normalisation


def layer_norm_ref(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


@given(x=arrays(shapes(1, 3)), data=st.data())
def test_layer_norm_against_numpy_and_grad(x, data):
    w = data.draw(arrays((x.shape[-1],)))
    b = data.draw(arrays((x.shape[-1],)))
    np.testing.assert_allclose(F.layer_norm(Tensor(x), Tensor(w), Tensor(b)).data, layer_norm_ref(x, w, b, 1e-5),
                               rtol=1e-10, atol=1e-10)
    # near-constant rows make 1/sqrt(var + eps) steep; the relative tolerance carries that
    check_grad(lambda t, u, v: scalarize(F.layer_norm(t, u, v)), [x, w, b], atol=1e-5, rtol=1e-4)


def test_layer_norm_output_has_zero_mean_unit_variance_without_affine():
    x = np.random.default_rng(0).standard_normal((5, 16)) * 4 + 3
    y = F.layer_norm(Tensor(x)).data
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-5)  # var/(var + eps) with eps = 1e-5


@given(x=arrays(shapes(1, 3)), data=st.data())
def test_layer_norm_without_weight_or_bias_grad(x, data):
    """The fused node's gradient when weight, bias or both are left out."""
    w = data.draw(arrays((x.shape[-1],)))
    np.testing.assert_allclose(F.layer_norm(Tensor(x), bias=Tensor(w)).data, layer_norm_ref(x, 1.0, w, 1e-5),
                               rtol=1e-10, atol=1e-10)
    check_grad(lambda t: scalarize(F.layer_norm(t)), [x], atol=1e-5, rtol=1e-4)
    check_grad(lambda t, u: scalarize(F.layer_norm(t, u)), [x, w], atol=1e-5, rtol=1e-4)
    check_grad(lambda t, v: scalarize(F.layer_norm(t, bias=v)), [x, w], atol=1e-5, rtol=1e-4)


def test_layer_norm_is_one_node_that_frees_its_input_intermediates():
    """The whole normalisation is one graph node whose parents are x, weight and bias (no full-size
    intermediates of the composed form stay alive until backward)."""
    x = Tensor(np.ones((3, 4)), requires_grad=True)
    w, b = Tensor(np.ones(4), requires_grad=True), Tensor(np.zeros(4), requires_grad=True)
    y = F.layer_norm(x, w, b)
    assert y._op == "layer_norm" and set(map(id, y._parents)) == {id(x), id(w), id(b)}


@given(x=arrays(shapes(2, 3)), data=st.data())
def test_linear_equals_matmul_plus_bias_and_grad(x, data):
    n = data.draw(st.integers(1, 4))
    w = data.draw(arrays((x.shape[-1], n)))
    b = data.draw(arrays((n,)))
    y = F.linear(Tensor(x, requires_grad=True), Tensor(w), Tensor(b))
    assert y._op == "linear"  # one node: the product before the bias is not kept
    np.testing.assert_allclose(y.data, x @ w + b, rtol=1e-10, atol=1e-10)
    check_grad(lambda t, u, v: scalarize(F.linear(t, u, v)), [x, w, b], atol=1e-5, rtol=1e-4)


def test_linear_falls_back_to_the_composed_form():
    """1-D inputs, no bias, and a bias whose dtype would change the product's take the composed path, with the
    composed path's result dtype."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((3, 4)), rng.standard_normal(4)
    y = F.linear(Tensor(x, requires_grad=True), Tensor(w.astype(np.float32)), Tensor(b, dtype=np.float64))
    assert y.dtype == np.float64 and y._op != "linear"
    np.testing.assert_allclose(y.data, x @ w.astype(np.float32) + b, rtol=1e-6)
    assert F.linear(Tensor(x[0]), Tensor(w)).shape == (4,)
    assert F.linear(Tensor(x), Tensor(w)).shape == (2, 4)


def test_layer_norm_vjp_on_a_big_input():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((4, 9, 64)), rng.standard_normal(64), rng.standard_normal(64)
    for seed in range(3):
        check_vjp(lambda t, u, v: F.layer_norm(t, u, v), [x, w, b], seed=seed)


@given(x=arrays(shapes(1, 3)), data=st.data())
def test_rms_norm_against_numpy_and_grad(x, data):
    w = data.draw(arrays((x.shape[-1],)))
    normalised = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(F.rms_norm(Tensor(x)).data, normalised, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(F.rms_norm(Tensor(x), Tensor(w)).data, normalised * w, rtol=1e-10, atol=1e-10)
    check_grad(lambda t, u: scalarize(F.rms_norm(t, u)), [x, w], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- dropout


def test_dropout_is_reproducible_from_the_generator_seed():
    x = Tensor(np.ones((8, 32)))
    a = F.dropout(x, 0.5, training=True, rng=np.random.default_rng(3)).data
    b = F.dropout(x, 0.5, training=True, rng=np.random.default_rng(3)).data
    c = F.dropout(x, 0.5, training=True, rng=np.random.default_rng(4)).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dropout_scales_survivors_and_preserves_the_mean():
    p, n = 0.3, 200_000
    y = F.dropout(Tensor(np.ones(n)), p, training=True, rng=np.random.default_rng(0)).data
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)  # inverted dropout
    assert kept.mean() == pytest.approx(1 - p, abs=0.01)  # std of the fraction ~ 0.001
    assert y.mean() == pytest.approx(1.0, abs=0.015)


def test_dropout_is_the_identity_in_eval_and_at_p_zero():
    x = np.random.default_rng(0).standard_normal((3, 4))
    np.testing.assert_array_equal(F.dropout(Tensor(x), 0.5, training=False).data, x)
    np.testing.assert_array_equal(F.dropout(Tensor(x), 0.0, training=True, rng=np.random.default_rng(0)).data, x)


def test_dropout_gradient_is_the_mask():
    x = np.random.default_rng(0).standard_normal((4, 5))
    grad = check_grad(lambda t: scalarize(F.dropout(t, 0.4, True, np.random.default_rng(9))), [x])[0]
    y = F.dropout(Tensor(x), 0.4, True, np.random.default_rng(9)).data
    assert np.all((grad == 0) == (y == 0))


def test_dropout_bad_arguments():
    with pytest.raises(ValueError, match="dropout"):
        F.dropout(Tensor(np.ones(3)), 1.0, training=True, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        F.dropout(Tensor(np.ones(3)), 0.5, training=True)


# ---------------------------------------------------------------- embedding


@given(w=arrays(shapes(2, 2)), data=st.data())
def test_embedding_picks_rows_and_scatters_gradients(w, data):
    ids = data.draw(hnp.arrays(np.int64, shapes(1, 2), elements=st.integers(0, w.shape[0] - 1)))
    out = F.embedding(ids, Tensor(w))
    assert out.shape == ids.shape + (w.shape[1],)
    np.testing.assert_array_equal(out.data, w[ids])
    grad = grad_of(lambda t: F.embedding(ids, t), w)[0]
    unused = np.setdiff1d(np.arange(w.shape[0]), ids)
    assert np.all(grad[unused] == 0)


def test_embedding_repeated_ids_sum_their_gradients():
    w = Tensor(np.zeros((4, 2)), requires_grad=True)
    F.embedding(Tensor(np.array([[1, 1], [3, 1]])), w).sum().backward()
    np.testing.assert_array_equal(w.grad, [[0, 0], [3, 3], [0, 0], [1, 1]])


def test_embedding_bad_ids():
    w = Tensor(np.zeros((4, 2)))
    with pytest.raises(TypeError, match="embedding"):
        F.embedding(np.array([0.0, 1.0]), w)
    with pytest.raises(TypeError, match="embedding"):
        F.embedding([0.5], w)
    with pytest.raises(IndexError, match="embedding"):
        F.embedding(np.array([4]), w)
    with pytest.raises(IndexError, match="embedding"):
        F.embedding(np.array([-1]), w)


# ---------------------------------------------------------------- cross-entropy


def cross_entropy_ref(logits, targets, ignore_index=-100, eps=0.0, reduction="mean"):
    """PyTorch's definition: (1-eps)·(-log p[target]) + eps·mean_c(-log p_c), over non-ignored targets."""
    C = logits.shape[-1]
    z = logits.reshape(-1, C)
    t = targets.reshape(-1)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = t != ignore_index
    nll = np.where(keep, -logp[np.arange(len(t)), np.where(keep, t, 0)], 0.0)
    smooth = np.where(keep, -logp.mean(-1), 0.0)
    loss = (1 - eps) * nll + eps * smooth
    if reduction == "mean":
        return loss.sum() / max(keep.sum(), 1)
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(targets.shape)


@st.composite
def ce_case(draw):
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4))
    C = draw(st.integers(2, 5))
    logits = draw(arrays(lead + (C,)))
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, C - 1)))
    ignored = draw(hnp.arrays(np.bool_, lead))
    targets = np.where(ignored, -100, targets)
    eps = draw(st.sampled_from([0.0, 0.1, 0.3]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    note(f"logits {logits.shape}, targets {targets.tolist()}, eps {eps}, reduction {reduction}")
    return logits, targets, eps, reduction


@given(case=ce_case())
def test_cross_entropy_against_the_pytorch_definition_and_grad(case):
    logits, targets, eps, reduction = case
    out = F.cross_entropy(Tensor(logits), targets, label_smoothing=eps, reduction=reduction)
    ref = cross_entropy_ref(logits, targets, eps=eps, reduction=reduction)
    assert out.shape == np.shape(ref)
    np.testing.assert_allclose(out.data, ref, rtol=1e-10, atol=1e-12)
    grad = grad_of(lambda t: F.cross_entropy(t, targets, label_smoothing=eps, reduction=reduction), logits)[0]
    assert np.all(grad[targets == -100] == 0)  # ignored positions get no gradient


def test_cross_entropy_known_values():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
    assert F.cross_entropy(Tensor(logits), np.array([0, 2])).item() == pytest.approx(
        -(math.log(0.7) + math.log(0.5)) / 2, rel=1e-12)
    # ignored rows are left out of the mean, not counted as zero
    assert F.cross_entropy(Tensor(logits), np.array([0, 7]), ignore_index=7).item() == pytest.approx(-math.log(0.7))
    # label smoothing, by hand: (1 - 0.1)·(-log 0.7) + 0.1·mean(-log p)
    expected = 0.9 * -math.log(0.7) + 0.1 * -(math.log(0.7) + math.log(0.2) + math.log(0.1)) / 3
    assert F.cross_entropy(Tensor(logits[:1]), np.array([0]), label_smoothing=0.1).item() == pytest.approx(expected)


def test_cross_entropy_is_stable_for_large_logits():
    logits = Tensor(np.array([[1000.0, 0.0], [0.0, 1000.0]]), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([0, 0]))
    assert loss.item() == pytest.approx(500.0, rel=1e-12)  # (0 + 1000) / 2
    loss.backward()
    np.testing.assert_allclose(logits.grad, [[0, 0], [-0.5, 0.5]], atol=1e-12)  # (softmax - one_hot) / 2


def test_cross_entropy_vjp_on_a_big_input():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 7, 33)) * 2
    targets = rng.integers(0, 33, (3, 7))
    targets[0, :3] = -100
    for reduction in ("none", "mean"):
        check_vjp(lambda t: F.cross_entropy(t, targets, label_smoothing=0.1, reduction=reduction), [logits], seed=5)


def test_cross_entropy_bad_targets():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="cross_entropy"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="cross_entropy"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(IndexError, match="cross_entropy"):
        F.cross_entropy(logits, np.array([0, 3]))


# ---------------------------------------------------------------- regression losses


@given(pair=st.data())
def test_mse_loss_against_numpy_and_grad(pair):
    shape = pair.draw(shapes())
    p, t = pair.draw(arrays(shape)), pair.draw(arrays(shape))
    reduction = pair.draw(st.sampled_from(["mean", "sum", "none"]))
    ref = {"mean": np.mean((p - t) ** 2), "sum": np.sum((p - t) ** 2), "none": (p - t) ** 2}[reduction]
    np.testing.assert_allclose(F.mse_loss(Tensor(p), Tensor(t), reduction=reduction).data, ref, rtol=1e-12)
    grad_of(lambda a, b: F.mse_loss(a, b, reduction=reduction), p, t)
    with pytest.raises(ValueError, match="mse_loss"):
        F.mse_loss(Tensor(p), Tensor(np.zeros(shape + (2,))))
    with pytest.raises(ValueError, match="reduction"):
        F.mse_loss(Tensor(p), Tensor(t), reduction="avg")


def bce_ref(x, y):
    s = 1 / (1 + np.exp(-x))
    return -(y * np.log(s) + (1 - y) * np.log(1 - s))


@given(data=st.data())
def test_bce_with_logits_against_the_direct_formula_and_grad(data):
    shape = data.draw(shapes())
    # the loss is smooth everywhere; x = 0 exactly is tested on its own below
    x = data.draw(arrays(shape, NO_KINK_AT_ZERO))
    y = data.draw(arrays(shape, st.floats(0, 1)))
    np.testing.assert_allclose(F.binary_cross_entropy_with_logits(Tensor(x), Tensor(y), reduction="none").data,
                               bce_ref(x, y), rtol=1e-10, atol=1e-12)
    grad_of(lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="none"), x, y)


def test_bce_with_logits_gradient_is_sigmoid_minus_target_everywhere():
    """d/dx = σ(x) − y, including at x = 0 (a common logit: zero-initialised heads) and in both tails."""
    x0 = np.array([0.0, 0.0, 0.0, 2.0, -100.0, 100.0])
    y0 = np.array([0.0, 1.0, 0.3, 1.0, 1.0, 0.0])
    x = Tensor(x0, requires_grad=True)
    F.binary_cross_entropy_with_logits(x, Tensor(y0), reduction="sum").backward()
    np.testing.assert_allclose(x.grad, 1 / (1 + np.exp(-x0)) - y0, rtol=1e-12, atol=1e-15)


def test_bce_with_logits_is_stable_at_plus_minus_100():
    x = Tensor(np.array([100.0, -100.0, 100.0, -100.0]), requires_grad=True)
    y = Tensor(np.array([1.0, 0.0, 0.0, 1.0]))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        loss.sum().backward()
    np.testing.assert_allclose(loss.data, [math.exp(-100), math.exp(-100), 100.0, 100.0], rtol=1e-12)
    np.testing.assert_allclose(x.grad, [0.0, 0.0, 1.0, -1.0], atol=1e-40)


# ---------------------------------------------------------------- multi-head attention (random projections)


def _attention_vjp(causal, padding_mask, seed):
    rng = np.random.default_rng(seed)
    B, T, d = 2, 5, 8
    mha = MultiHeadAttention(d, num_heads=2, causal=causal, seed=seed, dtype=np.float64)
    x = rng.standard_normal((B, T, d))
    params = [mha.qkv.weight.data, mha.qkv.bias.data, mha.proj.weight.data, mha.proj.bias.data]

    def fn(t, w_qkv, b_qkv, w_proj, b_proj):  # weights as inputs too, so their gradients are checked
        mha.qkv.weight, mha.qkv.bias, mha.proj.weight, mha.proj.bias = w_qkv, b_qkv, w_proj, b_proj
        return mha(t, padding_mask=padding_mask)

    for s in range(3):
        check_vjp(fn, [x, *params], seed=s)


def test_attention_vjp_causal():
    _attention_vjp(causal=True, padding_mask=None, seed=0)


def test_attention_vjp_with_a_padding_mask():
    pad = Tensor(np.array([[False, False, False, True, True], [False, False, False, False, False]]))
    _attention_vjp(causal=False, padding_mask=pad, seed=1)


def test_attention_vjp_causal_and_padded():
    pad = Tensor(np.array([[False, False, False, False, True], [False, False, True, True, True]]))
    _attention_vjp(causal=True, padding_mask=pad, seed=2)
