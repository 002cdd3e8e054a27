"""E3 — unseen tasks (Gupta et al. 2022, claim ii: sample-efficient generalisation by reusing seen routing).

Train on seen compositions of primitives; some compositions are held out, though each of their parts is seen.
Task embeddings (at the input and in the routers) are composed from the task description — the sum of learned
part embeddings — so a held-out task can be given an embedding without training. Then we fine-tune all weights
on K examples of the held-out task and report its test accuracy (K = 0: zero-shot). Methods:

* MoE add, description at input and router: the held-out task's parts everywhere (routing reused);
* MoE add, description at input, fresh router: the same trained model, the same input embedding, but the routers
  get an untrained part — this isolates the reuse of routing from the reuse of the input embedding;
* MoE add, fresh everywhere: an untrained part at the input and in the routers (learned from the K examples);
* dense, description at input (no router to reuse);
* MoE oracle routing, description at input: block l sends every token to the expert of the task's part l
  (an upper bound on what composing routes can give; with more parts than experts, parts share experts
  by their index mod E).

Pre-declared comparison for claim (ii): (description at input and router) − (description at input, fresh
router) at the smallest K > 0. Secondary (Holm): the same at the other K, against dense, and oracle − learned.
"""
from __future__ import annotations

import copy

import numpy as np

from ..data import sequence_tasks
from .common import (Timer, comparison_table, fastest_backend, fmt, interval_plot, lr_grid, markdown_table,
                     mean_std, optim_config, preset_config, run_dir, save_results, sequence_model, tune_lr,
                     write_results)
from .stats import compare, family
from ..plots import save_figure

PRESETS = {
    "tiny": dict(seeds=3, seen=[("reverse",), ("increment",), ("shift",), ("shift", "increment")],
                 heldout=[("reverse", "increment")], shots=[0, 4], n_per_task=60, n_test=30, seq_len=6, vocab=8,
                 d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, steps=10, finetune_steps=4,
                 batch_size=32, lrs=[3e-3], finetune_lr=1e-3),
    "small": dict(seeds=8, seen=[("reverse",), ("increment",), ("shift",), ("negate",), ("reverse", "negate"),
                                 ("shift", "increment"), ("sort",), ("sort", "increment")],
                  heldout=[("reverse", "increment"), ("shift", "negate")], shots=[0, 8, 32], n_per_task=600,
                  n_test=200, seq_len=8, vocab=10, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4,
                  steps=400, finetune_steps=40, batch_size=64, lrs=[3e-3, 1e-2], finetune_lr=1e-3),
}

REUSE = "MoE add, description at input and router"
FRESH_ROUTER = "MoE add, description at input, fresh router"
FRESH_ALL = "MoE add, fresh everywhere"
DENSE = "dense, description at input"
ORACLE = "MoE oracle routing, description at input"
METHODS = [REUSE, FRESH_ROUTER, FRESH_ALL, DENSE, ORACLE]
BASE_ARM = {REUSE: "MoE add (task-aware)", FRESH_ROUTER: "MoE add (task-aware)", FRESH_ALL: "MoE add (task-aware)",
            DENSE: "dense", ORACLE: "MoE oracle routing"}
CLAIM = "(ii) unseen tasks: reusing seen routing generalises sample-efficiently"


def register(model, input_parts, router_parts) -> int:
    """Add an unseen task with `input_parts` in the input embedding and `router_parts` in every router's task
    embedding (MoETransformer.add_task uses one description for both); returns its task id."""
    ids = {model.task_emb.add_task(input_parts)}
    for m in model.moe_layers:
        if hasattr(m.router, "task_embedding"):
            ids.add(m.router.task_embedding.add_task(router_parts))
    (task_id,) = ids
    for m in model.moe_layers:
        m.config.num_tasks = task_id + 1
    model.config.task_descriptions = [*model.config.task_descriptions, [int(p) for p in input_parts]]
    model.config.num_tasks = task_id + 1
    return task_id


def pretrain(arm, cfg, lr, seed):
    """Train `arm` on the seen tasks of setting `cfg` (description-composed task embeddings); returns (model, part
    ids per task, size of the description vocabulary, mean validation accuracy on the seen tasks)."""
    from ..train import evaluate, fit

    L, V, S, H = cfg["seq_len"], cfg["vocab"], len(cfg["seen"]), len(cfg["heldout"])
    tasks = [*cfg["seen"], *cfg["heldout"]]  # held-out task i has data id S + i, and gets model id S + i
    train = sequence_tasks(tasks, [cfg["n_per_task"]] * S + [0] * H, L, V, seed=seed)
    val = sequence_tasks(tasks, [max(cfg["n_per_task"] // 10, 1)] * S + [0] * H, L, V, seed=10_000 + seed)
    vocab = train.description_vocab
    parts = [list(train.description_ids(t)) for t in range(len(tasks))]
    model = sequence_model(arm, S, V, L, cfg, seed, descriptions=parts[:S], num_parts=len(vocab) + H,
                           task_parts=tasks)
    fit(model, train, val, optim_config(cfg, seed, lr=lr), seed=seed)
    return model, parts, len(vocab), float(evaluate(model, val)["mean"])


def heldout_accuracy(trained, method, cfg, seed, shots=None) -> dict:
    """{K: accuracy averaged over the held-out tasks} after fine-tuning a copy of the pre-trained model
    (`pretrain`'s result for BASE_ARM[method]) on K examples of each held-out task, registered the way `method`
    says (its description or a fresh part at the input and in the routers). The sweep of claim (ii)
    (e8_sweep_unseen) calls this at every scale point."""
    from ..train import evaluate, fit

    L, V, S, H = cfg["seq_len"], cfg["vocab"], len(cfg["seen"]), len(cfg["heldout"])
    tasks, held = [*cfg["seen"], *cfg["heldout"]], cfg["heldout"]
    model0, parts, n_vocab, _ = trained
    base = copy.deepcopy(model0)
    for i in range(H):
        fresh = [n_vocab + i]  # a part id no seen task uses: an untrained embedding
        inp = fresh if method == FRESH_ALL else parts[S + i]
        rout = parts[S + i] if method == REUSE else fresh
        assert register(base, inp, rout) == S + i
    out = {}
    for K in (cfg["shots"] if shots is None else shots):
        scores = []
        for i in range(H):
            model = copy.deepcopy(base)
            counts = [0] * (S + H)
            if K:
                counts[S + i] = K
                data = sequence_tasks(tasks, counts, L, V, seed=30_000 + 100 * seed + i)
                fit(model, data, data, optim_config(cfg, seed, cfg["finetune_steps"], cfg["finetune_lr"],
                                                    min(K, cfg["batch_size"])), seed=seed)
            counts = [0] * (S + H)
            counts[S + i] = cfg["n_test"]
            test = sequence_tasks(tasks, counts, L, V, seed=20_000 + 100 * seed + i)
            scores.append(evaluate(model, test)["per_task"]["+".join(held[i])])
        out[K] = float(np.mean(scores))
    return out


def run(preset="small", seeds=None, out=None, log=print) -> dict:
    cfg = preset_config(PRESETS, preset, seeds)
    path, timer = run_dir("e3_unseen", out), Timer()
    V, held = cfg["vocab"], cfg["heldout"]
    seen = cfg["seen"]
    first_k = min(K for K in cfg["shots"] if K > 0)

    acc = {(m, K): [] for m in METHODS for K in cfg["shots"]}  # mean over held-out tasks, per seed
    with fastest_backend() as backend:
        log(f"E3 ({preset}): backend {backend}; held out {['+'.join(h) for h in held]}; {cfg['seeds']} seeds")
        arms = sorted(set(BASE_ARM.values()))
        lrs = tune_lr(arms, lambda arm, lr, seed: pretrain(arm, cfg, lr, seed)[3], cfg, log)
        for seed in range(cfg["seeds"]):
            trained = {arm: pretrain(arm, cfg, lrs[arm], seed) for arm in arms}
            for method in METHODS:
                for K, value in heldout_accuracy(trained[BASE_ARM[method]], method, cfg, seed).items():
                    acc[(method, K)].append(value)
                    log(f"  seed {seed} {method} K={K}: held-out accuracy {value:.3f}")

    comparisons = comparisons_of(acc, cfg, first_k)
    rows = [[m, *[fmt(acc[(m, K)]) for K in cfg["shots"]]] for m in METHODS]
    table = markdown_table(["method", *[f"K={K}" + (" (zero-shot)" if K == 0 else "") for K in cfg["shots"]]], rows)
    verdicts = comparison_table(comparisons)
    took = timer.describe()  # ends the run's clock: results.json gets the same numbers
    seconds = timer.record()["seconds"]
    notes = [f"Preset `{preset}`: {cfg['seeds']} paired seeds, mean ± std over seeds of the accuracy averaged over "
             f"the held-out tasks; backend {backend}. Seen tasks ({cfg['n_per_task']} examples each): "
             f"{', '.join('+'.join(t) for t in seen)}. Held out: {', '.join('+'.join(t) for t in held)}. "
             f"Pre-training {cfg['steps']} steps (lr of each pre-trained model: the best of {lr_grid(cfg)} on a "
             f"separate tuning seed: {lrs}); fine-tuning {cfg['finetune_steps']} steps on the K examples (all "
             f"weights, lr {cfg['finetune_lr']}). MoE: every block, {cfg['num_experts']} experts, top-1; "
             f"{took}.", "", f"Chance accuracy is 1/{V} = {1 / V:.2f}."]
    write_results(path, "E3 — unseen tasks (claim ii)",
                  [("Held-out task test accuracy after K-shot fine-tuning", table), ("Paired comparisons", verdicts)],
                  notes)
    _plot(path, cfg, acc)
    interval_plot(path, "e3_comparisons.png", "E3: held-out accuracy, paired differences", comparisons)
    for c in comparisons:
        log(c.sentence())
    save_results(path, dict(experiment="e3", preset=preset, config=cfg,
                            values={f"{m} | K={K}": v for (m, K), v in acc.items()}, lrs=lrs,
                            comparisons=comparisons, backend=backend, **timer.record()))
    return {"dir": path, "table": table + "\n\n" + verdicts, "rows": rows, "comparisons": comparisons,
            "seconds": seconds}


def comparisons_of(acc, cfg, first_k):
    scale = (f"{len(cfg['seen'])} seen / {len(cfg['heldout'])} held-out tasks, d_model {cfg['d_model']}, "
             f"{cfg['num_experts']} experts")
    pairs = [((REUSE, FRESH_ROUTER, first_k), True)]
    pairs += [((REUSE, FRESH_ROUTER, K), False) for K in cfg["shots"] if K != first_k]
    pairs += [((REUSE, DENSE, K), False) for K in cfg["shots"]]
    pairs += [((ORACLE, REUSE, first_k), False)]
    out = [compare(acc[(a, K)], acc[(b, K)], claim=CLAIM, arm=a, baseline=b, metric=f"held-out accuracy, K={K}",
                   direction=+1, primary=primary, scale=scale) for (a, b, K), primary in pairs]
    return family(out)


def _plot(path, cfg, acc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import t_interval

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for m in METHODS:
        means, lo, hi = [], [], []
        for K in cfg["shots"]:
            v = acc[(m, K)]
            mean, a, b = t_interval(v) if len(v) > 1 and np.std(v) > 0 else (mean_std(v)[0],) * 3
            means.append(mean)
            lo.append(mean - a)
            hi.append(b - mean)
        ax.errorbar(cfg["shots"], means, [lo, hi], marker="o", capsize=3, label=m)
    ax.set(xlabel="K (fine-tuning examples of the held-out task)", ylabel="held-out test accuracy (95 % CI)",
           title="E3: unseen compositions")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, f"{path}/e3_unseen.png")
