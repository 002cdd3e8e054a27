"""Expert parallelism: bytes each rank sends per MoE layer, and all-to-all vs compute time, for P = 1, 2, 4.

    python benchmarks/distributed.py                      # P = 1, 2, 4 on this machine (launches mpiexec itself)
    python benchmarks/distributed.py --ranks 1 2 --tokens 8192 --json out.json
    python benchmarks/distributed.py --model              # the α-β model's predictions for 8-64 ranks (no MPI)

One MoE layer (`ExpertParallelMoE`, top-k, dropless) forward + backward on a fixed global batch of `--tokens`
tokens split evenly over P ranks (strong scaling), float32, each rank's BLAS on one thread. A communicator wrapper
times every MPI call and counts the bytes each rank sends to *other* ranks. Per layer and step:

* bytes: dispatch + return in forward, their adjoints in backward; each moves T·k·d values per rank (T tokens on
  the rank), of which (P−1)/P leave the rank under uniform routing: model = 2·T·k·d·4 B·(P−1)/P per pass.
* a2a: wall time inside Alltoall/Alltoallv (forward and backward). A Barrier before every collective takes the
  waiting for the slowest rank out of it: that time is the `wait` column (load imbalance, a busy machine).
* allreduce: the global aux-loss statistics (a few values; latency only).
* compute: everything else in the layer (router, gate, gather, expert FFN, combine, and their adjoints).

Results and the α-β model for larger machines: benchmarks/README.md, "Expert parallelism".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


class TimedComm:
    """Wraps an mpi4py communicator: seconds spent and bytes sent off-rank, per kind of call."""

    def __init__(self, comm):
        self.comm = comm
        self.seconds = {"a2a": 0.0, "allreduce": 0.0, "wait": 0.0}
        self.bytes_off_rank = 0

    def _timed(self, kind, fn, *args, **kwargs):
        t = time.perf_counter()
        self.comm.Barrier()  # waiting for the slowest rank is counted apart from the transfer itself
        self.seconds["wait"] += time.perf_counter() - t
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[kind] += time.perf_counter() - t
        return out

    def Alltoallv(self, send, recv):
        buf, (counts, _) = send
        counts = np.asarray(counts)
        mine = self.comm.Get_rank()
        self.bytes_off_rank += int((counts.sum() - counts[mine]) * buf.itemsize)
        return self._timed("a2a", self.comm.Alltoallv, send, recv)

    def Alltoall(self, *args):
        return self._timed("a2a", self.comm.Alltoall, *args)

    def Allreduce(self, *args, **kwargs):
        return self._timed("allreduce", self.comm.Allreduce, *args, **kwargs)

    def allgather(self, *args):
        return self._timed("allreduce", self.comm.allgather, *args)

    def reset(self):
        self.seconds = {k: 0.0 for k in self.seconds}
        self.bytes_off_rank = 0

    def __getattr__(self, name):
        return getattr(self.comm, name)


def worker(args):
    """Runs on every rank under mpiexec; rank 0 prints one JSON line."""
    import tinymoe as tm
    from tinymoe.distributed import ExpertParallel, world

    comm = world()
    P, r = comm.Get_size(), comm.Get_rank()
    tm.set_backend(args.backend)
    T = args.tokens // P
    rng = np.random.default_rng(r)
    x = rng.standard_normal((T, args.d)).astype(np.float32)
    g = rng.standard_normal((T, args.d)).astype(np.float32)
    layer = tm.nn.MoE(args.d, args.f, args.experts, k=args.k, seed=0)
    timed = TimedComm(comm)
    ExpertParallel(layer, timed)
    runs = []
    for i in range(args.warmup + args.repeat):
        comm.Barrier()
        timed.reset()
        start = time.perf_counter()
        xt = tm.Tensor(x, requires_grad=True)
        y = layer(xt)
        fwd_bytes = timed.bytes_off_rank
        ((y * tm.Tensor(g)).sum() + layer.aux_loss()).backward()
        total = time.perf_counter() - start
        layer.zero_grad()
        run = {"total": total, "a2a": timed.seconds["a2a"], "allreduce": timed.seconds["allreduce"],
               "wait": timed.seconds["wait"],
               "bytes_fwd": fwd_bytes, "bytes_bwd": timed.bytes_off_rank - fwd_bytes}
        if i >= args.warmup:
            runs.append(run)
    mine = {k: float(np.median([run[k] for run in runs])) for k in runs[0]}
    every = comm.gather(mine, root=0)
    if r == 0:
        mean = {k: float(np.mean([m[k] for m in every])) for k in mine}
        model = 2 * T * args.k * args.d * 4 * (P - 1) / P
        print(json.dumps({"P": P, "tokens_per_rank": T, "d": args.d, "f": args.f, "E": args.experts, "k": args.k,
                          "backend": args.backend, "model_bytes_per_pass": model, "mean_over_ranks": mean,
                          "slowest_rank_total": max(m["total"] for m in every)}), flush=True)


def launch(args):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else "mpiexec"
    results = []
    for P in args.ranks:
        if args.experts % P:
            print(f"skip P={P}: E={args.experts} is not divisible by it", file=sys.stderr)
            continue
        cmd = [mpiexec, "-n", str(P), sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--d",
               str(args.d), "--f", str(args.f), "--experts", str(args.experts), "--k", str(args.k), "--repeat",
               str(args.repeat), "--warmup", str(args.warmup), "--backend", args.backend]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMBA_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if out.returncode:
            sys.exit(f"P={P} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"MoE layer fwd+bwd, {args.tokens} tokens in all, d={args.d}, f={args.f}, E={args.experts}, k={args.k}, "
          f"float32, backend {args.backend}, 1 BLAS thread per rank, {os.cpu_count()} CPUs; medians of "
          f"{args.repeat}, mean over ranks")
    print(f"{'P':>2} {'tok/rank':>8} {'sent fwd KiB':>12} {'sent bwd KiB':>12} {'model KiB':>9} {'layer ms':>9} "
          f"{'a2a ms':>7} {'a2a %':>6} {'allred ms':>9} {'wait ms':>8} {'compute ms':>10}")
    for res in results:
        m = res["mean_over_ranks"]
        compute = m["total"] - m["a2a"] - m["allreduce"] - m["wait"]
        print(f"{res['P']:>2} {res['tokens_per_rank']:>8} {m['bytes_fwd'] / 1024:>12.0f} {m['bytes_bwd'] / 1024:>12.0f} "
              f"{res['model_bytes_per_pass'] / 1024:>9.0f} {m['total'] * 1e3:>9.1f} {m['a2a'] * 1e3:>7.2f} "
              f"{100 * m['a2a'] / m['total']:>6.1f} {m['allreduce'] * 1e3:>9.2f} {m['wait'] * 1e3:>8.1f} "
              f"{compute * 1e3:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


# ---- the α-β model -------------------------------------------------------------------------------------------------
def alpha_beta(P, T, k, d, f, bytes_per_value, alpha, beta, flops):
    """Seconds per MoE layer and step (forward + backward) on P ranks, T tokens per rank.

    all-to-all (pairwise exchange, one message to each other rank): t = (P−1)·α + (P−1)/P · V / β with V = T·k·d·b
    bytes per rank; four of them per layer and step (dispatch, return, and their adjoints).
    compute: 3 · 4·T·k·d·f FLOPs (forward 4·T·k·d·f, backward twice that) at `flops` per second per rank.
    """
    volume = T * k * d * bytes_per_value
    a2a = 4 * ((P - 1) * alpha + (P - 1) / P * volume / beta)
    compute = 3 * 4 * T * k * d * f / flops
    return a2a, compute


SCENARIOS = [  # name, bytes per value, α (s), β (B/s), FLOP/s per rank
    ("CPU node, fp32, 100 Gb/s (RoCE/IB, α 3 µs), 1 TFLOP/s", 4, 3e-6, 12.5e9, 1e12),
    ("GPU, fp32 (no tensor cores), 100 Gb/s, CUDA-aware MPI, 50 TFLOP/s", 4, 5e-6, 12.5e9, 50e12),
    ("GPU, bf16, 100 Gb/s, NCCL, 400 TFLOP/s", 2, 5e-6, 12.5e9, 400e12),
    ("GPU, bf16, NVLink-class fabric (~300 GB/s per GPU), NCCL, 400 TFLOP/s", 2, 3e-6, 300e9, 400e12),
]


def model_table(T=8192, k=2, d=4096, f=14336):
    """Predictions for 8-64 ranks. Default shape: a Mixtral-8x7B-sized layer (d 4096, f 14336, top-2)."""
    lines = [f"α-β model, one MoE layer fwd+bwd, T={T} tokens per rank, k={k}, d={d}, f={f}",
             f"{'scenario':<72} " + " ".join(f"{'P=' + str(P):>15}" for P in (8, 16, 32, 64)) + "   crossover f*"]
    for name, b, alpha, beta, flops in SCENARIOS:
        cells = []
        for P in (8, 16, 32, 64):
            a2a, comp = alpha_beta(P, T, k, d, f, b, alpha, beta, flops)
            cells.append(f"{(a2a + comp) * 1e3:7.1f}ms {a2a / (a2a + comp):4.0%}")
        f_star = b * flops / (3 * beta)  # all-to-all = compute at f = f* (bandwidth term, P ≫ 1)
        lines.append(f"{name:<72} " + " ".join(f"{c:>15}" for c in cells) + f"   f*={f_star:,.0f}")
    lines.append("cell: predicted layer time and the all-to-all share; communication dominates when f < f* "
                 "(f* = b·F/(3β), independent of T and, for P ≫ 1, of P)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=4096, help="global batch, split over the ranks")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--model", action="store_true", help="print the α-β model's predictions and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model:
        print(model_table())
        print()
        print(model_table(T=4096, k=2, d=256, f=512))  # this benchmark's layer, on a real network
    elif args.worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
