"""The numba backend's session: NumPy's BLAS on one thread and the engine's dense products on numba's threads.

* `dense_matmul` (row blocks for a·b, split sums for xᵀ·g) against NumPy on drawn shapes and layouts, float32 and
  float64, with the cases it leaves to NumPy (small, mixed dtypes, other layouts) returning None;
* the engine routes `Linear`'s three products through it while the numba backend is current, and a layer's output
  and gradients agree with the NumPy backend's (which the gradient checks cover);
* set_backend / use_backend hold the session while numba is current and give NumPy its BLAS threads back after.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import engine, nn
from tinymoe.engine import Tensor

pytestmark = pytest.mark.skipif("numba" not in tm.backends.available(),
                                reason=tm.backends.unavailable().get("numba", ""))
TOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture(scope="module")
def nb():
    module = tm.backends.load("numba")
    module.warmup()
    return module


@pytest.fixture(scope="module")
def threads(nb):
    import numba

    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread here: dense_matmul leaves every product to NumPy")
    return numba.get_num_threads()


@pytest.fixture(autouse=True)
def small_threshold(nb, monkeypatch):
    """Let drawn products of any size run on the threads (the real threshold keeps small ones in NumPy)."""
    monkeypatch.setattr(nb, "PARALLEL_MIN_FLOPS", 0)


def close(got, want, dtype):
    scale = max(float(np.max(np.abs(want))), 1.0)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


dims = st.integers(1, 70)


@given(N=dims, k=dims, n=dims, dtype=st.sampled_from([np.float32, np.float64]), b_fortran=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_rows_product_matches_numpy(nb, threads, N, k, n, dtype, b_fortran, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, k)).astype(dtype)
    b = rng.standard_normal((n, k)).astype(dtype).T if b_fortran else rng.standard_normal((k, n)).astype(dtype)
    with nb.session():
        got = nb.dense_matmul(a, b)
    if got is None:  # fewer rows than threads (and no other way to split it): NumPy's
        assert N < threads
        return
    assert got.dtype == dtype and got.shape == (N, n)
    close(got, a @ b, dtype)
    with nb.session():
        assert np.array_equal(nb.dense_matmul(a, b), got)  # a rerun is bitwise the same


@given(N=dims, k=dims, n=dims, dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_weight_gradient_product_matches_numpy(nb, threads, N, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    x, g = rng.standard_normal((N, k)).astype(dtype), rng.standard_normal((N, n)).astype(dtype)
    with nb.session():
        got = nb.dense_matmul(x.T, g)  # xᵀ·g: the sum over N split across the threads
    if got is None:
        assert N < threads
        return
    assert got.dtype == dtype and got.shape == (k, n)
    close(got, x.T @ g, dtype)
    with nb.session():
        assert np.array_equal(nb.dense_matmul(x.T, g), got)


def test_what_it_leaves_to_numpy(nb, threads, monkeypatch):
    rng = np.random.default_rng(0)
    a32, b32 = rng.standard_normal((64, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    assert nb.dense_matmul(a32, b32.astype(np.float64)) is None  # mixed dtypes
    assert nb.dense_matmul(a32.astype(np.float16), b32.astype(np.float16)) is None  # other dtypes
    assert nb.dense_matmul(a32[::2], b32) is None  # a strided view
    assert nb.dense_matmul(a32, b32[:, None, :]) is None  # not 2-D
    assert nb.dense_matmul(a32[:, :4], b32[:4]) is None  # not contiguous
    monkeypatch.setattr(nb, "PARALLEL_MIN_FLOPS", 2 * 64 * 8 * 4 + 1)
    assert nb.dense_matmul(a32, b32) is None  # below the size where a second thread pays


def _linear_step(seed=0):
    """A Linear's output and its three gradients for one backward."""
    rng = np.random.default_rng(seed)
    layer = nn.Linear(48, 40, seed=seed, dtype=np.float64)
    x = Tensor(rng.standard_normal((3, 37, 48)), requires_grad=True)
    y = layer(x)
    y.backward(rng.standard_normal(y.shape))
    return [y.data, x.grad, layer.weight.grad, layer.bias.grad]


def test_the_engine_routes_linear_through_it_while_numba_is_current(nb, threads, monkeypatch):
    calls = []
    real = nb.dense_matmul
    monkeypatch.setattr(nb, "dense_matmul", lambda a, b: calls.append((a.shape, b.shape)) or real(a, b))
    with tm.use_backend("numpy"):
        want = _linear_step()
        assert engine._gemm_hook is None and not calls
    with tm.use_backend("numba"):
        got = _linear_step()
    assert calls == [((111, 48), (48, 40)), ((111, 40), (40, 48)), ((48, 111), (111, 40))]  # y, dx, dW
    for g, w in zip(got, want):
        close(g, w, np.float64)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]  # NumPy's, SciPy's


def test_set_backend_holds_the_session_while_numba_is_current(nb):
    with tm.use_backend("numpy"):
        before = _blas_threads()
        tm.set_backend("numba")
        assert engine._gemm_hook is not None and set(_blas_threads()) == {1}
        with tm.backends.session():  # fit enters it again: harmless, and left as it was after
            assert set(_blas_threads()) == {1}
        assert engine._gemm_hook is not None and set(_blas_threads()) == {1}
        tm.set_backend("numba")  # again: still one session
        tm.set_backend("numpy")
        assert engine._gemm_hook is None and _blas_threads() == before
        with tm.use_backend("numba"):
            assert set(_blas_threads()) == {1}
        assert engine._gemm_hook is None and _blas_threads() == before


def test_switching_backend_inside_an_explicit_session_gives_numpy_its_threads_back(nb):
    """An explicit session (as fit enters, or a user who followed older docs) while numba is already current, and a
    switch to numpy inside it: leaving the explicit session must not put numba's settings back under numpy."""
    with tm.use_backend("numpy"):
        before = _blas_threads()
        tm.set_backend("numba")
        with tm.backends.session():
            tm.set_backend("numpy")
            assert engine._gemm_hook is None and _blas_threads() == before
        assert tm.get_backend() == "numpy" and engine._gemm_hook is None and _blas_threads() == before
        tm.set_backend("numba")
        tm.set_backend("numpy")
        assert engine._gemm_hook is None and _blas_threads() == before


def test_use_backend_restores_the_session_after_an_exception_and_when_nested(nb):
    with tm.use_backend("numpy"):
        before = _blas_threads()
        with tm.use_backend("numba"):
            with pytest.raises(KeyError), tm.use_backend("numpy"):
                assert engine._gemm_hook is None and _blas_threads() == before
                raise KeyError("inside")
            assert tm.get_backend() == "numba" and engine._gemm_hook is not None and set(_blas_threads()) == {1}
            with tm.use_backend("numpy"), tm.use_backend("numba"):  # numba inside numpy inside numba
                assert engine._gemm_hook is not None and set(_blas_threads()) == {1}
            assert engine._gemm_hook is not None and set(_blas_threads()) == {1}
        assert engine._gemm_hook is None and _blas_threads() == before


def test_a_backend_named_by_the_environment_holds_its_session_when_first_resolved(nb, monkeypatch):
    with tm.use_backend("numpy"):
        before = _blas_threads()
        with monkeypatch.context() as m:  # undone before use_backend restores its backend
            m.setattr(tm.backends, "_current", None)  # nothing chosen yet: get_backend reads TINYMOE_BACKEND
            m.setenv("TINYMOE_BACKEND", "numba")
            assert tm.get_backend() == "numba" and engine._gemm_hook is not None and set(_blas_threads()) == {1}
            tm.set_backend("numpy")
            assert engine._gemm_hook is None and _blas_threads() == before


def test_set_backend_takes_up_the_session_again_when_current_was_reset_without_it(nb, monkeypatch):
    """A fixture that resets the registry's current backend (tests/test_cupy_backend.py's fresh_registry) lets the
    next get_backend leave numba's session; setting numba again must hold it again, not see "already current"."""
    with tm.use_backend("numba"):
        with monkeypatch.context() as m:
            m.setattr(tm.backends, "_current", None)
            m.delenv("TINYMOE_BACKEND", raising=False)
            assert tm.get_backend() == "numpy" and engine._gemm_hook is None
        assert tm.backends._current == "numba"  # put back by the fixture's undo, with the session left
        tm.set_backend("numba")
        assert engine._gemm_hook is not None and set(_blas_threads()) == {1}


def _matmul_case(name, rng):
    """(a, b) for a (..., k) @ (k, n) product of the engine in an awkward layout or dtype."""
    base = rng.standard_normal((4, 37, 24))
    w = rng.standard_normal((24, 40))
    return {
        "permuted a": (base.transpose(1, 0, 2), w),  # neither C nor F once flattened: reshape copies
        "a a transposed view of a strided array": (rng.standard_normal((24, 6, 80))[:, :, ::2].T, w),
        "b a strided slice": (base, rng.standard_normal((24, 80))[:, ::2]),
        "b Fortran": (base, np.asfortranarray(w)),
        "b a transposed strided view": (base, rng.standard_normal((80, 24))[::2].T),
        "no rows": (base[:0], w),
        "fewer rows than threads": (base[:1, :1], w),
        "float16": (base.astype(np.float16), w.astype(np.float16)),
        "float32 @ float64": (base.astype(np.float32), w),
    }[name]


@pytest.mark.parametrize("name", ["permuted a", "a a transposed view of a strided array", "b a strided slice",
                                  "b Fortran", "b a transposed strided view", "no rows", "fewer rows than threads",
                                  "float16", "float32 @ float64"])
def test_the_engine_product_and_its_gradients_match_numpy_for_every_layout(nb, threads, name):
    """Whatever the engine hands the hook (views, empty batches, dtypes it leaves to NumPy), Tensor @ W under numba
    gives NumPy's product and gradients."""
    def run(backend):
        a, b = _matmul_case(name, np.random.default_rng(7))
        ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
        with tm.use_backend(backend):
            y = ta @ tb
            y.backward(np.random.default_rng(8).standard_normal(y.shape).astype(y.dtype))
        return [y.data, ta.grad, tb.grad]

    want, got = run("numpy"), run("numba")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        tol = 1e-2 if g.dtype == np.float16 else 1e-5 if g.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol * 10)


def test_the_engine_leaves_integer_products_to_numpy(nb, threads):
    a = np.arange(4 * 9 * 6).reshape(4, 9, 6)
    b = np.arange(6 * 5).reshape(6, 5)
    with tm.use_backend("numba"):
        y = Tensor(a) @ Tensor(b)
    assert y.dtype == (a @ b).dtype and np.array_equal(y.data, a @ b)
