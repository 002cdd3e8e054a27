"""E6 — a scale sweep for cluster recovery (Hazimeh et al. 2021, §5.2), the claim E1 cannot decide at 12 tasks.

Clustered synthetic regression (tinymoe.data.clustered_synthetic, the generator fixed as in E1) for a grid of
number of tasks T and number of experts E, with a fixed amount of data per task. For every setting we train
DSelect-k static (k = 1, so each task selects one expert) on the same paired seeds and measure how far the
implied clusters beat chance: ARI(selected experts vs true clusters) − ARI of the same implied partition against
randomly relabelled tasks (the permutation null), with its 95 % CI over seeds. The result reads "holds from T on"
or "not seen up to T" per E. The lr is E1's tuned lr for DSelect-k static; there is only one arm.
"""
from __future__ import annotations

import numpy as np

from ..data import clustered_synthetic, train_val_test_split
from .common import (Timer, adjusted_rand_index, comparison_table, fastest_backend, fmt, markdown_table,
                     partition_from_sets, preset_config, run_dir, save_results, write_results)
from .e1_gates import fit_model, permutation_null_ari, pick_generator, selected_sets
from .stats import compare
from .sweep import holds_from
from ..plots import save_figure

PRESETS = {
    "tiny": dict(seeds=3, tasks=[4, 8], experts=[2, 4], n_per_task=40, d=10, c=1.0, m=10, d_expert=8, d_hidden=8,
                 steps=20, batch_size=64, lr=1e-2, entropy=1e-2),
    "small": dict(seeds=8, tasks=[4, 16, 32], experts=[4, 16], n_per_task=100, d=20, c=1.0, m=10, d_expert=8,
                  d_hidden=16, steps=300, batch_size=128, lr=1e-2, entropy=1e-2),
}
CLAIM = "DSelect-k's selected experts recover the task clusters (scale sweep)"


def clusters_for(T):
    return max(2, min(4, T // 2))


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e6_scale", out), Timer()
    generator, r2 = pick_generator(cfg)
    gain = {(T, E): [] for T in cfg["tasks"] for E in cfg["experts"]}
    with fastest_backend() as backend:
        log(f"E6 ({preset}): backend {backend}, {cfg['seeds']} seeds, tasks {cfg['tasks']}, experts {cfg['experts']}")
        for seed in range(cfg["seeds"]):
            for T in cfg["tasks"]:
                K = clusters_for(T)
                ds = clustered_synthetic(cfg["n_per_task"] * T, T, K, rho=0.9, d=cfg["d"], c=cfg["c"], m=cfg["m"],
                                         seed=seed, generator_seed=generator)
                data = train_val_test_split(ds, (0.6, 0.2, 0.2), seed=seed)
                for E in cfg["experts"]:
                    model, _, _ = fit_model("DSelect-k static", data, {**cfg, "num_experts": E, "k": 1}, seed,
                                            cfg["lr"])
                    sets, _ = selected_sets(model, data["test"].x, 1)
                    implied = partition_from_sets(sets)
                    null = permutation_null_ari(ds.clusters, implied, np.random.default_rng([seed, T, E]))
                    gain[(T, E)].append(adjusted_rand_index(ds.clusters, implied) - null)
                    log(f"  seed {seed} T={T} E={E}: ARI − null {gain[(T, E)][-1]:+.2f}")

    comparisons = [compare(gain[(T, E)], np.zeros(cfg["seeds"]), claim=CLAIM, arm=f"DSelect-k static, T={T}, E={E}",
                           baseline="permutation null", metric="ARI", direction=+1,
                           scale=f"T={T} tasks in {clusters_for(T)} clusters, E={E}, {cfg['n_per_task']} per task")
                   for T in cfg["tasks"] for E in cfg["experts"]]
    rows = [[T, clusters_for(T), E, fmt(gain[(T, E)], 2), c.interval(2), c.verdict]
            for (T, E), c in zip(gain, comparisons)]
    table = markdown_table(["tasks T", "clusters", "experts E", "ARI − null (mean ± std)", "mean [95 % t CI]",
                            "verdict"], rows)
    verdict_of = {key: c.verdict for key, c in zip(gain, comparisons)}
    lines = [f"E={E}: " + holds_from(cfg["tasks"], [verdict_of[(T, E)] for T in cfg["tasks"]], "T")
             for E in cfg["experts"]]
    took = timer.record()  # the run's wall and CPU seconds and load, as results.json keeps them
    seconds = took["seconds"]
    notes = [f"Preset `{preset}`: {cfg['seeds']} paired seeds (each setting's ARI minus its permutation-null ARI, "
             f"so each row is its own primary comparison, uncorrected); backend {backend}; generator seed {generator}"
             f" (linear R² {r2:.2f}), d={cfg['d']}; {cfg['n_per_task']} examples per task (60/20/20), within-cluster "
             f"ρ=0.9; DSelect-k static, k=1, {cfg['steps']} Adam steps, lr {cfg['lr']}; {seconds:.0f} s.", "",
             *[f"* {line}" for line in lines]]
    write_results(path, "E6 — cluster recovery against scale", [("ARI above chance by scale", table),
                                                                  ("Comparisons", comparison_table(comparisons))],
                  notes)
    _plot(path, cfg, comparisons)
    for line in lines:
        log(line)
    save_results(path, dict(experiment="e6", preset=preset, config=cfg, values={f"T={T} E={E}": v
                                                                              for (T, E), v in gain.items()},
                            comparisons=comparisons, summary=lines, backend=backend, **took))
    return {"dir": path, "table": table, "rows": rows, "comparisons": comparisons, "seconds": seconds}


def _plot(path, cfg, comparisons):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    by_e = {E: [] for E in cfg["experts"]}
    for c, (T, E) in zip(comparisons, [(T, E) for T in cfg["tasks"] for E in cfg["experts"]]):
        by_e[E].append((T, c))
    for i, (E, items) in enumerate(by_e.items()):
        xs = np.array([T for T, _ in items], float) * (1 + 0.04 * (i - 0.5))
        ax.errorbar(xs, [c.mean for _, c in items], [[c.mean - c.low for _, c in items],
                                                     [c.high - c.mean for _, c in items]],
                    marker="o", capsize=3, label=f"E = {E}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="number of tasks T", ylabel="ARI − permutation null (95 % CI)",
           title="E6: cluster recovery by DSelect-k static")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, f"{path}/e6_scale.png")
