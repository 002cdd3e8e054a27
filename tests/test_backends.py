"""Every backend against the NumPy reference (tinymoe.dispatch), primitive by primitive and as a whole MoE layer.

Each test is parametrised over ALL backends; one that cannot run here is skipped with the registry's reason
(so the CuPy backend runs these same tests once it lands). numpy-vs-numpy is trivially true; the point is the
others. Hypothesis draws T (1..64), E (1..16), k (1..E), widths, float32/float64, a capacity factor (None =
dropless, or 0.25..2) and a routing pattern that hits the edges: uniform, every token on one expert, empty
experts, k = E, a single token; priority weights are small multiples of 1/4, so ties are common.

Integer and bool outputs must be equal; floats agree to 1e-5 (float32) or 1e-10 (float64) relative, with an
absolute floor of that tolerance times the largest reference magnitude (near-zero entries of a sum carry the
rounding error of its largest terms). Numba kernels compile once per process (or load from the disk cache) in a
module-scoped warmup.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import dispatch as D
from tinymoe.activations import ACTIVATIONS

ALL = ["numpy", "numba", "cupy"]
TOL = {np.float32: 1e-5, np.float64: 1e-10}
PATTERNS = ["uniform", "one_expert", "empty_experts", "k_equals_E", "single_token"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def warm():
    """Compile (or load from the cache) the numba kernels once for this module."""
    if "numba" in tm.backends.available():
        tm.backends.load("numba").warmup()


# module-scoped parameter, so that the `be` fixture may be module-scoped too (hypothesis re-runs a test body many
# times and warns about function-scoped fixtures)
over_backends = pytest.mark.parametrize("name", ALL, scope="module")


@pytest.fixture(scope="module")
def be(name, warm):
    """The backend module `name`, or a skip with the reason it cannot run here."""
    if name not in tm.backends.available():
        pytest.skip(tm.backends.unavailable()[name])
    return tm.backends.load(name)


def host(a):
    """A NumPy array from a backend's output (CuPy arrays have .get())."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def dev(be, a):
    """A backend's input: its own array type when it has `asarray` (CuPy), else the NumPy array as it is."""
    return be.asarray(a) if hasattr(be, "asarray") and a is not None else a


def assert_close(got, ref, dtype, what=""):
    got = host(got)
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    tol = TOL[np.dtype(dtype).type]
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(scale, 1e-30), err_msg=what)


def assert_same(got, ref, what=""):
    got = host(got)
    assert got.dtype == ref.dtype, (what, got.dtype, ref.dtype)
    np.testing.assert_array_equal(got, ref, err_msg=what)


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def routings(draw):
    """(expert_idx (T, k) int64 distinct per token, keep (T, k) bool or None, priority weights with ties, E)."""
    pattern = draw(st.sampled_from(PATTERNS))
    E = draw(st.integers(1, 16))
    k = E if pattern == "k_equals_E" else draw(st.integers(1, E))
    T = 1 if pattern == "single_token" else draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pool = np.arange(E)
    if pattern == "empty_experts":  # only a few experts are ever chosen
        pool = rng.permutation(E)[: max(k, E // 3)]
    idx = np.stack([rng.permutation(pool)[:k] for _ in range(T)])
    if pattern == "one_expert":  # slot 0 of every token on one expert, the other slots on distinct others
        hot = rng.integers(E)
        others = np.delete(np.arange(E), hot)
        idx = np.stack([np.concatenate([[hot], rng.permutation(others)[: k - 1]]) for _ in range(T)])
    keep = rng.random((T, k)) < 0.8 if draw(st.booleans()) else None
    priority = rng.integers(1, 5, (T, k)) / 4  # many ties
    note(f"pattern={pattern} T={T} E={E} k={k} keep={'mask' if keep is not None else None}")
    return idx.astype(np.int64), keep, priority, E


capacity_factors = st.none() | st.floats(0.25, 2.0)
dtypes = st.sampled_from([np.float32, np.float64])


def expert_weights(rng, E, d, f, d_out, dtype):
    """w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out), scaled to keep activations O(1)."""
    w1 = rng.standard_normal((E, d, f)) / np.sqrt(d)
    w2 = rng.standard_normal((E, f, d_out)) / np.sqrt(f)
    return [a.astype(dtype) for a in (w1, rng.standard_normal((E, f)), w2, rng.standard_normal((E, d_out)))]


# ------------------------------------------------------------------------------------------------ primitives
@over_backends
@given(routing=routings(), cf=capacity_factors, by_weight=st.booleans(), dtype=dtypes,
       d=st.integers(1, 12), f=st.integers(1, 12), d_out=st.integers(1, 12),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_primitives_match_reference(name, be, routing, cf, by_weight, dtype, d, f, d_out, activation, seed):
    idx, keep, priority, E = routing
    T, k = idx.shape
    rng = np.random.default_rng(seed)
    if cf is not None:
        C = D.capacity(cf, T, k, E)
        pw = priority.astype(dtype) if by_weight else None
        ref_keep = D.capacity_keep(idx, E, C, pw, keep)
        assert_same(be.capacity_keep(dev(be, idx), E, C, dev(be, pw), dev(be, keep)), ref_keep, "capacity_keep")
        keep = ref_keep

    ref_route = D.route(idx, E, keep)
    for got, ref, what in zip(be.route(dev(be, idx), E, dev(be, keep)), ref_route, ("order", "offsets", "inverse")):
        assert_same(got, ref, what)
    order, offsets, inverse = ref_route

    x = rng.standard_normal((T, d)).astype(dtype)
    xs = D.gather(x, order, k)
    assert_same(be.gather(dev(be, x), dev(be, order), k), xs, "gather")

    params = expert_weights(rng, E, d, f, d_out, dtype)
    out, h = D.expert_ffn(xs, offsets, *params, activation)
    got_out, got_h = be.expert_ffn(dev(be, xs), dev(be, offsets), *(dev(be, p) for p in params), activation)
    assert_close(got_out, out, dtype, "expert_ffn out")
    assert_close(got_h, h, dtype, "expert_ffn h")

    dout = rng.standard_normal(out.shape).astype(dtype)
    w1, _, w2, _ = params
    ref_grads = D.expert_ffn_backward(dout, xs, h, offsets, w1, w2, activation)
    got_grads = be.expert_ffn_backward(*(dev(be, a) for a in (dout, xs, h, offsets, w1, w2)), activation)
    for got, ref, what in zip(got_grads, ref_grads, ("dxs", "dw1", "db1", "dw2", "db2")):
        assert_close(got, ref, dtype, what)

    weights = priority.astype(dtype)
    y = D.combine(out, weights, inverse)
    assert_close(be.combine(dev(be, out), dev(be, weights), dev(be, inverse)), y, dtype, "combine")
    dy = rng.standard_normal(y.shape).astype(dtype)
    ref_adj = D.combine_backward(dy, out, weights, inverse)
    got_adj = be.combine_backward(*(dev(be, a) for a in (dy, out, weights, inverse)))
    for got, ref, what in zip(got_adj, ref_adj, ("dout", "dweights")):
        assert_close(got, ref, dtype, what)
    assert_close(be.gather_backward(dev(be, dout), dev(be, inverse), k, T), D.gather_backward(dout, inverse, k, T),
                 dtype, "gather_backward")


@over_backends
def test_inputs_are_coerced(name, be):
    """int32 ids, non-contiguous floats and a Fortran-ordered mask give the reference's results."""
    rng = np.random.default_rng(0)
    T, k, E, d, f = 10, 2, 4, 6, 5
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    keep = np.asfortranarray(rng.random((T, k)) < 0.7)
    ref = D.route(idx, E, keep)
    for got, want in zip(be.route(dev(be, idx.astype(np.int32)), E, dev(be, keep)), ref):
        assert_same(got, want)
    order, offsets, inverse = ref
    x = rng.standard_normal((d, T)).T  # (T, d), not C-contiguous
    xs = D.gather(x, order, k)
    assert_same(be.gather(dev(be, x), dev(be, order.astype(np.int32)), k), xs)
    params = expert_weights(rng, E, d, f, d, np.float64)
    w1_f = np.asfortranarray(params[0])
    out, h = D.expert_ffn(xs, offsets, *params, "gelu")
    got, _ = be.expert_ffn(dev(be, xs[:, ::-1][:, ::-1]), dev(be, offsets.astype(np.int32)), dev(be, w1_f),
                           *(dev(be, p) for p in params[1:]), "gelu")
    assert_close(got, out, np.float64)


@over_backends
def test_unknown_activation_raises(name, be):
    xs, offsets = np.zeros((2, 3)), np.array([0, 2])
    params = expert_weights(np.random.default_rng(0), 1, 3, 4, 3, np.float64)
    with pytest.raises(ValueError, match="unknown activation"):
        be.expert_ffn(dev(be, xs), dev(be, offsets), *(dev(be, p) for p in params), "nope")


# ------------------------------------------------------------------------------------------------ whole layer
def layer_grads(layer, x, u, backend):
    """Forward + backward of L = Σ y ⊙ u under `backend`: y and every gradient, by name."""
    layer.zero_grad()
    with tm.use_backend(backend):
        xt = tm.Tensor(x.copy(), requires_grad=True)
        y = layer(xt)
        (y * tm.Tensor(u)).sum().backward()
    grads = {name: np.array(p.grad) for name, p in layer.named_parameters() if p.grad is not None}
    return np.array(y.data), np.array(xt.grad), grads


@over_backends
@given(gate=st.sampled_from(["top_k", "softmax", "expert_choice", "dselect_k"]), cf=capacity_factors,
       priority=st.sampled_from(["slot", "weight"]), T=st.integers(1, 64), E=st.integers(1, 16),
       k_frac=st.floats(0, 1), d=st.integers(1, 10), f=st.integers(1, 10), dtype=dtypes,
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_moe_layer_matches_numpy(name, be, gate, cf, priority, T, E, k_frac, d, f, dtype, activation, seed):
    """tm.nn.MoE forward and every gradient (x and all parameters) under `name` equal those under numpy."""
    k = 1 + int(k_frac * (E - 1))
    layer = tm.nn.MoE(d, f, E, gate=gate, k=k, capacity_factor=cf, priority=priority, activation=activation,
                      seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d)).astype(dtype)
    u = rng.standard_normal((T, d)).astype(dtype)
    ref_y, ref_dx, ref_grads = layer_grads(layer, x, u, "numpy")
    y, dx, grads = layer_grads(layer, x, u, name)
    assert_close(y, ref_y, dtype, "y")
    assert_close(dx, ref_dx, dtype, "x.grad")
    assert grads.keys() == ref_grads.keys()
    for pname, ref in ref_grads.items():
        assert_close(grads[pname], ref, dtype, pname)


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", ["numba"], scope="module")
@given(routing=routings(), dtype=dtypes, seed=st.integers(0, 2**16))
def test_deterministic(name, be, routing, dtype, seed):
    """Same inputs twice -> bitwise the same outputs, for every primitive (both expert-FFN schedules drawn)."""
    idx, keep, priority, E = routing
    T, k = idx.shape
    rng = np.random.default_rng(seed)
    d, f = 8, 16
    x = rng.standard_normal((T, d)).astype(dtype)
    params = expert_weights(rng, E, d, f, d, dtype)
    weights = priority.astype(dtype)
    for a, b in zip(*(every_primitive(be, idx, keep, x, params, weights) for _ in range(2))):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def every_primitive(be, idx, keep, x, params, weights) -> list:
    """Every primitive of backend `be` once, each fed by the one before (capacity_keep at half the tokens, route,
    gather, expert FFN, combine and the three adjoints); returns every array made, for bitwise comparisons."""
    T, k = idx.shape
    E = params[0].shape[0]
    kept = be.capacity_keep(idx, E, max(1, T // 2), weights, keep)
    order, offsets, inverse = be.route(idx, E, kept)
    xs = be.gather(x, order, k)
    out, h = be.expert_ffn(xs, offsets, *params, "gelu")
    y = be.combine(out, weights, inverse)
    dout, dw = be.combine_backward(y, out, weights, inverse)
    grads = be.expert_ffn_backward(dout, xs, h, offsets, params[0], params[2], "gelu")
    return [kept, order, offsets, inverse, xs, out, h, y, dout, dw, *grads, be.gather_backward(grads[0], inverse, k, T)]


@pytest.mark.parametrize("name", ["numba"], scope="module")
@given(routing=routings(), dtype=dtypes, activation=st.sampled_from(sorted(ACTIVATIONS)),
       min_tile_rows=st.sampled_from([1, 3, 16]), seed=st.integers(0, 2**16))
def test_numba_row_tiles_match_reference(name, be, routing, dtype, activation, min_tile_rows, seed):
    """Experts cut into row tiles across threads (partial weight gradients summed after) give the reference.

    The size rule that runs small calls on one thread is switched off here, so these small inputs take the
    multi-threaded paths (tiles, and the parallel gather/combine kernels)."""
    idx, keep, _, E = routing
    order, offsets, inverse = D.route(idx, E, keep)
    rng = np.random.default_rng(seed)
    d, f = 5, 7
    xs = rng.standard_normal((order.size, d)).astype(dtype)
    params = expert_weights(rng, E, d, f, d, dtype)
    out, h = D.expert_ffn(xs, offsets, *params, activation)
    dout = rng.standard_normal(out.shape).astype(dtype)
    ref_grads = D.expert_ffn_backward(dout, xs, h, offsets, params[0], params[2], activation)
    weights = rng.random((idx.shape[0], idx.shape[1])).astype(dtype)
    names = ("MIN_TILE_ROWS", "PARALLEL_MIN_FLOPS", "PARALLEL_MIN_ELEMENTS")
    saved = [getattr(be, n) for n in names]
    for n, value in zip(names, (min_tile_rows, 0, 0)):
        setattr(be, n, value)
    try:
        got_out, got_h = be.expert_ffn(xs, offsets, *params, activation)
        got = be.expert_ffn_backward(dout, xs, h, offsets, params[0], params[2], activation)
        again = be.expert_ffn_backward(dout, xs, h, offsets, params[0], params[2], activation)
        x = rng.standard_normal((idx.shape[0], d)).astype(dtype)
        assert_close(be.gather(x, order, idx.shape[1]), D.gather(x, order, idx.shape[1]), dtype, "gather")
        assert_close(be.gather_backward(xs, inverse, idx.shape[1], idx.shape[0]),
                     D.gather_backward(xs, inverse, idx.shape[1], idx.shape[0]), dtype, "gather_backward")
        assert_close(be.combine(out, weights, inverse), D.combine(out, weights, inverse), dtype, "combine")
        dy = rng.standard_normal((idx.shape[0], d)).astype(dtype)
        for g, ref, what in zip(be.combine_backward(dy, out, weights, inverse),
                                D.combine_backward(dy, out, weights, inverse), ("dout", "dweights")):
            assert_close(g, ref, dtype, what)
    finally:
        for n, value in zip(names, saved):
            setattr(be, n, value)
    assert_close(got_out, out, dtype, "out")
    assert_close(got_h, h, dtype, "h")
    for g, g2, ref, what in zip(got, again, ref_grads, ("dxs", "dw1", "db1", "dw2", "db2")):
        assert_close(g, ref, dtype, what)
        assert g.tobytes() == g2.tobytes(), f"{what} not deterministic"


# ------------------------------------------------------------------------------------------------ registry
def test_unknown_backend_raises():
    with pytest.raises(tm.backends.BackendUnavailable, match="unknown backend 'nope'"):
        tm.backends.load("nope")
    with pytest.raises(tm.backends.BackendUnavailable, match="known backends"):
        tm.set_backend("nope")


def test_unavailable_backend_says_why_and_how(monkeypatch):
    if "cupy" not in tm.backends.available():  # (with a GPU it loads; tests/test_cupy_backend.py fakes its failures)
        with pytest.raises(tm.backends.BackendUnavailable, match="pip install"):
            tm.backends.load("cupy")
    # numba missing: the registry checks with find_spec, without importing anything
    real_find_spec = tm.backends.importlib.util.find_spec
    monkeypatch.setattr(tm.backends.importlib.util, "find_spec",
                        lambda pkg, *a: None if pkg == "numba" else real_find_spec(pkg, *a))
    monkeypatch.setattr(tm.backends, "_loaded", {})
    assert "numba" not in tm.backends.available()
    assert "numba not installed" in tm.backends.unavailable()["numba"]
    with pytest.raises(tm.backends.BackendUnavailable, match=r"numba not installed.*pip install"):
        tm.backends.load("numba")


def test_import_does_not_import_numba():
    env = {key: value for key, value in os.environ.items() if key != "TINYMOE_BACKEND"}
    code = "import sys, tinymoe; tinymoe.backends.available(); assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_numba_cache_env(monkeypatch):
    """TINYMOE_NUMBA_CACHE=0 turns numba's disk cache off (read-only installs); anything else leaves it on."""
    if "numba" not in tm.backends.available():
        pytest.skip(tm.backends.unavailable()["numba"])
    from tinymoe.backends.numba import _jit

    for value, enabled in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("TINYMOE_NUMBA_CACHE", value)
        assert _jit.cache_enabled() is enabled
    monkeypatch.delenv("TINYMOE_NUMBA_CACHE")
    assert _jit.cache_enabled()


def test_numba_relu_keeps_nan_like_the_reference():
    """np.maximum(NaN, 0) is NaN: a NaN input must not be silently zeroed by a backend's ReLU."""
    if "numba" not in tm.backends.available():
        pytest.skip(tm.backends.unavailable().get("numba", "numba not available"))
    nb = tm.backends.load("numba")
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, 3)).astype(np.float32)
    xs[1, 0] = np.nan
    offsets = np.array([0, 2, 4])
    w1, b1 = rng.standard_normal((2, 3, 5)).astype(np.float32), np.zeros((2, 5), np.float32)
    w2, b2 = rng.standard_normal((2, 5, 3)).astype(np.float32), np.zeros((2, 3), np.float32)
    ref, _ = tm.dispatch.expert_ffn(xs, offsets, w1, b1, w2, b2, "relu")
    got, _ = nb.expert_ffn(xs, offsets, w1, b1, w2, b2, "relu")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got).any()
