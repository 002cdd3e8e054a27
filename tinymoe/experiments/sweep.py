"""Scale sweeps: a claim's pre-declared paired comparison at every point of a sweep, and from where on it shows.

A sweep varies one axis at a time around a base point (the other axes stay at the base): the number of tasks T,
the number of experts E, and the data per task n, e.g. base (T=16, E=4, n=300) with T ∈ {4, 16, 32},
E ∈ {4, 16}, n ∈ {100, 300, 900} gives 6 points. At every point both arms are trained on the same ≥ 8 paired
seeds; the point's verdict is the rule of tinymoe.experiments.stats applied to its own 95 % t interval (each
point is its own primary comparison, uncorrected, as in E6). Along an axis, read from the smallest value up, the
claim "holds from N on" when it holds at N and at every larger value tried, else it is "not seen up to N_max".

Used by E7–E9, the sweeps of Gupta et al. 2022's claims (i)–(iii); E6 uses `holds_from` for its summary.
"""
from __future__ import annotations

import os
import textwrap

import numpy as np

from .common import Timer, comparison_table, fastest_backend, fmt, markdown_table, run_dir, save_results, write_results
from .stats import CONTRADICTED, HOLDS, compare

AXES = ("tasks", "experts", "data")
SYMBOLS = {"tasks": "T", "experts": "E", "data": "n"}


# ---- the points of a sweep ----------------------------------------------------------------------------------------


def sweep_points(base, axes) -> list[dict]:
    """The base point first, then, axis by axis, every other value of that axis with the rest at the base point.

    sweep_points({"tasks": 16, "experts": 4}, {"tasks": [4, 16, 32], "experts": [4, 16]})
    -> [{T16 E4}, {T4 E4}, {T32 E4}, {T16 E16}]
    """
    missing = [a for a in axes if a not in base]
    if missing:
        raise ValueError(f"sweep_points: axes {missing} have no base value; give the base point a value for each")
    if any(base[a] not in values for a, values in axes.items()):
        raise ValueError(f"sweep_points: the base point {base} must be one of the values of every axis {axes}")
    points = [dict(base)]
    for axis, values in axes.items():
        for v in values:
            p = {**base, axis: v}
            if p not in points:
                points.append(p)
    return points


def label(point) -> str:
    """'T=16, E=4, n=300' (the axes in AXES order, then any others)."""
    keys = [a for a in AXES if a in point] + [a for a in point if a not in AXES]
    return ", ".join(f"{SYMBOLS.get(k, k)}={point[k]}" for k in keys)


def along(points, base, axis) -> list[dict]:
    """The points on `axis` (every other axis at the base value), sorted by that axis."""
    return sorted((p for p in points if all(p[a] == base[a] for a in base if a != axis)), key=lambda p: p[axis])


def holds_from(scales, verdicts, symbol="N") -> str:
    """One axis read from the smallest scale up: 'holds from T=16 on (up to T=32)' when the claim holds at T=16
    and at every larger scale, else 'not seen up to T=32'; contradicted scales are named after a semicolon.
    scales ascending, one verdict each."""
    if len(scales) != len(verdicts) or not scales:
        raise ValueError(f"holds_from: need one verdict per scale, got {len(scales)} scales, {len(verdicts)} verdicts")
    if list(scales) != sorted(scales):
        raise ValueError(f"holds_from: scales must be ascending, got {list(scales)}")
    top = f"{symbol}={scales[-1]}"
    first = None
    for s, v in zip(reversed(scales), reversed(verdicts)):  # the longest run of "holds" that reaches the top
        if v != HOLDS:
            break
        first = s
    text = f"holds from {symbol}={first} on (up to {top})" if first is not None else f"not seen up to {top}"
    against = [f"{symbol}={s}" for s, v in zip(scales, verdicts) if v == CONTRADICTED]
    return text + (f"; contradicted at {', '.join(against)}" if against else "")


def cached(fn, ignore=()):
    """fn(point, seed) memoised on (seed, the point without the keys in `ignore`): a dense baseline, whose model does
    not depend on the number of experts, is trained once per seed for the whole experts axis."""
    memo = {}

    def wrapper(point, seed):
        key = (seed, tuple(sorted((k, v) for k, v in point.items() if k not in ignore)))
        if key not in memo:
            memo[key] = fn(point, seed)
        return memo[key]

    return wrapper


# ---- tasks for a given number of tasks ---------------------------------------------------------------------------


def task_pool(first, count, exclude=(), seq_len=8, vocab=10) -> list[tuple[str, ...]]:
    """`count` sequence tasks: the tasks in `first` (in order), then compositions of up to two primitives
    (tinymoe.data.all_compositions), skipping every task that computes the same function as one already taken or
    as one in `exclude` (e.g. the target, or the held-out tasks). Raises when there are not enough."""
    from ..data import all_compositions, make_task

    probe = np.random.default_rng(12345).integers(0, vocab, (512, seq_len))  # tells task functions apart

    def signature(t):
        return make_task(t, seq_len, vocab)(probe).tobytes()

    taken, seen = [], {signature(t) for t in exclude}
    for t in [*first, *all_compositions(2, seq_len, vocab)]:
        if len(taken) == count:
            break
        sig = signature(t)
        if sig not in seen:
            seen.add(sig)
            taken.append(tuple(t))
    if len(taken) < count:
        raise ValueError(f"task_pool: only {len(taken)} different tasks of up to two primitives, asked for {count}; "
                         f"sweep fewer tasks")
    return taken


# ---- running a sweep and writing its results ----------------------------------------------------------------------


def run_sweep(cfg, measure, *, claim, arm, baseline, metric, words, log=print):
    """Run `measure(point, seed) -> (arm value, baseline value)`, where higher favours the claim, at every point of cfg's sweep on seeds
    0..cfg["seeds"]-1; returns (points, {label: (arm values, baseline values)}, comparisons, summary lines).
    words: {axis: what it counts}, e.g. {"tasks": "tasks in the mixture", "experts": "experts",
    "data": "examples per related task"}."""
    base, axes = cfg["sweep"]["base"], cfg["sweep"]["axes"]
    points = sweep_points(base, axes)
    values = {label(p): ([], []) for p in points}
    for seed in range(cfg["seeds"]):
        for p in points:
            a, b = measure(p, seed)
            values[label(p)][0].append(float(a))
            values[label(p)][1].append(float(b))
            log(f"  seed {seed} {label(p)}: {arm} {a:.3f}, {baseline} {b:.3f}, difference {a - b:+.3f}")
    comparisons = [compare(*values[label(p)], claim=claim, arm=f"{arm}, {label(p)}", baseline=baseline,
                           metric=metric, scale=scale_words(p, words)) for p in points]
    verdict_of = {label(p): c.verdict for p, c in zip(points, comparisons)}
    summary = []
    for axis in axes:
        line = along(points, base, axis)
        fixed = ", ".join(f"{SYMBOLS[a]}={base[a]}" for a in axes if a != axis)
        summary.append(f"{words[axis]} {SYMBOLS[axis]} ({fixed}): " + holds_from(
            [p[axis] for p in line], [verdict_of[label(p)] for p in line], SYMBOLS[axis]))
    return points, values, comparisons, summary


def sweep_experiment(name, *, experiment, title, preset, cfg, measure, claim, arm, baseline, metric, words, notes,
                     plot_name, out=None, log=print) -> dict:
    """The whole run of a sweep experiment (E7-E9): `measure` at every point of cfg's sweep on the fastest backend
    (run_sweep), then results.md, results.json and the effect-against-scale plot in the run folder (write_sweep),
    and the per-axis summary on the console. notes(backend, timer) -> the experiment's own notes, asked for once the
    run has finished (so they can quote its time); the first is prefixed with what every sweep shares."""
    path, timer = run_dir(name, out), Timer()
    with fastest_backend() as backend:
        log(f"{experiment.upper()} ({preset}): backend {backend}, {cfg['seeds']} seeds, base "
            f"{label(cfg['sweep']['base'])}, axes {cfg['sweep']['axes']}")
        points, values, comparisons, summary = run_sweep(cfg, measure, claim=claim, arm=arm, baseline=baseline,
                                                         metric=metric, words=words, log=log)
    first, *rest = notes(backend, timer)
    notes = [f"Preset `{preset}`: {cfg['seeds']} paired seeds per setting (each setting's difference is its own "
             f"primary comparison, uncorrected); backend {backend}. {first}", *rest]
    result = write_sweep(path, experiment=experiment, preset=preset, title=title, cfg=cfg, points=points,
                         values=values, comparisons=comparisons, summary=summary, arm=arm, baseline=baseline,
                         metric=metric, words=words, notes=notes, plot_name=plot_name, backend=backend, timer=timer)
    for line in summary:
        log(line)
    return result


def scale_words(point, words) -> str:
    """'32 tasks in the mixture, 4 experts, 300 examples per related task'."""
    return ", ".join(f"{point[a]} {words[a]}" for a in AXES if a in point)


def write_sweep(path, *, experiment, preset, title, cfg, points, values, comparisons, summary, arm, baseline, metric,
                words, notes, plot_name, backend, timer) -> dict:
    """results.md (the per-point table, the comparisons, the summary per axis), the effect-against-scale plot and
    results.json of a sweep; returns the experiment's result dict."""
    rows = [[label(p), fmt(values[label(p)][0]), fmt(values[label(p)][1]), c.interval(), c.seeds, f"{c.p:.3g}",
             f"**{c.verdict}**" if c.verdict in (HOLDS, CONTRADICTED) else c.verdict]
            for p, c in zip(points, comparisons)]
    table = markdown_table(["setting", f"{arm} (mean ± std)", f"{baseline} (mean ± std)",
                            "mean paired diff. [95 % t CI]", "seeds", "sign-flip p", "verdict"], rows)
    write_results(path, title, [(f"{metric} by scale", table), ("Comparisons", comparison_table(comparisons))],
                  [*notes, "", *[f"* {line}" for line in summary]])
    plot(path, plot_name, f"{title}: {arm} − {baseline}", cfg, points, comparisons,
         f"paired difference in {metric}\n(95 % t CI, > 0 favours the claim)", words)
    record = timer.record()
    save_results(path, dict(experiment=experiment, preset=preset, config=cfg,
                            values={k: dict(arm=a, baseline=b) for k, (a, b) in values.items()},
                            comparisons=comparisons, summary=summary, scale_tried=scale_tried(cfg, words),
                            arm=arm, settings=[label(p) for p in points],
                            backend=backend, **record))
    return {"dir": path, "table": table, "rows": rows, "comparisons": comparisons, "summary": summary,
            "seconds": record["seconds"]}


def scale_tried(cfg, words) -> str:
    """'tasks in the mixture T ∈ {4, 16, 32}, experts E ∈ {4, 16}, examples per related task n ∈ {100, 300, 900}'
    (the base point's value of each axis is the one the other axes are held at)."""
    axes = cfg["sweep"]["axes"]
    return ", ".join(f"{words[a]} {SYMBOLS[a]} ∈ {{{', '.join(map(str, v))}}}" for a, v in axes.items())


def plot(path, filename, title, cfg, points, comparisons, ylabel, words):
    """One panel per axis: the paired effect with its 95 % CI against the axis's value (log scale), green where the
    claim holds, red where contradicted, grey where we cannot tell; the other axes at the base point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    base, axes = cfg["sweep"]["base"], list(cfg["sweep"]["axes"])
    by_label = {label(p): c for p, c in zip(points, comparisons)}
    fig, panels = plt.subplots(1, len(axes), figsize=(3.4 * len(axes), 3.4), sharey=True, squeeze=False)
    for ax, axis in zip(panels[0], axes):
        line = along(points, base, axis)
        xs = np.array([p[axis] for p in line], dtype=float)
        cs = [by_label[label(p)] for p in line]
        ax.plot(xs, [c.mean for c in cs], color="0.6", lw=1, zorder=1)
        for x, c in zip(xs, cs):
            color = {HOLDS: "tab:green", CONTRADICTED: "tab:red"}.get(c.verdict, "tab:gray")
            ax.errorbar([x], [c.mean], [[c.mean - c.low], [c.high - c.mean]], fmt="o", color=color, capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(int(x)) for x in xs])
        fixed = ", ".join(f"{SYMBOLS[a]}={base[a]}" for a in axes if a != axis)
        ax.set(xlabel=f"{words[axis]} {SYMBOLS[axis]}", title=f"{fixed}")
        ax.title.set_fontsize(8)
    panels[0][0].set_ylabel(ylabel, fontsize=8)
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, os.path.join(path, filename))  # atomic, like every file of a run
