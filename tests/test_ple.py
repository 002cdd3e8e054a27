"""CGC and PLE (Tang et al. 2020): shapes and gate structure, gradients against finite differences (float64),
training on the MMoE synthetic data, checkpoints, and `tinymoe train --set model.family=ple`."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe import data as D
from tinymoe.cli import main
from tinymoe.gradcheck import check_grad
from tinymoe.nn import CGC, PLE
from tinymoe.nn.module import Parameter
from tinymoe.train import OptimConfig, evaluate, fit


@pytest.fixture(autouse=True)
def numpy_backend():
    with tm.use_backend("numpy"):
        yield


def test_shapes_and_gate_structure():
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    model = PLE(5, 4, num_tasks=3, num_task_experts=2, num_shared_experts=1, num_levels=3, out_dim=2)
    outputs = model(x)
    assert [o.shape for o in outputs] == [(7, 2)] * 3
    assert model.num_experts == 7 and model.expert_names[-1] == "shared.e0" and len(model.levels) == 3
    assert [lvl.shared_gate is None for lvl in model.levels] == [False, False, True]  # no shared gate at the top
    for k, w in enumerate(model.last_weights):  # task k's gate: its own 2 experts and the shared one, nothing else
        assert w.shape == (7, 7)
        np.testing.assert_allclose(w.sum(axis=1), 1, rtol=1e-5)
        own = np.zeros(7, bool)
        own[2 * k:2 * k + 2] = own[6] = True
        assert (w[:, ~own] == 0).all() and (w[:, own] > 0).all()
    cgc = CGC(5, 4, num_tasks=2)
    assert len(cgc.levels) == 1 and cgc.levels[0].shared_gate is None and "num_levels" not in cgc.config


@pytest.mark.parametrize("bad", [dict(num_tasks=0), dict(num_levels=0), dict(num_shared_experts=-1),
                                 dict(num_task_experts=1.5)])
def test_bad_sizes_are_named(bad):
    kwargs = {**dict(d_in=4, d_expert=3, num_tasks=2), **bad}
    with pytest.raises(ValueError, match=f"PLE: {next(iter(bad))} must be an integer"):
        PLE(**kwargs)


def _owners(model):
    """(module, attribute name) of every Parameter, in named_parameters order."""
    return [(m, name) for m in model.modules() for name, v in vars(m).items() if isinstance(v, Parameter)]


@settings(max_examples=10)  # each example is ~2 x (number of weights) forward passes
@given(num_tasks=st.integers(1, 3), m_k=st.integers(1, 2), m_s=st.integers(0, 2), levels=st.integers(1, 3),
       n=st.integers(1, 4), d_in=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_gradients_match_finite_differences(num_tasks, m_k, m_s, levels, n, d_in, seed):
    rng = np.random.default_rng(seed)
    cls, kwargs = (CGC, {}) if levels == 1 else (PLE, {"num_levels": levels})
    model = cls(d_in, 2, num_tasks, num_task_experts=m_k, num_shared_experts=m_s, seed=seed, d_hidden=3,
                tower_hidden=2, out_dim=2, dtype=np.float64, **kwargs)
    owners = _owners(model)
    params = [getattr(m, a) for m, a in owners]
    for p in params:  # biases start at exactly 0, which puts ReLUs at their kink for zero inputs: draw them all
        p.data = rng.standard_normal(p.shape)
    x = rng.standard_normal((n, d_in))
    cot = [rng.standard_normal((n, 2)) for _ in range(num_tasks)]

    def loss(x, *weights):  # every weight is an input, so check_grad differentiates all of them
        for (m, a), w in zip(owners, weights):
            setattr(m, a, w)
        outs = model(x)
        return sum(((o * c).sum() for o, c in zip(outs[1:], cot[1:])), (outs[0] * cot[0]).sum())  # Σ_k <u_k, y_k>

    try:
        check_grad(loss, [x] + [p.numpy() for p in params], atol=1e-6, rtol=1e-4)
    finally:
        for (m, a), p in zip(owners, params):
            setattr(m, a, p)


def tab_splits(n=1200, d=8, rho=0.5, seed=0):
    return D.train_val_test_split(D.mmoe_synthetic(n, rho, d=d, seed=seed), seed=seed)


@pytest.mark.parametrize("cls", [CGC, PLE])
def test_trains_on_the_mmoe_synthetic_data(cls):
    splits = tab_splits()
    model = cls(8, 8, 2, num_task_experts=2, num_shared_experts=2, seed=0, d_hidden=16)
    history = fit(model, splits["train"], splits["val"],
                  OptimConfig(lr=1e-2, steps=200, batch_size=64, warmup_steps=10, eval_every=50))
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 5
    result = evaluate(model, splits["test"])
    baseline = ((splits["test"].y - splits["train"].y.mean(axis=0)) ** 2).mean(axis=0)
    for (name, mse), base in zip(result["per_task"].items(), baseline):
        assert mse < 0.05 * base, (name, mse, base)  # the bar MMoE passes in tests/test_train.py


def test_checkpoint_round_trip(tmp_path):
    model = PLE(6, 4, 3, num_levels=2, seed=5, out_dim=2)
    tm.save(tmp_path / "ple.safetensors", model)
    back = tm.load(tmp_path / "ple.safetensors")
    assert type(back) is PLE and back.config == model.config
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    for a, b in zip(model(x), back(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("family", ["ple", "cgc"])
def test_train_command(tmp_path, capsys, family):
    run = tmp_path / family
    assert main(["train", "--run-dir", str(run), "--quiet", "--set", "data.kind=mmoe", "--set", "data.n=400",
                 "--set", f"model.family={family}", "--set", "optim.steps=20", "--set", "optim.eval_every=10",
                 "--set", "backend=numpy"]) == 0
    config = json.loads((run / "config.json").read_text())
    expected = {"family", "num_task_experts", "num_shared_experts", "d_expert", "d_hidden", "tower_hidden", "seed"}
    assert set(config["model"]) == expected | ({"num_levels"} if family == "ple" else set())
    model = tm.load(run / "checkpoint.safetensors")
    assert type(model).__name__ == family.upper()
    capsys.readouterr()
    assert main(["routes", str(run)]) == 0
    out = capsys.readouterr().out
    assert "mean gate weight of each task per expert" in out and (run / "routes.png").is_file()
    header = next(line for line in out.splitlines() if line.startswith("task ") and "t0.e0" in line)
    assert header.split()[1:] == ["t0.e0", "t0.e1", "t1.e0", "t1.e1", "shared.e0", "shared.e1"]
    row = next(line for line in out.splitlines() if line.startswith("task0 "))
    assert [float(v) for v in row.split()[1:]][2:4] == [0.0, 0.0]  # task 0's gate never uses task 1's experts
    assert len(row) == len(header)


def test_a_huge_ple_is_refused_before_it_is_built(tmp_path, capsys):
    """The memory estimate counts CGC/PLE's experts (per task, shared, per level), so a config asking for 10^8
    experts per task is one line and exit 2, not a MemoryError after minutes of allocation."""
    from tinymoe.cli import main

    code = main(["train", "--run-dir", str(tmp_path / "r"), "--quiet", "--set", "data.kind=mmoe",
                 "--set", "model.family=ple", "--set", "model.num_task_experts=100000000"])
    err = capsys.readouterr().err
    assert code == 2 and "of memory" in err and "parameters" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
