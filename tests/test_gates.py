"""Gates and routers (docs/design.md §1-2) against independent definitions written in this file.

Every reference below is plain NumPy / Python written from the spec's formulas, never a call back into the gate
under test. Tolerances: float32 layers to 1e-5 (relative and absolute), float64 formulas to 1e-12; discrete
choices (which experts, which tokens, codes) exactly.
"""
import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import gates as G
from tinymoe import losses as L
from tinymoe.nn.routers import TaskEmbedding

F32 = dict(rtol=1e-5, atol=1e-5)
F64 = dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ references
def np_softmax(h, axis=-1):
    e = np.exp(h - h.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def hand_top_k(row, k):
    """The k largest entries of one row, ties to the lower expert index, in descending order."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def relu(v):
    return np.maximum(v, 0)


def ffn(experts, e, x):
    """Expert e's FFN with activation relu (the layers below are built with activation='relu')."""
    w1, b1, w2, b2 = (p.data.astype(np.float64) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    return relu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]


def logits_of(moe, x):
    """h = x·W_g + b for a token router, from the layer's parameters."""
    return x @ moe.gate.weight.data.astype(np.float64) + moe.gate.bias.data.astype(np.float64)


def dense(weights, idx, E):
    """(T, k) weights at columns idx -> (T, E)."""
    out = np.zeros((idx.shape[0], E))
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[t, idx[t, j]] += weights[t, j]
    return out


def hand_S(t, gamma):
    """DSelect-k's smooth step (Hazimeh et al. 2021 eq. 2; docs/design.md §2)."""
    if t <= -gamma / 2:
        return 0.0
    if t >= gamma / 2:
        return 1.0
    return -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5


def hand_code(i, m):
    return [int(c) for c in format(i, f"0{m}b")] if m else []  # most significant bit first; no bits for m = 0


def hand_r(z, E, gamma):
    """r(z)_i = Π_{bit_j(i)=1} S(z_j) · Π_{bit_j(i)=0} (1 − S(z_j)) for i < E."""
    m = max(1, math.ceil(math.log2(E)))
    out = []
    for i in range(E):
        p = 1.0
        for j, bit in enumerate(hand_code(i, m)):
            s = hand_S(float(z[j]), gamma)
            p *= s if bit else 1 - s
        out.append(p)
    return np.array(out)


def m_of(E):
    """m = ⌈log2 E⌉ bits (Hazimeh et al. 2021 §3); one expert needs none (its selector is the empty product, 1)."""
    return math.ceil(math.log2(E))


# ------------------------------------------------------------------------------------------------ top-k / softmax
@st.composite
def logit_rows(draw, max_T=6, max_E=8):
    T, E = draw(st.integers(1, max_T)), draw(st.integers(1, max_E))
    k = draw(st.integers(1, E))
    if draw(st.booleans()):  # small integers: many ties
        vals = st.integers(-2, 2).map(float)
    else:
        vals = st.floats(-5, 5, allow_nan=False)
    h = np.array(draw(st.lists(vals, min_size=T * E, max_size=T * E))).reshape(T, E)
    return h, k


@given(case=logit_rows())
def test_top_k_picks_largest_logits_ties_to_lower_index(case):
    h, k = case
    T, E = h.shape
    r = G.top_k_gate(tm.Tensor(h), k)
    note(f"h=\n{h}\nidx=\n{r.expert_idx}")
    assert r.expert_idx.shape == (T, k)
    for t in range(T):
        assert list(r.expert_idx[t]) == hand_top_k(h[t], k)


@given(case=logit_rows())
def test_top_k_weights_softmax_over_selected_or_switch_probability(case):
    h, k = case
    T, E = h.shape
    r = G.top_k_gate(tm.Tensor(h), k)
    w = r.weights.numpy()
    for t in range(T):
        sel = hand_top_k(h[t], k)
        if k == 1:  # Switch: the full-softmax probability of the chosen expert
            want = [np_softmax(h[t])[sel[0]]]
        else:  # softmax over the k selected logits only
            want = np_softmax(h[t][sel])
        np.testing.assert_allclose(w[t], want, **F32)
    # exactly k nonzeros per token, the rest zero
    q = dense(w, r.expert_idx, E)
    assert np.all((q > 0).sum(axis=1) == k)
    if k > 1:
        np.testing.assert_allclose(q.sum(axis=1), 1.0, **F32)


@given(case=logit_rows())
def test_softmax_gate_is_the_full_softmax(case):
    h, _ = case
    r = G.softmax_gate(tm.Tensor(h))
    q = dense(r.weights.numpy(), r.expert_idx, h.shape[1])
    np.testing.assert_allclose(q, np_softmax(h), **F32)
    # slots in descending weight, every expert once
    assert np.all(np.diff(r.weights.numpy(), axis=1) <= 0)
    assert np.all(np.sort(r.expert_idx, axis=1) == np.arange(h.shape[1]))


def test_top_k_exact_ties_hand_example():
    h = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    r = G.top_k_gate(tm.Tensor(h), 2)
    assert list(r.expert_idx[0]) == [1, 2]
    np.testing.assert_allclose(r.weights.numpy(), [[0.5, 0.5]], **F32)


def test_softmax_gate_layer_with_k_equal_E_is_the_dense_mixture():
    rng = np.random.default_rng(0)
    moe = tm.nn.MoE(6, 8, 4, gate="softmax", activation="relu", seed=1, dtype=np.float64)
    x = rng.standard_normal((5, 6))
    p = np_softmax(logits_of(moe, x))
    want = sum(p[:, e:e + 1] * ffn(moe.experts, e, x) for e in range(4))
    np.testing.assert_allclose(moe(x).numpy(), want, **F64)


# ------------------------------------------------------------------------------------------------ noisy top-k
def test_noisy_top_k_gate_and_noise_weights_start_at_zero():
    moe = tm.nn.MoE(8, 16, 4, gate="noisy_top_k", k=2, seed=3)
    params = dict(moe.named_parameters())
    routers = [n for n in params if n.startswith("gate.") or n.startswith("noise.")]
    assert {"gate.weight", "gate.bias", "noise.weight", "noise.bias"} <= set(routers)
    for name in routers:
        assert np.all(params[name].data == 0), name


def test_noisy_top_k_eval_is_noise_free_and_deterministic():
    rng = np.random.default_rng(1)
    moe = tm.nn.MoE(6, 8, 5, gate="noisy_top_k", k=2, activation="relu", seed=0, dtype=np.float64)
    moe.gate.weight.data[...] = rng.standard_normal(moe.gate.weight.shape)
    moe.noise.weight.data[...] = rng.standard_normal(moe.noise.weight.shape)  # would add a lot of noise
    x = rng.standard_normal((10, 6))
    moe.eval()
    y1 = moe(x).numpy()
    idx1 = moe.last_routing.expert_idx.copy()
    y2 = moe(x).numpy()
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(idx1, moe.last_routing.expert_idx)
    # no noise: exactly the top-k of the clean logits with softmax-over-k weights
    h = logits_of(moe, x)
    want = np.zeros_like(y1)
    for t in range(10):
        sel = hand_top_k(h[t], 2)
        assert list(idx1[t]) == sel
        w = np_softmax(h[t][sel])
        want[t] = sum(w[j] * ffn(moe.experts, sel[j], x[t]) for j in range(2))
    np.testing.assert_allclose(y1, want, **F64)


def test_noisy_top_k_training_adds_noise():
    """At init (W_g = 0) every logit ties; eval takes experts 0..k-1, training spreads tokens by the noise."""
    moe = tm.nn.MoE(6, 8, 4, gate="noisy_top_k", k=1, seed=0)
    x = np.random.default_rng(2).standard_normal((64, 6)).astype(np.float32)
    moe.eval()
    moe(x)
    assert np.all(moe.last_routing.expert_idx == 0)
    moe.train()
    moe(x)
    first = moe.last_routing.expert_idx.copy()
    assert len(np.unique(first)) > 1  # the noise (std softplus(0) ≈ 0.69) breaks the tie differently per token
    moe(x)
    assert np.any(first != moe.last_routing.expert_idx)  # a fresh draw each call


# ------------------------------------------------------------------------------------------------ DSelect-k
@given(t=st.floats(-3, 3, allow_nan=False), gamma=st.floats(0.1, 4.0))
def test_smooth_step_matches_formula(t, gamma):
    got = G.smooth_step(tm.Tensor(np.array([t])), gamma).numpy()[0]
    np.testing.assert_allclose(got, hand_S(t, gamma), **F64)
    assert 0.0 <= got <= 1.0


@given(gamma=st.floats(0.1, 4.0))
def test_smooth_step_saturates_continuously_with_zero_gradient(gamma):
    edges = np.array([-gamma / 2, gamma / 2, -gamma, gamma, -10 * gamma, 10 * gamma, 0.0])
    t = tm.Tensor(edges, requires_grad=True)
    s = G.smooth_step(t, gamma)
    np.testing.assert_allclose(s.numpy(), [0, 1, 0, 1, 0, 1, 0.5], **F64)
    s.sum().backward()
    assert np.all(t.grad[:6] == 0.0)  # exactly zero once saturated
    np.testing.assert_allclose(t.grad[6], 3 / (2 * gamma), **F64)  # S'(0) = 3/(2γ)
    # the cubic itself meets the constants with zero slope at ±γ/2 (C¹): S'(±γ/2) = −(6/γ³)(γ²/4) + 3/(2γ) = 0
    inner = np.array([-gamma / 2 * 0.999999, gamma / 2 * 0.999999, 0.3 * gamma])
    t = tm.Tensor(inner, requires_grad=True)
    G.smooth_step(t, gamma).sum().backward()
    np.testing.assert_allclose(t.grad, -6 / gamma**3 * inner**2 + 3 / (2 * gamma), rtol=1e-9, atol=1e-9)
    assert np.all(np.abs(t.grad[:2]) < 1e-5 / gamma)


@pytest.mark.parametrize("E", [1, 2, 3, 4, 5, 7, 8, 9, 16])
def test_binary_codes_msb_first(E):
    codes = G.binary_codes(E)
    m = m_of(E)
    assert codes.shape == (E, m)
    for i in range(E):
        assert list(codes[i]) == hand_code(i, m)


def test_binary_codes_hand_example():
    np.testing.assert_array_equal(G.binary_codes(5), [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]])


@given(m=st.integers(1, 4), gamma=st.floats(0.25, 3.0), data=st.data())
def test_selector_matches_formula_and_sums_to_one_over_all_codes(m, gamma, data):
    E = 2**m
    z = np.array(data.draw(st.lists(st.floats(-2, 2), min_size=m, max_size=m)))
    r = G.dselect_selector(tm.Tensor(z), E, gamma).numpy()
    np.testing.assert_allclose(r, hand_r(z, E, gamma), **F64)
    np.testing.assert_allclose(r.sum(), 1.0, **F64)
    assert np.all(r >= 0)
    # fewer experts than codes: the first E codes, so the mass can fall short of 1
    E2 = data.draw(st.integers(max(1, 2 ** (m - 1) + 1), E), label="E not a power of two")
    if E2 > 1:
        r2 = G.dselect_selector(tm.Tensor(z), E2, gamma).numpy()
        np.testing.assert_allclose(r2, hand_r(z, E2, gamma), **F64)
        assert r2.sum() <= 1 + 1e-12


@given(E=st.sampled_from([2, 4, 8, 16]), data=st.data())
def test_dselect_weights_sum_to_one_and_match_formula(E, data):
    k = data.draw(st.integers(1, min(E, 4)))
    m = m_of(E)
    z = np.array(data.draw(st.lists(st.floats(-1.5, 1.5), min_size=k * m, max_size=k * m))).reshape(k, m)
    alpha = np.array(data.draw(st.lists(st.floats(-3, 3), min_size=k, max_size=k)))
    q, _ = G.dselect_k_weights(tm.Tensor(z), tm.Tensor(alpha), E, 1.0, training=False)
    want = sum(np_softmax(alpha)[l] * hand_r(z[l], E, 1.0) for l in range(k))
    np.testing.assert_allclose(q.numpy(), want, **F64)
    np.testing.assert_allclose(q.numpy().sum(), 1.0, **F64)


@given(E=st.sampled_from([2, 4, 8, 16]), data=st.data())
def test_dselect_saturated_selects_at_most_k_experts_by_their_codes(E, data):
    """z = ±large: each selector is one-hot on the expert whose code is the sign pattern of z (MSB first)."""
    k = data.draw(st.integers(1, min(E, 4)))
    m = m_of(E)
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=k * m, max_size=k * m))).reshape(k, m)
    z = signs * data.draw(st.floats(0.5, 50.0), label="magnitude (≥ γ/2: saturated)")
    alpha = np.array(data.draw(st.lists(st.floats(-3, 3), min_size=k, max_size=k)))
    q = G.dselect_k_weights(tm.Tensor(z), tm.Tensor(alpha), E, 1.0, training=False)[0].numpy()
    picked = [int("".join("1" if s > 0 else "0" for s in signs[l]), 2) for l in range(k)]
    want = np.zeros(E)
    for l, e in enumerate(picked):
        want[e] += np_softmax(alpha)[l]
    note(f"signs={signs}, picked={picked}, q={q}")
    np.testing.assert_allclose(q, want, **F64)
    assert (q > 0).sum() <= k
    np.testing.assert_allclose(q.sum(), 1.0, **F64)


def hand_entropy(zs, E, gamma):
    """Σ_l H(r(z⁽ˡ⁾)) with H(p) = −Σ p log(p + 1e-6)."""
    return sum(-np.sum(hand_r(z, E, gamma) * np.log(hand_r(z, E, gamma) + 1e-6)) for z in zs)


def hand_reachability(zs, E, gamma):
    """Σ_l 1/Σ_i r(z⁽ˡ⁾)_i (only reported when E is not a power of two)."""
    return sum(1.0 / hand_r(z, E, gamma).sum() for z in zs)


@pytest.mark.parametrize("E", [4, 5, 6, 8])
def test_dselect_entropy_regulariser_and_non_power_of_two_term(E):
    rng = np.random.default_rng(E)
    k, m, gamma = 2, m_of(E), 1.5
    z = rng.uniform(-0.6, 0.6, (k, m))
    alpha = rng.standard_normal(k)
    power_of_two = not E & (E - 1)
    _, aux = G.dselect_k_weights(tm.Tensor(z), tm.Tensor(alpha), E, gamma, training=True)
    np.testing.assert_allclose(aux["dselect_entropy"].numpy(), hand_entropy(z, E, gamma), **F64)
    assert ("dselect_reachability" in aux) == (not power_of_two)
    if not power_of_two:
        np.testing.assert_allclose(aux["dselect_reachability"].numpy(), hand_reachability(z, E, gamma), **F64)
    # per example (leading dimension): the mean over examples
    zb = rng.uniform(-0.6, 0.6, (3, k, m))
    _, aux = G.dselect_k_weights(tm.Tensor(zb), tm.Tensor(rng.standard_normal((3, k))), E, gamma, training=True)
    np.testing.assert_allclose(aux["dselect_entropy"].numpy(), np.mean([hand_entropy(zz, E, gamma) for zz in zb]), **F64)
    if not power_of_two:
        np.testing.assert_allclose(aux["dselect_reachability"].numpy(),
                                   np.mean([hand_reachability(zz, E, gamma) for zz in zb]), **F64)
    # training only
    assert not G.dselect_k_weights(tm.Tensor(z), tm.Tensor(alpha), E, gamma, training=False)[1]


def test_dselect_entropy_hand_value():
    """E = 2, one selector at z = 0: r = (½, ½), H = −2·½·log(½ + 1e-6); E = 3 adds 1/(r_0 + r_1 + r_2) as its own
    term, weighted 1 by default (not the entropy's 1e-6)."""
    z = np.zeros((1, 1))
    _, aux = G.dselect_k_weights(tm.Tensor(z), tm.Tensor(np.zeros(1)), 2, 1.0, training=True)
    np.testing.assert_allclose(aux["dselect_entropy"].numpy(), -np.log(0.5 + 1e-6), **F64)
    z = np.zeros((1, 2))  # E = 3, m = 2: r = (¼, ¼, ¼) over the reachable codes
    _, aux = G.dselect_k_weights(tm.Tensor(z), tm.Tensor(np.zeros(1)), 3, 1.0, training=True)
    np.testing.assert_allclose(aux["dselect_entropy"].numpy(), -3 * 0.25 * np.log(0.25 + 1e-6), **F64)
    np.testing.assert_allclose(aux["dselect_reachability"].numpy(), 1 / 0.75, **F64)
    moe = tm.nn.MoE(4, 4, 3, gate="dselect_k", k=1, seed=0, dtype=np.float64)
    moe(np.random.default_rng(0).standard_normal((5, 4)))
    want = sum(L.DEFAULT_WEIGHTS[n] * float(v.numpy()) for n, v in moe.aux_losses.items())
    assert L.DEFAULT_WEIGHTS["dselect_reachability"] == 1.0
    np.testing.assert_allclose(float(moe.aux_loss().numpy()), want, rtol=1e-12)


def test_dselect_layer_entropy_in_training_only():
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    moe = tm.nn.MoE(8, 8, 4, gate="dselect_k", k=2, seed=0)
    moe(x)
    assert "dselect_entropy" in moe.aux_losses and float(moe.aux_losses["dselect_entropy"].numpy()) > 0
    moe.eval()
    moe(x)
    assert "dselect_entropy" not in moe.aux_losses


def assert_uniform_range(values, bound):
    """Inside [−bound, bound], and (with ≥ 20 draws) spread over it: the largest |value| of n uniform draws falls
    below bound/2 with probability 2⁻ⁿ, so a narrower init would be caught."""
    assert values.size and np.abs(values).max() <= bound * (1 + 1e-6)
    if values.size >= 20:
        assert np.abs(values).max() > 0.5 * bound
        assert values.min() < 0 < values.max()


@pytest.mark.parametrize("gamma", [1.0, 2.5])
@pytest.mark.parametrize("E,k", [(4, 2), (8, 3), (6, 1)])
def test_dselect_init_ranges(E, k, gamma):
    """z weights and biases U(±γ/100), α weights and biases U(±0.05) (the official Keras init)."""
    m = m_of(E)
    for router in ("token", "add"):
        moe = tm.nn.MoE(32, 8, E, gate="dselect_k", k=k, gamma=gamma, router=router, num_tasks=2, seed=1)
        blocks = [moe.gate.weight.data, moe.gate.bias.data]
        if router == "add":
            blocks.append(moe.gate.task_weight.data)
        z_part = np.concatenate([b[..., : k * m].ravel() for b in blocks])
        a_part = np.concatenate([b[..., k * m:].ravel() for b in blocks])
        assert_uniform_range(z_part, gamma / 100)
        assert_uniform_range(a_part, 0.05)
    # at init every S(z) ≈ ½: all experts equal weight (within 0.05 of 1/E for unit-scale inputs)
    x = (np.random.default_rng(0).standard_normal((4, 32)) / np.sqrt(32)).astype(np.float32)
    moe(x, task_ids=np.zeros(4, int))
    if E & (E - 1) == 0:
        q = dense(moe.last_routing.weights, moe.last_routing.expert_idx, E)
        np.testing.assert_allclose(q, 1 / E, atol=0.05)
    # MultiGateMoE, static and per example
    for per_example in (False, True):
        mg = tm.nn.MultiGateMoE(16, 4, E, 2, gate="dselect_k", k=k, per_example=per_example, gamma=gamma, seed=2)
        if not per_example:
            z_part, a_part = mg.z.data.ravel(), mg.alpha.data.ravel()
        else:
            ps = [p.data for lin in mg.gates for p in (lin.weight, lin.bias)]
            z_part = np.concatenate([p[..., : k * m].ravel() for p in ps])
            a_part = np.concatenate([p[..., k * m:].ravel() for p in ps])
        assert_uniform_range(z_part, gamma / 100)
        assert_uniform_range(a_part, 0.05)


# ------------------------------------------------------------------------------------------------ expert choice
@given(T=st.integers(1, 12), E=st.integers(1, 6), k=st.integers(1, 3), c=st.sampled_from([0.5, 1.0, 1.5, 2.0, 8.0]),
       seed=st.integers(0, 1000))
def test_expert_choice_each_expert_takes_its_top_C_tokens(T, E, k, c, seed):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    moe = tm.nn.MoE(5, 6, E, gate="expert_choice", k=k, capacity_factor=c, activation="relu", seed=seed,
                    dtype=np.float64)
    x = rng.standard_normal((T, 5))
    y = moe(x).numpy()
    C = min(math.ceil(c * T * k / E), T)
    S = np_softmax(logits_of(moe, x))
    st_ = moe.last_routing
    want_y = np.zeros_like(y)
    for e in range(E):
        took = sorted(set(np.nonzero(st_.keep & (st_.expert_idx == e))[0]))
        top = sorted(sorted(range(T), key=lambda t: (-S[t, e], t))[:C])
        note(f"expert {e}: took {took}, top-C {top}")
        assert took == top
        assert st_.counts[e] == C
        for t in top:  # combine weight: the token's router probability for that expert
            want_y[t] += S[t, e] * ffn(moe.experts, e, x[t])
    assert np.all(st_.dropped == 0)
    np.testing.assert_allclose(y, want_y, **F64)


# ------------------------------------------------------------------------------------------------ hash
def test_hash_routing_is_a_fixed_function_of_the_id():
    rng = np.random.default_rng(0)
    E, k = 6, 2
    moe = tm.nn.MoE(4, 6, E, gate="hash", k=k, activation="relu", seed=0, dtype=np.float64)
    ids = rng.integers(0, 20, 40)
    moe(rng.standard_normal((40, 4)), token_ids=ids)
    table = {}
    for t, i in enumerate(ids):
        row = tuple(moe.last_routing.expert_idx[t])
        assert len(set(row)) == k and all(0 <= e < E for e in row)
        assert table.setdefault(int(i), row) == row  # the same id always goes to the same experts
    np.testing.assert_allclose(moe.last_routing.weights, 1 / k, **F64)
    assert len(set(table.values())) > 1  # and different ids spread over experts
    # another batch, other inputs, other order: the same map from id to experts
    ids2 = rng.permutation(ids)[:15]
    x2 = rng.standard_normal((15, 4)) * 10
    y2 = moe(x2, token_ids=ids2).numpy()
    for t, i in enumerate(ids2):
        assert tuple(moe.last_routing.expert_idx[t]) == table[int(i)]
        want = sum(ffn(moe.experts, e, x2[t]) for e in table[int(i)]) / k
        np.testing.assert_allclose(y2[t], want, **F64)
    # by task id when no token ids are given
    moe_t = tm.nn.MoE(4, 6, E, gate="hash", k=k, num_tasks=3, seed=0)
    tasks = np.array([0, 1, 2, 1, 0])
    moe_t(rng.standard_normal((5, 4)).astype(np.float32), task_ids=tasks)
    for t in range(5):
        np.testing.assert_array_equal(moe_t.last_routing.expert_idx[t], moe_t.last_routing.expert_idx[tasks == tasks[t]][0])


def test_hash_layer_with_num_tasks_still_routes_by_token_ids():
    """Knowing the number of tasks must not stop a hash layer from routing by the token ids it is given."""
    moe = tm.nn.MoE(4, 6, 4, gate="hash", k=1, num_tasks=2, seed=0)
    ids = np.array([3, 1, 3, 2])
    moe(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), token_ids=ids)
    np.testing.assert_array_equal(moe.last_routing.expert_idx[0], moe.last_routing.expert_idx[2])


def test_hash_gate_in_the_transformer_routes_by_token_id():
    """ModelConfig accepts gate='hash'; a hash layer (Roller et al. 2021) routes each position by its token id."""
    cfg = tm.ModelConfig(vocab_size=10, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4,
                         k=1, moe_every=1, gate="hash")
    model = tm.MoETransformer(cfg)
    tokens = np.array([[1, 2, 3, 1, 2, 7], [7, 7, 3, 1, 0, 9]])
    model(tokens)
    for layer in model.moe_layers:
        idx = layer.last_routing.expert_idx.reshape(2, 6, -1)
        for tok in np.unique(tokens):
            rows = idx[tokens == tok]
            assert np.all(rows == rows[0]), f"token {tok} routed to {rows.tolist()}"


# ------------------------------------------------------------------------------------------------ task routing
@pytest.mark.parametrize("gate", ["top_k", "softmax", "dselect_k"])
def test_task_level_router_gives_every_token_of_a_task_the_same_experts(gate):
    rng = np.random.default_rng(5)
    moe = tm.nn.MoE(6, 8, 4, gate=gate, k=2, router="task", num_tasks=3, seed=4)
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    tasks = np.array([2, 0, 2, 1])
    moe(x, task_ids=tasks)
    st_ = moe.last_routing
    idx = st_.expert_idx.reshape(4, 5, -1)
    w = st_.weights.reshape(4, 5, -1)
    keep = st_.keep.reshape(4, 5, -1)
    for b in range(4):
        same = tasks == tasks[b]
        assert np.all(idx[same] == idx[b, 0]) and np.all(keep[same] == keep[b, 0])
        np.testing.assert_allclose(w[same], np.broadcast_to(w[b, 0], w[same].shape), **F32)
    if gate == "top_k":  # h = e_task·U + b, whatever the token
        e = moe.gate.task_embedding.weight.data
        h = e @ moe.gate.weight.data + moe.gate.bias.data
        for b in range(4):
            assert list(idx[b, 0]) == hand_top_k(h[tasks[b]], 2)


def test_task_embedding_composed_from_description_parts():
    descriptions = [[0], [1], [0, 2], [2, 1, 0]]
    emb = TaskEmbedding(4, 5, descriptions=descriptions, num_parts=3, seed=0, dtype=np.float64)
    parts = emb.part_weight.data
    got = emb(np.array([0, 1, 2, 3, 2])).numpy()
    want = np.stack([parts[d].sum(axis=0) for d in [descriptions[i] for i in (0, 1, 2, 3, 2)]])
    np.testing.assert_allclose(got, want, **F64)
    new = emb.add_task([2, 0])  # an unseen task made of known parts
    assert new == 4 and emb.num_tasks == 5
    np.testing.assert_allclose(emb(np.array([new])).numpy()[0], parts[0] + parts[2], **F64)
    np.testing.assert_allclose(emb(np.array([new])).numpy(), emb(np.array([2])).numpy(), **F64)  # = task [0, 2]
    # the gradient reaches exactly the parts used
    pw = emb.part_weight
    pw.grad = None
    emb(np.array([new])).sum().backward()
    np.testing.assert_array_equal(pw.grad, np.array([[1.0] * 5, [0.0] * 5, [1.0] * 5]))
    with pytest.raises(ValueError, match="parts"):
        emb.add_task([3])
    with pytest.raises(ValueError, match="descriptions"):
        TaskEmbedding(2, 4).add_task([0])


@pytest.mark.parametrize("router", ["task", "add", "concat"])
def test_new_task_with_known_parts_routes_without_training(router):
    rng = np.random.default_rng(7)
    moe = tm.nn.MoE(6, 8, 4, gate="top_k", k=2, router=router, num_tasks=3, task_descriptions=[[0], [1], [0, 1]],
                    seed=2, dtype=np.float64)
    x = rng.standard_normal((7, 6))
    new = moe.gate.task_embedding.add_task([1, 0])
    assert new == 3
    y_new = moe(x, task_ids=np.full(7, new)).numpy()
    idx_new = moe.last_routing.expert_idx.copy()
    y_old = moe(x, task_ids=np.full(7, 2)).numpy()
    np.testing.assert_allclose(y_new, y_old, **F64)  # same parts -> same routing and output
    np.testing.assert_array_equal(idx_new, moe.last_routing.expert_idx)
    # and the routing is the one the composed embedding gives, computed by hand
    p = moe.gate.task_embedding.part_weight.data
    e = p[0] + p[1]
    W, b = moe.gate.weight.data, moe.gate.bias.data
    if router == "task":
        h = np.broadcast_to(e @ W + b, (7, 4))
    elif router == "add":
        h = x @ W + e @ moe.gate.task_weight.data + b
    else:
        h = np.concatenate([x, np.broadcast_to(e, (7, len(e)))], axis=1) @ W + b
    for t in range(7):
        assert list(idx_new[t]) == hand_top_k(h[t], 2)


def test_transformer_add_task_routes_a_composed_task():
    cfg = tm.ModelConfig(vocab_size=8, max_seq_len=6, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, k=2,
                         moe_every=1, router="task", num_tasks=2, task_embedding=True, task_descriptions=[[0], [1]],
                         num_description_parts=2)
    model = tm.MoETransformer(cfg)
    new = model.add_task([0, 1])
    assert new == 2
    tokens = np.random.default_rng(0).integers(0, 8, (3, 6))
    out = model(tokens, task_ids=np.array([2, 0, 2]))
    assert out.shape == (3, 6, 8) and np.all(np.isfinite(out.numpy()))
    for layer in model.moe_layers:
        p = layer.gate.task_embedding.part_weight.data
        h = (p[0] + p[1]) @ layer.gate.weight.data + layer.gate.bias.data
        idx = layer.last_routing.expert_idx.reshape(3, 6, -1)
        for b in (0, 2):
            assert np.all(idx[b] == hand_top_k(h, 2))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("E", [4, 5])
@pytest.mark.parametrize("gate", G.GATES)
def test_a_nan_token_comes_out_nan_for_every_gate(gate, E, backend):
    """NaN in, NaN out: the gates that keep only nonzero weights (dselect_k) or let experts pick tokens
    (expert_choice) once dropped a NaN token from every expert, so it came out as a finite 0 that hid the NaN."""
    if backend not in tm.backends.available():
        pytest.skip(f"{backend} backend not installed")
    x = np.random.default_rng(0).standard_normal((7, 6)).astype(np.float32)
    x[2, 3] = np.nan
    moe = tm.nn.MoE(6, 8, E, gate=gate, k=2, seed=0)
    with tm.use_backend(backend), np.errstate(invalid="ignore"):
        for training in (True, False):
            moe.train(training)
            y = moe(x, token_ids=np.arange(7)).numpy()
            assert np.isnan(y[2]).all(), (gate, training, y[2])
            assert np.isfinite(np.delete(y, 2, axis=0)).all(), (gate, training)


@pytest.mark.parametrize("gate, per_example", [("softmax", False), ("top_k", False), ("dselect_k", False),
                                               ("dselect_k", True)])
def test_a_nan_example_comes_out_nan_in_multigate_moe(gate, per_example):
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    x[1, 0] = np.nan
    mg = tm.nn.MultiGateMoE(6, 4, 5, 2, gate=gate, k=2, per_example=per_example, seed=0)
    mg.eval()
    with np.errstate(invalid="ignore"):
        outs = mg(x)
    for out in outs:
        assert np.isnan(out.numpy()[1]).all() and np.isfinite(np.delete(out.numpy(), 1, axis=0)).all()
