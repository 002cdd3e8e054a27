"""Auxiliary losses (docs/design.md §5) against hand computations.

| loss            | formula checked here                                   | known values                          |
|-----------------|--------------------------------------------------------|---------------------------------------|
| load_balance    | E · Σ_i f_i · P_i over the gate's T·k assignments       | 1 uniform; E all on one expert, p = 1 |
| z_loss          | mean_x logsumexp(h(x))²                                 | hand value                            |
| importance_load | CV(Σ_x g(x))² + CV(load)², CV² = population var / mean² | 1/6 for (1, 2, 3); 0 balanced         |
| weights         | 1e-2, 1e-2, 1e-3, 1e-6; averaged over MoE layers        |                                       |

Float64 values to 1e-12 unless stated; float32 layers to 1e-5.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import gates as G
from tinymoe import losses as L
from tinymoe.gradcheck import check_grad

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)


def np_softmax(h):
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hand_lse(h):
    return np.array([math.log(sum(math.exp(v) for v in row)) for row in h])


def hand_cv2(v):
    v = np.asarray(v, float)
    return v.var() / v.mean() ** 2


def hand_load_balance(probs, expert_idx, keep=None):
    E = probs.shape[1]
    chosen = expert_idx[np.ones(expert_idx.shape, bool) if keep is None else keep]
    f = np.array([(chosen == i).sum() for i in range(E)]) / max(chosen.size, 1)
    return E * float(np.sum(f * probs.mean(axis=0)))


# ------------------------------------------------------------------------------------------------ load balance
@pytest.mark.parametrize("E,k", [(2, 1), (4, 1), (4, 2), (8, 3), (5, 5)])
def test_load_balance_is_one_when_uniform(E, k):
    T = 2 * E
    probs = np.full((T, E), 1.0 / E)
    idx = np.array([[(t + j) % E for j in range(k)] for t in range(T)])  # every expert gets T·k/E assignments
    np.testing.assert_allclose(L.load_balance(tm.Tensor(probs), idx).numpy(), 1.0, **F64)


@pytest.mark.parametrize("E", [1, 2, 4, 7])
def test_load_balance_is_E_when_everything_goes_to_one_expert_with_probability_one(E):
    T = 5
    probs = np.zeros((T, E))
    probs[:, 0] = 1.0
    idx = np.zeros((T, 1), int)
    np.testing.assert_allclose(L.load_balance(tm.Tensor(probs), idx).numpy(), float(E), **F64)


@given(T=st.integers(1, 8), E=st.integers(1, 6), seed=st.integers(0, 2**16), masked=st.booleans())
def test_load_balance_matches_formula_and_only_P_has_gradient(T, E, seed, masked):
    rng = np.random.default_rng(seed)
    k = rng.integers(1, E + 1)
    probs = np_softmax(rng.standard_normal((T, E)))
    idx = np.array([rng.permutation(E)[:k] for _ in range(T)])
    keep = rng.random((T, k)) < 0.7 if masked else None
    p = tm.Tensor(probs, requires_grad=True)
    lb = L.load_balance(p, idx, keep)
    np.testing.assert_allclose(lb.numpy(), hand_load_balance(probs, idx, keep), **F64)
    lb.backward()
    chosen = idx[np.ones(idx.shape, bool) if keep is None else keep]
    f = np.array([(chosen == i).sum() for i in range(E)]) / max(chosen.size, 1)
    np.testing.assert_allclose(p.grad, np.broadcast_to(E * f / T, (T, E)), **F64)  # d/dP_ti of E·Σ f_i·mean_t P_ti


def test_load_balance_in_the_layer():
    """Top-1 layer: all logits equal -> p uniform and every token on expert 0 (ties -> lower index): f = e_0,
    LB = E·1·(1/E) = 1 although nothing is balanced; bias +50 on expert 0 -> p ≈ e_0 too: LB ≈ E."""
    E = 4
    moe = tm.nn.MoE(6, 8, E, gate="top_k", k=1, seed=0, dtype=np.float64)
    moe.gate.weight.data[...] = 0
    moe.gate.bias.data[...] = 0
    x = np.random.default_rng(0).standard_normal((10, 6))
    moe(x)
    assert np.all(moe.last_routing.expert_idx == 0)
    np.testing.assert_allclose(moe.aux_losses["load_balance"].numpy(), 1.0, **F64)
    moe.gate.bias.data[0] = 50.0
    moe(x)
    np.testing.assert_allclose(moe.aux_losses["load_balance"].numpy(), float(E), rtol=1e-12)
    # general case, with capacity drops: f counts the gate's choices (all T·k assignments), P the mean probability
    moe = tm.nn.MoE(6, 8, E, gate="top_k", k=2, capacity_factor=0.5, seed=1, dtype=np.float64)
    moe(x)
    assert moe.last_routing.dropped.sum() > 0
    h = x @ moe.gate.weight.data + moe.gate.bias.data
    want = hand_load_balance(np_softmax(h), moe.last_routing.expert_idx)
    np.testing.assert_allclose(moe.aux_losses["load_balance"].numpy(), want, **F64)


# ------------------------------------------------------------------------------------------------ z-loss
def test_z_loss_hand_value():
    h = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 0.5]])
    want = np.mean(hand_lse(h) ** 2)
    # the first two by hand: log(e + e² + e³) = 3.40760596..., log 3 = 1.09861228...
    np.testing.assert_allclose(hand_lse(h)[:2], [3.4076059644443806, 1.0986122886681098], **F64)
    np.testing.assert_allclose(L.z_loss(tm.Tensor(h)).numpy(), want, **F64)
    # gradient: d/dh_ti of mean_t lse_t² = 2·lse_t·softmax(h_t)_i / T
    ht = tm.Tensor(h, requires_grad=True)
    L.z_loss(ht).backward()
    np.testing.assert_allclose(ht.grad, 2 * hand_lse(h)[:, None] * np_softmax(h) / 3, **F64)


@pytest.mark.parametrize("gate", ["top_k", "softmax", "noisy_top_k", "expert_choice"])
def test_z_loss_in_the_layer(gate):
    moe = tm.nn.MoE(5, 6, 4, gate=gate, k=2, seed=3, dtype=np.float64)
    rng = np.random.default_rng(1)
    moe.gate.weight.data[...] = rng.standard_normal(moe.gate.weight.shape)
    x = rng.standard_normal((7, 5))
    moe.eval()
    moe(x)
    h = x @ moe.gate.weight.data + moe.gate.bias.data
    np.testing.assert_allclose(moe.aux_losses["z_loss"].numpy(), np.mean(hand_lse(h) ** 2), **F64)


# ------------------------------------------------------------------------------------------------ importance + load
def test_cv_squared_hand_values():
    np.testing.assert_allclose(G.cv_squared(tm.Tensor(np.array([1.0, 2.0, 3.0]))).numpy(), 1 / 6, rtol=1e-9)
    np.testing.assert_allclose(G.cv_squared(tm.Tensor(np.array([2.0, 2.0, 2.0]))).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(G.cv_squared(tm.Tensor(np.array([4.0, 0.0, 0.0, 0.0]))).numpy(), 3.0, rtol=1e-9)


def test_importance_load_eval_hand_value():
    """No noise: importance = Σ_x g(x) (the top-k weights), load = tokens per expert."""
    moe = tm.nn.MoE(4, 6, 3, gate="noisy_top_k", k=2, seed=0, dtype=np.float64)
    moe.gate.weight.data[...] = np.random.default_rng(4).standard_normal((4, 3))
    moe.eval()
    x = np.random.default_rng(5).standard_normal((6, 4))
    moe(x)
    h = x @ moe.gate.weight.data + moe.gate.bias.data
    g = np.zeros((6, 3))
    load = np.zeros(3)
    for t in range(6):
        sel = sorted(range(3), key=lambda e: -h[t, e])[:2]
        g[t, sel] = np_softmax(h[t, sel])
        load[sel] += 1
    want = hand_cv2(g.sum(axis=0)) + hand_cv2(load)
    np.testing.assert_allclose(moe.aux_losses["importance_load"].numpy(), want, rtol=1e-9)


class ReplayNoise:
    """A stand-in for the gate's random generator that always returns the same ε."""

    def __init__(self, eps):
        self.eps = eps

    def standard_normal(self, shape):
        assert tuple(shape) == self.eps.shape
        return self.eps.copy()


def hand_phi(v):
    return 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))


def hand_importance_load_training(h, hn, eps, k):
    """Shazeer et al. 2017 eq. 4-11: H = h + ε·σ, σ = softplus(h_noise) (+ 1e-2, the noise_epsilon of Shazeer's
    code); g = softmax over the top-k of H; P(x, i) = Φ((h_i − kth_excluding(H, k, i)) / σ_i)."""
    sigma = np.logaddexp(0, hn) + 1e-2
    H = h + eps * sigma
    T, E = h.shape
    g = np.zeros((T, E))
    P = np.zeros((T, E))
    for t in range(T):
        sel = sorted(range(E), key=lambda e: -H[t, e])[:k]
        g[t, sel] = np_softmax(H[t, sel])
        for i in range(E):
            others = np.sort(np.delete(H[t], i))[::-1]
            P[t, i] = hand_phi((h[t, i] - others[k - 1]) / sigma[t, i])
    return hand_cv2(g.sum(axis=0)) + hand_cv2(P.sum(axis=0))


def test_importance_load_training_hand_value():
    rng = np.random.default_rng(6)
    T, E, k = 5, 4, 2
    h, hn, eps = rng.standard_normal((T, E)), rng.standard_normal((T, E)), rng.standard_normal((T, E))
    r = G.noisy_top_k_gate(tm.Tensor(h), tm.Tensor(hn), k, ReplayNoise(eps), training=True)
    # 1e-6: NumPy has no erf, the library's Φ is a 1.5e-7-accurate approximation
    np.testing.assert_allclose(r.aux["importance_load"].numpy(), hand_importance_load_training(h, hn, eps, k),
                               rtol=1e-6, atol=1e-6)


def test_importance_load_training_gradient_matches_finite_differences():
    """The smooth load Φ((h_i − kth_excluding(H, k, i)) / σ_i) depends on h through both h_i and the threshold
    (other experts' noisy logits); the engine's gradient must be the derivative of the value it reports."""
    rng = np.random.default_rng(7)
    T, E, k = 6, 4, 2
    h, hn, eps = rng.standard_normal((T, E)), rng.standard_normal((T, E)), rng.standard_normal((T, E))
    H = h + eps * (np.logaddexp(0, hn) + 1e-2)
    s = -np.sort(-H, axis=1)
    assert np.min(s[:, :-1] - s[:, 1:]) > 1e-3  # no ordering of H flips within the finite-difference step

    def fn(logits, noise_logits):
        return G.noisy_top_k_gate(logits, noise_logits, k, ReplayNoise(eps), training=True).aux["importance_load"]

    # atol 1e-5: the derivative of the 1.5e-7-accurate erf approximation is accurate to ~1e-6
    check_grad(fn, [h, hn], eps=1e-6, atol=1e-5, rtol=1e-4)


def test_importance_load_gives_the_noise_router_a_gradient():
    moe = tm.nn.MoE(4, 6, 4, gate="noisy_top_k", k=1, seed=0)
    moe(np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    moe.aux_losses["importance_load"].backward()
    assert moe.noise.weight.grad is not None and np.abs(moe.noise.weight.grad).max() > 0
    assert np.abs(moe.gate.weight.grad).max() > 0


# ------------------------------------------------------------------------------------------------ weights, layers
def test_default_weights():
    assert L.DEFAULT_WEIGHTS == {"load_balance": 1e-2, "importance_load": 1e-2, "z_loss": 1e-3, "dselect_entropy": 1e-6,
                                 "dselect_reachability": 1.0}


@pytest.mark.parametrize("gate,expected", [("top_k", {"load_balance", "z_loss"}),
                                           ("noisy_top_k", {"load_balance", "z_loss", "importance_load"}),
                                           ("dselect_k", {"load_balance", "dselect_entropy"})])
def test_layer_aux_loss_is_the_default_weighted_sum(gate, expected):
    moe = tm.nn.MoE(6, 8, 4, gate=gate, k=2, seed=0, dtype=np.float64)
    moe(np.random.default_rng(0).standard_normal((9, 6)))
    assert expected <= set(moe.aux_losses)
    weights = {"load_balance": 1e-2, "importance_load": 1e-2, "z_loss": 1e-3, "dselect_entropy": 1e-6}
    want = sum(weights[n] * float(v.numpy()) for n, v in moe.aux_losses.items())
    np.testing.assert_allclose(float(np.asarray(moe.aux_loss().numpy())), want, **F64)
    # an override replaces one weight, the rest stay at their defaults
    moe2 = tm.nn.MoE(6, 8, 4, gate=gate, k=2, seed=0, dtype=np.float64, aux_weights={"load_balance": 0.5})
    moe2(np.random.default_rng(0).standard_normal((9, 6)))
    want2 = want + (0.5 - 1e-2) * float(moe2.aux_losses["load_balance"].numpy())
    np.testing.assert_allclose(float(np.asarray(moe2.aux_loss().numpy())), want2, **F64)


@pytest.mark.parametrize("gate", ["top_k", "noisy_top_k", "dselect_k"])
def test_transformer_aux_losses_are_averaged_over_layers(gate):
    cfg = tm.ModelConfig(vocab_size=8, max_seq_len=6, d_model=16, n_layers=4, n_heads=2, d_ff=16, num_experts=4, k=2,
                         moe_every=1, gate=gate)
    model = tm.MoETransformer(cfg)
    tokens = np.random.default_rng(0).integers(0, 8, (3, 6))
    model(tokens)
    layers = model.moe_layers
    assert len(layers) == 4
    avg = model.aux_losses
    assert set(avg) == set(layers[0].aux_losses)
    differ = 0
    for name, value in avg.items():
        per_layer = [float(m.aux_losses[name].numpy()) for m in layers]
        differ += len(set(per_layer)) > 1
        np.testing.assert_allclose(float(value.numpy()), np.mean(per_layer), **F32)
    assert differ  # the layers really differ (noisy top-k's z-loss is log(E)² in every layer at W_g = 0)
    want = sum({"load_balance": 1e-2, "importance_load": 1e-2, "z_loss": 1e-3, "dselect_entropy": 1e-6}[n]
               * float(v.numpy()) for n, v in avg.items())
    np.testing.assert_allclose(float(np.asarray(model.aux_loss().numpy())), want, **F32)
    # the total is differentiable down to every layer's router
    model.aux_loss().backward()
    for m in layers:
        assert m.gate.weight.grad is not None and np.abs(m.gate.weight.grad).max() > 0


def test_transformer_aux_losses_only_from_moe_blocks_and_config_weights():
    cfg = tm.ModelConfig(vocab_size=8, max_seq_len=6, d_model=16, n_layers=4, n_heads=2, d_ff=16, num_experts=4, k=2,
                         moe_every=2, aux_weights={"z_loss": 0.0, "load_balance": 1.0})
    model = tm.MoETransformer(cfg)
    assert len(model.moe_layers) == 2  # blocks 1 and 3
    model(np.random.default_rng(1).integers(0, 8, (2, 6)))
    lbs = [float(m.aux_losses["load_balance"].numpy()) for m in model.moe_layers]
    np.testing.assert_allclose(float(np.asarray(model.aux_loss().numpy())), np.mean(lbs), **F32)
    dense = tm.MoETransformer(tm.ModelConfig(vocab_size=8, max_seq_len=6, d_model=16, n_layers=2, n_heads=2,
                                             d_ff=16, moe_every=0))
    dense(np.zeros((1, 3), int))
    assert dense.aux_losses == {} and float(np.asarray(getattr(dense.aux_loss(), "data", dense.aux_loss()))) == 0.0
