"""The experiments: each tiny preset runs and writes its tables, paired comparisons (with a verdict of the rule in
tinymoe.experiments.stats), results.json and plots; the control arms do what their names say (the task-blind
router sees no task, oracle routing follows the task's parts); the report has a row per claim; the adjusted Rand
index matches hand-computed cases; SharedBottom has MultiGateMoE's call convention."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tinymoe.experiments import EXPERIMENTS, get, main
from tinymoe.experiments.common import (SharedBottom, adjusted_rand_index, fmt, markdown_table, mean_std,
                                        partition_from_sets)
from tinymoe.experiments.stats import CANNOT_TELL, CONTRADICTED, HOLDS

pytest.importorskip("matplotlib")


# ---- adjusted Rand index ---------------------------------------------------------------------------------------


def test_ari_identical_partitions_is_one():
    assert adjusted_rand_index([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]) == pytest.approx(1.0)


def test_ari_is_invariant_to_label_permutation():
    a = [0, 0, 1, 1, 2, 2, 2]
    b = [5, 5, 9, 9, 7, 7, 7]  # the same partition under other names
    assert adjusted_rand_index(a, b) == pytest.approx(1.0)
    c = [0, 1, 1, 1, 2, 2, 0]
    relabel = {0: 2, 1: 0, 2: 1}
    assert adjusted_rand_index(a, c) == pytest.approx(adjusted_rand_index(a, [relabel[x] for x in c]))
    assert adjusted_rand_index(a, c) == pytest.approx(adjusted_rand_index(c, a))  # symmetric


def test_ari_hand_computed_case():
    # true [0,0,0,1,1,1] vs pred [0,0,1,1,2,2]: contingency [[2,1,0],[0,1,2]]
    # index = C(2,2)+C(2,2) = 2; rows: 2·C(3,2) = 6; cols: 3·C(2,2) = 3; expected = 6·3/C(6,2) = 1.2
    # ARI = (2 − 1.2) / ((6 + 3)/2 − 1.2) = 0.8 / 3.3
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)


def test_ari_everything_in_one_cluster_against_a_real_partition_is_zero():
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx(0.0)


def test_ari_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="labels"):
        adjusted_rand_index([0, 1], [0, 1, 2])


def test_partition_from_sets_groups_equal_sets():
    np.testing.assert_array_equal(partition_from_sets([{0, 1}, {2}, {1, 0}, {3}]), [0, 1, 0, 2])


def test_mean_std_and_table_format():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert fmt([0.5]) == "0.500 ± 0.000"
    assert fmt([]) == "—"
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_shared_bottom_call_convention():
    model = SharedBottom(6, 4, num_tasks=3, seed=0, d_hidden=8)
    outs = model(np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32))
    assert len(outs) == 3 and all(o.shape == (5, 1) for o in outs)
    assert model.aux_loss() == 0.0
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- each experiment's tiny preset -----------------------------------------------------------------------------


def _table_rows(text):
    """Markdown table rows (lists of cells) of every table in results.md, header and separator lines excluded."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _run(name, tmp_path):
    out = tmp_path / name
    result = get(name).run(preset="tiny", out=str(out), log=lambda *a: None)
    text = (out / "results.md").read_text()
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert pngs and all((out / p).stat().st_size > 1000 for p in pngs)
    assert result["dir"] == str(out)
    assert all(table in text for table in result["table"].split("\n\n"))
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["comparisons"]) == len(result["comparisons"])
    return text, _table_rows(text), result


def _is_mean_std(cell):
    m, _, s = cell.partition(" ± ")
    return float(m) == float(m) and float(s) >= 0


def _check_comparisons(result, seeds):
    """Every comparison names its seeds, has a CI around its mean and a verdict of the rule; exactly the
    pre-declared ones are primary and carry no Holm p."""
    comps = result["comparisons"]
    assert comps and any(c.primary for c in comps)
    for c in comps:
        assert c.seeds == seeds and c.low <= c.mean <= c.high
        assert c.verdict in (HOLDS, CONTRADICTED, CANNOT_TELL)
        assert (c.p_holm is None) == c.primary
    return comps


@pytest.mark.slow
def test_e1_tiny(tmp_path):
    from tinymoe.experiments.e1_gates import MODELS, MODELS_A, ORACLE, PRESETS

    text, rows, result = _run("e1", tmp_path)
    assert "Part A" in text and "Part B" in text and "linear R²" in text
    rhos = PRESETS["tiny"]["rhos"]
    header_a = ["model", *[f"ρ = {r}" for r in rhos], "mean over ρ"]
    assert header_a in rows
    part_a = [r for r in rows if len(r) == len(header_a) and r != header_a and r[0] in MODELS_A]
    assert [r[0] for r in part_a] == MODELS_A and MODELS_A[-2:] == ["CGC", "PLE"]  # Tang et al. 2020 beside MMoE
    assert all(_is_mean_std(c) and float(c.split(" ± ")[0]) >= 0 for r in part_a for c in r[1:])
    part_b = [r for r in rows if len(r) == 5 and r[0] in [*MODELS, ORACLE]]
    assert [r[0] for r in part_b] == [*MODELS, ORACLE]
    for r in part_b:
        assert _is_mean_std(r[1])
        if r[0] in ("ridge", "shared-bottom", ORACLE):
            assert r[2] == "—"  # no learned gate, no selected experts
        else:
            assert -1.0 <= float(r[2].split(" ± ")[0]) <= 1.0
    comps = _check_comparisons(result, PRESETS["tiny"]["seeds"])
    assert {c.claim for c in comps if c.primary} == {"DSelect-k beats Top-k and MMoE on synthetic MTL",
                                                     "DSelect-k's selected experts recover the task clusters"}


def test_e1_ridge_and_normalised_mse():
    from tinymoe.data import mmoe_synthetic, train_val_test_split
    from tinymoe.experiments.e1_gates import normalised_mse, ridge

    y = np.random.default_rng(0).standard_normal((100, 2))
    np.testing.assert_allclose(normalised_mse(np.broadcast_to(y.mean(axis=0), y.shape), y), [1.0, 1.0])
    # with no sinusoids the targets are linear: ridge explains nearly everything
    data = train_val_test_split(mmoe_synthetic(600, 0.5, d=10, m=0, seed=0), (0.6, 0.2, 0.2), seed=0)
    assert normalised_mse(ridge(data), data["test"].y).max() < 0.05


def test_static_top_k_gate_is_the_same_for_every_example():
    from tinymoe.experiments.e1_gates import StaticGateMoE

    model = StaticGateMoE(6, 4, 4, 3, "top_k", k=2, seed=0)
    outs = model(np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32))
    assert len(outs) == 3
    for w in model.last_weights:
        assert (w == w[0]).all() and ((w[0] > 0).sum() == 2) and np.isclose(w[0].sum(), 1.0)
    sum(o.sum() for o in outs).backward()
    assert model.logits.grad is not None and np.abs(model.logits.grad).sum() > 0
    oracle = StaticGateMoE(6, 4, 4, 3, "oracle", table=[2, 0, 2], seed=0)
    oracle(np.zeros((2, 6), np.float32))
    assert [int(w[0].argmax()) for w in oracle.last_weights] == [2, 0, 2]


def test_fixed_generator_seed_fixes_the_function_not_the_sample():
    from tinymoe.data import mmoe_synthetic

    a = mmoe_synthetic(50, 0.5, d=8, seed=0, generator_seed=3)
    b = mmoe_synthetic(50, 0.5, d=8, seed=1, generator_seed=3)
    np.testing.assert_array_equal(a.meta["alpha"], b.meta["alpha"])
    np.testing.assert_array_equal(a.meta["weights"], b.meta["weights"])
    assert not np.array_equal(a.x, b.x)
    c = mmoe_synthetic(50, 0.5, d=8, seed=0)  # default: both from seed, as before
    assert not np.array_equal(a.meta["alpha"], c.meta["alpha"])


@pytest.mark.slow
def test_e2_tiny(tmp_path):
    from tinymoe.experiments.e2_transfer import PRESETS

    text, rows, result = _run("e2", tmp_path)
    assert rows[0] == ["arm", "reverse+increment test accuracy (mean ± std over seeds)", "lr (tuned)"]
    arms = PRESETS["tiny"]["arms"]
    assert [r[0] for r in rows[1:1 + len(arms)]] == arms
    assert all(0.0 <= float(r[1].split(" ± ")[0]) <= 1.0 for r in rows[1:1 + len(arms)])
    comps = _check_comparisons(result, PRESETS["tiny"]["seeds"])
    primary = [c for c in comps if c.primary]
    assert [(c.arm, c.baseline) for c in primary] == [("MoE add (task-aware)", "dense")]


@pytest.mark.slow
def test_e3_tiny(tmp_path):
    from tinymoe.experiments.e3_unseen import FRESH_ROUTER, METHODS, PRESETS, REUSE

    text, rows, result = _run("e3", tmp_path)
    assert rows[0] == ["method", "K=0 (zero-shot)", "K=4"]
    assert [r[0] for r in rows[1:1 + len(METHODS)]] == METHODS
    assert all(0.0 <= float(c.split(" ± ")[0]) <= 1.0 for r in rows[1:1 + len(METHODS)] for c in r[1:])
    comps = _check_comparisons(result, PRESETS["tiny"]["seeds"])
    assert [(c.arm, c.baseline) for c in comps if c.primary] == [(REUSE, FRESH_ROUTER)]


def test_e3_fresh_router_keeps_the_input_description():
    from tinymoe.experiments.common import sequence_model
    from tinymoe.experiments.e3_unseen import register

    cfg = dict(d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4)
    model = sequence_model("MoE add (task-aware)", 2, 8, 6, cfg, 0, descriptions=[[0], [1]], num_parts=4)
    assert register(model, [0, 1], [3]) == 2
    assert model.task_emb.descriptions[2] == [0, 1]
    assert all(m.gate.task_embedding.descriptions[2] == [3] for m in model.moe_layers)
    out = model(np.zeros((1, 6), np.int64), np.array([2]))
    assert out.shape == (1, 6, 8)


@pytest.mark.slow
def test_e4_tiny(tmp_path):
    from tinymoe.experiments.e4_unrelated import PRESETS

    text, rows, result = _run("e4", tmp_path)
    assert rows[0][0] == "arm" and rows[0][4] == "Δ (unrelated − base only)" and len(rows[0]) == 6
    arms = PRESETS["tiny"]["arms"]
    assert [r[0] for r in rows[1:1 + len(arms)]] == arms
    for r in rows[1:1 + len(arms)]:
        before, only, mixed, delta = (float(c.split(" ± ")[0]) for c in r[1:5])
        assert 0.0 <= min(before, only, mixed) and max(before, only, mixed) <= 1.0
        assert delta == pytest.approx(mixed - only, abs=2e-3)  # rounding of the printed means
    _check_comparisons(result, PRESETS["tiny"]["seeds"])


@pytest.mark.slow
def test_e5_tiny(tmp_path):
    pytest.importorskip("sklearn")
    from tinymoe.experiments.e5_digits import MODELS, PRESETS

    text, rows, result = _run("e5", tmp_path)
    assert [r[0] for r in rows[1:1 + len(MODELS)]] == MODELS
    assert all(0.0 <= float(r[1].split(" ± ")[0]) <= 1.0 for r in rows[1:1 + len(MODELS)])
    comps = _check_comparisons(result, PRESETS["tiny"]["seeds"])
    assert [(c.arm, c.baseline) for c in comps if c.primary] == [("DSelect-k static", "top-k static")]


@pytest.mark.slow
def test_e6_tiny(tmp_path):
    from tinymoe.experiments.e6_scale import PRESETS

    text, rows, result = _run("e6", tmp_path)
    cfg = PRESETS["tiny"]
    settings = [r for r in rows if r[0].isdigit()]
    assert [(int(r[0]), int(r[2])) for r in settings] == [(T, E) for T in cfg["tasks"] for E in cfg["experts"]]
    _check_comparisons(result, cfg["seeds"])
    assert all(f"E={E}:" in text for E in cfg["experts"])  # "holds from T on" / "not seen up to T" per E


def test_multi_digit_splits_keep_test_digits_unseen():
    pytest.importorskip("sklearn")
    from tinymoe.experiments.e5_digits import PRESETS, data_for

    data = data_for(PRESETS["tiny"], 0)
    train_src = set(data["train"].meta["source_index"].ravel()) | set(data["val"].meta["source_index"].ravel())
    assert not train_src & set(data["test"].meta["source_index"].ravel())


def test_report_writes_a_row_per_claim(tmp_path):
    from tinymoe.experiments.e2_transfer import CLAIM
    from tinymoe.experiments.report import CLAIMS, report
    from tinymoe.experiments.stats import compare

    folder = tmp_path / "runs" / "e2-tiny"
    folder.mkdir(parents=True)
    (folder / "results.md").write_text("# E2\n\n## Target\n\n| a |\n|---|\n| 1 |\n")
    base = np.linspace(0.5, 0.6, 8)
    c = compare(base + 0.05, base, claim=CLAIM, arm="MoE add (task-aware)", baseline="dense", metric="acc",
                scale="7 tasks")
    (folder / "results.json").write_text(json.dumps(dict(comparisons=[c.to_dict()], seconds=1.0, backend="numpy")))
    lines = []
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    text = report("tiny", str(tmp_path / "runs"), str(doc), log=lines.append)
    assert doc.read_text() == text
    summary = [r for r in _table_rows(text) if len(r) > 1 and r[1].startswith(("Hazimeh", "Gupta"))]
    assert len(summary) == len(CLAIMS)
    row = next(r for r in summary if r[0].startswith("(i)"))
    assert row[-1] == "**holds**" and "8 seeds" in row[3] and c.interval() in row[3] and row[4] == "7 tasks"
    assert sum("not run" in r[-1] for r in summary) == len(CLAIMS) - 1  # only e2 has results here
    assert any("HOLDS" in line and "8 paired seeds" in line for line in lines)  # verdicts on the console too


def test_cli_runs_a_tiny_experiment(tmp_path, capsys):
    assert main(["e4", "--preset", "tiny", "--seeds", "2", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| arm |" in out and "2 paired seeds" in out  # the table, then the verdicts on the console
    assert "2 paired seeds" in (tmp_path / "cli" / "results.md").read_text()
    with pytest.raises(ValueError, match="at least two seeds"):
        main(["e4", "--preset", "tiny", "--seeds", "1", "--out", str(tmp_path / "cli1")])


def test_registry_names():
    assert set(EXPERIMENTS) == {f"e{i}" for i in range(1, 10)}
    assert get("e1_gates") is get("E1")
    with pytest.raises(ValueError, match="unknown experiment"):
        get("e10")


# ---- the control arms of E2–E4 ---------------------------------------------------------------------------------

_SEQ_CFG = dict(d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4)


def _routing_under(model, tokens, task_ids):
    model(tokens, task_ids)
    return [(m.last_routing.expert_idx.copy(), m.last_routing.weights.copy()) for m in model.moe_layers]


def test_task_blind_router_receives_no_task_information():
    from tinymoe.experiments.common import BlindRouter, sequence_model

    model = sequence_model("MoE task-blind router", 3, 8, 6, _SEQ_CFG, seed=0)
    assert all(isinstance(m.gate, BlindRouter) for m in model.moe_layers) and len(model.moe_layers) == 2
    tokens = np.random.default_rng(0).integers(0, 8, (5, 6))
    a, b = np.zeros(5, np.int64), np.full(5, 2)
    for (ia, wa), (ib, wb) in zip(_routing_under(model, tokens, a), _routing_under(model, tokens, b)):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(wa, wb)
    # the task still reaches the model (through the input), just not its routers
    assert not np.allclose(model(tokens, a).numpy(), model(tokens, b).numpy())
    # and the router is trained: its weights get a gradient
    model(tokens, a).sum().backward()
    assert all(m.gate.inner.weight.grad is not None and np.abs(m.gate.inner.weight.grad).sum() > 0
               for m in model.moe_layers)


def test_token_router_sees_the_task_through_the_input():
    # the control for the test above: the usual token router's weights do move with the task id
    from tinymoe.experiments.common import sequence_model

    model = sequence_model("MoE token router (task via input)", 3, 8, 6, _SEQ_CFG, seed=0)
    tokens = np.random.default_rng(0).integers(0, 8, (5, 6))
    ra = _routing_under(model, tokens, np.zeros(5, np.int64))
    rb = _routing_under(model, tokens, np.full(5, 2))
    assert any(not np.allclose(wa, wb) for (_, wa), (_, wb) in zip(ra, rb))


def test_oracle_routing_sends_each_task_to_the_expert_of_its_part():
    from tinymoe.experiments.common import sequence_model

    parts = [("reverse",), ("increment",), ("reverse", "increment")]  # experts: increment 0, reverse 1
    model = sequence_model("MoE oracle routing", 3, 8, 6, _SEQ_CFG, seed=0, task_parts=parts)
    tokens = np.random.default_rng(0).integers(0, 8, (3, 6))
    routes = _routing_under(model, tokens, np.array([0, 1, 2]))
    first, second = (idx.reshape(3, 6, -1)[:, :, 0] for idx, _ in routes)
    np.testing.assert_array_equal(first, [[1] * 6, [0] * 6, [1] * 6])   # block 0: the first part
    np.testing.assert_array_equal(second, [[1] * 6, [0] * 6, [0] * 6])  # block 1: the second (or only) part


def test_arms_differ_in_what_they_compute():
    from tinymoe.experiments.common import SEQ_ARMS, sequence_model

    assert "MoE concat (task-aware)" not in SEQ_ARMS  # [x; e]W = xW_x + eW_e: the same function as add
    dense = sequence_model("dense", 2, 8, 6, _SEQ_CFG, seed=0)
    wide = sequence_model("dense ×E (equal params)", 2, 8, 6, _SEQ_CFG, seed=0)
    moe = sequence_model("MoE add (task-aware)", 2, 8, 6, _SEQ_CFG, seed=0)
    assert dense.num_parameters() < moe.num_parameters()
    assert abs(wide.num_parameters() - moe.num_parameters()) < 0.1 * moe.num_parameters()  # equal total params


def test_conflicting_unrelated_tasks():
    from tinymoe.data.sequences import make_task, random_mapping_tasks

    x = np.random.default_rng(0).integers(0, 10, (400, 8))
    (value,), (memo,) = random_mapping_tasks(1, kind="value")[0], random_mapping_tasks(1, kind="memorise")[0]
    v = make_task((value,))(x)
    # a value map keeps positions: equal inputs at two positions give equal outputs
    same = x[:, 0] == x[:, 1]
    np.testing.assert_array_equal(v[same, 0], v[same, 1])
    m = make_task((memo,))(x)
    np.testing.assert_array_equal(m, make_task((memo,))(x))  # deterministic
    flipped = x.copy()
    flipped[:, -1] = (flipped[:, -1] + 1) % 10  # change one input token: labels everywhere change
    assert np.mean(make_task((memo,))(flipped)[:, 0] == m[:, 0]) < 0.2
