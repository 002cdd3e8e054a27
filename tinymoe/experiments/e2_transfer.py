"""E2 — low-resource transfer (Gupta et al. 2022, claim i).

A mixture of sequence tasks composed of primitives (tinymoe.data.sequences); the target task shares its parts
with the others and gets ~1% of the training data. We report the target's per-position test accuracy when it is
trained alone, in a dense multi-task model, and in MoE models with a task-agnostic (token) or task-aware (add,
concat, task-level) router — all with the same active compute per token (MoE: top-1 of E experts of the dense
FFN's width).
"""
from __future__ import annotations

from ..data import sequence_tasks
from .common import (SEQ_VARIANTS, Timer, bar_plot, fastest_backend, fmt, markdown_table, optim_config,
                     preset_config, run_dir, sequence_model, write_results)

PRESETS = {
    "tiny": dict(seeds=2, related=[("reverse",), ("increment",)], target=("reverse", "increment"), n_related=60,
                 n_target=6, n_test=40, seq_len=6, vocab=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                 num_experts=4, steps=10, batch_size=32, lr=3e-3),
    # the target sorts then negates; related tasks hold both parts (reverse+increment was too easy: 100% alone)
    "small": dict(seeds=3, related=[("sort",), ("negate",), ("reverse",), ("increment",), ("sort", "increment"),
                                    ("reverse", "negate")],
                  target=("sort", "negate"), n_related=1500, n_target=90, n_test=300, seq_len=8, vocab=10,
                  d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, steps=900, batch_size=64, lr=3e-3),
}

VARIANTS = ["trained alone (dense)", *SEQ_VARIANTS]


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e2_transfer", out), Timer()
    tasks = [*cfg["related"], cfg["target"]]
    target = "+".join(cfg["target"])
    L, V = cfg["seq_len"], cfg["vocab"]
    counts = [cfg["n_related"]] * len(cfg["related"]) + [cfg["n_target"]]
    share = cfg["n_target"] / sum(counts)
    acc = {v: [] for v in VARIANTS}
    from ..train import evaluate, fit

    with fastest_backend() as backend:
        log(f"E2 ({preset}): backend {backend}, target {target} with {share:.1%} of the data")
        for seed in range(cfg["seeds"]):
            train = sequence_tasks(tasks, counts, L, V, seed=seed)
            # val: a few target examples (early stopping looks at the task we care about); test: many
            val = sequence_tasks(tasks, [cfg["n_target"] // 3 + 1] * len(tasks), L, V, seed=10_000 + seed)
            test = sequence_tasks(tasks, [0] * len(cfg["related"]) + [cfg["n_test"]], L, V, seed=20_000 + seed)
            for variant in VARIANTS:
                if variant.startswith("trained alone"):
                    tr, va, te = (sequence_tasks([cfg["target"]], n, L, V, seed=s) for n, s in
                                  ((cfg["n_target"], seed), (cfg["n_target"] // 3 + 1, 10_000 + seed),
                                   (cfg["n_test"], 20_000 + seed)))
                    model = sequence_model("dense", 1, V, L, cfg, seed)
                else:
                    tr, va, te = train, val, test
                    model = sequence_model(variant, len(tasks), V, L, cfg, seed)
                fit(model, tr, va, optim_config(cfg, seed), seed=seed)
                acc[variant].append(evaluate(model, te)["per_task"][target])
                log(f"  seed {seed} {variant}: {target} accuracy {acc[variant][-1]:.3f}")

    rows = [[v, fmt(acc[v])] for v in VARIANTS]
    table = markdown_table(["model", f"{target} test accuracy (per position)"], rows)
    seconds = timer.seconds
    notes = [f"Preset `{preset}`: {cfg['seeds']} seeds, mean ± std over seeds; backend {backend}. Related tasks "
             f"({cfg['n_related']} training examples each): {', '.join('+'.join(t) for t in cfg['related'])}; "
             f"target {target}: {cfg['n_target']} examples ({share:.1%} of the training data). Transformer "
             f"d_model={cfg['d_model']}, {cfg['n_layers']} layers, d_ff={cfg['d_ff']}; MoE: every block, "
             f"{cfg['num_experts']} experts, top-1; {cfg['steps']} Adam steps, batch {cfg['batch_size']}, "
             f"lr {cfg['lr']}; {seconds:.0f} s.", "",
             f"Chance accuracy is 1/{V} = {1 / V:.2f}."]
    write_results(path, "E2 — low-resource transfer (claim i)", [(f"Target task {target}", table)], notes)
    bar_plot(path, "e2_transfer.png", f"E2: accuracy on low-resource task {target}", ["target"],
             {v: [acc[v]] for v in VARIANTS}, "test accuracy")
    return {"dir": path, "table": table, "rows": rows, "seconds": seconds}
