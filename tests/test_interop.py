"""tinymoe.interop: weights out to torch's names and layouts and back, exactly; and, when PyTorch is installed,
tinymoe layers against their torch twins loaded with those weights (outputs and gradients)."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.interop import from_torch_state_dict, load_torch_state_dict, to_torch_state_dict
from tinymoe.model import ModelConfig, MoETransformer


def transformer(seed):
    return MoETransformer(ModelConfig(vocab_size=7, max_seq_len=5, d_model=8, n_heads=2, d_ff=12, num_experts=4,
                                      moe_every=1, router="add", num_tasks=2, task_embedding=True, seed=seed))


def models(seed):
    return {"transformer": transformer(seed),
            "multigate": tm.nn.MultiGateMoE(6, 4, 3, 2, gate="dselect_k", per_example=True, seed=seed),
            "multi_gate_router": tm.nn.MoE(6, 8, 4, router="multi_gate", num_tasks=3, seed=seed),
            "ple": tm.nn.PLE(6, 4, 2, seed=seed)}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["transformer", "multigate", "multi_gate_router", "ple"])
def test_numpy_round_trip_is_exact(name):
    src, dst = models(1)[name], models(2)[name]
    assert not same_weights(src, dst)
    sd = to_torch_state_dict(src, as_numpy=True)
    load_torch_state_dict(dst, sd)
    assert same_weights(src, dst)


def test_layouts():
    model = transformer(0)
    sd = to_torch_state_dict(model, as_numpy=True)
    params = dict(model.named_parameters())
    qkv = "blocks.0.attn.qkv.weight"
    assert qkv in params and sd[qkv].shape == params[qkv].shape[::-1]  # Linear: (out, in)
    np.testing.assert_array_equal(sd[qkv], params[qkv].numpy().T)
    np.testing.assert_array_equal(sd["tok_emb.weight"], params["tok_emb.weight"].numpy())  # embeddings as they are
    experts = [k for k in params if k.endswith("experts.w1")][0]
    prefix = experts[: -len("w1")]
    w1 = params[experts].numpy()  # (E, d, f)
    assert experts not in sd and f"{prefix}3.fc1.weight" in sd
    np.testing.assert_array_equal(sd[f"{prefix}2.fc1.weight"], w1[2].T)  # expert 2's fc1: (f, d)
    np.testing.assert_array_equal(sd[f"{prefix}1.fc2.bias"], params[prefix + "b2"].numpy()[1])
    router = [k for k in params if k.endswith("gate.task_weight")][0]
    np.testing.assert_array_equal(sd[router], params[router].numpy().T)


def test_wrong_keys_and_shapes_are_named():
    model = tm.nn.FeedForward(4, 6)
    sd = to_torch_state_dict(model, as_numpy=True)
    with pytest.raises(KeyError, match=r"missing keys \['fc2.bias'\], unexpected keys \['fc3.bias'\]"):
        from_torch_state_dict(model, {**{k: v for k, v in sd.items() if k != "fc2.bias"}, "fc3.bias": sd["fc2.bias"]})
    with pytest.raises(ValueError, match="fc1.weight"):
        load_torch_state_dict(model, {**sd, "fc1.weight": sd["fc1.weight"].T})
    moe = tm.nn.MoE(4, 6, 3)
    sd = to_torch_state_dict(moe, as_numpy=True)
    key = "experts.0.fc1.weight"
    with pytest.raises(ValueError, match=r"experts.0.fc1.weight has shape \(4, 6\), the model expects \(6, 4\)"):
        from_torch_state_dict(moe, {**sd, key: sd[key].T})


# ---- with PyTorch ---------------------------------------------------------------------------------------------------

try:
    import torch
except ImportError:  # torch is optional: these tests need it, the ones above do not
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install torch==2.13.0)")


@needs_torch
def test_torch_round_trip_keeps_dtype():
    src, dst = transformer(1).to(np.float64), transformer(2).to(np.float64)
    sd = to_torch_state_dict(src)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in sd.values())
    load_torch_state_dict(dst, sd)
    assert same_weights(src, dst)


@needs_torch
def test_linear_matches_its_torch_twin():
    rng = np.random.default_rng(0)
    ours = tm.nn.Linear(5, 3, seed=1).to(np.float64)
    twin = torch.nn.Linear(5, 3, dtype=torch.float64)
    twin.load_state_dict(to_torch_state_dict(ours))
    x = rng.standard_normal((4, 5))
    xt = tm.Tensor(x, requires_grad=True)
    xx = torch.tensor(x, requires_grad=True)
    y, yy = ours(xt), twin(xx)
    np.testing.assert_allclose(y.numpy(), yy.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal((4, 3))
    y.backward(g)
    yy.backward(torch.tensor(g))
    np.testing.assert_allclose(xt.grad, xx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.weight.grad.T, twin.weight.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.bias.grad, twin.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


def TorchFeedForward(d, f):
    """The torch twin of tm.nn.FeedForward: fc1 -> GELU (tanh approximation, as tinymoe's) -> fc2."""

    class FeedForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(d, f, dtype=torch.float64)
            self.fc2 = torch.nn.Linear(f, d, dtype=torch.float64)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate="tanh"))

    return FeedForward()


@needs_torch
def test_feedforward_matches_its_torch_twin_both_ways():
    rng = np.random.default_rng(1)
    ours = tm.nn.FeedForward(6, 10, seed=2).to(np.float64)
    twin = TorchFeedForward(6, 10)
    twin.load_state_dict(to_torch_state_dict(ours))
    x = rng.standard_normal((3, 4, 6))
    xt, xx = tm.Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y, yy = ours(xt), twin(xx)
    np.testing.assert_allclose(y.numpy(), yy.detach().numpy(), rtol=1e-10, atol=1e-12)
    y.sum().backward()
    yy.sum().backward()
    np.testing.assert_allclose(xt.grad, xx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.fc1.weight.grad.T, twin.fc1.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # torch -> tinymoe: change the twin, load it back, same function again
        for p in twin.parameters():
            p.add_(torch.tensor(rng.standard_normal(tuple(p.shape))))
    load_torch_state_dict(ours, twin.state_dict())
    np.testing.assert_allclose(ours(x).numpy(), twin(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


@needs_torch
def test_moe_experts_match_a_torch_modulelist_of_ffns():
    rng = np.random.default_rng(2)
    moe = tm.nn.MoE(6, 8, 4, gate="softmax", seed=3).to(np.float64)  # softmax: every token uses every expert
    sd = to_torch_state_dict(moe)
    twins = torch.nn.ModuleList([TorchFeedForward(6, 8) for _ in range(4)])
    twins.load_state_dict({k[len("experts."):]: v for k, v in sd.items() if k.startswith("experts.")})
    x = rng.standard_normal((5, 6))
    with tm.use_backend("numpy"):
        y = moe(x).numpy()
    w = torch.softmax(torch.tensor(x) @ sd["gate.weight"].T + sd["gate.bias"], dim=-1)  # the router, a torch Linear
    yy = sum(w[:, i:i + 1] * twins[i](torch.tensor(x)) for i in range(4))
    np.testing.assert_allclose(y, yy.detach().numpy(), rtol=1e-10, atol=1e-12)
