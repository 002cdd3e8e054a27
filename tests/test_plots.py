"""Figures and tables a user reads after a run: curves.png (written by every run, redrawn by `tinymoe plot`), the
routes figure and table (`tinymoe routes`), and the split named by `tinymoe eval --split`."""
import json
import re

import numpy as np
import pytest

from tinymoe.cli import main
from tinymoe.plots import curves_figure, format_routing, read_metrics, routes_figure

matplotlib = pytest.importorskip("matplotlib")

TINY = """\
name = "tiny"
backend = "numpy"

[data]
kind = "sequence"
tasks = ["copy", "reverse+increment", "sort"]
n_per_task = 40
seq_len = 5
vocab_size = 6

[model]
d_model = 16
n_layers = 2
n_heads = 2
d_ff = 16
num_experts = 6
k = 2
moe_every = 1
router = "add"

[optim]
steps = 6
batch_size = 16
warmup_steps = 2
eval_every = 2
"""
TASKS = ["copy", "reverse+increment", "sort"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plots")
    (folder / "tiny.toml").write_text(TINY)
    assert main(["train", "--config", str(folder / "tiny.toml"), "--run-dir", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


def test_every_run_writes_curves_png(run):
    assert (run / "curves.png").stat().st_size > 10_000
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["val"]["metric"] == "accuracy" for r in records)


def test_tinymoe_plot_redraws_curves(run, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and str(out) in capsys.readouterr().out
    assert main(["plot", str(tmp_path)]) == 2  # not a run folder: a one-line error
    assert "no metrics.jsonl" in capsys.readouterr().err


def _lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_curves_figure_shows_losses_aux_tasks_and_load(run):
    records = read_metrics(run)
    fig = curves_figure(records, "accuracy")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles[:3] == ["task loss", "auxiliary losses (unweighted, last batch)", "validation accuracy per task"]
    assert titles[3:] == ["expert load f_i, MoE layer 0", "expert load f_i, MoE layer 1"]
    for ax in axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
    loss = _lines_by_label(axes[0])
    np.testing.assert_allclose(loss["validation"].get_ydata(), [r["val"]["loss"] for r in records])
    aux = _lines_by_label(axes[1])
    assert set(aux) == set(records[0]["aux"]) and {"load_balance", "z_loss"} <= set(aux)
    tasks = _lines_by_label(axes[2])
    assert list(tasks) == TASKS  # full names, one line each
    colors = [tuple(tasks[t].get_color()) for t in TASKS]
    assert len(set(colors)) == len(TASKS)  # one colour per task
    np.testing.assert_allclose(tasks["sort"].get_ydata(), [r["val"]["per_task"]["sort"] for r in records])
    load = _lines_by_label(axes[3])
    assert [f"expert {e}" for e in range(6)] == [k for k in load if k.startswith("expert")]
    np.testing.assert_allclose(load["expert 5"].get_ydata(), [r["expert_load"][0][5] for r in records])
    np.testing.assert_allclose(load["uniform 1/E"].get_ydata(), 1 / 6)
    matplotlib.pyplot.close(fig)


def test_curves_of_a_tabular_run_show_mse_and_the_gate_load(tmp_path):
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--quiet", "--set", "data.kind=mmoe", "--set",
                 "data.n=300", "--set", "optim.steps=4", "--set", "optim.eval_every=2", "--set", "backend=numpy"]) == 0
    records = read_metrics(tmp_path / "r")
    assert records[0]["val"]["metric"] == "mse" and len(records[0]["expert_load"]) == 1
    fig = curves_figure(records, "mse")
    assert fig.axes[2].get_title() == "validation mse per task" and fig.axes[2].get_ylabel() == "mse"
    matplotlib.pyplot.close(fig)


def _tables():
    rng = np.random.default_rng(0)
    layers = [rng.dirichlet(np.ones(10), size=3) * s for s in (1.0, 0.5)]  # different maxima per layer
    return {"tasks": ["copy", "reverse+increment", "sort"], "layers": layers,
            "expert_load": [s.mean(axis=0) / s.mean(axis=0).sum() for s in layers],
            "what": "share of each task's assignments per expert"}


def test_routes_figure_one_colour_scale_labelled_bar_every_expert_and_a_free_legend():
    tables = _tables()
    fig = routes_figure(tables)
    heatmaps = [ax for ax in fig.axes if ax.get_images()]
    assert len(heatmaps) == 2
    limits = {ax.get_images()[0].get_clim() for ax in heatmaps}
    assert limits == {(0, max(float(s.max()) for s in tables["layers"]))}  # one scale for both layers
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == tables["what"]]
    assert len(colorbars) == 1  # one colour bar, labelled with what the colours mean
    for ax in heatmaps:
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in range(10)]
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == tables["tasks"]
    bars = next(ax for ax in fig.axes if ax.patches)
    assert list(bars.get_xticks()) == list(range(10))  # integer ticks, every expert
    assert [t.get_text() for t in bars.get_xticklabels()] == [str(e) for e in range(10)]
    fig.canvas.draw()
    legend = bars.get_legend().get_window_extent()
    for patch in bars.patches:  # the legend hides no bar
        assert not legend.overlaps(patch.get_window_extent())
    matplotlib.pyplot.close(fig)


def test_routes_table_is_aligned_with_full_task_names():
    text = format_routing(_tables())
    lines = text.splitlines()
    header, rows = lines[1], lines[2:5]
    assert [row.split()[0] for row in rows] == ["copy", "reverse+increment", "sort"]
    ends = [m.end() for m in re.finditer(r"e\d+", header)]
    for row in rows + [lines[5]]:
        assert [m.end() for m in re.finditer(r"\d\.\d\d", row)] == ends  # every value under its expert


def test_routes_command_prints_full_names(run, capsys):
    assert main(["routes", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reverse+increment" in out and (run / "routes.png").is_file()


def test_eval_names_the_split(run, capsys):
    assert main(["eval", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "val accuracy per task" in out and "test accuracy" not in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(r["val"]["mean"] for r in records)
    assert f"(mean {best:.4f})" in out  # the best-on-validation model's validation numbers


def test_curves_of_a_cgc_run_name_each_expert_and_draw_no_uniform_line(tmp_path):
    # CGC gates each task over its own experts and the shared ones, so "1/E" is not the balanced share of any
    # expert: the panel labels the experts by name and leaves the reference line out.
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--quiet", "--set", "data.kind=mmoe", "--set",
                 "data.n=300", "--set", "optim.steps=4", "--set", "optim.eval_every=2", "--set", "backend=numpy",
                 "--set", "model.family=cgc"]) == 0
    records = read_metrics(tmp_path / "r")
    names = records[0]["experts"]
    assert names[0] == "t0.e0" and names[-1].startswith("shared.") and len(names) == len(records[0]["expert_load"][0])
    fig = curves_figure(records, "mse")
    load = _lines_by_label(fig.axes[3])
    assert list(load) == names and "uniform 1/E" not in load
    matplotlib.pyplot.close(fig)
