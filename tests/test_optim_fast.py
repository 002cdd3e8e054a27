"""The in-place optimizer paths against the plain formulas, on every backend that can run here.

Adam/AdamW update in place (NumPy ufuncs with one scratch array, or the numba backend's fused kernel); clipping
takes each gradient's squared norm as a dot product in its own dtype. Here each is checked against the textbook
form written out in float64 (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019, Alg. 2), over drawn shapes,
hyperparameters and several steps, and the fused kernel is checked to be bitwise reproducible.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe.nn import Parameter
from tinymoe.optim import Adam, AdamW, clip_grad_norm

BACKENDS = [name for name in ("numpy", "numba") if name in tm.backends.available()]
SHAPES = st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4), (300, 300)])  # 90 000 > the fused kernel's parallel cut


def plain_adam(p, grads, lr, b1, b2, eps, wd, decoupled):
    """Adam / AdamW step by step as the papers write it, in float64 -> (p, m, v)."""
    p, m, v = p.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if wd and not decoupled:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        if decoupled:
            p = p - lr * wd * p
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=SHAPES, dtype=st.sampled_from([np.float32, np.float64]), decoupled=st.booleans(),
       lr=st.sampled_from([1e-3, 0.1]), wd=st.sampled_from([0.0, 0.01, 0.5]), b2=st.sampled_from([0.999, 0.95]),
       steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_adam_matches_the_plain_formula(backend, shape, dtype, decoupled, lr, wd, b2, steps, seed):
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(shape).astype(dtype)
    grads = [(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3)).astype(dtype) for _ in range(steps)]
    p = Parameter(start.copy())
    opt = (AdamW if decoupled else Adam)([p], lr=lr, betas=(0.9, b2), eps=1e-8, weight_decay=wd)
    with tm.use_backend(backend):
        for g in grads:
            p.grad = g.copy()
            opt.step()
    want_p, want_m, want_v = plain_adam(start, grads, lr, 0.9, b2, 1e-8, wd, decoupled)
    tol = 2e-5 if dtype == np.float32 else 1e-10
    assert p.data.dtype == dtype
    np.testing.assert_allclose(opt.state["exp_avg"][0], want_m, rtol=tol, atol=tol * np.abs(want_m).max())
    np.testing.assert_allclose(opt.state["exp_avg_sq"][0], want_v, rtol=tol, atol=tol * np.abs(want_v).max())
    # the step is lr·m̂/(√v̂ + ε), at most ~lr per element: compare the change against that scale
    np.testing.assert_allclose(p.data, want_p, rtol=tol, atol=tol * lr * steps)
    np.testing.assert_array_equal(p.grad, grads[-1])  # the step reads the gradient, never writes into it


@pytest.mark.skipif("numba" not in tm.backends.available(), reason="needs the numba backend")
def test_fused_adam_is_bitwise_reproducible_and_takes_only_what_it_can():
    nb = tm.backends.load("numba")
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(200_000).astype(np.float32) for _ in range(4)]
    arrays[3] = np.abs(arrays[3])  # v ≥ 0
    runs = []
    for _ in range(2):
        p, g, m, v = (a.copy() for a in arrays)
        assert nb.adam_step(p, g, m, v, 0.9, 0.999, 1e-8, 1e-3, 1.2, 0.99)
        runs.append((p, m, v))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    p, g, m, v = (a.copy() for a in arrays)
    strided = np.zeros(400_000, np.float32)[::2]
    assert not nb.adam_step(strided, g, m, v, 0.9, 0.999, 1e-8, 1e-3, 1.0, 1.0)  # not contiguous: declined
    assert not nb.adam_step(p, g.astype(np.float64), m, v, 0.9, 0.999, 1e-8, 1e-3, 1.0, 1.0)  # mixed dtypes
    np.testing.assert_array_equal(p, arrays[0])  # ... and nothing was touched


def _param(grad):
    p = Parameter(np.zeros(np.shape(grad), np.asarray(grad).dtype))
    p.grad = np.asarray(grad)
    return p


@given(scale=st.sampled_from([1e-25, 1e-12, 1.0, 1e12, 1e25]), seed=st.integers(0, 2**16))
def test_clip_norm_is_exact_in_float32_at_any_scale(scale, seed):
    """Squares of 1e25 overflow float32 and squares of 1e-25 underflow it: the norm must still be right."""
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal(shape) * scale).astype(np.float32) for shape in [(40, 30), (30,), (1,)]]
    want = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    params = [_param(g.copy()) for g in grads]
    total = clip_grad_norm(params, max_norm=want / 2)
    assert total == pytest.approx(want, rel=1e-5)
    clipped = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params))
    assert clipped == pytest.approx(want * (want / 2) / (want + 1e-6), rel=1e-5)  # scale max_norm / (norm + 1e-6)
    assert all(p.grad.dtype == np.float32 for p in params)


def test_clip_norm_raises_on_nan_and_counts_zero_gradients():
    with pytest.raises(FloatingPointError, match="clip_grad_norm"):
        clip_grad_norm([_param(np.array([1.0, np.nan], np.float32))], max_norm=1.0)
    assert clip_grad_norm([_param(np.zeros(5, np.float32)), _param(np.array([3.0, 4.0], np.float32))], 10.0) == 5.0


def test_clip_scales_gradients_that_share_memory_once():
    """One op can hand the same gradient array to two inputs: clipping must not scale it twice."""
    shared = np.array([3.0, 4.0], np.float32)
    a, b = _param(shared), _param(shared)
    clip_grad_norm([a, b], max_norm=1.0)  # norm √50
    np.testing.assert_allclose(a.grad, shared / math.sqrt(50), rtol=1e-5)
    np.testing.assert_allclose(b.grad, shared / math.sqrt(50), rtol=1e-5)
    np.testing.assert_array_equal(shared, [3.0, 4.0])


def test_clip_scales_views_of_one_gradient_once_on_a_device_without_base():
    """On a device array type that cannot tell views apart (tinymoe.guarded has no `.base`), two parameters whose
    gradients view one array (`a + c.reshape(2, 3)`) must still be scaled once, as on the host."""
    from tinymoe import guarded
    from tinymoe.engine import Tensor

    def clipped(xp):
        a = Tensor(xp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3)), requires_grad=True)
        c = Tensor(xp.asarray(np.arange(6, dtype=np.float32)), requires_grad=True)
        y = a + c.reshape(2, 3)
        (y * y).sum().backward()
        clip_grad_norm([a, c], 0.5)
        return [t.grad.get() if hasattr(t.grad, "get") else t.grad for t in (a, c)]

    for host, dev in zip(clipped(np), clipped(guarded.xp)):
        np.testing.assert_array_equal(host, dev)


def test_numpy_adam_on_blocks_is_bitwise_the_whole_array_update(monkeypatch):
    """The NumPy update runs on cache-sized blocks of the flat arrays; being elementwise, it must give bitwise
    the result of one pass over whole arrays (non-contiguous arrays take the whole-array path)."""
    import tinymoe.optim as optim

    rng = np.random.default_rng(0)
    start = rng.standard_normal((300, 301)).astype(np.float32)
    grads = [rng.standard_normal(start.shape).astype(np.float32) for _ in range(3)]
    runs = []
    for block in (1000, start.size):  # 1000 does not divide 90 300: a short last block; then one whole block
        monkeypatch.setattr(optim, "BLOCK", block)
        p = Parameter(start.copy())
        opt = AdamW([p], lr=1e-2, weight_decay=0.1)
        with tm.use_backend("numpy"):
            for g in grads:
                p.grad = g.copy()
                opt.step()
        runs.append((p.data, opt.state["exp_avg"][0], opt.state["exp_avg_sq"][0]))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_clip_scales_unshared_gradients_in_place():
    a, b = _param(np.array([3.0, 4.0], np.float32)), _param(np.array([0.0, 12.0], np.float32))
    ga = a.grad
    assert clip_grad_norm([a, b], max_norm=1.0) == pytest.approx(13.0)
    assert a.grad is ga  # scaled where it lies: no second copy of every gradient
    np.testing.assert_allclose(ga, [3 / 13, 4 / 13], rtol=1e-5)
    np.testing.assert_allclose(b.grad, [0.0, 12 / 13], rtol=1e-5)


def test_backward_seed_gradient_is_not_the_callers_array():
    """backward(grad=g) copies g: it may end up as a leaf's .grad, which clipping scales in place."""
    x = Parameter(np.ones(3, np.float32))
    seed = np.full(3, 10.0, np.float32)
    (x + 0.0).backward(seed)
    clip_grad_norm([x], max_norm=1.0)
    np.testing.assert_array_equal(seed, [10.0, 10.0, 10.0])
