"""The NumPy reference of the MoE hot path (tinymoe.dispatch) against naive loops written here from docs/design.md §3-4.

Each primitive is compared with a loop that follows the spec word for word: capacity C = ⌈c·T·k/E⌉, served
slot-major (all j = 0 choices, then j = 1, ...) and in token order within a slot, or highest weight first with
priority="weight"; dropped assignments contribute nothing; weights are not renormalised; `route` is a stable
argsort of the kept assignments' expert ids. Hypothesis draws T, E, k and capacity factors, and the strategies
deliberately hit the edges: empty experts, every token on one expert, capacity overflow, k = E, tied weights and a
single token. Integer/bool outputs are compared exactly; float outputs in float64 to 1e-12 (they are sums of at
most k products, so only rounding-order differences are allowed).
"""
import math

import numpy as np
from hypothesis import assume, given, note
from hypothesis import strategies as st

from tinymoe import dispatch as D

TOL = dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def routings(draw, max_tokens=9, max_experts=6, all_on_one=None):
    """A routing (T, k) of distinct experts per token, with an optional keep mask and weights.

    The expert choices are drawn from a small pool of "popular" experts half of the time, so that some experts are
    empty and others overflow; all_on_one forces every token's slot-0 choice onto expert 0.
    """
    T = draw(st.integers(1, max_tokens))
    E = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, E))
    skewed = draw(st.booleans()) if all_on_one is None else all_on_one
    rows = []
    for _ in range(T):
        if skewed:  # slot 0 on expert 0 for everybody, the rest a random distinct choice
            rest = draw(st.permutations(list(range(1, E))))[: k - 1]
            rows.append([0, *rest])
        else:
            rows.append(draw(st.permutations(list(range(E))))[:k])
    expert_idx = np.array(rows, dtype=np.int64).reshape(T, k)
    keep = None
    if draw(st.booleans()):
        keep = np.array(draw(st.lists(st.booleans(), min_size=T * k, max_size=T * k)), bool).reshape(T, k)
    # weights: small integers / 4 so that ties are common; positive, not renormalised
    weights = np.array(draw(st.lists(st.integers(1, 8), min_size=T * k, max_size=T * k)), float).reshape(T, k) / 4
    return expert_idx, keep, weights, E


capacity_factors = st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.25, 2.0, 100.0]) | st.floats(0.05, 4.0)


# ------------------------------------------------------------------------------------------------ naive references
def naive_capacity(c, T, k, E):
    return math.ceil(c * T * k / E)


def naive_keep(expert_idx, E, C, priority=None, keep=None):
    """Serve the assignments in the spec's order; each expert accepts until it holds C."""
    T, k = expert_idx.shape
    if priority is None:
        queue = [(t, j) for j in range(k) for t in range(T)]  # slot-major, token order within a slot
    else:  # highest weight first; equal weights keep the slot-major order
        queue = sorted(((t, j) for j in range(k) for t in range(T)), key=lambda a: -priority[a])
    held = [0] * E
    out = np.zeros((T, k), bool)
    for t, j in queue:
        if keep is not None and not keep[t, j]:
            continue  # already excluded: takes no place in the queue
        e = expert_idx[t, j]
        if held[e] < C:
            held[e] += 1
            out[t, j] = True
    return out


def naive_route(expert_idx, E, keep=None):
    T, k = expert_idx.shape
    order, offsets = [], [0]
    for e in range(E):
        for a in range(T * k):
            t, j = divmod(a, k)
            if (keep is None or keep[t, j]) and expert_idx[t, j] == e:
                order.append(a)
        offsets.append(len(order))
    inverse = np.full(T * k, -1)
    for r, a in enumerate(order):
        inverse[a] = r
    return np.array(order, dtype=np.int64), np.array(offsets), inverse


def naive_combine(out, weights, inverse):
    T, k = weights.shape
    y = np.zeros((T, out.shape[1]))
    for t in range(T):
        for j in range(k):
            r = inverse[t * k + j]
            if r >= 0:
                y[t] += weights[t, j] * out[r]
    return y


def relu(v):
    return np.maximum(v, 0)


# ------------------------------------------------------------------------------------------------ capacity
@given(c=capacity_factors, T=st.integers(1, 50), k=st.integers(1, 8), E=st.integers(1, 16))
def test_capacity_is_ceil_of_c_T_k_over_E(c, T, k, E):
    C = D.capacity(c, T, k, E)
    note(f"C={C}")
    assert isinstance(C, int)
    assert C == naive_capacity(c, T, k, E)
    assert C >= c * T * k / E - 1e-9 and C - 1 < c * T * k / E + 1e-9


def test_capacity_hand_values():
    assert D.capacity(1.0, 8, 2, 4) == 4  # exactly T·k/E
    assert D.capacity(1.25, 8, 2, 4) == 5
    assert D.capacity(1.0, 3, 1, 2) == 2  # ⌈1.5⌉
    assert D.capacity(0.01, 3, 1, 2) == 1  # never 0 for a positive factor


@given(r=routings(), c=capacity_factors)
def test_capacity_keep_matches_slot_major_token_order(r, c):
    expert_idx, keep, _, E = r
    T, k = expert_idx.shape
    C = naive_capacity(c, T, k, E)
    got = D.capacity_keep(expert_idx, E, C, None, keep)
    want = naive_keep(expert_idx, E, C, None, keep)
    note(f"expert_idx=\n{expert_idx}\nkeep=\n{keep}\nC={C}\ngot=\n{got}\nwant=\n{want}")
    assert got.shape == (T, k) and got.dtype == bool
    np.testing.assert_array_equal(got, want)
    # invariants that hold whatever the order: at most C per expert, never keeps what was excluded
    assert np.all(np.bincount(expert_idx[got], minlength=E) <= C)
    if keep is not None:
        assert not np.any(got & ~keep)


@given(r=routings(), c=capacity_factors, data=st.data())
def test_capacity_keep_priority_weight_serves_highest_weights_first(r, c, data):
    expert_idx, keep, weights, E = r
    T, k = expert_idx.shape
    if data.draw(st.booleans(), label="distinct weights"):  # a strict order, no ties to break
        weights = np.array(data.draw(st.permutations(list(range(T * k)))), float).reshape(T, k) + 1.0
    C = naive_capacity(c, T, k, E)
    got = D.capacity_keep(expert_idx, E, C, weights, keep)
    want = naive_keep(expert_idx, E, C, weights, keep)
    note(f"expert_idx=\n{expert_idx}\nweights=\n{weights}\nC={C}\ngot=\n{got}\nwant=\n{want}")
    np.testing.assert_array_equal(got, want)
    # per expert: every kept assignment weighs at least as much as every dropped one
    live = np.ones_like(got) if keep is None else keep
    for e in range(E):
        kept_w = weights[got & (expert_idx == e)]
        dropped_w = weights[live & ~got & (expert_idx == e)]
        if kept_w.size and dropped_w.size:
            assert kept_w.min() >= dropped_w.max()


def test_capacity_keep_hand_example():
    # 4 tokens, k = 2, E = 2, C = 2: slot 0 fills expert 0 with tokens 0, 1; token 2's slot 0 overflows;
    # slot 1 choices of tokens 0..1 go to expert 1 (which then is full), token 3's slot 0 was served before them.
    expert_idx = np.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    got = D.capacity_keep(expert_idx, 2, 2)
    np.testing.assert_array_equal(got, [[True, True], [True, False], [False, False], [True, False]])
    # by weight (0.9, 0.7, 0.6 fill expert 0 twice and expert 1 once; 0.5 and 0.3 then overflow expert 0; 0.2 is
    # expert 1's second): token 0 loses both choices although it comes first
    w = np.array([[0.5, 0.1], [0.6, 0.2], [0.9, 0.05], [0.7, 0.3]])
    got = D.capacity_keep(expert_idx, 2, 2, w)
    np.testing.assert_array_equal(got, [[False, False], [True, True], [True, False], [True, False]])


@given(r=routings(all_on_one=True))
def test_all_tokens_on_one_expert_overflow(r):
    expert_idx, _, _, E = r
    T, k = expert_idx.shape
    C = naive_capacity(1.0, T, k, E)
    got = D.capacity_keep(expert_idx, E, C)
    # slot 0 is served first in token order: exactly the first min(C, T) tokens keep their expert-0 choice
    np.testing.assert_array_equal(got[:, 0], np.arange(T) < min(C, T))


@given(r=routings())
def test_capacity_at_least_T_times_k_drops_nothing(r):
    expert_idx, keep, _, E = r
    T, k = expert_idx.shape
    got = D.capacity_keep(expert_idx, E, T * k, None, keep)
    np.testing.assert_array_equal(got, np.ones((T, k), bool) if keep is None else keep)


# ------------------------------------------------------------------------------------------------ route
@given(r=routings())
def test_route_matches_naive_loop_and_stable_argsort(r):
    expert_idx, keep, _, E = r
    T, k = expert_idx.shape
    order, offsets, inverse = D.route(expert_idx, E, keep)
    n_order, n_offsets, n_inverse = naive_route(expert_idx, E, keep)
    note(f"expert_idx=\n{expert_idx}\nkeep=\n{keep}\norder={order}\noffsets={offsets}")
    np.testing.assert_array_equal(order, n_order)
    np.testing.assert_array_equal(offsets, n_offsets)
    np.testing.assert_array_equal(inverse, n_inverse)
    # a stable argsort of the kept assignments' expert ids
    flat = expert_idx.reshape(-1)
    kept_ids = np.arange(T * k) if keep is None else np.flatnonzero(keep.reshape(-1))
    np.testing.assert_array_equal(order, kept_ids[np.argsort(flat[kept_ids], kind="stable")])
    # offsets delimit each expert's rows; empty experts have offsets[e] == offsets[e + 1]
    assert offsets[0] == 0 and offsets[-1] == order.size and np.all(np.diff(offsets) >= 0)
    for e in range(E):
        assert np.all(flat[order[offsets[e]:offsets[e + 1]]] == e)


def test_route_hand_example_with_empty_expert():
    expert_idx = np.array([[2, 0], [0, 2], [2, 0]])  # expert 1 is empty
    order, offsets, inverse = D.route(expert_idx, 3)
    np.testing.assert_array_equal(order, [1, 2, 5, 0, 3, 4])
    np.testing.assert_array_equal(offsets, [0, 3, 3, 6])
    np.testing.assert_array_equal(inverse, [3, 0, 1, 4, 5, 2])


# ------------------------------------------------------------------------------------------------ gather / combine
@given(r=routings(), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_gather_and_combine_match_naive_loops(r, d, seed):
    expert_idx, keep, weights, E = r
    T, k = expert_idx.shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d))
    order, offsets, inverse = D.route(expert_idx, E, keep)
    xs = D.gather(x, order, k)
    assert xs.shape == (order.size, d)
    for row, a in enumerate(order):
        np.testing.assert_array_equal(xs[row], x[a // k])
    out = rng.standard_normal((order.size, d))
    np.testing.assert_allclose(D.combine(out, weights, inverse), naive_combine(out, weights, inverse), **TOL)


@given(r=routings(), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_combine_after_gather_round_trips(r, d, seed):
    """combine(gather(x), w) = x · Σ_{kept j} w[t, j]: each kept assignment brings back its own token, weighted."""
    expert_idx, keep, weights, E = r
    T, k = expert_idx.shape
    x = np.random.default_rng(seed).standard_normal((T, d))
    order, _, inverse = D.route(expert_idx, E, keep)
    y = D.combine(D.gather(x, order, k), weights, inverse)
    kept = np.ones((T, k), bool) if keep is None else keep
    np.testing.assert_allclose(y, x * (weights * kept).sum(axis=1, keepdims=True), **TOL)
    # with unit weights and nothing dropped, k = 1: the identity
    if k == 1 and keep is None:
        np.testing.assert_array_equal(D.combine(D.gather(x, order, 1), np.ones((T, 1)), inverse), x)


@given(r=routings(), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_dropped_assignments_contribute_nothing_and_weights_are_not_renormalised(r, d, seed):
    expert_idx, _, weights, E = r
    T, k = expert_idx.shape
    rng = np.random.default_rng(seed)
    C = naive_capacity(0.5, T, k, E)
    keep = D.capacity_keep(expert_idx, E, C)
    order, _, inverse = D.route(expert_idx, E, keep)
    out = rng.standard_normal((order.size, d))
    y = D.combine(out, weights, inverse)
    for t in range(T):
        want = sum((weights[t, j] * out[inverse[t * k + j]] for j in range(k) if keep[t, j]), np.zeros(d))
        np.testing.assert_allclose(y[t], want, **TOL)  # the surviving weights as they were, no rescaling
        if not keep[t].any():
            np.testing.assert_array_equal(y[t], 0.0)  # dropped everywhere: the MoE output is exactly 0


@given(r=routings(), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_gather_and_combine_backward_are_adjoints(r, d, seed):
    """<gather(x), g> = <x, gather_backward(g)>; combine is bilinear in (out, w), so its two adjoints follow."""
    expert_idx, keep, weights, E = r
    T, k = expert_idx.shape
    rng = np.random.default_rng(seed)
    order, _, inverse = D.route(expert_idx, E, keep)
    R = order.size
    x, g = rng.standard_normal((T, d)), rng.standard_normal((R, d))
    np.testing.assert_allclose(np.sum(D.gather(x, order, k) * g), np.sum(x * D.gather_backward(g, inverse, k, T)),
                               **TOL)
    out, dy = rng.standard_normal((R, d)), rng.standard_normal((T, d))
    dout, dweights = D.combine_backward(dy, out, weights, inverse)
    lhs = np.sum(D.combine(out, weights, inverse) * dy)
    np.testing.assert_allclose(lhs, np.sum(out * dout), **TOL)
    np.testing.assert_allclose(lhs, np.sum(weights * dweights), **TOL)
    kept = (inverse.reshape(T, k) >= 0)
    assert np.all(dweights[~kept] == 0)  # a dropped assignment's weight gets no gradient


# ------------------------------------------------------------------------------------------------ expert FFN
@given(r=routings(max_tokens=6, max_experts=4), d=st.integers(1, 3), f=st.integers(1, 4),
       act=st.sampled_from(["relu", "gelu", "silu"]), seed=st.integers(0, 2**16))
def test_expert_ffn_matches_per_row_loop_and_its_backward_finite_differences(r, d, f, act, seed):
    expert_idx, keep, _, E = r
    rng = np.random.default_rng(seed)
    order, offsets, _ = D.route(expert_idx, E, keep)
    R = order.size
    assume(R > 0)
    xs = rng.standard_normal((R, d))
    w1, b1 = rng.standard_normal((E, d, f)), rng.standard_normal((E, f))
    w2, b2 = rng.standard_normal((E, f, d)), rng.standard_normal((E, d))
    acts = {"relu": relu, "gelu": lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
            "silu": lambda v: v / (1 + np.exp(-v))}
    out, _ = D.expert_ffn(xs, offsets, w1, b1, w2, b2, act)
    owner = np.repeat(np.arange(E), np.diff(offsets))  # row r belongs to expert owner[r]
    for row in range(R):
        e = owner[row]
        want = acts[act](xs[row] @ w1[e] + b1[e]) @ w2[e] + b2[e]
        np.testing.assert_allclose(out[row], want, rtol=1e-10, atol=1e-10)

    # backward: central differences of L = <out, g> in float64, step 1e-6, tolerance 1e-5 (relu's kink is
    # avoided by the random draws: the chance of a pre-activation within 1e-6 of 0 is negligible)
    g = rng.standard_normal(out.shape)
    _, h = D.expert_ffn(xs, offsets, w1, b1, w2, b2, act)
    grads = D.expert_ffn_backward(g, xs, h, offsets, w1, w2, act)
    arrays = [xs, w1, b1, w2, b2]
    for which, (arr, grad) in enumerate(zip(arrays, grads)):
        assert grad.shape == arr.shape
        fd = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + 1e-6
            plus = np.sum(D.expert_ffn(*arrays[:1], offsets, *arrays[1:], act)[0] * g)
            arr[i] = old - 1e-6
            minus = np.sum(D.expert_ffn(*arrays[:1], offsets, *arrays[1:], act)[0] * g)
            arr[i] = old
            fd[i] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5, err_msg=f"gradient {which}")
    # experts without rows get exactly zero parameter gradients
    for e in np.flatnonzero(np.diff(offsets) == 0):
        assert np.all(grads[1][e] == 0) and np.all(grads[4][e] == 0)


def test_single_token_k_equals_E():
    """One token sent to every expert: each expert gets exactly its row, nothing dropped at capacity 1."""
    E = 4
    expert_idx = np.array([[2, 0, 3, 1]])
    keep = D.capacity_keep(expert_idx, E, D.capacity(1.0, 1, E, E))
    assert keep.all()
    order, offsets, inverse = D.route(expert_idx, E, keep)
    np.testing.assert_array_equal(order, [1, 3, 0, 2])
    np.testing.assert_array_equal(offsets, [0, 1, 2, 3, 4])
    w = np.array([[0.4, 0.3, 0.2, 0.1]])
    out = np.arange(4.0)[:, None] + 1  # row r holds r + 1
    # y = Σ_j w_j · out[inverse[j]] = 0.4·3 + 0.3·1 + 0.2·4 + 0.1·2
    np.testing.assert_allclose(D.combine(out, w, inverse), [[0.4 * 3 + 0.3 * 1 + 0.2 * 4 + 0.1 * 2]], **TOL)
