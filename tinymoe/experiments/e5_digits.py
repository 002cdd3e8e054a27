"""E5 — gates on real multi-task image data: multi-digits (DSelect-k, Hazimeh et al. 2021, §5.3 on Multi-MNIST).

Two handwritten digits side by side (an 8×16 image built offline from scikit-learn's bundled 8×8 digits,
tinymoe.data.multi_digits, as Multi-MNIST is built from MNIST); task "left" classifies the left digit, task
"right" the right one. Training and validation images are composed from one fixed part of the source digits and
test images from the other, so no test digit was seen in training. Models as in E1 (one gate and one tower per
task); every arm on the same paired seeds and lr grid (tuned per arm on a separate seed), early stopping on
validation accuracy. Pre-declared comparison: DSelect-k static − Top-k static (mean test accuracy over the two
tasks); secondary (Holm): against MMoE and shared-bottom, and how many experts each gate uses.
"""
from __future__ import annotations

import numpy as np

from ..data import multi_digits
from .common import (Timer, comparison_table, fastest_backend, fmt, interval_plot, lr_grid, markdown_table,
                     optim_config, preset_config, run_dir, save_results, tune_lr, write_results)
from .e1_gates import make_model, selected_sets
from .stats import declared

PRESETS = {
    "tiny": dict(seeds=3, n_train=300, n_val=100, n_test=200, num_experts=4, k=2, d_expert=8, d_hidden=8,
                 out_dim=10, steps=20, batch_size=64, lrs=[3e-3], entropy=1e-3),
    "small": dict(seeds=12, n_train=2000, n_val=500, n_test=1000, num_experts=8, k=2, d_expert=16, d_hidden=16,
                  out_dim=10, steps=300, batch_size=128, lrs=[3e-3, 1e-2], entropy=1e-3),
}

MODELS = ["shared-bottom", "MMoE (softmax)", "top-k static", "DSelect-k static"]
PRIMARY = ("DSelect-k static", "top-k static")
SECONDARY = [("DSelect-k static", "MMoE (softmax)"), ("DSelect-k static", "shared-bottom")]
CLAIM = "DSelect-k beats Top-k on real multi-task image data"


def data_for(cfg, seed):
    return dict(train=multi_digits(n=cfg["n_train"], seed=seed, source="train"),
                val=multi_digits(n=cfg["n_val"], seed=10_000 + seed, source="train"),
                test=multi_digits(n=cfg["n_test"], seed=20_000 + seed, source="test"))


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    from ..train import evaluate, fit

    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e5_digits", out), Timer()

    def train(name, lr, seed):
        data = data_for(cfg, seed)
        model = make_model(name, data["train"].x.shape[1], 2, cfg, seed)
        fit(model, data["train"], data["val"], optim_config(cfg, seed, lr=lr), seed=seed)
        return model, data, float(evaluate(model, data["val"])["mean"])

    acc, used = {m: [] for m in MODELS}, {m: [] for m in MODELS if m != "shared-bottom"}
    with fastest_backend() as backend:
        log(f"E5 ({preset}): backend {backend}, {cfg['seeds']} seeds, lr grid {lr_grid(cfg)}")
        lrs = tune_lr(MODELS, lambda name, lr, seed: train(name, lr, seed)[2], cfg, log)
        for seed in range(cfg["seeds"]):
            for name in MODELS:
                model, data, _ = train(name, lrs[name], seed)
                acc[name].append(float(evaluate(model, data["test"])["mean"]))
                if name in used:
                    used[name].append(selected_sets(model, data["test"].x, cfg["k"])[1])
                log(f"  seed {seed} {name}: test accuracy {acc[name][-1]:.3f}")

    scale = f"2 tasks, {cfg['n_train']} training images, E={cfg['num_experts']}, k={cfg['k']}"
    comparisons = declared(acc, PRIMARY, SECONDARY, claim=CLAIM, metric="test accuracy", direction=+1, scale=scale)
    rows = [[m, fmt(acc[m]), fmt(used[m], 1) if m in used else "—", f"{lrs[m]:g}"] for m in MODELS]
    table = markdown_table(["model", "mean test accuracy (left, right)", "experts per gate (mean weight ≥ 0.01)",
                            "lr (tuned)"], rows)
    verdicts = comparison_table(comparisons)
    took = timer.record()  # the run's wall and CPU seconds and load, as results.json keeps them
    seconds = took["seconds"]
    notes = [f"Preset `{preset}`: {cfg['seeds']} paired seeds, mean ± std over seeds; backend {backend}. "
             f"{cfg['n_train']} training / {cfg['n_val']} validation images from one part of the source digits, "
             f"{cfg['n_test']} test images from the other; E={cfg['num_experts']}, k={cfg['k']}, experts "
             f"{128}->{cfg['d_hidden']}->{cfg['d_expert']}; {cfg['steps']} Adam steps, batch {cfg['batch_size']}, "
             f"lr grid {lr_grid(cfg)}; {seconds:.0f} s. Chance accuracy is 0.10."]
    write_results(path, "E5 — gates on multi-digit images", [("Test accuracy", table),
                                                              ("Paired comparisons", verdicts)], notes)
    interval_plot(path, "e5_digits.png", "E5: multi-digits accuracy, paired differences", comparisons)
    for c in comparisons:
        log(c.sentence())
    save_results(path, dict(experiment="e5", preset=preset, config=cfg, values=acc, experts_used=used, lrs=lrs,
                            comparisons=comparisons, backend=backend, **took))
    return {"dir": path, "table": table + "\n\n" + verdicts, "rows": rows, "comparisons": comparisons,
            "seconds": seconds, "mean": float(np.mean([np.mean(v) for v in acc.values()]))}
