"""End-to-end training speed per backend: `tinymoe bench --train`.

The hot-path benchmark (benchmarks/moe_layer.py) times the MoE primitives alone; this one times whole optimizer steps of a
MoETransformer (embeddings, attention, router, aux losses, autodiff, AdamW) on generated multi-task sequences, so
it shows how much of a real step the backend accelerates. Each model is built once per backend from the same
seed and run inside the backend's training session, as `fit` does (numba: NumPy's BLAS on one thread); a few
warm-up steps (JIT compile) are not timed; the figure is the median step time.

* `demo`:   the `tinymoe train` demo model (d_model 32, d_ff 64, 8 experts, top-2, 2 MoE blocks), batch 64 × 8
  tokens — tiny matrices, so Python and the autodiff graph dominate.
* `medium`: d_model 128, d_ff 512, 8 experts, top-2, 2 MoE blocks, batch 32 × 32 tokens = 256 rows per expert.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from tinymoe import backends
from tinymoe.data import sequence_tasks
from tinymoe.model import ModelConfig, MoETransformer
from tinymoe.train import OptimConfig, make_optimizer, task_loss

TRAIN_SHAPES = {
    "demo": dict(d_model=32, n_heads=4, d_ff=64, seq_len=8, batch=64),
    "medium": dict(d_model=128, n_heads=4, d_ff=512, seq_len=32, batch=32),
}


def time_training(backend, shape, steps=20, warmup=3, seed=0) -> float:
    """Median seconds per optimizer step of `shape` (a key of TRAIN_SHAPES) on `backend`."""
    s = TRAIN_SHAPES[shape]
    data = sequence_tasks(["copy", "reverse", "sort", "reverse+increment"], s["batch"] * 4, s["seq_len"], 10,
                          seed=seed)
    config = ModelConfig(vocab_size=10, max_seq_len=s["seq_len"], d_model=s["d_model"], n_layers=2,
                         n_heads=s["n_heads"], d_ff=s["d_ff"], num_experts=8, k=2, moe_every=1, router="add",
                         num_tasks=data.num_tasks, task_embedding=True, seed=seed)
    rng = np.random.default_rng(seed)
    with backends.use_backend(backend), backends.session():  # the session fit() enters
        model = MoETransformer(config)
        opt = make_optimizer(model, OptimConfig(lr=1e-3))
        times = []
        for step in range(warmup + steps):
            idx = rng.choice(len(data), s["batch"], replace=False)
            t0 = time.perf_counter()
            loss, _ = task_loss(model, data, idx)
            total = loss + model.aux_loss()
            opt.zero_grad()
            total.backward()
            opt.step()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(names, steps=20, log=print) -> list[dict]:
    """Time every shape on every backend in `names` (numpy first: the others' speedup is over it)."""
    names = ["numpy", *[n for n in names if n != "numpy"]]
    rows = []
    for shape in TRAIN_SHAPES:
        base = None
        for name in names:
            t = time_training(name, shape, steps)
            base = t if name == "numpy" else base
            rows.append({"shape": shape, "backend": name, "seconds_per_step": t,
                         "speedup_vs_numpy": (base / t) if base else None})
    log(format_rows(rows))
    return rows


def format_rows(rows) -> str:
    lines = [f"\n{'training step':<14} {'backend':<8} {'ms/step':>9} {'speedup over numpy':>19}"]
    for r in rows:
        speed = f"{r['speedup_vs_numpy']:.2f}x" if r["speedup_vs_numpy"] else "-"
        lines.append(f"{r['shape']:<14} {r['backend']:<8} {1e3 * r['seconds_per_step']:>9.1f} {speed:>19}")
    return "\n".join(lines)
