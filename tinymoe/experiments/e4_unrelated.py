"""E4 — adding unrelated tasks (Gupta et al. 2022, claim iii: task-aware MoE is robust to unrelated tasks).

Phase 1 trains on a base mixture of composed sequence tasks, kept short so that base accuracy sits well below 1.
From that checkpoint we continue two ways for the same number of steps:

(a) base only, batches of B examples;
(b) base + unrelated tasks, batches of 2B drawn from a mixture with as many unrelated as base examples, so each
    step still sees about B base examples (exposure-matched: the drop is interference, not less training).

The unrelated tasks conflict with the base tasks instead of sitting beside them: value-only maps ("value<k>":
the same positions as increment / negate, a different answer per value) and per-sequence random labels
("memorise<k>": nothing to generalise). Forgetting is Δ = acc_b − acc_a, the mean base-task test accuracy after
(b) minus after (a); the claim predicts Δ closer to 0 (larger) for task-aware MoE.

Pre-declared comparison: Δ(MoE add, task-aware) − Δ(dense at equal active FLOPs). Secondary (Holm): against the
dense model of equal total parameters, the task-blind router, the token router that sees the task through the
input, and the task-level router against dense.
"""
from __future__ import annotations

import numpy as np

from ..data import random_mapping_tasks, sequence_tasks
from .common import (SEQ_ARMS, Timer, comparison_table, fastest_backend, fmt, interval_plot, lr_grid, markdown_table,
                     optim_config, preset_config, run_dir, save_results, sequence_model, tune_lr, write_results)
from .stats import declared

PRESETS = {
    "tiny": dict(seeds=3, base=[("reverse",), ("increment",)], unrelated=dict(value=1, memorise=1), n_per_task=60,
                 n_test=30, seq_len=6, vocab=8, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=2, steps=8,
                 steps_after=6, batch_size=16, lrs=[3e-3],
                 arms=["dense", "MoE task-blind router", "MoE add (task-aware)"]),
    "small": dict(seeds=8, base=[("sort", "negate"), ("reverse", "increment"), ("shift",), ("cummax",)],
                  unrelated=dict(value=2, memorise=2), n_per_task=600, n_test=200, seq_len=8, vocab=10, d_model=32,
                  n_layers=2, n_heads=2, d_ff=32, num_experts=4, steps=300, steps_after=200, batch_size=32,
                  lrs=[3e-3, 1e-2],
                  arms=["dense", "dense ×E (equal params)", "MoE task-blind router",
                        "MoE token router (task via input)", "MoE add (task-aware)", "MoE task-level"]),
}

PRIMARY = ("MoE add (task-aware)", "dense")
SECONDARY = [("MoE add (task-aware)", "dense ×E (equal params)"), ("MoE add (task-aware)", "MoE task-blind router"),
             ("MoE add (task-aware)", "MoE token router (task via input)"), ("MoE task-level", "dense")]
CLAIM = "(iii) adding unrelated tasks hurts task-aware MoE less"


def _copy_state(model):
    return {name: np.array(value, copy=True) for name, value in model.state_dict().items()}


def unrelated_tasks(cfg, seed):
    kinds = cfg["unrelated"]
    return [t for kind, num in kinds.items() for t in random_mapping_tasks(num, cfg["seq_len"], cfg["vocab"],
                                                                           seed=seed, kind=kind)]


def setting(cfg, seed) -> dict:
    """This seed's tasks (base, then unrelated) and datasets: base-only and mixed training sets (as many unrelated
    as base examples in the mixture), base validation and base test."""
    L, V, B = cfg["seq_len"], cfg["vocab"], len(cfg["base"])
    unrelated = unrelated_tasks(cfg, seed)
    tasks, U, n = [*cfg["base"], *unrelated], len(unrelated), cfg["n_per_task"]
    n_unrel = -(-n * B // U)  # as many unrelated as base examples in the mixture

    def data(counts, s):
        return sequence_tasks(tasks, counts, L, V, seed=s)

    return dict(tasks=tasks, base_train=data([n] * B + [0] * U, seed),
                mixed_train=data([n] * B + [n_unrel] * U, 100 + seed),
                base_val=data([max(n // 10, 1)] * B + [0] * U, 10_000 + seed),
                test=data([cfg["n_test"]] * B + [0] * U, 20_000 + seed))


def base_accuracy(model, data, cfg) -> float:
    from ..train import evaluate

    per_task = evaluate(model, data)["per_task"]
    return float(np.mean([per_task["+".join(t)] for t in cfg["base"]]))


def phase1(arm, cfg, lr, seed, s):
    """The model of `arm` trained on the base tasks of setting `s` (phase 1)."""
    from ..train import fit

    model = sequence_model(arm, len(s["tasks"]), cfg["vocab"], cfg["seq_len"], cfg, seed, task_parts=s["tasks"])
    fit(model, s["base_train"], s["base_val"], optim_config(cfg, seed, lr=lr), seed=seed)
    return model


def forgetting(arm, cfg, lr, seed, s=None) -> tuple[float, float, float]:
    """Mean base-task test accuracy of `arm` (after phase 1, continued on base only, continued on base + unrelated
    at twice the batch); Δ is the third minus the second. The sweep of claim (iii) (e9_sweep_unrelated) calls this
    at every scale point."""
    from ..train import fit

    s = s or setting(cfg, seed)
    model = phase1(arm, cfg, lr, seed, s)
    before = base_accuracy(model, s["test"], cfg)
    checkpoint = _copy_state(model)
    steps = cfg["steps_after"]
    fit(model, s["base_train"], s["base_val"], optim_config(cfg, seed, steps, lr), seed=seed)
    only_base = base_accuracy(model, s["test"], cfg)
    model.load_state_dict(checkpoint)
    fit(model, s["mixed_train"], s["base_val"], optim_config(cfg, seed, steps, lr, batch_size=2 * cfg["batch_size"]),
        seed=seed)
    return before, only_base, base_accuracy(model, s["test"], cfg)


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e4_unrelated", out), Timer()
    arms = cfg["arms"]
    base_names = ["+".join(t) for t in cfg["base"]]

    before, only_base, with_unrel = ({a: [] for a in arms} for _ in range(3))
    with fastest_backend() as backend:
        log(f"E4 ({preset}): backend {backend}, {cfg['seeds']} seeds, lr grid {lr_grid(cfg)}")

        def tuning_score(arm, lr, seed):
            s = setting(cfg, seed)
            return base_accuracy(phase1(arm, cfg, lr, seed, s), s["base_val"], cfg)

        lrs = tune_lr(arms, tuning_score, cfg, log)
        for seed in range(cfg["seeds"]):
            s = setting(cfg, seed)
            for arm in arms:
                for store, value in zip((before, only_base, with_unrel), forgetting(arm, cfg, lrs[arm], seed, s)):
                    store[arm].append(value)
                log(f"  seed {seed} {arm}: base accuracy {before[arm][-1]:.3f} -> base only "
                    f"{only_base[arm][-1]:.3f}, + unrelated {with_unrel[arm][-1]:.3f}")

    delta = {a: list(np.subtract(with_unrel[a], only_base[a])) for a in arms}
    comparisons = comparisons_of(delta, cfg)
    rows = [[a, fmt(before[a]), fmt(only_base[a]), fmt(with_unrel[a]), fmt(delta[a]), f"{lrs[a]:g}"] for a in arms]
    table = markdown_table(["arm", "base acc. after phase 1", "continued on base only",
                            "continued on base + unrelated", "Δ (unrelated − base only)", "lr (tuned)"], rows)
    verdicts = comparison_table(comparisons)
    took = timer.describe()  # ends the run's clock: results.json gets the same numbers
    seconds = timer.record()["seconds"]
    unrel = ", ".join(f"{num} {kind}" for kind, num in cfg["unrelated"].items())
    notes = [f"Preset `{preset}`: {cfg['seeds']} paired seeds, mean ± std over seeds; backend {backend}. Base tasks: "
             f"{', '.join(base_names)} ({cfg['n_per_task']} examples each); unrelated tasks: {unrel} (as many "
             f"examples in all as the base tasks). Phase 1: {cfg['steps']} steps, batch {cfg['batch_size']}; each "
             f"continuation: {cfg['steps_after']} steps (fresh Adam), base only at batch {cfg['batch_size']}, "
             f"base + unrelated at batch {2 * cfg['batch_size']} (exposure-matched). Transformer d_model="
             f"{cfg['d_model']}, d_ff={cfg['d_ff']}; MoE: every block, {cfg['num_experts']} experts, top-1; lr of "
             f"each arm: the best of {lr_grid(cfg)} on a separate tuning seed; {took}."]
    write_results(path, "E4 — adding unrelated tasks (claim iii)",
                  [("Mean base-task test accuracy", table), ("Paired comparisons of Δ", verdicts)], notes)
    interval_plot(path, "e4_unrelated.png", "E4: Δ (forgetting), paired differences", comparisons)
    for c in comparisons:
        log(c.sentence())
    save_results(path, dict(experiment="e4", preset=preset, config=cfg, values=delta, before=before,
                            only_base=only_base, with_unrelated=with_unrel, lrs=lrs, comparisons=comparisons,
                            backend=backend, **timer.record()))
    return {"dir": path, "table": table + "\n\n" + verdicts, "rows": rows, "comparisons": comparisons,
            "seconds": seconds}


def comparisons_of(delta, cfg):
    scale = (f"{len(cfg['base'])} base + {sum(cfg['unrelated'].values())} unrelated tasks, d_model {cfg['d_model']}, "
             f"{cfg['num_experts']} experts")
    return declared(delta, PRIMARY, SECONDARY, claim=CLAIM, metric="Δ base accuracy", direction=+1, scale=scale)


__all__ = ["PRESETS", "SEQ_ARMS", "run"]
