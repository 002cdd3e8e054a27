"""E3 — unseen tasks (Gupta et al. 2022, claim ii: sample-efficient generalisation by reusing seen routing).

Train on seen compositions of primitives; some compositions are held out, though each of their parts is seen.
Task embeddings (at the input and in the routers) are composed from the task description — the sum of learned
part embeddings — so a held-out task gets an embedding, and a routing, from `model.add_task(description)`. Then
we fine-tune all weights on K examples of the held-out task and report its test accuracy (K = 0: zero-shot):

* MoE, routing from the description: add_task(the held-out task's parts);
* MoE, fresh task embedding: the same trained model, add_task([a new, untrained part]) — learned from scratch;
* dense, description-composed task embedding (no router to reuse).
"""
from __future__ import annotations

import copy

import numpy as np

from ..data import sequence_tasks
from .common import (Timer, fastest_backend, fmt, markdown_table, optim_config, preset_config, run_dir,
                     sequence_model, write_results)

PRESETS = {
    "tiny": dict(seeds=2, seen=[("reverse",), ("increment",), ("shift",), ("shift", "increment")],
                 heldout=[("reverse", "increment")], shots=[0, 8], n_per_task=60, n_test=30, seq_len=6, vocab=8,
                 d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=4, steps=10, finetune_steps=4,
                 batch_size=32, lr=3e-3, finetune_lr=1e-3, router="MoE add (task-aware)"),
    "small": dict(seeds=3, seen=[("reverse",), ("increment",), ("shift",), ("negate",), ("reverse", "negate"),
                                 ("shift", "increment"), ("sort",), ("sort", "increment")],
                  heldout=[("reverse", "increment"), ("shift", "negate")], shots=[0, 16, 64], n_per_task=1000,
                  n_test=300, seq_len=8, vocab=10, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4,
                  steps=900, finetune_steps=100, batch_size=64, lr=3e-3, finetune_lr=1e-3,
                  router="MoE add (task-aware)"),
}

METHODS = ["MoE, routing from description", "MoE, fresh task embedding", "dense, description embedding"]


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    from ..train import evaluate, fit

    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e3_unseen", out), Timer()
    L, V = cfg["seq_len"], cfg["vocab"]
    seen, held = cfg["seen"], cfg["heldout"]
    S, H = len(seen), len(held)
    tasks = [*seen, *held]  # held-out task i has data id S + i, and gets model id S + i from add_task
    acc = {(m, K): [] for m in METHODS for K in cfg["shots"]}  # mean over held-out tasks, per seed
    with fastest_backend() as backend:
        log(f"E3 ({preset}): backend {backend}; held out {['+'.join(h) for h in held]}")
        for seed in range(cfg["seeds"]):
            train = sequence_tasks(tasks, [cfg["n_per_task"]] * S + [0] * H, L, V, seed=seed)
            val = sequence_tasks(tasks, [cfg["n_per_task"] // 10] * S + [0] * H, L, V, seed=10_000 + seed)
            vocab = train.description_vocab
            parts = [list(train.description_ids(t)) for t in range(len(tasks))]
            fresh = [[len(vocab) + i] for i in range(H)]  # part ids no seen task uses: untrained embeddings
            trained = {}
            for variant in ("MoE", "dense"):
                name = cfg["router"] if variant == "MoE" else "dense"
                model = sequence_model(name, S, V, L, cfg, seed, descriptions=parts[:S], num_parts=len(vocab) + H)
                fit(model, train, val, optim_config(cfg, seed), seed=seed)
                trained[variant] = model
            for method in METHODS:
                base = copy.deepcopy(trained["dense" if method.startswith("dense") else "MoE"])
                for i in range(H):
                    assert base.add_task(fresh[i] if "fresh" in method else parts[S + i]) == S + i
                for K in cfg["shots"]:
                    scores = []
                    for i in range(H):
                        model = copy.deepcopy(base)
                        counts = [0] * (S + H)
                        if K:
                            counts[S + i] = K
                            shots = sequence_tasks(tasks, counts, L, V, seed=30_000 + 100 * seed + i)
                            steps = cfg["finetune_steps"]
                            fit(model, shots, shots, optim_config({**cfg, "batch_size": min(K, cfg["batch_size"])},
                                                                  seed, steps, cfg["finetune_lr"]), seed=seed)
                        counts = [0] * (S + H)
                        counts[S + i] = cfg["n_test"]
                        test = sequence_tasks(tasks, counts, L, V, seed=20_000 + 100 * seed + i)
                        scores.append(evaluate(model, test)["per_task"]["+".join(held[i])])
                    acc[(method, K)].append(float(np.mean(scores)))
                    log(f"  seed {seed} {method} K={K}: held-out accuracy {acc[(method, K)][-1]:.3f}")

    rows = [[m, *[fmt(acc[(m, K)]) for K in cfg["shots"]]] for m in METHODS]
    table = markdown_table(["method", *[f"K={K}" + (" (zero-shot)" if K == 0 else "") for K in cfg["shots"]]], rows)
    seconds = timer.seconds
    notes = [f"Preset `{preset}`: {cfg['seeds']} seeds, mean ± std over seeds of the accuracy averaged over the "
             f"held-out tasks; backend {backend}. Seen tasks ({cfg['n_per_task']} examples each): "
             f"{', '.join('+'.join(t) for t in seen)}. Held out: {', '.join('+'.join(t) for t in held)}. "
             f"Pre-training {cfg['steps']} steps; fine-tuning {cfg['finetune_steps']} steps on the K examples "
             f"(all weights, lr {cfg['finetune_lr']}). MoE = {cfg['router']}, every block, {cfg['num_experts']} "
             f"experts, top-1; {seconds:.0f} s.", "", f"Chance accuracy is 1/{V} = {1 / V:.2f}."]
    write_results(path, "E3 — unseen tasks (claim ii)",
                  [("Held-out task test accuracy after K-shot fine-tuning", table)], notes)
    _plot(path, cfg, acc)
    return {"dir": path, "table": table, "rows": rows, "seconds": seconds}


def _plot(path, cfg, acc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import mean_std

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in METHODS:
        stats = [mean_std(acc[(m, K)]) for K in cfg["shots"]]
        ax.errorbar(cfg["shots"], [s[0] for s in stats], [s[1] for s in stats], marker="o", capsize=3, label=m)
    ax.set(xlabel="K (fine-tuning examples of the held-out task)", ylabel="held-out test accuracy",
           title="E3: unseen compositions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{path}/e3_unseen.png", dpi=110)
    plt.close(fig)
