"""The MoE layers against docs/design.md §3-4: invariants as hypothesis properties, and float64 gradients.

References are written here in NumPy from the spec (top-k by hand, the capacity queue by hand, each expert's FFN
by hand with activation="relu"), never by calling into the layer's internals. Layers under an exact comparison
are built in float64 and compared to 1e-10 (only summation order differs); float32 layers to 1e-5.

Gradient checks: `tinymoe.gradcheck.check_grad` (central differences in float64, eps = 1e-6, a gradient passes
when |engine − numeric| ≤ 1e-6 + 1e-5·|numeric|) on L = Σ y ⊙ U (+ the layer's auxiliary losses) with a fixed
random U, with respect to the input and every parameter. A step of 1e-6 moves a logit by ~1e-6, so before each
check we assert that the discrete decisions have a margin of at least 1e-3 (the gap between the k-th and
(k+1)-th logit, or between the C-th and (C+1)-th token of each expert for expert choice): no step flips them.
"""
import contextlib
import copy
import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe.gradcheck import check_grad

EXACT = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-5)
MARGIN = 1e-3


# ------------------------------------------------------------------------------------------------ references
def np_softmax(h, axis=-1):
    e = np.exp(h - h.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def relu(v):
    return np.maximum(v, 0)


def arr(p):
    return np.asarray(p.data, dtype=np.float64)


def ffn(experts, e, x):
    """Expert e: relu(x·W1 + b1)·W2 + b2 (layers under comparison use activation='relu')."""
    return relu(x @ arr(experts.w1)[e] + arr(experts.b1)[e]) @ arr(experts.w2)[e] + arr(experts.b2)[e]


def token_logits(moe, x):
    return x @ arr(moe.gate.weight) + arr(moe.gate.bias)


def hand_top_k(row, k):
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def hand_moe_top_k(moe, x, k, capacity_factor=None, priority="slot"):
    """y_t = Σ_j w_{t,j} FFN_{e_{t,j}}(x_t) over the assignments that fit (docs/design.md §2-4), by hand."""
    T, E = x.shape[0], moe.num_experts
    h = token_logits(moe, x)
    idx = np.array([hand_top_k(h[t], k) for t in range(T)])
    if k == 1:
        w = np.array([[np_softmax(h[t])[idx[t, 0]]] for t in range(T)])
    else:
        w = np.array([np_softmax(h[t][idx[t]]) for t in range(T)])
    keep = np.ones((T, k), bool)
    if capacity_factor is not None:
        C = math.ceil(capacity_factor * T * k / E)
        queue = [(t, j) for j in range(k) for t in range(T)]
        if priority == "weight":
            queue.sort(key=lambda a: -w[a])
        held = [0] * E
        for t, j in queue:
            if held[idx[t, j]] < C:
                held[idx[t, j]] += 1
            else:
                keep[t, j] = False
    y = np.zeros((T, moe.config.d_model))
    for t in range(T):
        for j in range(k):
            if keep[t, j]:
                y[t] += w[t, j] * ffn(moe.experts, idx[t, j], x[t])
    return y, idx, w, keep


def topk_margin(h, k):
    """Smallest gap between the k-th and (k+1)-th largest logit over tokens (inf when k = E)."""
    if k >= h.shape[1]:
        return np.inf
    s = -np.sort(-h, axis=1)
    return float((s[:, k - 1] - s[:, k]).min())


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def layer_cases(draw, gates=("top_k",), max_T=8, max_E=5):
    T = draw(st.integers(1, max_T))
    E = draw(st.integers(1, max_E))
    k = draw(st.integers(1, E))
    d = draw(st.integers(1, 5))
    f = draw(st.integers(1, 5))
    gate = draw(st.sampled_from(gates))
    seed = draw(st.integers(0, 2**16))
    return T, E, k, d, f, gate, seed


def make(E, k, d, f, gate="top_k", seed=0, dtype=np.float64, scale=1.0, **kw):
    moe = tm.nn.MoE(d, f, E, gate=gate, k=k, activation=kw.pop("activation", "relu"), seed=seed, dtype=dtype, **kw)
    rng = np.random.default_rng(seed + 1)
    for name, p in moe.named_parameters():  # non-trivial values (W_g of noisy top-k starts at 0); DSelect-k keeps
        # its own small init, else its smooth steps saturate and the gate has no gradient
        if (name.startswith(("gate.", "noise.")) and gate != "dselect_k") or name.endswith(("b1", "b2")):
            p.data[...] = (rng.standard_normal(p.shape) * scale).astype(p.dtype)
    return moe


# ------------------------------------------------------------------------------------------------ invariants
@given(T=st.integers(1, 8), d=st.integers(1, 5), f=st.integers(1, 6), seed=st.integers(0, 2**16),
       gate=st.sampled_from(["top_k", "softmax", "noisy_top_k", "expert_choice", "hash"]))
def test_one_expert_k1_is_the_dense_ffn(T, d, f, seed, gate):
    """One expert, k = 1: every token goes to it with weight 1 (Switch: p = softmax over one logit = 1)."""
    moe = make(1, 1, d, f, gate, seed)
    moe.eval()
    x = np.random.default_rng(seed).standard_normal((T, d))
    y = moe(x, token_ids=np.arange(T)).numpy() if gate == "hash" else moe(x).numpy()
    note(f"weights={moe.last_routing.weights.ravel()}")
    np.testing.assert_allclose(y, ffn(moe.experts, 0, x), **EXACT)
    np.testing.assert_allclose(moe.last_routing.weights[moe.last_routing.keep], 1.0, **EXACT)


def test_one_expert_dselect_k_is_the_dense_ffn():
    """DSelect-k with E = 1: m = ⌈log2 1⌉ = 0 bits, r(z) is the empty product 1, so the one expert gets weight 1."""
    moe = make(1, 1, 3, 4, "dselect_k", 0)
    x = np.random.default_rng(0).standard_normal((5, 3))
    y = moe(x).numpy()
    np.testing.assert_allclose(moe.last_routing.weights[moe.last_routing.keep], 1.0, **EXACT)
    np.testing.assert_allclose(y, ffn(moe.experts, 0, x), **EXACT)


def test_one_expert_is_the_library_dense_ffn_with_gelu():
    """The expert path's GELU is the dense FeedForward's GELU: copy the weights across and compare."""
    moe = tm.nn.MoE(6, 10, 1, gate="top_k", k=1, activation="gelu", seed=2, dtype=np.float64)
    ff = tm.nn.FeedForward(6, 10, "gelu", seed=0, dtype=np.float64)
    e = moe.experts
    e.b1.data[...] = np.linspace(-1, 1, 10)
    e.b2.data[...] = np.linspace(0.5, -0.5, 6)
    ff.fc1.weight.data[...], ff.fc1.bias.data[...] = e.w1.data[0], e.b1.data[0]
    ff.fc2.weight.data[...], ff.fc2.bias.data[...] = e.w2.data[0], e.b2.data[0]
    x = np.random.default_rng(0).standard_normal((2, 3, 6))
    np.testing.assert_allclose(moe(x).numpy(), ff(tm.Tensor(x)).numpy(), **EXACT)


@given(case=layer_cases(gates=("softmax",)))
def test_softmax_gate_is_the_dense_mixture(case):
    T, E, _, d, f, _, seed = case
    moe = make(E, E, d, f, "softmax", seed)
    x = np.random.default_rng(seed).standard_normal((T, d))
    p = np_softmax(token_logits(moe, x))
    want = sum(p[:, e:e + 1] * ffn(moe.experts, e, x) for e in range(E))
    np.testing.assert_allclose(moe(x).numpy(), want, **EXACT)
    assert moe.last_routing.keep.all() and np.all(moe.last_routing.counts == T)


@given(case=layer_cases(), cap=st.sampled_from([None, 0.3, 0.75, 1.0, 1.5]), priority=st.sampled_from(["slot", "weight"]))
def test_top_k_layer_matches_hand_routing_capacity_and_combine(case, cap, priority):
    """The whole layer against a by-hand top-k + capacity queue + weighted sum; last_routing consistent with it."""
    T, E, k, d, f, _, seed = case
    moe = make(E, k, d, f, "top_k", seed, capacity_factor=cap, priority=priority)
    x = np.random.default_rng(seed).standard_normal((T, d))
    y = moe(x).numpy()
    want, idx, w, keep = hand_moe_top_k(moe, x, k, cap, priority)
    st_ = moe.last_routing
    note(f"idx=\n{idx}\nkeep=\n{keep}\nlayer keep=\n{st_.keep}")
    np.testing.assert_array_equal(st_.expert_idx, idx)
    np.testing.assert_allclose(st_.weights, w, **EXACT)
    np.testing.assert_array_equal(st_.keep, keep)
    np.testing.assert_allclose(y, want, **EXACT)
    # the statistics agree with the routing
    assert st_.chosen.all()
    np.testing.assert_array_equal(st_.counts, np.bincount(idx[keep], minlength=E))
    np.testing.assert_array_equal(st_.dropped, np.bincount(idx[~keep], minlength=E))
    assert st_.counts.sum() + st_.dropped.sum() == T * k
    if cap is not None:
        assert np.all(st_.counts <= math.ceil(cap * T * k / E))
    assert st_.tokens_dropped == int((~keep.any(axis=1)).sum())
    np.testing.assert_array_equal(y[~keep.any(axis=1)], 0.0)  # dropped everywhere: output exactly 0
    np.testing.assert_allclose(st_.expert_load(), st_.counts / max(st_.counts.sum(), 1), **EXACT)


def permuted_copy(moe, perm):
    """The same layer with expert i := old expert perm[i] and the router's output columns permuted alike."""
    other = copy.deepcopy(moe)
    for name, p in other.named_parameters():
        if name.startswith("experts."):
            p.data = p.data[perm].copy()
        elif name.startswith(("gate.", "noise.")) and "task_embedding" not in name:
            p.data = p.data[..., perm].copy()
    return other


@given(case=layer_cases(gates=("top_k", "softmax", "noisy_top_k", "expert_choice")),
       cap=st.sampled_from([None, 0.5, 1.0]), priority=st.sampled_from(["slot", "weight"]), data=st.data())
def test_permuting_experts_and_gate_columns_changes_nothing(case, cap, priority, data):
    T, E, k, d, f, gate, seed = case
    moe = make(E, k, d, f, gate, seed, capacity_factor=cap, priority=priority)
    moe.eval()
    perm = np.array(data.draw(st.permutations(list(range(E))), label="perm"))
    x = np.random.default_rng(seed).standard_normal((T, d))
    y = moe(x).numpy()
    y_perm = permuted_copy(moe, perm)(x).numpy()
    np.testing.assert_allclose(y_perm, y, **EXACT)


@pytest.mark.parametrize("router", ["concat", "add", "task", "multi_gate"])
def test_permutation_invariance_with_task_routers(router):
    rng = np.random.default_rng(3)
    moe = make(5, 2, 4, 3, "top_k", 3, router=router, num_tasks=3)
    x, tasks = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    perm = rng.permutation(5)
    np.testing.assert_allclose(permuted_copy(moe, perm)(x, task_ids=tasks).numpy(), moe(x, task_ids=tasks).numpy(),
                               **EXACT)


@given(case=layer_cases(gates=("top_k", "softmax", "noisy_top_k", "dselect_k", "hash")),
       priority=st.sampled_from(["slot", "weight"]))
def test_capacity_at_least_T_times_k_is_dropless(case, priority):
    T, E, k, d, f, gate, seed = case
    x = np.random.default_rng(seed).standard_normal((T, d))
    ids = np.random.default_rng(seed).integers(0, 50, T)
    outs = []
    for cap in (None, float(E)):  # C = ⌈E·T·k/E⌉ = T·k: room for every assignment
        moe = make(E, k, d, f, gate, seed, capacity_factor=cap, priority=priority)
        moe.eval()
        outs.append(moe(x, token_ids=ids).numpy())
        assert np.all(moe.last_routing.dropped == 0)
        np.testing.assert_array_equal(moe.last_routing.keep, moe.last_routing.chosen)
    np.testing.assert_allclose(outs[1], outs[0], **EXACT)


@given(case=layer_cases(gates=("top_k", "softmax", "noisy_top_k", "dselect_k", "expert_choice", "hash")),
       cap=st.sampled_from([None, 0.5]))
def test_eval_routing_is_deterministic(case, cap):
    T, E, k, d, f, gate, seed = case
    moe = make(E, k, d, f, gate, seed, capacity_factor=cap)
    moe.eval()
    x = np.random.default_rng(seed).standard_normal((T, d))
    ids = np.arange(T)
    y1, r1 = moe(x, token_ids=ids).numpy(), copy.deepcopy(moe.last_routing)
    y2, r2 = moe(x, token_ids=ids).numpy(), moe.last_routing
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(r1.expert_idx, r2.expert_idx)
    np.testing.assert_array_equal(r1.keep, r2.keep)
    # last_routing is self-consistent for every gate
    np.testing.assert_array_equal(r2.counts, np.bincount(r2.expert_idx[r2.keep], minlength=E))
    np.testing.assert_array_equal(r2.dropped, np.bincount(r2.expert_idx[r2.chosen & ~r2.keep], minlength=E))
    assert not np.any(r2.keep & ~r2.chosen)


@given(B=st.integers(1, 3), T=st.integers(1, 4), seed=st.integers(0, 2**16),
       gate=st.sampled_from(["top_k", "softmax", "noisy_top_k", "dselect_k", "expert_choice"]),
       router=st.sampled_from(["token", "concat", "add", "task", "multi_gate"]), cap=st.sampled_from([None, 0.75]))
def test_batched_and_flat_inputs_agree(B, T, seed, gate, router, cap):
    moe = make(4, 2, 3, 4, gate, seed, capacity_factor=cap, router=router, num_tasks=3)
    moe.eval()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, 3))
    tasks = rng.integers(0, 3, B)
    y3 = moe(x, task_ids=tasks).numpy()
    assert y3.shape == (B, T, 3)
    y2 = moe(x.reshape(B * T, 3), task_ids=np.repeat(tasks, T)).numpy()
    assert y2.shape == (B * T, 3)
    np.testing.assert_allclose(y3.reshape(B * T, 3), y2, **EXACT)


@pytest.mark.parametrize("gate", ["top_k", "softmax", "dselect_k"])
@pytest.mark.parametrize("num_shared", [1, 2])
def test_shared_experts_add_a_dense_ffn(gate, num_shared):
    rng = np.random.default_rng(0)
    plain = make(4, 2, 5, 6, gate, 0, capacity_factor=0.5)
    shared = make(4, 2, 5, 6, gate, 0, capacity_factor=0.5, num_shared_experts=num_shared)
    shared.load_state_dict(plain.state_dict(), strict=False)  # the same router and experts
    x = rng.standard_normal((2, 4, 5))
    extra = 0.0
    for ff in shared.shared:
        extra = extra + relu(x @ arr(ff.fc1.weight) + arr(ff.fc1.bias)) @ arr(ff.fc2.weight) + arr(ff.fc2.bias)
    np.testing.assert_allclose(shared(x).numpy(), plain(x).numpy() + extra, **EXACT)
    # a token dropped by capacity still gets the shared experts' output
    dropped = ~shared.last_routing.keep.any(axis=1)
    if dropped.any():
        np.testing.assert_allclose(shared(x).numpy().reshape(-1, 5)[dropped], extra.reshape(-1, 5)[dropped], **EXACT)


# ------------------------------------------------------------------------------------------------ gradients
@contextlib.contextmanager
def swapped(module, names, tensors):
    """Temporarily replace the named parameters by the given tensors (so check_grad can differentiate them)."""
    def owner(path):
        obj = module
        for part in path.split(".")[:-1]:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj, path.split(".")[-1]

    saved = []
    for name, t in zip(names, tensors):
        obj, attr = owner(name)
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, t)
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def layer_grad_check(layer, x, call=None, with_aux=True, seed=0, reset=None):
    """check_grad of L = Σ y ⊙ U (+ Σ aux losses) in x and every parameter; returns {name: gradient}."""
    call = call or (lambda m, xt: m(xt))
    names = [n for n, _ in layer.named_parameters()]
    params = [p.data.copy() for _, p in layer.named_parameters()]
    assert all(p.dtype == np.float64 for p in params)
    with tm.no_grad():
        out = call(layer, tm.Tensor(x))
    outs = out if isinstance(out, list) else [out]
    U = [np.random.default_rng(seed).standard_normal(o.shape) for o in outs]

    def fn(xt, *ps):
        if reset is not None:
            reset()
        with swapped(layer, names, ps):
            ys = call(layer, xt)
            ys = ys if isinstance(ys, list) else [ys]
            loss = sum((y * u).sum() for y, u in zip(ys, U))
            if with_aux:
                for v in layer.aux_losses.values():
                    loss = loss + v
        return loss

    grads = check_grad(fn, [x, *params], eps=1e-6, atol=1e-6, rtol=1e-5)
    return dict(zip(["x", *names], grads))


def assert_margin(moe, x, k, task_ids=None):
    if moe.config.gate in ("softmax", "dselect_k", "hash"):
        return
    with tm.no_grad():
        h = moe.router(tm.Tensor(x), task_ids).numpy().astype(np.float64)
    if moe.config.gate == "expert_choice":
        C = min(math.ceil((moe.config.capacity_factor or 1.0) * x.shape[0] * k / moe.num_experts), x.shape[0])
        p = -np.sort(-np_softmax(h), axis=0)
        gap = np.inf if C >= x.shape[0] else float((p[C - 1] - p[C]).min())
    else:
        gap = topk_margin(h, k)
    assert gap > MARGIN, f"test setup: routing margin {gap} too small for finite differences"


GATE_CASES = [
    ("softmax", 4, None),
    ("top_k", 2, None),
    ("top_k", 1, None),
    ("top_k", 2, 0.5),  # capacity with drops
    ("top_k", 1, 0.6),
    ("noisy_top_k", 2, None),
    ("dselect_k", 2, None),
    ("dselect_k", 1, None),
    ("expert_choice", 2, 1.0),
    ("expert_choice", 1, 0.5),
    ("hash", 2, None),
]


def seed_with_margin(E, k, d, f, gate, cap, T, **kw):
    """The first seed whose routing has a comfortable margin (deterministic: always the same seed)."""
    task_ids = kw.pop("task_ids", None)
    for seed in range(50):
        moe = make(E, k, d, f, gate, seed, capacity_factor=cap, activation="gelu", **kw)
        if gate == "noisy_top_k":
            moe.eval()
        x = np.random.default_rng(100 + seed).standard_normal((T, d))
        try:
            assert_margin(moe, x, k, task_ids)
            return moe, x
        except AssertionError:
            continue
    raise AssertionError("no seed with a routing margin")


@pytest.mark.parametrize("gate,k,cap", GATE_CASES)
def test_layer_gradients_every_gate(gate, k, cap):
    E, d, f, T = 4, 3, 3, 6
    moe, x = seed_with_margin(E, k, d, f, gate, cap, T)
    ids = np.arange(T) % 5
    grads = layer_grad_check(moe, x, (lambda m, xt: m(xt, token_ids=ids)) if gate == "hash" else None)
    if cap is not None and gate != "expert_choice":
        assert moe.last_routing.dropped.sum() > 0  # the capacity case really drops something
    assert np.abs(grads["x"]).max() > 0 and np.abs(grads["experts.w1"]).max() > 0
    if gate != "hash":
        assert np.abs(grads["gate.weight"]).max() > 0


@pytest.mark.parametrize("gate,k,cap", [("top_k", 1, None), ("top_k", 1, 0.6), ("top_k", 2, None),
                                        ("noisy_top_k", 1, None), ("dselect_k", 2, None), ("expert_choice", 2, 1.0)])
def test_gate_weight_gets_gradient_through_the_combine_weights_alone(gate, k, cap):
    """No auxiliary loss: the router learns only through w in y = Σ w·FFN (Switch's reason for p_i at k = 1)."""
    moe, x = seed_with_margin(4, k, 3, 3, gate, cap, 6)
    grads = layer_grad_check(moe, x, with_aux=False)
    assert np.abs(grads["gate.weight"]).max() > 1e-4
    assert np.abs(grads["gate.bias"]).max() > 1e-4


def test_noisy_top_k_training_gradients_with_a_fixed_noise_draw():
    """Training mode adds noise; replaying the same draw makes the layer a function, whose gradient (through the
    noisy logits, the smooth load Φ of the importance+load loss and W_noise) must match finite differences."""
    moe, x = seed_with_margin(4, 2, 3, 3, "noisy_top_k", None, 6)
    moe.train()
    if not hasattr(moe, "noise_rng"):
        pytest.skip("no replayable noise generator")
    state = copy.deepcopy(moe.noise_rng.bit_generator.state)

    def reset():
        moe.noise_rng.bit_generator.state = copy.deepcopy(state)

    grads = layer_grad_check(moe, x, reset=reset)
    assert "importance_load" in moe.aux_losses
    assert np.abs(grads["noise.weight"]).max() > 0


@pytest.mark.parametrize("router", ["token", "concat", "add", "task", "multi_gate"])
@pytest.mark.parametrize("gate", ["top_k", "softmax"])
def test_layer_gradients_every_router(router, gate):
    tasks = np.array([0, 1, 2, 1, 0, 2])
    moe, x = seed_with_margin(4, 2, 3, 3, gate, None, 6, router=router, num_tasks=3, task_ids=tasks)
    grads = layer_grad_check(moe, x, lambda m, xt: m(xt, task_ids=tasks))
    if router in ("concat", "add", "task"):
        assert np.abs(grads["gate.task_embedding.weight"]).max() > 0


def test_layer_gradients_composed_task_embedding_and_shared_experts():
    tasks = np.array([2, 2, 1, 1])  # task ids [2, 1] per example, two tokens each
    moe, x = seed_with_margin(4, 2, 3, 3, "top_k", 0.75, 4, router="add", num_tasks=3,
                              task_descriptions=[[0], [1], [0, 1]], num_shared_experts=1, task_ids=tasks)
    grads = layer_grad_check(moe, x, lambda m, xt: m(xt.reshape(2, 2, 3), task_ids=np.array([2, 1])))
    assert np.abs(grads["gate.task_embedding.part_weight"]).max() > 0
    assert np.abs(grads["shared.0.fc1.weight"]).max() > 0


# ------------------------------------------------------------------------------------------------ MultiGateMoE
def mg_layer(gate, per_example=False, seed=0, **kw):
    mg = tm.nn.MultiGateMoE(4, 3, 4, 2, gate=gate, k=2, per_example=per_example, seed=seed, tower_hidden=5,
                            dtype=np.float64, **kw)
    rng = np.random.default_rng(seed + 7)
    for name, p in mg.named_parameters():  # non-zero biases; towers' ReLU active on most units
        if name.endswith("bias") or name in ("z", "alpha"):
            p.data[...] = rng.uniform(-0.4, 0.4, p.shape) + (0.3 if "towers" in name else 0.0)
    return mg


def hand_tower(tower, v):
    h = relu(v @ arr(tower.fc1.weight) + arr(tower.fc1.bias))
    return h @ arr(tower.fc2.weight) + arr(tower.fc2.bias)


def hand_dselect_q(z, alpha, E, gamma=1.0):
    m = max(1, math.ceil(math.log2(E)))

    def S(t):
        return np.where(t <= -gamma / 2, 0.0, np.where(t >= gamma / 2, 1.0, -2 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5))

    q = 0.0
    for l in range(len(alpha)):
        r = np.array([np.prod([S(z[l][j]) if (i >> (m - 1 - j)) & 1 else 1 - S(z[l][j]) for j in range(m)])
                      for i in range(E)])
        q = q + np_softmax(np.asarray(alpha))[l] * r
    return q


def test_multigate_softmax_is_the_mmoe_formula():
    """y_t(x) = tower_t(Σ_e softmax(x·W_t + b_t)_e · f_e(x)), f_e = relu MLP (Ma et al. 2018, eq. 5-6)."""
    mg = mg_layer("softmax", seed=1)
    x = np.random.default_rng(0).standard_normal((7, 4))
    outs = mg(x)
    assert isinstance(outs, list) and len(outs) == 2
    f = [ffn(mg.experts, e, x) for e in range(4)]
    for t, out in enumerate(outs):
        assert out.shape == (7, 1)
        g = np_softmax(x @ arr(mg.gates[t].weight) + arr(mg.gates[t].bias))
        mix = sum(g[:, e:e + 1] * f[e] for e in range(4))
        np.testing.assert_allclose(out.numpy(), hand_tower(mg.towers[t], mix), **EXACT)


def test_multigate_static_dselect_and_top_k_match_hand_formulas():
    x = np.random.default_rng(1).standard_normal((5, 4))
    mg = mg_layer("dselect_k", seed=2)
    f = [ffn(mg.experts, e, x) for e in range(4)]
    for t, out in enumerate(mg(x)):
        q = hand_dselect_q(arr(mg.z)[t], arr(mg.alpha)[t], 4)
        np.testing.assert_allclose(out.numpy(), hand_tower(mg.towers[t], sum(q[e] * f[e] for e in range(4))), **EXACT)
    mg = mg_layer("top_k", seed=3)
    for t, out in enumerate(mg(x)):
        h = x @ arr(mg.gates[t].weight) + arr(mg.gates[t].bias)
        mix = np.zeros((5, 3))
        for n in range(5):
            sel = hand_top_k(h[n], 2)
            w = np_softmax(h[n][sel])
            mix[n] = w[0] * ffn(mg.experts, sel[0], x[n]) + w[1] * ffn(mg.experts, sel[1], x[n])
        np.testing.assert_allclose(out.numpy(), hand_tower(mg.towers[t], mix), **EXACT)


@pytest.mark.parametrize("gate,per_example", [("softmax", False), ("top_k", False), ("dselect_k", False),
                                              ("dselect_k", True)])
def test_multigate_gradients(gate, per_example):
    for seed in range(50):
        mg = mg_layer(gate, per_example, seed=seed)
        x = np.random.default_rng(seed).standard_normal((5, 4))
        if gate == "top_k":
            with tm.no_grad():
                hs = [lin(tm.Tensor(x)).numpy() for lin in mg.gates]
            if min(topk_margin(h, 2) for h in hs) < MARGIN:
                continue
        break
    grads = layer_grad_check(mg, x, lambda m, xt: m(xt))
    params = dict(mg.named_parameters())
    gate_names = [n for n in params if n in ("z", "alpha") or n.startswith("gates.")]
    assert gate_names and all(np.abs(grads[n]).max() > 0 for n in gate_names)
