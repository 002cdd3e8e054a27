"""E1 — gates on synthetic multi-task regression (the setting of Hazimeh et al. 2021, DSelect-k, §5.1).

Models, each with one gate and one tower per task: shared-bottom (no gate), MMoE (softmax gate, Ma et al. 2018),
Top-k, DSelect-k static (one free gate per task) and DSelect-k per-example.

* Part A — the MMoE two-task data (Ma et al. 2018) for a sweep of the task correlation ρ: per-task test MSE.
* Part B — the clustered many-task data (tasks in clusters of related tasks): mean test MSE, and how well the
  experts each task selects recover the true clusters. A task's selected set is the (at most) k experts with
  the largest mean gate weight on the test set, ignoring any below 0.01; tasks with the same set form one implied
  cluster; we report the adjusted Rand index (ARI) of implied vs true clusters (1 = recovered exactly, ~0 = chance).
"""
from __future__ import annotations

import numpy as np

from ..data import clustered_synthetic, mmoe_synthetic, train_val_test_split
from ..nn import MultiGateMoE
from ..engine import no_grad
from .common import (SharedBottom, Timer, adjusted_rand_index, fastest_backend, fmt, markdown_table, mean_std,
                     partition_from_sets, preset_config, run_dir, write_results)

PRESETS = {
    "tiny": dict(seeds=2, rhos=[0.0, 0.9], n=600, d=20, num_experts=4, k=2, d_expert=8, d_hidden=8, steps=30,
                 batch_size=64, lr=3e-3, entropy=1e-3,
                 clusters=(4, 2), n_clustered=300, clustered=dict(num_experts=2, k=1, steps=30, entropy=1e-2)),
    "small": dict(seeds=3, rhos=[0.0, 0.5, 0.9], n=2000, d=100, num_experts=8, k=2, d_expert=16, d_hidden=32,
                  steps=1000, batch_size=128, lr=2e-3, entropy=1e-3,
                  # part B: few examples and small experts, so that sharing within a cluster pays off; top-1 of as
                  # many experts as clusters, so the "right" selection is one expert per cluster
                  clusters=(12, 3), n_clustered=800,
                  clustered=dict(num_experts=4, k=1, d_expert=8, d_hidden=16, steps=800, entropy=1e-2)),
}

MODELS = ["shared-bottom", "MMoE (softmax)", "top-k", "DSelect-k static", "DSelect-k per-example"]


def make_model(name, d, num_tasks, cfg, seed):
    E, k, f, h = cfg["num_experts"], cfg["k"], cfg["d_expert"], cfg["d_hidden"]
    if name == "shared-bottom":  # hidden width k·h: the same work per example as a top-k model
        return SharedBottom(d, f, num_tasks, seed, d_hidden=k * h)
    gate, per_example = {"MMoE (softmax)": ("softmax", False), "top-k": ("top_k", False),
                         "DSelect-k static": ("dselect_k", False),
                         "DSelect-k per-example": ("dselect_k", True)}[name]
    return MultiGateMoE(d, f, E, num_tasks, gate=gate, k=k, per_example=per_example, seed=seed, d_hidden=h,
                        aux_weights={"dselect_entropy": cfg["entropy"]})


def train_and_test(model, data, cfg, seed):
    """Fit on data['train'] (early stopping on data['val']) and return evaluate() on data['test']."""
    from ..train import OptimConfig, evaluate, fit

    optim = OptimConfig(optimizer="adam", lr=cfg["lr"], steps=cfg["steps"], batch_size=cfg["batch_size"],
                        eval_every=max(cfg["steps"] // 6, 1), seed=seed)
    fit(model, data["train"], data["val"], optim, seed=seed)
    return evaluate(model, data["test"])


def selected_sets(model, x, k, threshold=0.01):
    """Per task, the ≤ k experts with the largest mean gate weight over x (those above `threshold`)."""
    model.eval()
    with no_grad():
        model(x)
    sets = []
    for w in model.last_weights:  # (N, E) per task
        mean = w.mean(axis=0)
        top = np.argsort(-mean, kind="stable")[:k]
        sets.append({int(e) for e in top if mean[e] > threshold})
    return sets


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e1_gates", out), Timer()
    mse = {(m, rho): [[], []] for m in MODELS for rho in cfg["rhos"]}  # per task, per seed
    cl_mse = {m: [] for m in MODELS}
    ari = {m: [] for m in MODELS}
    num_sel = {m: [] for m in MODELS}
    T, K = cfg["clusters"]
    cfg_b = {**cfg, **cfg["clustered"]}
    with fastest_backend() as backend:
        log(f"E1 ({preset}): backend {backend}, {cfg['seeds']} seeds")
        for seed in range(cfg["seeds"]):
            for rho in cfg["rhos"]:  # Part A: two tasks, correlation rho
                data = train_val_test_split(mmoe_synthetic(cfg["n"], rho, d=cfg["d"], seed=seed), (0.6, 0.2, 0.2),
                                            seed=seed)
                for name in MODELS:
                    res = train_and_test(make_model(name, cfg["d"], 2, cfg, seed), data, cfg, seed)
                    for t, task in enumerate(data["test"].task_names):
                        mse[(name, rho)][t].append(res["per_task"][task])
                    log(f"  seed {seed} rho {rho} {name}: " + ", ".join(f"{res['per_task'][n]:.3f}"
                                                                        for n in data["test"].task_names))
            # Part B: T tasks in K clusters
            ds = clustered_synthetic(cfg["n_clustered"], T, K, rho=0.9, d=cfg["d"], seed=seed)
            data = train_val_test_split(ds, (0.6, 0.2, 0.2), seed=seed)
            for name in MODELS:
                model = make_model(name, cfg["d"], T, cfg_b, seed)
                res = train_and_test(model, data, cfg_b, seed)
                cl_mse[name].append(res["mean"])
                if name != "shared-bottom":
                    sets = selected_sets(model, data["test"].x, cfg_b["k"])
                    ari[name].append(adjusted_rand_index(ds.clusters, partition_from_sets(sets)))
                    num_sel[name].append(len(set().union(*sets)))
                log(f"  seed {seed} clustered {name}: mse {res['mean']:.3f}"
                    + (f", ARI {ari[name][-1]:.2f}" if name != "shared-bottom" else ""))

    rows_a = [[name, rho, fmt(mse[(name, rho)][0]), fmt(mse[(name, rho)][1]),
               fmt(np.mean(mse[(name, rho)], axis=0))] for rho in cfg["rhos"] for name in MODELS]
    table_a = markdown_table(["model", "ρ", "task0 test MSE", "task1 test MSE", "mean test MSE"], rows_a)
    rows_b = [[name, fmt(cl_mse[name]), fmt(ari[name], 2), fmt(num_sel[name], 1)] for name in MODELS]
    table_b = markdown_table(["model", "mean test MSE", "ARI (selected experts vs true clusters)",
                              "experts used by any task"], rows_b)
    seconds = timer.seconds
    notes = [f"Preset `{preset}`: {cfg['seeds']} seeds, mean ± std over seeds; backend {backend}; "
             f"{cfg['steps']} Adam steps, batch {cfg['batch_size']}, lr {cfg['lr']}; E={cfg['num_experts']}, "
             f"k={cfg['k']}; clustered data: {T} tasks in {K} clusters, within-cluster ρ=0.9; "
             f"DSelect-k entropy weight {cfg['entropy']}; {seconds:.0f} s.",
             f"Part B overrides: {cfg['clustered']}, {cfg['n_clustered']} examples (60/20/20 split); a task's "
             f"selected experts are the ≤ k with the largest mean gate weight on the test set (ignoring < 0.01), "
             f"and tasks with the same selected set form one implied cluster."]
    write_results(path, "E1 — gates on synthetic multi-task regression",
                  [("Part A: MMoE synthetic data, ρ sweep (per-task test MSE, lower is better)", table_a),
                   (f"Part B: clustered data ({T} tasks, {K} clusters)", table_b)], notes)
    _plot(path, cfg, mse, cl_mse, ari)
    return {"dir": path, "table": table_a + "\n\n" + table_b, "rows": rows_a + rows_b, "seconds": seconds}


def _plot(path, cfg, mse, cl_mse, ari):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in MODELS:
        stats = [mean_std(np.mean(mse[(name, rho)], axis=0)) for rho in cfg["rhos"]]
        a.errorbar(cfg["rhos"], [m for m, _ in stats], [s for _, s in stats], marker="o", capsize=3, label=name)
    a.set(xlabel="task correlation ρ", ylabel="mean test MSE", title="MMoE data")
    a.legend(fontsize=7)
    xs = np.arange(len(MODELS))
    for ax, values, label in ((b, cl_mse, "mean test MSE"), (c, ari, "ARI vs true clusters")):
        stats = [mean_std(values[m]) for m in MODELS]
        ax.bar(xs, [0 if np.isnan(m) else m for m, _ in stats], yerr=[0 if np.isnan(s) else s for _, s in stats],
               capsize=3, color=[f"C{i}" for i in range(len(MODELS))])
        ax.set_xticks(xs)
        ax.set_xticklabels([m.replace(" ", "\n", 1) for m in MODELS], fontsize=7)
        ax.set(ylabel=label, title=f"clustered data: {label}")
    fig.tight_layout()
    fig.savefig(f"{path}/e1_gates.png", dpi=110)
    plt.close(fig)
