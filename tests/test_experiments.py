"""The experiments of docs/design.md §7: each tiny preset runs and writes a table with the expected rows and
columns and a plot; the adjusted Rand index matches hand-computed cases; SharedBottom has MultiGateMoE's call
convention."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tinymoe.experiments import EXPERIMENTS, get, main
from tinymoe.experiments.common import (SharedBottom, adjusted_rand_index, fmt, markdown_table, mean_std,
                                        partition_from_sets)

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
    assert len(pngs) == 1 and (out / pngs[0]).stat().st_size > 1000
    assert result["dir"] == str(out)
    assert all(table in text for table in result["table"].split("\n\n"))  # E1 returns two tables
    return text, _table_rows(text)


def _is_mean_std(cell):
    m, _, s = cell.partition(" ± ")
    return float(m) == float(m) and float(s) >= 0


@pytest.mark.slow
def test_e1_tiny(tmp_path):
    from tinymoe.experiments.e1_gates import MODELS, PRESETS

    text, rows = _run("e1", tmp_path)
    assert "Part A" in text and "Part B" in text
    header_a = ["model", "ρ", "task0 test MSE", "task1 test MSE", "mean test MSE"]
    assert header_a in rows
    part_a = [r for r in rows if len(r) == 5 and r != header_a]
    assert {(r[0], float(r[1])) for r in part_a} == {(m, rho) for m in MODELS for rho in PRESETS["tiny"]["rhos"]}
    assert all(_is_mean_std(c) for r in part_a for c in r[2:])
    part_b = [r for r in rows if len(r) == 4 and r[0] != "model"]
    assert [r[0] for r in part_b] == MODELS
    for r in part_b:
        assert _is_mean_std(r[1])
        if r[0] == "shared-bottom":
            assert r[2] == "—"  # no gate, no selected experts
        else:
            assert -1.0 <= float(r[2].split(" ± ")[0]) <= 1.0


@pytest.mark.slow
def test_e2_tiny(tmp_path):
    from tinymoe.experiments.e2_transfer import VARIANTS

    text, rows = _run("e2", tmp_path)
    assert rows[0] == ["model", "reverse+increment test accuracy (per position)"]
    assert [r[0] for r in rows[1:]] == VARIANTS
    assert "trained alone (dense)" in VARIANTS and "MoE token (task-agnostic)" in VARIANTS
    assert all(0.0 <= float(r[1].split(" ± ")[0]) <= 1.0 for r in rows[1:])


@pytest.mark.slow
def test_e3_tiny(tmp_path):
    from tinymoe.experiments.e3_unseen import METHODS

    text, rows = _run("e3", tmp_path)
    assert rows[0] == ["method", "K=0 (zero-shot)", "K=8"]
    assert [r[0] for r in rows[1:]] == METHODS
    assert all(0.0 <= float(c.split(" ± ")[0]) <= 1.0 for r in rows[1:] for c in r[1:])


@pytest.mark.slow
def test_e4_tiny(tmp_path):
    from tinymoe.experiments.e4_unrelated import PRESETS

    text, rows = _run("e4", tmp_path)
    assert rows[0][0] == "model" and rows[0][-1] == "Δ (unrelated − base only)" and len(rows[0]) == 5
    assert [r[0] for r in rows[1:]] == PRESETS["tiny"]["variants"]
    for r in rows[1:]:
        before, only, mixed, delta = (float(c.split(" ± ")[0]) for c in r[1:])
        assert 0.0 <= min(before, only, mixed) and max(before, only, mixed) <= 1.0
        assert delta == pytest.approx(mixed - only, abs=2e-3)  # rounding of the printed means


def test_cli_runs_a_tiny_experiment(tmp_path, capsys):
    assert main(["e1", "--preset", "tiny", "--seeds", "1", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "| model |" in capsys.readouterr().out
    assert "1 seeds" in (tmp_path / "cli" / "results.md").read_text()


def test_registry_names():
    assert set(EXPERIMENTS) == {"e1", "e2", "e3", "e4"}
    assert get("e1_gates") is get("E1")
    with pytest.raises(ValueError, match="unknown experiment"):
        get("e9")
