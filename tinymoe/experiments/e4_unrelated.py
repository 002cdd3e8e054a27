"""E4 — adding unrelated tasks (Gupta et al. 2022, claim iii: robustness, no catastrophic forgetting).

Phase 1 trains on a base mixture of composed sequence tasks. From that checkpoint we continue two ways for the same
number of steps: (a) on the base mixture alone, (b) on the base mixture plus unrelated tasks (fixed random
mappings, tinymoe.data.random_mapping_tasks). The effect of adding the unrelated tasks on the base tasks is
Δ = acc_b − acc_a (mean base-task test accuracy); the claim predicts Δ closer to 0 for task-aware MoE than dense.
"""
from __future__ import annotations

import numpy as np

from ..data import random_mapping_tasks, sequence_tasks
from .common import (Timer, bar_plot, fastest_backend, fmt, markdown_table, optim_config, preset_config, run_dir,
                     sequence_model, write_results)

PRESETS = {
    "tiny": dict(seeds=2, base=[("reverse",), ("increment",)], num_unrelated=2, n_per_task=60, n_test=30, seq_len=6,
                 vocab=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=4, steps=10, steps_after=6,
                 batch_size=32, lr=3e-3,
                 variants=["dense", "MoE token (task-agnostic)", "MoE task-level (task-aware)"]),
    "small": dict(seeds=3, base=[("reverse",), ("increment",), ("sort",), ("shift", "increment")], num_unrelated=4,
                  n_per_task=1000, n_test=300, seq_len=8, vocab=10, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                  num_experts=4, steps=600, steps_after=400, batch_size=64, lr=3e-3,
                  variants=["dense", "MoE token (task-agnostic)", "MoE add (task-aware)",
                            "MoE task-level (task-aware)"]),
}


def _copy_state(model):
    return {name: np.array(value, copy=True) for name, value in model.state_dict().items()}


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    from ..train import evaluate, fit

    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e4_unrelated", out), Timer()
    L, V, B = cfg["seq_len"], cfg["vocab"], len(cfg["base"])
    variants = cfg["variants"]
    before, only_base, with_unrel = ({v: [] for v in variants} for _ in range(3))
    with fastest_backend() as backend:
        log(f"E4 ({preset}): backend {backend}")
        for seed in range(cfg["seeds"]):
            unrelated = random_mapping_tasks(cfg["num_unrelated"], L, V, seed=seed)
            tasks = [*cfg["base"], *unrelated]
            U, n = len(unrelated), cfg["n_per_task"]
            base_names = ["+".join(t) for t in cfg["base"]]

            def data(counts, s):
                return sequence_tasks(tasks, counts, L, V, seed=s)

            base_train, mixed_train = data([n] * B + [0] * U, seed), data([n] * (B + U), 100 + seed)
            base_val, mixed_val = data([n // 10] * B + [0] * U, 10_000 + seed), data([n // 10] * (B + U), 10_100 + seed)
            test = data([cfg["n_test"]] * B + [0] * U, 20_000 + seed)

            def base_accuracy(model):
                per_task = evaluate(model, test)["per_task"]
                return float(np.mean([per_task[name] for name in base_names]))

            for variant in variants:
                model = sequence_model(variant, B + U, V, L, cfg, seed)
                fit(model, base_train, base_val, optim_config(cfg, seed), seed=seed)
                before[variant].append(base_accuracy(model))
                checkpoint = _copy_state(model)
                fit(model, base_train, base_val, optim_config(cfg, seed, cfg["steps_after"]), seed=seed)
                only_base[variant].append(base_accuracy(model))
                model.load_state_dict(checkpoint)
                fit(model, mixed_train, mixed_val, optim_config(cfg, seed, cfg["steps_after"]), seed=seed)
                with_unrel[variant].append(base_accuracy(model))
                log(f"  seed {seed} {variant}: base accuracy {before[variant][-1]:.3f} -> base only "
                    f"{only_base[variant][-1]:.3f}, + unrelated {with_unrel[variant][-1]:.3f}")

    delta = {v: list(np.subtract(with_unrel[v], only_base[v])) for v in variants}
    rows = [[v, fmt(before[v]), fmt(only_base[v]), fmt(with_unrel[v]), fmt(delta[v])] for v in variants]
    table = markdown_table(["model", "base acc. after phase 1", "continued on base only",
                            "continued on base + unrelated", "Δ (unrelated − base only)"], rows)
    seconds = timer.seconds
    notes = [f"Preset `{preset}`: {cfg['seeds']} seeds, mean ± std over seeds; backend {backend}. Base tasks: "
             f"{', '.join('+'.join(t) for t in cfg['base'])} ({cfg['n_per_task']} examples each); "
             f"{cfg['num_unrelated']} unrelated random-mapping tasks ({cfg['n_per_task']} each). Phase 1: "
             f"{cfg['steps']} steps; each continuation: {cfg['steps_after']} steps (fresh Adam). MoE: every block, "
             f"{cfg['num_experts']} experts, top-1 (the dense model's active compute); {seconds:.0f} s."]
    write_results(path, "E4 — adding unrelated tasks (claim iii)", [("Mean base-task test accuracy", table)], notes)
    bar_plot(path, "e4_unrelated.png", "E4: mean base-task accuracy", ["after phase 1", "+ base only",
                                                                       "+ base + unrelated"],
             {v: [before[v], only_base[v], with_unrel[v]] for v in variants}, "test accuracy")
    return {"dir": path, "table": table, "rows": rows, "seconds": seconds}
