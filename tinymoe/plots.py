"""Figures of a run: training curves (`curves.png`) and routing (`routes.png`), plus the routing table as text.

    tinymoe plot RUN_DIR        # RUN_DIR/curves.png from RUN_DIR/metrics.jsonl (written at the end of every run)
    tinymoe routes RUN_DIR      # the routing table on stdout and RUN_DIR/routes.png

curves.png answers "is training healthy?" at a glance:
* task loss: the training loss (mean over each eval window) and the validation loss, per eval step;
* auxiliary losses: one line per loss the model reports (load balance, z-loss, DSelect-k entropy, ...), unweighted;
* the validation metric per task (accuracy or MSE), one colour per task, the same colours in every figure;
* expert load f_i per MoE layer: the share of assignments each expert received in the eval step's batch; a healthy
  router keeps every line near the dashed uniform share 1/E, a collapsed one sends most lines to 0.

matplotlib is only needed to draw (pip install 'tinymoe[plot]'); reading the metrics needs nothing.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .engine import no_grad


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    """Save `fig` as a PNG atomically (as every file of a run: a reader never sees half a file) and close it."""
    import io

    from .checkpoint import write_atomic

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        _pyplot().close(fig)
    write_atomic(path, buf.getvalue())
    return path


def task_colors(names) -> dict:
    """One colour per task name (tab10, then tab20 for more than ten tasks), stable across figures."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


# ---- curves --------------------------------------------------------------------------------------------------------


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (one per eval step), in order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; pass a run folder written by `tinymoe train`")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # the half-written last line of a run killed mid-write (a resume cuts it)
            try:
                records.append(json.loads(line)) if line.strip() else None
            except ValueError as e:
                raise ValueError(f"{path} line {number} is not a JSON record ({e}); the file is damaged") from None
    if not records:
        raise ValueError(f"{path} is empty: the run logged no eval step yet (eval_every is larger than its steps?)")
    return records


def _metric_name(run_dir, records) -> str:
    """"accuracy" or "mse": from the records, else results.json, else the run's config."""
    for r in records:
        if "metric" in r.get("val", {}):
            return r["val"]["metric"]
    path = os.path.join(run_dir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["test"]["metric"]
    with open(os.path.join(run_dir, "config.json")) as f:
        data = json.load(f)["data"]
    regression = data["kind"] in ("mmoe", "clustered") or (data["kind"] == "table" and
                                                           data.get("task_type", "regression") == "regression")
    return "mse" if regression else "accuracy"


def curves_figure(records, metric="accuracy", title=""):
    """The matplotlib Figure of `plot_curves` from a list of metrics records (see the module docstring)."""
    plt = _pyplot()
    steps = np.array([r["step"] for r in records])
    layers = max((len(r.get("expert_load", [])) for r in records), default=0)
    ncols = 3
    nrows = 1 + (layers + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)

    ax = axes[0, 0]
    ax.plot(steps, [r["train_loss"] for r in records], marker=".", label="train (mean over the eval window)")
    val = [(r["step"], r["val"]["loss"]) for r in records if "val" in r]
    if val:
        ax.plot(*zip(*val), marker=".", label="validation")
    ax.set(title="task loss", xlabel="step", ylabel="loss")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    names = sorted({name for r in records for name in r.get("aux", {})})
    for name in names:
        pts = [(r["step"], r["aux"][name]) for r in records if name in r.get("aux", {})]
        ax.plot(*zip(*pts), marker=".", label=name)
    ax.set(title="auxiliary losses (unweighted, last batch)", xlabel="step", ylabel="value")
    if names:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "this model reports no auxiliary loss", ha="center", va="center", transform=ax.transAxes)

    ax = axes[0, 2]
    tasks = list(next((r["val"]["per_task"] for r in records if "val" in r), {}))
    colors = task_colors(tasks)
    for name in tasks:
        pts = [(r["step"], r["val"]["per_task"][name]) for r in records if name in r.get("val", {}).get("per_task", {})]
        ax.plot(*zip(*pts), marker=".", color=colors[name], label=name)
    ax.set(title=f"validation {metric} per task", xlabel="step", ylabel=metric)
    if tasks:
        ax.legend(fontsize=7, ncol=2 if len(tasks) > 6 else 1)
    else:
        ax.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax.transAxes)

    for i in range(layers):
        ax = axes[1 + i // ncols, i % ncols]
        pts = [(r["step"], r["expert_load"][i]) for r in records if len(r.get("expert_load", [])) > i]
        load = np.array([p[1] for p in pts])  # (evals, E)
        E = load.shape[1]
        named = records[-1].get("experts")  # CGC / PLE name their experts ("t0.e1", "shared.e0")
        labels = named if named and len(named) == E else [f"expert {e}" for e in range(E)]
        cmap = plt.get_cmap("tab10" if E <= 10 else "tab20")
        for e in range(E):
            ax.plot([p[0] for p in pts], load[:, e], color=cmap(e % cmap.N), lw=1, label=labels[e])
        if not named:  # with task-specific experts no single share is "balanced", so no reference line
            ax.axhline(1 / E, color="k", lw=0.8, ls="--", label="uniform 1/E")
        gates = all("dropped" not in r for r in records)  # a multi-gate model: dense gate weights, no dispatch
        panel, ylabel = (("mean gate weight per expert (over tasks)", "mean gate weight") if gates else
                         (f"expert load f_i, MoE layer {i}", "share of assignments"))
        ax.set(title=panel, xlabel="step", ylabel=ylabel,
               ylim=(0, max(float(load.max()) * 1.1, 2 / E)))
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over
    for j in range(layers, (nrows - 1) * ncols):
        axes[1 + j // ncols, j % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(run_dir, out=None) -> str:
    """Draw RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/curves.png); returns the path. Needs matplotlib."""
    records = read_metrics(run_dir)
    fig = curves_figure(records, _metric_name(run_dir, records), title=os.path.basename(os.path.normpath(run_dir)))
    return save_figure(fig, out or os.path.join(run_dir, "curves.png"))


# ---- routing ---------------------------------------------------------------------------------------------------------


def has_routing(model) -> bool:
    """Whether the model routes at all (a dense transformer or shared-bottom has nothing to show)."""
    return bool(getattr(model, "moe_layers", None)) or hasattr(model, "last_weights")


def routing_tables(model, data, batch_size=512) -> dict:
    """What the model routes where on `data`, in eval mode.

    Returns {"tasks": names, "layers": [per layer (num_tasks, E) share of each task's assignments per expert],
    "expert_load": [per layer (E,) share of all assignments]}. For a MultiGateMoE the one "layer" is each task's
    mean gate weight per expert.
    """
    if not has_routing(model):
        raise ValueError(f"{type(model).__name__} has no MoE layer: there is no routing to show")
    model.eval()
    names = list(data.task_names)
    if not hasattr(model, "moe_layers"):  # MultiGateMoE: every example is scored on every task
        with no_grad():
            model(data.x[:batch_size * 4])
        weights = getattr(model, "last_weights", None)
        if not weights:
            raise ValueError(f"{type(model).__name__} has no routing to show")
        table = np.stack([w.mean(axis=0) for w in weights])  # (num_tasks, E)
        out = {"tasks": names, "layers": [table], "expert_load": [table.mean(axis=0)],
               "what": "mean gate weight of each task per expert"}
        if hasattr(model, "expert_names"):  # CGC / PLE: each task's own experts, then the shared ones
            out["experts"] = list(model.expert_names)
        return out
    layers = model.moe_layers
    counts = [np.zeros((len(names), m.num_experts)) for m in layers]
    with no_grad():
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            model(data.tokens[idx], task_ids=data.task_ids[idx])
            for c, m in zip(counts, layers):
                c += m.last_routing.task_expert_load(len(names))
    shares = [c / np.maximum(c.sum(axis=1, keepdims=True), 1) for c in counts]
    loads = [c.sum(axis=0) / max(c.sum(), 1) for c in counts]
    return {"tasks": names, "layers": shares, "expert_load": loads,
            "what": "share of each task's assignments per expert"}


def format_routing(tables) -> str:
    """The routing tables (routing_tables) as aligned text: full task names, one column per expert."""
    lines = []
    width = max([len("all (load f_i)")] + [len(name) for name in tables["tasks"]])
    for i, (share, load) in enumerate(zip(tables["layers"], tables["expert_load"])):
        names = _expert_labels(tables, share.shape[1], prefix="e")
        col = max(6, *(len(n) + 1 for n in names))
        gates = tables["what"].startswith("mean gate weight")  # a multi-gate model: its task gates, no layers
        lines.append(f"{'task gates' if gates else f'MoE layer {i}'}: {tables['what']}")
        lines.append(f"{'task':<{width}}" + "".join(f"{n:>{col}}" for n in names))
        for name, row in zip(tables["tasks"], share):
            lines.append(f"{name:<{width}}" + "".join(f"{v:{col}.2f}" for v in row))
        lines.append(f"{'all (load f_i)':<{width}}" + "".join(f"{v:{col}.2f}" for v in load))
    return "\n".join(lines)


def _expert_labels(tables, E, prefix=""):
    """The experts' names when the model gives them (CGC / PLE: "t0.e1", "shared.e0"), else their numbers."""
    names = tables.get("experts")
    return list(names) if names and len(names) == E else [f"{prefix}{e}" for e in range(E)]


def routes_figure(tables):
    """Task x expert heatmaps (one per MoE layer, one shared colour scale and colour bar) and the per-layer expert
    load as grouped bars, every expert labelled. Returns the matplotlib Figure."""
    plt = _pyplot()
    n, tasks = len(tables["layers"]), tables["tasks"]
    E = tables["layers"][0].shape[1]
    vmax = max(max(float(s.max()) for s in tables["layers"]), 1e-9)
    fig = plt.figure(figsize=(3.4 * n + 0.4 * E + 3.5, 0.32 * len(tasks) + 3.0))
    grid = fig.add_gridspec(1, n + 2, width_ratios=[1] * n + [0.06, 1.25])
    heatmaps = [fig.add_subplot(grid[0, i]) for i in range(n)]
    for i, (ax, share) in enumerate(zip(heatmaps, tables["layers"])):
        im = ax.imshow(share, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"MoE layer {i}" if n > 1 else "task x expert")
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        named = "experts" in tables
        ax.set_xticklabels(_expert_labels(tables, E), fontsize=7, rotation=90 if named else 0)
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks if i == 0 else [], fontsize=7)
    cbar = fig.colorbar(im, cax=fig.add_subplot(grid[0, n]))
    cbar.set_label(tables["what"], fontsize=8)

    ax = fig.add_subplot(grid[0, n + 1])
    gates = tables["what"].startswith("mean gate weight")  # a multi-gate model: dense gates, no layers
    width = 0.8 / len(tables["expert_load"])
    for i, load in enumerate(tables["expert_load"]):
        ax.bar(np.arange(E) + (i - (n - 1) / 2) * width, load, width, label="mean over tasks" if gates else f"layer {i}")
    ax.axhline(1 / E, color="k", lw=0.8, ls="--", label="uniform 1/E")
    ax.set_title("mean gate weight per expert (over tasks)" if gates else "expert load f_i per layer")
    ax.set_xlabel("expert")
    ax.set_ylabel("mean gate weight" if gates else "share of all assignments")
    ax.set_xticks(range(E))
    ax.set_xticklabels(_expert_labels(tables, E), rotation=90 if "experts" in tables else 0)
    # the legend sits beside the axes, where it cannot hide a bar or a label
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_routes(model, data, path) -> str:
    """Task x expert heatmap per MoE layer plus per-layer expert load, to a PNG (needs matplotlib)."""
    return save_figure(routes_figure(routing_tables(model, data)), path)
