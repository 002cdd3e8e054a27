"""Modules, attention masks, optimizers and schedules: behaviour against hand-computed values, and a small
transformer that must overfit a fixed batch (the end-to-end check that forward, backward and Adam agree)."""
import math

import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F
from tinymoe import Tensor
from tinymoe.nn import (Dropout, Embedding, FeedForward, LayerNorm, Linear, Module, ModuleList, MultiHeadAttention,
                        Parameter, RMSNorm, TransformerBlock)
from tinymoe.optim import SGD, Adam, AdamW, clip_grad_norm, warmup_cosine

# ---------------------------------------------------------------- a small causal language model


class TinyLM(Module):
    """Token + position embeddings, two causal pre-norm blocks, a linear head."""

    def __init__(self, vocab, max_len, d=32, heads=2, dropout=0.0, seed=0):
        rng = np.random.default_rng(seed)
        self.tok = Embedding(vocab, d, seed=rng)
        self.pos = Embedding(max_len, d, seed=rng)
        self.blocks = ModuleList([TransformerBlock(d, heads, d_ff=64, causal=True, dropout=dropout, seed=rng)
                                  for _ in range(2)])
        self.head = Linear(d, vocab, seed=rng)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(np.arange(ids.shape[1]))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (B, T, vocab)


class WithPlainList(Module):
    def __init__(self):
        self.layers = [Linear(2, 3, seed=0), Linear(3, 1, bias=False, seed=1)]
        self.norm = RMSNorm(1)


# ---------------------------------------------------------------- Module


def test_named_parameters_use_dotted_attribute_paths():
    assert [n for n, _ in FeedForward(4, 8, seed=0).named_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert [n for n, _ in WithPlainList().named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "norm.weight"]
    names = [n for n, _ in TinyLM(5, 4).named_parameters()]
    assert names[:2] == ["tok.weight", "pos.weight"]
    assert "blocks.0.attn.qkv.weight" in names and "blocks.1.ffn.fc2.bias" in names and names[-1] == "head.bias"
    assert len(names) == len(set(names))
    block = TransformerBlock(8, 2, seed=0)
    assert [n for n, _ in block.named_parameters()] == [
        "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ln2.weight", "ln2.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias"]
    assert block.num_parameters() == 2 * 8 + 8 * 24 + 24 + 8 * 8 + 8 + 2 * 8 + 8 * 32 + 32 + 32 * 8 + 8


def test_parameters_are_float32_trainable_tensors():
    for p in TinyLM(5, 4).parameters():
        assert isinstance(p, Parameter) and p.requires_grad and p.dtype == np.float32


def test_state_dict_round_trip_gives_identical_outputs():
    ids = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    a, b = TinyLM(6, 4, seed=0), TinyLM(6, 4, seed=1)
    assert not np.allclose(a(ids).data, b(ids).data)  # different seeds, different functions
    state = a.state_dict()
    assert set(state) == {n for n, _ in a.named_parameters()}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b.load_state_dict(state)
    np.testing.assert_array_equal(a(ids).data, b(ids).data)
    # the state dict is a copy: changing it changes neither model
    state["head.bias"] += 1.0
    np.testing.assert_array_equal(a(ids).data, b(ids).data)


def test_load_state_dict_reports_missing_and_unexpected_keys():
    m = FeedForward(4, 8, seed=0)
    state = m.state_dict()
    del state["fc2.bias"]
    state["fc3.weight"] = np.zeros((8, 4), np.float32)
    with pytest.raises(KeyError) as info:
        m.load_state_dict(state)
    assert "fc2.bias" in str(info.value) and "fc3.weight" in str(info.value)
    before = m.fc2.bias.data.copy()
    state["fc1.weight"] = np.ones((4, 8), np.float32)
    m.load_state_dict(state, strict=False)  # loads what matches, ignores the rest
    np.testing.assert_array_equal(m.fc1.weight.data, np.ones((4, 8)))
    np.testing.assert_array_equal(m.fc2.bias.data, before)


def test_load_state_dict_rejects_wrong_shapes_naming_the_key():
    m = FeedForward(4, 8, seed=0)
    state = m.state_dict()
    state["fc1.weight"] = np.zeros((8, 4), np.float32)
    with pytest.raises(ValueError) as info:
        m.load_state_dict(state)
    message = str(info.value)
    assert "fc1.weight" in message and "(8, 4)" in message and "(4, 8)" in message


def test_train_and_eval_propagate_to_every_submodule():
    model = TinyLM(5, 4, dropout=0.5)
    modules = list(model.modules())
    assert any(isinstance(m, Dropout) for m in modules)
    assert model.eval() is model
    assert all(m.training is False for m in modules)
    ids = np.array([[0, 1, 2, 3]])
    np.testing.assert_array_equal(model(ids).data, model(ids).data)  # eval: dropout is off, deterministic
    model.train()
    assert all(m.training is True for m in modules)
    assert not np.array_equal(model(ids).data, model(ids).data)  # train: dropout draws new masks


def test_zero_grad_clears_every_gradient():
    model = FeedForward(4, 8, seed=0)
    model(Tensor(np.ones((3, 4), np.float32))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_every_parameter_of_the_transformer_gets_a_gradient():
    model = TinyLM(6, 5, seed=0)
    ids = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    F.cross_entropy(model(ids), np.array([[2, 3, 4, 5, 0], [4, 3, 2, 1, 0]])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        if name != "pos.weight":  # every position is used, so all rows of every weight move
            assert np.any(p.grad != 0), name


def test_seeded_initialisation_is_reproducible():
    a, b, c = TinyLM(7, 5, seed=3), TinyLM(7, 5, seed=3), TinyLM(7, 5, seed=4)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
        if "ln" not in name and not name.endswith("bias"):  # ones/zeros init is the same whatever the seed
            assert not np.array_equal(pa.data, pc.data), name


def test_linear_init_bounds_and_bad_width():
    lin = Linear(16, 4, seed=0)
    assert np.all(np.abs(lin.weight.data) <= 1 / 4) and lin.weight.shape == (16, 4)
    np.testing.assert_array_equal(lin.bias.data, np.zeros(4))
    with pytest.raises(ValueError, match="Linear"):
        lin(Tensor(np.ones((2, 15), np.float32)))
    with pytest.raises(ValueError, match="LayerNorm"):
        LayerNorm(4)(Tensor(np.ones((2, 5), np.float32)))


# ---------------------------------------------------------------- attention masks


def _mha(causal, seed=0):
    return MultiHeadAttention(8, num_heads=2, causal=causal, seed=seed, dtype=np.float64)


@pytest.mark.parametrize("i", range(6))
def test_causal_attention_ignores_later_positions(i):
    mha = _mha(causal=True)
    rng = np.random.default_rng(i)
    x = rng.standard_normal((2, 6, 8))
    x2 = x.copy()
    x2[:, i + 1:] = rng.standard_normal(x2[:, i + 1:].shape) * 10  # change everything after position i
    y, y2 = mha(Tensor(x)).data, mha(Tensor(x2)).data
    np.testing.assert_allclose(y2[:, : i + 1], y[:, : i + 1], rtol=1e-12, atol=1e-12)
    if i < 5:
        assert not np.allclose(y2[:, i + 1:], y[:, i + 1:])  # later positions did change


def test_bidirectional_attention_sees_every_position():
    mha = _mha(causal=False)
    x = np.random.default_rng(0).standard_normal((1, 4, 8))
    x2 = x.copy()
    x2[:, 3] += 1.0
    assert not np.allclose(mha(Tensor(x)).data[:, 0], mha(Tensor(x2)).data[:, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_do_not_affect_unpadded_positions(causal):
    mha = _mha(causal)
    rng = np.random.default_rng(1)
    # padding on both sides, so that even a causal query would see a padded key without the mask
    pad = Tensor(np.array([[True, False, False, False, True], [True, True, False, False, False]]))
    x = rng.standard_normal((2, 5, 8))
    x2 = x.copy()
    x2[pad.data] = rng.standard_normal((int(pad.data.sum()), 8)) * 10  # change only the padded positions
    y, y2 = mha(Tensor(x), padding_mask=pad).data, mha(Tensor(x2), padding_mask=pad).data
    keep = ~pad.data
    np.testing.assert_allclose(y2[keep], y[keep], rtol=1e-12, atol=1e-12)
    # and without the mask the padded positions would have mattered
    assert not np.allclose(mha(Tensor(x)).data[keep], mha(Tensor(x2)).data[keep])


def test_padding_mask_as_a_plain_numpy_array():
    """The docstring asks for a (B, T) bool mask; a NumPy array must work as well as a bool Tensor."""
    mha = _mha(causal=False)
    x = Tensor(np.random.default_rng(2).standard_normal((2, 5, 8)))
    pad = np.array([[False, False, False, True, True], [False, False, False, False, True]])
    np.testing.assert_array_equal(mha(x, padding_mask=pad).data, mha(x, padding_mask=Tensor(pad)).data)


def test_attention_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, num_heads=3)
    mha = _mha(causal=False)
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        mha(Tensor(np.ones((5, 8))))
    with pytest.raises(ValueError, match="padding_mask"):
        mha(Tensor(np.ones((2, 5, 8))), padding_mask=Tensor(np.zeros((2, 4), bool)))


# ---------------------------------------------------------------- optimizers (hand-computed single steps)


def _param(values, grad):
    p = Parameter(np.array(values, np.float64))
    p.grad = np.array(grad, np.float64)
    return p


def test_sgd_step():
    p = _param([1.0, 2.0], [0.5, -1.0])
    SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [0.95, 2.1], rtol=1e-12)


def test_sgd_weight_decay_adds_l2_to_the_gradient():
    p = _param([1.0, 2.0], [0.5, -1.0])
    SGD([p], lr=0.1, weight_decay=0.5).step()  # g = [0.5 + 0.5, -1 + 1] = [1, 0]
    np.testing.assert_allclose(p.data, [0.9, 2.0], rtol=1e-12)


def test_sgd_momentum_two_steps():
    p = _param([1.0, -1.0], [1.0, 2.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    opt.step()  # v = g = [1, 2];  p = [0.9, -1.2]
    np.testing.assert_allclose(p.data, [0.9, -1.2], rtol=1e-12)
    p.grad = np.array([1.0, 2.0])
    opt.step()  # v = 0.9·[1, 2] + [1, 2] = [1.9, 3.8];  p = [0.9 - 0.19, -1.2 - 0.38]
    np.testing.assert_allclose(p.data, [0.71, -1.58], rtol=1e-12)


def test_adam_first_step_moves_each_weight_by_lr_times_the_sign():
    # m̂ = g and v̂ = g², so the step is lr · g / (|g| + eps) ≈ lr · sign(g)
    p = _param([1.0, 1.0, 1.0], [0.3, -4.0, 1e-3])
    Adam([p], lr=0.01).step()
    np.testing.assert_allclose(p.data, [1 - 0.01 * 0.3 / (0.3 + 1e-8), 1 + 0.01 * 4 / (4 + 1e-8),
                                        1 - 0.01 * 1e-3 / (1e-3 + 1e-8)], rtol=1e-12)
    np.testing.assert_allclose(p.data, [0.99, 1.01, 0.99], rtol=1e-6)


def test_adam_two_steps_against_the_paper():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    p = _param([0.0, 0.0], g1)
    opt = Adam([p], lr=lr)
    opt.step()
    p.grad = g2
    opt.step()
    # Kingma & Ba 2015, Algorithm 1, written out for t = 2
    m = (1 - b1) * (b1 * g1 + g2)
    v = (1 - b2) * (b2 * g1**2 + g2**2)
    first = -lr * g1 / (np.abs(g1) + eps)
    expected = first - lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(p.data, expected, rtol=1e-10)
    assert opt.step_count == 2


def test_adam_l2_weight_decay_goes_through_the_moments():
    p = _param([2.0], [0.0])  # g + wd·p = 0.2: the first step is lr · 0.2 / (0.2 + eps)
    Adam([p], lr=0.01, weight_decay=0.1).step()
    np.testing.assert_allclose(p.data, [2.0 - 0.01 * 0.2 / (0.2 + 1e-8)], rtol=1e-12)


def test_adamw_decays_the_weights_apart_from_the_moments():
    p = _param([2.0, -1.0], [0.0, 3.0])
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    # p·(1 - lr·wd) - lr·g/(|g| + eps):  [2·0.95 - 0, -1·0.95 - 0.1·3/(3 + eps)]
    np.testing.assert_allclose(p.data, [1.9, -0.95 - 0.1 * 3 / (3 + 1e-8)], rtol=1e-12)


def test_optimizers_skip_parameters_without_gradients():
    a, b = _param([1.0], [1.0]), Parameter(np.array([5.0]))
    for opt in (SGD([a, b], lr=0.1, momentum=0.9), Adam([a, b], lr=0.1), AdamW([a, b], lr=0.1)):
        opt.step()
    np.testing.assert_array_equal(b.data, [5.0])


def test_optimizer_zero_grad_and_bad_arguments():
    p = _param([1.0], [1.0])
    opt = SGD([p], lr=0.1)
    opt.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=0.0)
    with pytest.raises(ValueError, match="empty"):
        Adam([], lr=0.1)


def test_adam_state_dict_resumes_exactly():
    def run(opt, p, grads):
        for g in grads:
            p.grad = np.array(g)
            opt.step()

    p1 = _param([1.0, 2.0], [0.0, 0.0])
    opt1 = Adam([p1], lr=0.1)
    run(opt1, p1, [[1.0, -1.0], [0.5, 2.0]])
    p2 = Parameter(p1.data.copy())
    opt2 = Adam([p2], lr=0.5)
    opt2.load_state_dict(opt1.state_dict())
    assert opt2.lr == 0.1 and opt2.step_count == 2
    run(opt1, p1, [[0.3, 0.3]])
    run(opt2, p2, [[0.3, 0.3]])
    np.testing.assert_array_equal(p1.data, p2.data)


# ---------------------------------------------------------------- clipping and schedule


def test_clip_grad_norm_scales_to_the_max_norm():
    a, b = _param([0.0, 0.0], [3.0, 4.0]), _param([0.0], [12.0])  # global norm 13
    total = clip_grad_norm([a, b], max_norm=6.5)
    assert total == pytest.approx(13.0, rel=1e-12)
    np.testing.assert_allclose(a.grad, [1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(b.grad, [6.0], rtol=1e-6)
    assert math.sqrt(np.sum(a.grad**2) + np.sum(b.grad**2)) == pytest.approx(6.5, rel=1e-6)


def test_clip_grad_norm_leaves_small_gradients_alone():
    a = _param([0.0, 0.0], [0.3, 0.4])
    assert clip_grad_norm([a, Parameter(np.zeros(2))], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(a.grad, [0.3, 0.4])


def test_clip_grad_norm_refuses_a_non_finite_norm():
    with pytest.raises(FloatingPointError, match="clip_grad_norm"):
        clip_grad_norm([_param([0.0], [np.inf])], max_norm=1.0)


@pytest.mark.parametrize("step, lr", [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (35, 0.5 * (1 + math.cos(math.pi / 4))),
                                      (60, 0.5), (110, 0.0), (500, 0.0)])
def test_warmup_cosine_values(step, lr):
    # base 1, 10 warmup steps (linear from 0.1 to 1.0), cosine over the remaining 100 steps down to 0
    assert warmup_cosine(step, 1.0, 10, 110) == pytest.approx(lr, abs=1e-12)


def test_warmup_cosine_floor():
    assert warmup_cosine(60, 1.0, 10, 110, min_lr=0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 1.0, 10, 110, min_lr=0.1) == pytest.approx(0.1)
    lrs = [warmup_cosine(s, 1.0, 10, 110, min_lr=0.1) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # non-increasing after warmup


# ---------------------------------------------------------------- end to end: a transformer overfits


def test_two_layer_transformer_overfits_a_reverse_task():
    """Given a1..a6 SEP, predict a6..a1: 16 fixed sequences, 100 Adam steps, loss from ~log 9 to < 0.01."""
    n, L, V = 16, 6, 8
    sep = V
    a = np.random.default_rng(0).integers(0, V, (n, L))
    seq = np.concatenate([a, np.full((n, 1), sep), a[:, ::-1]], axis=1)  # (16, 13)
    inputs, targets = seq[:, :-1], seq[:, 1:].copy()
    targets[:, :L] = -100  # the random first half is not predictable: score only the reversal
    model = TinyLM(V + 1, inputs.shape[1], seed=0)
    opt = Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V + 1), abs=0.3)  # starts near uniform
    assert losses[-1] < 0.01, losses[::10]
    with tm.no_grad():
        predicted = model.eval()(inputs).data.argmax(-1)
    np.testing.assert_array_equal(predicted[:, L:], a[:, ::-1])
