"""The MoE layer is driven by its per-gate table (tinymoe.nn.moe.GATE_SPECS), not by branches on the gate's name:
every gate has a spec, a new gate needs only a spec and a gate function, and MoEConfig is the one place the
layer's options live (the constructor keywords, the checkpoint's config)."""
import dataclasses
import os
import re

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import gates
from tinymoe.nn import moe as moe_module
from tinymoe.nn.moe import GATE_SPECS, GateSpec, MoE, MoEConfig


def test_every_gate_has_a_spec():
    assert set(GATE_SPECS) == set(gates.GATES)


def test_the_layer_has_no_branches_on_the_gate_name():
    with open(moe_module.__file__, encoding="utf-8") as f:
        source = f.read()
    assert not re.search(r"""gate(_name)?\s*[!=]=\s*["']""", source)
    assert not re.search(r"""gate(_name)?\s+(not\s+)?in\s*\(""", source)
    assert os.path.basename(moe_module.__file__) == "moe.py"


def first_k_gate(h, k):
    """A toy gate for the test: experts 0..k-1 for every token, weights softmax(h[:, :k])."""
    T = h.shape[0]
    idx = np.broadcast_to(np.arange(k), (T, k)).copy()
    return gates.Routing(idx, tm.functional.softmax(h[:, :k], axis=-1))


def test_a_new_gate_is_one_spec_and_one_function(monkeypatch):
    monkeypatch.setitem(GATE_SPECS, "first_k", GateSpec(lambda h, g: first_k_gate(h, g.k), aux=()))
    layer = MoE(4, 6, 3, gate="first_k", k=2, seed=1)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with tm.no_grad():
        y = layer(x).numpy()
        h = layer.router(tm.Tensor(x)).numpy()
    w = np.exp(h[:, :2] - h[:, :2].max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    e = layer.experts
    ffn = [tm.functional.gelu(tm.Tensor(x @ e.w1.data[i] + e.b1.data[i])).numpy() @ e.w2.data[i] + e.b2.data[i]
           for i in range(2)]
    np.testing.assert_allclose(y, w[:, :1] * ffn[0] + w[:, 1:] * ffn[1], rtol=1e-5, atol=1e-6)
    assert layer.aux_losses == {} and layer.last_routing.counts.tolist() == [5, 5, 0]


def test_config_object_and_keywords_build_the_same_layer():
    kwargs = dict(d_model=4, d_ff=8, num_experts=4, gate="noisy_top_k", k=2, router="add", num_tasks=3,
                  num_shared_experts=1, seed=7)
    a, b = MoE(**kwargs), MoE(MoEConfig(**kwargs))
    assert a.config == b.config
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        np.testing.assert_array_equal(pa.data, pb.data)


def test_the_public_parameter_names_stay():
    layer = MoE(4, 8, 4, gate="noisy_top_k", k=2, router="add", num_tasks=2, num_shared_experts=1)
    names = set(dict(layer.named_parameters()))
    assert {"gate.weight", "gate.task_weight", "gate.bias", "gate.task_embedding.weight", "noise.weight",
            "experts.w1", "experts.b1", "experts.w2", "experts.b2", "shared.0.fc1.weight"} <= names
    assert layer.gate is layer.router  # `moe.gate.weight` (the API's name) still reaches the router


def test_dense_gates_use_every_expert_and_the_config_says_so():
    layer = MoE(4, 8, 5, gate="softmax", k=2)
    assert layer.config.k == 5 and layer.k == 5


def test_the_config_is_json_and_rebuilds_the_layer(tmp_path):
    rng = np.random.default_rng(0)
    layer = MoE(4, 8, 4, gate="top_k", k=1, capacity_factor=1.5, seed=rng, dtype=np.float64)
    assert layer.config.seed is None and layer.config.dtype == "float64"  # a Generator seed is not kept
    path = tm.save(tmp_path / "moe.safetensors", layer)
    again = tm.load(path)
    assert dataclasses.asdict(again.config) == dataclasses.asdict(layer.config)


def test_capacity_means_what_the_spec_says():
    assert GATE_SPECS["expert_choice"].capacity == "choose"
    assert {name for name, s in GATE_SPECS.items() if s.capacity == "drop"} == set(gates.GATES) - {"expert_choice"}


@pytest.mark.parametrize("gate", ["softmax", "top_k", "noisy_top_k", "dselect_k", "expert_choice", "hash"])
def test_the_layer_adds_the_aux_losses_its_spec_lists(gate):
    layer = MoE(4, 8, 4, gate=gate, k=2)
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    layer(x, token_ids=np.arange(6)) if gate == "hash" else layer(x)
    for name in ("load_balance", "z_loss"):  # the layer's own; a gate may add more of its own (routing.aux)
        assert (name in layer.aux_losses) == (name in GATE_SPECS[gate].aux), name
