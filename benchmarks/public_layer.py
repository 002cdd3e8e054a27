"""The public MoE layer in a user's own loop: tm.nn.MoE forward + backward against the dense-equivalent FFN.

    python benchmarks/public_layer.py                     # 256, 512, 1024 rows per expert
    python benchmarks/public_layer.py --rows 256 --json out.json

What a user who writes their own training loop gets: `tm.set_backend(backend)` and then plain calls, no
`tm.backends.session()`. The dense-equivalent (`tm.nn.FeedForward` on the T·k rows, the same FLOPs) and the MoE
layer take turns with no pause between them, as the layers of a model do: whatever one leaves behind on the CPU
(for instance OpenBLAS worker threads that busy-wait after a multi-threaded call) the other meets. Reported: the
median of `--repeat` turns each, ratio = MoE / dense.
A second yardstick, `dense (numpy)`, is the same FFN on the numpy backend, i.e. NumPy's BLAS with its own threads.

Shape: d 256, f 1024, 8 experts, top-2, float32, GELU (the train_step benchmark's medium layer).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np

import tinymoe as tm
from tinymoe import nn
from tinymoe.engine import Tensor

D, F, E, K = 256, 1024, 8, 2


def _step(module, x, dy):
    """Seconds of one forward + backward of `module` on x."""
    module.zero_grad()
    t = Tensor(x, requires_grad=True)
    t0 = time.perf_counter()
    module(t).backward(dy)
    return time.perf_counter() - t0


def measure(rows_per_expert, backend, repeat, seed=0):
    """Median seconds of the MoE layer and of the dense FFN, taking turns; and of the dense FFN on numpy."""
    T = rows_per_expert * E // K
    rng = np.random.default_rng(seed)
    x, dy = (rng.standard_normal((T, D)).astype(np.float32) for _ in range(2))
    xd, dyd = (rng.standard_normal((T * K, D)).astype(np.float32) for _ in range(2))
    moe = nn.MoE(D, F, E, gate="top_k", k=K, activation="gelu", seed=seed)
    ffn = nn.FeedForward(D, F, "gelu", seed=seed)
    times = {"moe": [], "dense": [], "dense (numpy)": []}
    with tm.use_backend("numpy"):
        for _ in range(2):
            _step(ffn, xd, dyd)
        times["dense (numpy)"] = [_step(ffn, xd, dyd) for _ in range(repeat)]
    tm.set_backend(backend)  # as a user does; the loop below never pauses
    for _ in range(3):
        _step(ffn, xd, dyd), _step(moe, x, dy)
    gc.disable()
    try:
        for _ in range(repeat):
            times["dense"].append(_step(ffn, xd, dyd))
            times["moe"].append(_step(moe, x, dy))
    finally:
        gc.enable()
    med = {key: statistics.median(v) for key, v in times.items()}
    return {"rows_per_expert": rows_per_expert, "tokens": T, "backend": backend,
            "median_s": med, "ratio": med["moe"] / med["dense"],
            "ratio_vs_numpy_dense": med["moe"] / med["dense (numpy)"],
            "seconds": times}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024], help="rows per expert")
    ap.add_argument("--backend", default="numba" if "numba" in tm.backends.available() else "numpy")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if args.backend == "numba":
        tm.backends.load("numba").warmup()
    rows = [measure(r, args.backend, args.repeat) for r in args.rows]
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"tm.nn.MoE (d {D}, f {F}, {E} experts, top-{K}) forward + backward in a user's loop, backend "
          f"{args.backend}, medians of {args.repeat}; load {load}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'rows/expert':>12}{'moe ms':>9}{'dense ms':>10}{'ratio':>7}{'dense(numpy) ms':>17}{'ratio':>7}")
    for row in rows:
        m = row["median_s"]
        print(f"{row['rows_per_expert']:>12}{1e3 * m['moe']:>9.1f}"
              f"{1e3 * m['dense']:>10.1f}{row['ratio']:>7.2f}{1e3 * m['dense (numpy)']:>17.1f}"
              f"{row['ratio_vs_numpy_dense']:>7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "load": load}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
