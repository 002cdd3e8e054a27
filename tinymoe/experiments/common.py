"""What every experiment shares: the run folder, the seeds loop, mean ± std, a markdown table, a plot, the
adjusted Rand index, the backend choice, and the sequence models of E2-E4.

An experiment module defines `PRESETS = {"tiny": {...}, "small": {...}}` and
`run(preset="small", seeds=None, out=None, log=print) -> dict` that writes results.md and a PNG into its run
folder and returns {"dir", "table", "rows", "seconds"}.
"""
from __future__ import annotations

import os
import time
from datetime import datetime

import numpy as np

from ..nn import SharedBottom  # noqa: F401  (the E1 baseline lives in the library: `tinymoe train` builds it too)

# ---- run folder, backend, seeds ----------------------------------------------------------------------------------


def run_dir(name, out=None) -> str:
    """`out` if given, else runs/experiments/<name>-<timestamp>; created if missing."""
    path = out or os.path.join("runs", "experiments", f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(path, exist_ok=True)
    return path


def fastest_backend():
    """Context: run under TINYMOE_BACKEND when it is set (`--backend` sets it), else numba when it is installed,
    else the NumPy reference (tinymoe.runs.run_backend's "auto"); yields its name. Backends agree to ~1e-6, not
    bitwise, so a table is reproduced exactly only on the backend it names."""
    from ..runs import run_backend

    return run_backend(os.environ.get("TINYMOE_BACKEND") or "auto")


def preset_config(presets, preset, seeds=None) -> dict:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(presets)}")
    cfg = dict(presets[preset])
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be ≥ 1, got {seeds}")
        cfg["seeds"] = seeds
    return cfg


# ---- statistics --------------------------------------------------------------------------------------------------


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), NaNs ignored."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, digits=3) -> str:
    """'mean ± std' over seeds, or '—' when there is nothing to report."""
    m, s = mean_std(values)
    return "—" if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two partitions of the same items, from the contingency table.

    ARI = (Σ_ij C(n_ij, 2) − E) / (½(Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) − E),  E = Σ_i C(a_i, 2)·Σ_j C(b_j, 2) / C(n, 2)
    1 for identical partitions (whatever the label names), about 0 for independent ones. When both partitions
    are trivial (one cluster each, or all singletons) the denominator is 0 and we return 1.0 (they agree).
    """
    a, b = np.asarray(labels_true).reshape(-1), np.asarray(labels_pred).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"adjusted_rand_index: {a.size} true labels but {b.size} predicted labels")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)  # contingency n_ij

    def pairs(n):
        return (n * (n - 1) / 2.0).sum()

    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * cols / max(a.size * (a.size - 1) / 2.0, 1.0)
    top = (rows + cols) / 2.0
    if top == expected:
        return 1.0
    return float((index - expected) / (top - expected))


def partition_from_sets(sets) -> np.ndarray:
    """Tasks with the same set of selected experts form one cluster: [{0,1},{2,3},{0,1}] -> [0, 1, 0]."""
    ids: dict = {}
    return np.array([ids.setdefault(frozenset(int(e) for e in s), len(ids)) for s in sets], dtype=np.int64)


# ---- output ------------------------------------------------------------------------------------------------------


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_results(path, title, sections, notes=()) -> str:
    """results.md: a title, then (heading, markdown table) sections, then notes. Returns the file name."""
    text = [f"# {title}", ""]
    for heading, table in sections:
        text += [f"## {heading}", "", table, ""]
    text += [str(n) for n in notes]
    file = os.path.join(path, "results.md")
    with open(file, "w") as f:
        f.write("\n".join(text).rstrip() + "\n")
    return file


def bar_plot(path, filename, title, groups, series, ylabel):
    """Grouped bars with std error bars. groups: x labels; series: {name: [per-group list of per-seed values]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) * max(1, len(series)) / 2), 3.5))
    width = 0.8 / max(len(series), 1)
    for i, (name, per_group) in enumerate(series.items()):
        stats = [mean_std(v) for v in per_group]
        xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, label=name)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    file = os.path.join(path, filename)
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self):
        return time.perf_counter() - self.start


# ---- the sequence-task models of E2–E4 ----------------------------------------------------------------------------

# name -> (moe_every, router). Every model gets the task id through a task embedding added to its tokens (tasks
# map the same inputs to different outputs, so even a "task-agnostic" model must be told the task); the MoE
# variants differ only in what their router sees. MoE layers use top-1 of E experts of the dense FFN's width:
# the same active compute per token as the dense model.
SEQ_VARIANTS = {
    "dense": (0, "token"),
    "MoE token (task-agnostic)": (1, "token"),
    "MoE add (task-aware)": (1, "add"),
    "MoE concat (task-aware)": (1, "concat"),
    "MoE task-level (task-aware)": (1, "task"),
}


def sequence_model(variant, num_tasks, vocab_size, seq_len, cfg, seed, descriptions=None, num_parts=None):
    """A MoETransformer for `variant` (a key of SEQ_VARIANTS); descriptions -> composed task embeddings."""
    from ..model import ModelConfig, MoETransformer

    moe_every, router = SEQ_VARIANTS[variant]
    config = ModelConfig(vocab_size=vocab_size, max_seq_len=seq_len, d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                         n_heads=cfg["n_heads"], d_ff=cfg["d_ff"], num_experts=cfg["num_experts"], k=1,
                         moe_every=moe_every, gate="top_k", router=router, num_tasks=num_tasks, task_embedding=True,
                         task_descriptions=descriptions, num_description_parts=num_parts, seed=seed)
    return MoETransformer(config)


def optim_config(cfg, seed, steps=None, lr=None):
    from ..train import OptimConfig

    steps = steps or cfg["steps"]
    return OptimConfig(optimizer="adam", lr=lr or cfg["lr"], steps=steps, batch_size=cfg["batch_size"],
                       warmup_steps=min(50, steps // 10), eval_every=max(steps // 5, 1), seed=seed)
