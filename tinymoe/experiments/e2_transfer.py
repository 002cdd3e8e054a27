"""E2 — low-resource transfer (Gupta et al. 2022, claim i: task-aware routing helps a low-resource task).

A mixture of sequence tasks composed of primitives (tinymoe.data.sequences); the target task shares its parts
with the others and gets ~1 % of the training data. Every arm (common.SEQ_ARMS, plus the target trained alone) is
trained on the same data, split and seeds, at each learning rate of one shared grid, with early stopping on the
*target* task's validation accuracy; each arm's lr is the grid's best on a separate tuning seed. We report the target's
per-position test accuracy and paired differences over seeds (tinymoe.experiments.stats).

Pre-declared comparison for claim (i): task-aware MoE (add router) − dense at equal active FLOPs. Secondary
(Holm-corrected): against the dense model of equal total parameters, the task-blind router, the token router
that sees the task through the input, the task-level router, oracle routing, and whether multi-task training
helps the target at all (dense − trained alone).

Read "trained alone" with care: it sees the target in every batch, the multi-task arms in about 1 % of them, so
over the same steps it takes ~80× more target updates — dense − trained alone mixes transfer with exposure.
Oracle routing is given the target's structure (which part each block should compute): an upper bound on what
composition-aware routing can give, not a method.
"""
from __future__ import annotations

from ..data import sequence_tasks
from .common import (SEQ_ARMS, Timer, comparison_table, fastest_backend, fmt, interval_plot, lr_grid,
                     markdown_table, optim_config, preset_config, run_dir, save_results, sequence_model, tune_lr,
                     write_results)
from .stats import declared

PRESETS = {
    "tiny": dict(seeds=3, related=[("reverse",), ("increment",)], target=("reverse", "increment"), n_related=60,
                 n_target=6, n_val=12, n_test=40, seq_len=6, vocab=8, d_model=16, n_layers=2, n_heads=2, d_ff=16,
                 num_experts=2, steps=8, batch_size=32, lrs=[3e-3],
                 arms=["trained alone (dense)", "dense", "MoE task-blind router", "MoE add (task-aware)"]),
    # the target sorts then negates; related tasks hold both parts. 60 target examples keep it off the ceiling.
    "small": dict(seeds=8, related=[("sort",), ("negate",), ("reverse",), ("increment",), ("sort", "increment"),
                                    ("reverse", "negate")],
                  target=("sort", "negate"), n_related=800, n_target=60, n_val=60, n_test=300, seq_len=8, vocab=10,
                  d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4, steps=500, batch_size=64,
                  lrs=[3e-3, 1e-2], arms=None),
}

ALONE = "trained alone (dense)"
ARMS = [ALONE, *SEQ_ARMS]
PRIMARY = ("MoE add (task-aware)", "dense")
SECONDARY = [("MoE add (task-aware)", "dense ×E (equal params)"), ("MoE add (task-aware)", "MoE task-blind router"),
             ("MoE add (task-aware)", "MoE token router (task via input)"), ("MoE task-level", "dense"),
             ("MoE oracle routing", "MoE add (task-aware)"), ("dense", ALONE)]
CLAIM = "(i) task-aware routing helps a low-resource task"


def target_accuracy(arm, cfg, lr, seed) -> tuple[float, float]:
    """Fit `arm` on this seed's data of setting `cfg` (the keys of a preset); returns the target task's
    (validation accuracy, test accuracy). Validation and test hold the target only, so early stopping and the lr
    choice look at the target. The sweep of claim (i) (e7_sweep_transfer) calls this at every scale point."""
    from ..train import evaluate, fit

    L, V = cfg["seq_len"], cfg["vocab"]
    tasks = [*cfg["related"], cfg["target"]]
    target = "+".join(cfg["target"])
    if arm == ALONE:
        tr, va, te = (sequence_tasks([cfg["target"]], n, L, V, seed=s) for n, s in
                      ((cfg["n_target"], seed), (cfg["n_val"], 10_000 + seed), (cfg["n_test"], 20_000 + seed)))
        model = sequence_model("dense", 1, V, L, cfg, seed)
    else:
        counts = [cfg["n_related"]] * len(cfg["related"]) + [cfg["n_target"]]
        only_target = [0] * len(cfg["related"])
        tr = sequence_tasks(tasks, counts, L, V, seed=seed)
        va, te = (sequence_tasks(tasks, only_target + [n], L, V, seed=s) for n, s in
                  ((cfg["n_val"], 10_000 + seed), (cfg["n_test"], 20_000 + seed)))
        model = sequence_model(arm, len(tasks), V, L, cfg, seed, task_parts=tasks)
    fit(model, tr, va, optim_config(cfg, seed, lr=lr), seed=seed)
    return float(evaluate(model, va)["per_task"][target]), float(evaluate(model, te)["per_task"][target])


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e2_transfer", out), Timer()
    V = cfg["vocab"]
    target = "+".join(cfg["target"])
    arms = cfg["arms"] or ARMS
    counts = [cfg["n_related"]] * len(cfg["related"]) + [cfg["n_target"]]
    share = cfg["n_target"] / sum(counts)

    acc = {a: [] for a in arms}
    with fastest_backend() as backend:
        log(f"E2 ({preset}): backend {backend}, target {target} with {share:.1%} of the data, {cfg['seeds']} seeds, "
            f"lr grid {lr_grid(cfg)}")
        lrs = tune_lr(arms, lambda arm, lr, seed: target_accuracy(arm, cfg, lr, seed)[0], cfg, log)
        for seed in range(cfg["seeds"]):
            for arm in arms:
                acc[arm].append(target_accuracy(arm, cfg, lrs[arm], seed)[1])
                log(f"  seed {seed} {arm}: {target} accuracy {acc[arm][-1]:.3f}")

    comparisons = comparisons_of(acc, cfg)
    rows = [[a, fmt(acc[a]), f"{lrs[a]:g}"] for a in arms]
    table = markdown_table(["arm", f"{target} test accuracy (mean ± std over seeds)", "lr (tuned)"], rows)
    verdicts = comparison_table(comparisons)
    took = timer.describe()  # ends the run's clock: results.json gets the same numbers
    seconds = timer.record()["seconds"]
    notes = [f"Preset `{preset}`: {cfg['seeds']} paired seeds (same data, split and lr grid for every arm); backend "
             f"{backend}. Related tasks ({cfg['n_related']} training examples each): "
             f"{', '.join('+'.join(t) for t in cfg['related'])}; target {target}: {cfg['n_target']} examples "
             f"({share:.1%} of the training data), {cfg['n_val']} validation examples (early stopping and lr choice "
             f"on the target only; the lr of each arm is the grid's best on a separate tuning seed). Transformer d_model={cfg['d_model']}, {cfg['n_layers']} layers, d_ff="
             f"{cfg['d_ff']}; MoE: every block, {cfg['num_experts']} experts of width d_ff, top-1; {cfg['steps']} "
             f"Adam steps, batch {cfg['batch_size']}, lr grid {lr_grid(cfg)}; {took}.",
             "", f"Chance accuracy is 1/{V} = {1 / V:.2f}."]
    write_results(path, "E2 — low-resource transfer (claim i)",
                  [(f"Target task {target}", table), ("Paired comparisons", verdicts)], notes)
    interval_plot(path, "e2_transfer.png", f"E2: {target} accuracy, paired differences", comparisons)
    for c in comparisons:
        log(c.sentence())
    save_results(path, dict(experiment="e2", preset=preset, config=cfg, values=acc, lrs=lrs,
                            comparisons=comparisons, backend=backend, **timer.record()))
    return {"dir": path, "table": table + "\n\n" + verdicts, "rows": rows, "comparisons": comparisons,
            "seconds": seconds}


def comparisons_of(acc, cfg):
    scale = (f"{len(cfg['related']) + 1} tasks, {cfg['n_target']} target examples, d_model {cfg['d_model']}, "
             f"{cfg['num_experts']} experts")
    return declared(acc, PRIMARY, SECONDARY, claim=CLAIM, metric="target accuracy", direction=+1, scale=scale)
