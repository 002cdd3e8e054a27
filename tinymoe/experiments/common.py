"""What every experiment shares: the run folder, mean ± std, markdown tables, plots (forest plots of paired
differences), the adjusted Rand index, the backend choice, the lr grid tuned per arm, the arms of the sequence
experiments (with the task-blind and oracle routers), and the shared-bottom baseline of E1.

An experiment module defines `PRESETS = {"tiny": {...}, "small": {...}}` and
`run(preset="small", seeds=None, out=None, log=print) -> dict` that writes results.md, results.json and PNGs into
its run folder and returns {"dir", "table", "rows", "comparisons", "seconds"}; the comparisons are
tinymoe.experiments.stats.Comparison objects with their verdicts.
"""
from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime

import numpy as np

from ..arrays import move
from ..checkpoint import write_atomic
from ..nn import Module, SharedBottom  # noqa: F401  (SharedBottom, the E1 baseline, lives in the library: `tinymoe train` builds it too)
from ..plots import save_figure

# ---- run folder, backend, seeds ----------------------------------------------------------------------------------


def run_dir(name, out=None) -> str:
    """`out` if given, else runs/experiments/<name>-<timestamp>; created if missing."""
    path = out or os.path.join("runs", "experiments", f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def fastest_backend():
    """Context: run under TINYMOE_BACKEND when it is set (`--backend` sets it), else numba when it is installed,
    else the NumPy reference (tinymoe.runs.run_backend's "auto"); yields its name. Backends agree to ~1e-6, not
    bitwise, so a table is reproduced exactly only on the backend it names.

    BLAS runs on one thread inside (when threadpoolctl is installed, as the numba extra installs it): the
    experiments' matrices are a few dozen rows wide, where a second BLAS thread only adds synchronisation, and on a
    machine shared with other jobs the spinning BLAS threads made a run 5-10x slower (measured: 300 steps of E2's
    model took 17-23 s with the default threads and 1.8-2.6 s with one, at load average 3)."""
    from ..runs import run_backend

    with run_backend(os.environ.get("TINYMOE_BACKEND") or "auto") as name, one_blas_thread():
        yield name


def one_blas_thread():
    """Context limiting BLAS to one thread (threadpoolctl), or doing nothing when threadpoolctl is missing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def preset_config(presets, preset, seeds=None) -> dict:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(presets)}")
    cfg = dict(presets[preset])
    if seeds is not None:
        if seeds < 2:
            raise ValueError(f"--seeds must be ≥ 2 (a paired comparison needs at least two seeds; use ≥ 8 for a "
                             f"verdict that can be decided), got {seeds}")
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
    write_atomic(file, ("\n".join(text).rstrip() + "\n").encode())  # a reader never sees half a file
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
    return save_figure(fig, os.path.join(path, filename))  # atomic, like every file of a run


class Timer:
    """Wall-clock and CPU seconds since construction, and the load average (1 min) at the start and now: a runtime
    on a shared machine is quoted with all three. The process's CPU seconds are what the run would take on a quiet
    machine with one core free for it (the experiments run single-threaded, `fastest_backend`)."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.load_start = _load()
        self._end = None  # the record, once taken: the notes and results.json quote the same numbers

    @property
    def seconds(self):
        return time.perf_counter() - self.start

    @property
    def cpu_seconds(self):
        return time.process_time() - self.cpu_start

    def record(self) -> dict:
        """{"seconds", "cpu_seconds", "load"}: for results.json (the report quotes them). The first call (of this
        or `describe`) ends the run's clock; later calls give the same numbers."""
        if self._end is None:
            self._end = dict(seconds=self.seconds, cpu_seconds=self.cpu_seconds, load=[self.load_start, _load()])
        return dict(self._end)

    def describe(self) -> str:
        """'412 s wall, 388 s CPU, load average 2.9 -> 3.4'."""
        r = self.record()
        return (f"{r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU, load average {r['load'][0]:.1f} -> "
                f"{r['load'][1]:.1f}")


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # not every platform has a load average
        return float("nan")


# ---- the sequence-task models of E2–E4 ----------------------------------------------------------------------------

# Every arm gets the task id through a task embedding added to its input tokens (the tasks map the same inputs to
# different outputs, so every model must be told the task somewhere); the arms differ in their FFN and in what
# their router sees. No two arms compute the same function class: the "concat" router is left out because
# [x; e]·W = x·W_x + e·W_e is exactly the "add" router.
#
# name -> (moe_every, router, d_ff multiplier)
#   dense                    one FFN of width d_ff: the active FLOPs of a top-1 MoE layer
#   dense ×E (equal params)  one FFN of width E·d_ff: about the total parameters of the MoE layer
#   MoE task-blind router    the router sees only the token + position embedding, never the task (BlindRouter)
#   MoE token router         the usual router on the residual stream, which carries the task embedding
#   MoE add (task-aware)     h = x·W + e_task·U (Gupta et al. 2022, §3)
#   MoE task-level           h = e_task·U: every token of a task goes to the same expert (Kudugunta et al. 2021)
#   MoE oracle routing       no learned router: block l sends every token to the expert of part l of the task's
#                            description (FixedRouter), the routing a perfect composition-aware router would pick
SEQ_ARMS = {
    "dense": (0, "token", 1),
    "dense ×E (equal params)": (0, "token", "E"),
    "MoE task-blind router": (1, "blind", 1),
    "MoE token router (task via input)": (1, "token", 1),
    "MoE add (task-aware)": (1, "add", 1),
    "MoE task-level": (1, "task", 1),
    "MoE oracle routing": (1, "oracle", 1),
}


class BlindRouter(Module):
    """A token router that cannot see the task: h = (token + position embedding)·W + b, read from a box that
    BlindRouterTransformer fills before each forward (the MoE layer's own input carries the task embedding)."""

    kind, needs_tasks = "blind", False

    def __init__(self, inner, box):
        self.inner = inner  # a tinymoe.nn.Router("token") of the right output size
        self.box = box  # {"x": (N, d) task-free token + position embeddings of the current batch}

    def forward(self, x, task_ids=None):
        return self.inner(self.box["x"])


class FixedRouter(Module):
    """No parameters: logits (N, E) = 20·onehot(table[task]) — every token of a task to one chosen expert."""

    kind, needs_tasks = "oracle", True

    def __init__(self, table, num_experts):
        self.table = np.asarray(table, dtype=np.int64)  # (tasks,) expert per task id
        self.num_experts = num_experts

    def forward(self, x, task_ids=None):
        from ..engine import Tensor

        xp = x.xp  # built on the input's device
        task_ids = task_ids.data if isinstance(task_ids, Tensor) else xp.asarray(task_ids)
        table = move(self.table, xp)
        logits = xp.zeros((len(task_ids), self.num_experts), x.dtype)
        logits[xp.arange(len(task_ids)), table[task_ids]] = 20.0
        return Tensor(logits)


def _moe_transformer_class():
    from ..model import MoETransformer

    class BlindRouterTransformer(MoETransformer):
        """MoETransformer whose MoE routers see only the task-free token + position embeddings (BlindRouter)."""

        def forward(self, tokens, task_ids=None, padding_mask=None):
            t = self._ids(tokens)
            x0 = self.tok_emb(t) + self.pos_emb.weight[: t.shape[1]]  # (B, T, d), no task
            self._box["x"] = x0.reshape(-1, self.config.d_model)
            return super().forward(tokens, task_ids, padding_mask)

    return BlindRouterTransformer


def oracle_table(descriptions, layer, num_experts, part_ids):
    """Expert per task for MoE block `layer`: the expert of the task's part at that depth (a one-part task repeats
    its part); part_ids maps part name -> expert (taken mod E)."""
    return [part_ids[d[min(layer, len(d) - 1)]] % num_experts for d in descriptions]


def sequence_model(arm, num_tasks, vocab_size, seq_len, cfg, seed, descriptions=None, num_parts=None,
                   task_parts=None):
    """A MoETransformer for `arm` (a key of SEQ_ARMS). descriptions (part ids per task) -> description-composed
    task embeddings; task_parts (part names per task) is needed by the oracle arm."""
    from ..model import ModelConfig, MoETransformer
    from ..nn.routers import Router

    if arm not in SEQ_ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {list(SEQ_ARMS)}")
    moe_every, router, mult = SEQ_ARMS[arm]
    d_ff = cfg["d_ff"] * (cfg["num_experts"] if mult == "E" else 1)
    config = ModelConfig(vocab_size=vocab_size, max_seq_len=seq_len, d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                         n_heads=cfg["n_heads"], d_ff=d_ff, num_experts=cfg["num_experts"], k=1,
                         moe_every=moe_every, gate="top_k", router=router if router in ("token", "add", "task")
                         else "token", num_tasks=num_tasks, task_embedding=True, task_descriptions=descriptions,
                         num_description_parts=num_parts, seed=seed)
    if router == "blind":
        model = _moe_transformer_class()(config)
        model._box = {}
        for i, moe in enumerate(model.moe_layers):
            inner = Router(cfg["d_model"], cfg["num_experts"], "token", seed=seed * 1000 + i)
            moe.router = BlindRouter(inner, model._box)
        return model
    model = MoETransformer(config)
    if router == "oracle":
        if task_parts is None:
            raise ValueError("the oracle arm routes by the task's parts: pass task_parts (part names per task)")
        names = sorted({p for d in task_parts for p in d})
        part_ids = {p: i for i, p in enumerate(names)}
        for layer, moe in enumerate(model.moe_layers):
            moe.router = FixedRouter(oracle_table(task_parts, layer, cfg["num_experts"], part_ids), cfg["num_experts"])
        model._oracle_parts = part_ids
    return model


def optim_config(cfg, seed, steps=None, lr=None, batch_size=None):
    from ..train import OptimConfig

    steps = steps or cfg["steps"]
    return OptimConfig(optimizer="adam", lr=lr or cfg["lr"], steps=steps, batch_size=batch_size or cfg["batch_size"],
                       warmup_steps=min(50, steps // 10), eval_every=max(steps // 5, 1), seed=seed)


def lr_grid(cfg) -> list:
    """The learning rates every arm tries (the same grid for every arm); the best on validation is kept."""
    return list(cfg.get("lrs") or [cfg["lr"]])


TUNING_SEED = 1000  # lr tuning uses its own data and initialisation, never one of the evaluation seeds


def tune_lr(arms, val_score, cfg, log=print) -> dict:
    """The lr of the shared grid with the best validation score (higher is better) for each arm, from one run per
    (arm, lr) on TUNING_SEED; the evaluation seeds then all use that lr. val_score(arm, lr, seed) -> float.
    A one-value grid needs no runs."""
    grid = lr_grid(cfg)
    if len(grid) == 1:
        return {arm: grid[0] for arm in arms}
    chosen = {}
    for arm in arms:
        scores = [val_score(arm, lr, TUNING_SEED) for lr in grid]
        chosen[arm] = grid[int(np.argmax(scores))]
        log(f"  lr tuning {arm}: " + ", ".join(f"{lr:g} -> {s:.3f}" for lr, s in zip(grid, scores))
            + f"; using {chosen[arm]:g}")
    return chosen


# ---- paired comparisons: tables, plots, saved results ----------------------------------------------------------


def comparison_table(comparisons) -> str:
    from .stats import CANNOT_TELL

    rows = [[c.claim + ("" if c.primary else " (secondary)"), f"{c.arm} − {c.baseline}", c.metric,
             c.interval(), c.seeds, f"{c.p:.3g}", "—" if c.p_holm is None else f"{c.p_holm:.3g}",
             f"**{c.verdict}**" if c.verdict != CANNOT_TELL else c.verdict] for c in comparisons]
    return markdown_table(["claim", "arm − baseline", "metric", "mean paired diff. [95 % t CI]", "seeds",
                           "sign-flip p", "Holm p", "verdict"], rows)


def interval_plot(path, filename, title, comparisons):
    """A forest plot: each comparison's mean paired difference with its 95 % CI, signed so that right = the claim's
    direction; green holds, red contradicted, grey cannot tell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import CONTRADICTED, HOLDS

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(comparisons) + 1.2))
    for i, c in enumerate(comparisons):
        s = c.direction
        lo, hi = sorted((s * c.low, s * c.high))
        color = {HOLDS: "tab:green", CONTRADICTED: "tab:red"}.get(c.verdict, "tab:gray")
        ax.errorbar([s * c.mean], [i], xerr=[[s * c.mean - lo], [hi - s * c.mean]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(comparisons)))
    ax.set_yticklabels([f"{c.arm} vs {c.baseline}" + ("" if c.primary else " *") for c in comparisons], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="paired difference, signed so that > 0 favours the claim (95 % t CI)", title=title)
    fig.tight_layout()
    return save_figure(fig, os.path.join(path, filename))  # atomic, like every file of a run


def save_results(path, payload) -> str:
    """results.json: the per-seed values and the comparisons, for `tinymoe experiment report`."""
    import json

    file = os.path.join(path, "results.json")
    text = json.dumps(payload, indent=1, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else float(o))
    write_atomic(file, text.encode())  # `report` never reads half a file
    return file
