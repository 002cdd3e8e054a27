"""The scale sweeps (tinymoe.experiments.sweep, E7–E9): the points vary one axis at a time, "holds from N on" reads
the verdicts correctly, task pools never repeat a function, each sweep's tiny preset writes its table, plot and
results with every point's verdict being the rule applied to that point's own interval, and the report gives the
sweeps their rows."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tinymoe.data import make_task
from tinymoe.experiments import get
from tinymoe.experiments.stats import CANNOT_TELL, CONTRADICTED, HOLDS, t_interval, verdict
from tinymoe.experiments.sweep import cached, holds_from, label, sweep_points, task_pool

pytest.importorskip("matplotlib")


# ---- the helper ----------------------------------------------------------------------------------------------------


def test_sweep_points_vary_one_axis_at_a_time():
    points = sweep_points({"tasks": 16, "experts": 4, "data": 300},
                          {"tasks": [4, 16, 32], "experts": [4, 16], "data": [100, 300, 900]})
    assert [label(p) for p in points] == ["T=16, E=4, n=300", "T=4, E=4, n=300", "T=32, E=4, n=300",
                                          "T=16, E=16, n=300", "T=16, E=4, n=100", "T=16, E=4, n=900"]


def test_sweep_points_reject_a_base_off_the_axes():
    with pytest.raises(ValueError, match="base point"):
        sweep_points({"tasks": 8}, {"tasks": [4, 16]})
    with pytest.raises(ValueError, match="no base value"):
        sweep_points({"tasks": 4}, {"tasks": [4], "experts": [4]})


@pytest.mark.parametrize("verdicts, expected", [
    ([CANNOT_TELL, HOLDS, HOLDS], "holds from T=16 on (up to T=32)"),
    ([HOLDS, HOLDS, HOLDS], "holds from T=4 on (up to T=32)"),
    ([HOLDS, CANNOT_TELL, HOLDS], "holds from T=32 on (up to T=32)"),  # a gap breaks the run: only the top holds
    ([HOLDS, HOLDS, CANNOT_TELL], "not seen up to T=32"),  # holding below the top is not "from N on"
    ([CONTRADICTED, CANNOT_TELL, HOLDS], "holds from T=32 on (up to T=32); contradicted at T=4"),
    ([CANNOT_TELL] * 3, "not seen up to T=32"),
])
def test_holds_from_known_answers(verdicts, expected):
    assert holds_from([4, 16, 32], verdicts, "T") == expected


def test_holds_from_rejects_bad_input():
    with pytest.raises(ValueError, match="ascending"):
        holds_from([16, 4], [HOLDS, HOLDS], "T")
    with pytest.raises(ValueError, match="one verdict per scale"):
        holds_from([4, 16], [HOLDS], "T")


def test_cached_trains_once_per_seed_across_the_ignored_axis():
    calls = []
    fn = cached(lambda point, seed: calls.append((point["tasks"], seed)) or len(calls), ignore=("experts",))
    assert fn({"tasks": 4, "experts": 4}, 0) == fn({"tasks": 4, "experts": 16}, 0) == 1
    assert fn({"tasks": 4, "experts": 4}, 1) == 2 and fn({"tasks": 8, "experts": 4}, 0) == 3
    assert calls == [(4, 0), (4, 1), (8, 0)]


def test_task_pool_keeps_the_first_tasks_and_never_repeats_a_function():
    probe = np.random.default_rng(7).integers(0, 10, (256, 8))
    target = ("sort", "negate")
    pool = task_pool([("sort",), ("negate",)], 32, exclude=[target])
    assert len(pool) == 32 and pool[:2] == [("sort",), ("negate",)]
    signatures = [make_task(t)(probe).tobytes() for t in pool]
    assert len(set(signatures)) == 32  # 32 different functions
    assert make_task(target)(probe).tobytes() not in signatures  # nor the excluded target's
    with pytest.raises(ValueError, match="sweep fewer tasks"):
        task_pool([], 10_000)


# ---- the sweeps' tiny presets --------------------------------------------------------------------------------------


def _check_sweep(name, tmp_path):
    """Run the tiny preset; every point has a comparison whose CI is the t interval of the saved per-seed paired
    differences and whose verdict is the rule applied to that CI; the summary is holds_from over those verdicts."""
    module = get(name)
    cfg = module.PRESETS["tiny"]
    out = tmp_path / "runs" / f"{name}-tiny"
    result = module.run(preset="tiny", out=str(out), log=lambda *a: None)
    saved = json.loads((out / "results.json").read_text())
    points = sweep_points(cfg["sweep"]["base"], cfg["sweep"]["axes"])
    comps = result["comparisons"]
    assert saved["settings"] == [label(p) for p in points] and len(comps) == len(points)
    assert all(c.arm == f"{saved['arm']}, {label(p)}" for p, c in zip(points, comps))
    for p, c in zip(points, comps):
        v = saved["values"][label(p)]
        assert len(v["arm"]) == len(v["baseline"]) == cfg["seeds"] == c.seeds
        mean, lo, hi = t_interval(np.subtract(v["arm"], v["baseline"]))
        assert (c.mean, c.low, c.high) == pytest.approx((mean, lo, hi))
        assert c.verdict == verdict(lo, hi, +1) and c.primary and c.p_holm is None  # from the saved values
    base = cfg["sweep"]["base"]
    by_label = {label(p): c for p, c in zip(points, comps)}
    for axis, line in zip(cfg["sweep"]["axes"], result["summary"]):
        scales = sorted(cfg["sweep"]["axes"][axis])
        verdicts = [by_label[label({**base, axis: s})].verdict for s in scales]
        assert line.endswith(holds_from(scales, verdicts, {"tasks": "T", "experts": "E", "data": "n"}[axis]))
    assert saved["summary"] == result["summary"] and saved["scale_tried"]
    assert saved["cpu_seconds"] >= 0 and len(saved["load"]) == 2
    text = (out / "results.md").read_text()
    assert all(f"* {line}" in text for line in result["summary"]) and "s CPU" in text
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert len(pngs) == 1 and (out / pngs[0]).stat().st_size > 1000
    assert not [f for f in os.listdir(out) if f.startswith(".") or f.endswith(".tmp")]  # atomic: no leftovers
    return result, out


def test_e7_tiny(tmp_path):
    from tinymoe.experiments.report import report

    result, out = _check_sweep("e7", tmp_path)
    assert all(c.baseline == "dense" and c.arm.startswith("MoE add (task-aware)") for c in result["comparisons"])
    # the report gives the sweep its row, with each setting's interval and the summary as the verdict
    lines = []
    text = report("tiny", str(tmp_path / "runs"), str(tmp_path / "results.md"), log=lines.append)
    row = next(line for line in text.splitlines() if line.startswith("| … (i) against"))
    assert all(c.interval(2) in row for c in result["comparisons"]) and "seeds each" in row
    assert all(s in row for s in result["summary"])
    assert sum("(scale sweep)" in line and "paired seeds" in line for line in lines) == len(result["comparisons"])
    assert any(line.endswith("; ".join(result["summary"])) for line in lines)  # and the summary per axis


def test_e7_setting_grows_the_mixture_around_the_target():
    from tinymoe.experiments.e7_sweep_transfer import PRESETS, setting

    cfg = PRESETS["small"]
    s = setting(cfg, {"tasks": 32, "experts": 16, "data": 900})
    assert len(s["related"]) == 31 and s["related"][:6] == cfg["related"]  # E2's related tasks first
    assert cfg["target"] not in s["related"] and s["num_experts"] == 16 and s["n_related"] == 900


def test_e8_tiny(tmp_path):
    from tinymoe.experiments.e3_unseen import FRESH_ROUTER, REUSE

    result, _ = _check_sweep("e8", tmp_path)
    assert all(c.baseline == FRESH_ROUTER and c.arm.startswith(REUSE) for c in result["comparisons"])


def test_e8_seen_tasks_hold_the_held_out_parts_but_not_their_functions():
    from tinymoe.experiments.e8_sweep_unseen import PRESETS, setting

    cfg = PRESETS["small"]
    probe = np.random.default_rng(3).integers(0, cfg["vocab"], (256, cfg["seq_len"]))
    held = {make_task(h)(probe).tobytes() for h in cfg["heldout"]}
    for T in cfg["sweep"]["axes"]["tasks"]:
        seen = setting(cfg, {"tasks": T, "experts": 4, "data": 300})["seen"]
        assert len(seen) == T and not held & {make_task(t)(probe).tobytes() for t in seen}
        assert {p for h in cfg["heldout"] for p in h} <= {p for t in seen for p in t}  # every part is seen


def test_e9_tiny(tmp_path):
    result, _ = _check_sweep("e9", tmp_path)
    assert all(c.baseline == "dense" and c.metric == "Δ base accuracy" for c in result["comparisons"])


def test_e9_setting_adds_the_unrelated_tasks_half_and_half():
    from tinymoe.experiments.e4_unrelated import unrelated_tasks
    from tinymoe.experiments.e9_sweep_unrelated import PRESETS, setting

    s = setting(PRESETS["small"], {"tasks": 32, "experts": 4, "data": 200})
    assert s["unrelated"] == {"value": 16, "memorise": 16} and s["n_per_task"] == 200
    names = unrelated_tasks(s, 0)
    assert len(set(names)) == 32 and s["base"] == PRESETS["small"]["base"]


# ---- the runtime bookkeeping ---------------------------------------------------------------------------------------


def test_experiments_run_blas_on_one_thread(monkeypatch):
    """Under the numpy backend too (numba's session pins BLAS by itself, so it would hide a missing pin here)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from tinymoe.experiments.common import fastest_backend

    monkeypatch.setenv("TINYMOE_BACKEND", "numpy")
    with fastest_backend() as name:
        assert name == "numpy"
        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas)


def test_timer_records_wall_cpu_and_load():
    from tinymoe.experiments.common import Timer

    timer = Timer()
    sum(i * i for i in range(100_000))
    r = timer.record()
    assert r["seconds"] > 0 and r["cpu_seconds"] > 0 and len(r["load"]) == 2
    assert "s wall" in timer.describe() and "s CPU" in timer.describe()
    sum(i * i for i in range(100_000))
    assert timer.record() == r  # the first record ends the clock: the notes and results.json agree
