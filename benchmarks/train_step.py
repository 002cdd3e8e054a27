"""A whole training step of MoETransformer: tinymoe (numpy and numba backends) against a PyTorch eager twin.

    python benchmarks/train_step.py                       # demo, medium and big configs
    python benchmarks/train_step.py --configs demo medium --repeat 7 --json results.json
    python benchmarks/train_step.py --no-torch --no-memory
    python benchmarks/train_step.py --configs demo medium --busy 1   # with one extra process spinning on a core

A step is what `tinymoe.train.fit` runs: forward, cross-entropy + the weighted auxiliary losses (load balance,
z-loss), backward, global-norm gradient clip (1.0), AdamW. The PyTorch twin has the same architecture (pre-norm
blocks, the same attention reshapes, top-2 routing with a softmax over the chosen logits, experts run on their
sorted rows, the same aux losses), the same parameter count and starts from the same weights; the script checks
that both compute the same first loss. PyTorch is optional (never a tinymoe dependency): without it the torch
columns are empty.

Timing: the contenders hold their own model and optimizer and take steps in turn (round-robin, one step each per
round, a short pause between contenders so one runtime's spinning worker threads have gone to sleep before the
next starts); the figure is the median over rounds, so a change of machine load shifts every contender alike.
The numba contender runs inside its session (held by `tm.use_backend`), as fit does. Every process uses --threads threads
(BLAS, numba, torch). Also reported per tinymoe contender: the expert FFN (forward + backward primitives) against
the bound its FLOPs allow at this process's sgemm rate (a (2048, 512)·(512, 2048) GEMM timed in every round), and
the optimizer (clip + AdamW) time of every contender.

Peak memory (--memory, on by default): each contender runs a few steps in a fresh subprocess; the number is the
growth of the peak resident set (VmHWM) over the resident set after building the model (MB).

--busy N starts N processes that spin on the CPUs for the timed part (not for the memory children): how each
contender degrades when another job keeps cores busy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import tinymoe as tm
import tinymoe.functional as F
from tinymoe.model import ModelConfig, MoETransformer
from tinymoe.optim import AdamW, clip_grad_norm

CONFIGS = {  # batch × seq_len tokens; every block is an MoE block
    "demo": dict(d_model=32, n_heads=4, d_ff=64, num_experts=8, k=2, n_layers=2, batch=64, seq_len=8),
    "medium": dict(d_model=256, n_heads=4, d_ff=1024, num_experts=8, k=2, n_layers=4, batch=32, seq_len=64),
    "big": dict(d_model=512, n_heads=8, d_ff=2048, num_experts=16, k=2, n_layers=4, batch=16, seq_len=128),
}
VOCAB = 16
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 1.0
CONTENDERS = ("numpy", "numba", "torch")


GPU_CONFIG = dict(d_model=512, n_heads=8, d_ff=2048, num_experts=8, k=2, n_layers=4, batch=32, seq_len=128)  # `gpu`


def _shape(name):
    return GPU_CONFIG if name == "gpu" else CONFIGS[name]


def model_config(name, seed=0) -> ModelConfig:
    c = _shape(name)
    return ModelConfig(vocab_size=VOCAB, max_seq_len=c["seq_len"], d_model=c["d_model"], n_layers=c["n_layers"],
                       n_heads=c["n_heads"], d_ff=c["d_ff"], num_experts=c["num_experts"], k=c["k"], moe_every=1,
                       gate="top_k", router="token", seed=seed)


def batches(name, count, seed=0):
    """`count` (tokens, targets) batches of random ids, the same for every contender."""
    c = _shape(name)
    rng = np.random.default_rng(seed + 1)
    return [(rng.integers(0, VOCAB, (c["batch"], c["seq_len"])), rng.integers(0, VOCAB, (c["batch"], c["seq_len"])))
            for _ in range(count)]


# ---------------------------------------------------------------------------------------------------- tinymoe
class FFNTimer:
    """Wraps a backend's expert_ffn / expert_ffn_backward to add up their time (and count their FLOPs)."""

    def __init__(self, module):
        self.module, self.seconds, self.flops = module, 0.0, 0.0
        self.original = (module.expert_ffn, module.expert_ffn_backward)

    def __enter__(self):
        fwd, bwd = self.original
        # FLOPs: 2·rows·d·f per GEMM; forward has two GEMMs, backward four (dW2, dh, dW1, dxs)
        expert_ffn = self._timed(fwd, lambda xs, offsets, w1, *_: 2.0 * xs.shape[0] * w1.shape[1] * w1.shape[2] * 2)
        expert_ffn_backward = self._timed(
            bwd, lambda dout, xs, h, offsets, w1, *_: 2.0 * xs.shape[0] * w1.shape[1] * w1.shape[2] * 4)
        self.module.expert_ffn, self.module.expert_ffn_backward = expert_ffn, expert_ffn_backward
        return self

    def __exit__(self, *exc):
        self.module.expert_ffn, self.module.expert_ffn_backward = self.original

    def _timed(self, fn, flops):
        """fn, adding its time to self.seconds and flops(*its positional arguments) to self.flops."""
        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds += time.perf_counter() - t0
            self.flops += flops(*args)
            return out

        return timed


class TinymoeRunner:
    def __init__(self, name, backend, seed=0):
        self.backend = backend
        with tm.use_backend(backend):
            self.model = MoETransformer(model_config(name, seed))
        self.opt = AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.ffn_seconds, self.ffn_flops, self.opt_seconds = [], [], []

    def step(self, tokens, targets) -> float:
        """One fit step; returns the loss."""
        module = tm.backends.load(self.backend)
        with tm.use_backend(self.backend), FFNTimer(module) as ffn:  # use_backend holds its session, as in fit
            logits = self.model(tokens)
            total = F.cross_entropy(logits, targets) + self.model.aux_loss()
            self.opt.zero_grad()
            total.backward()
            t0 = time.perf_counter()
            clip_grad_norm(self.model.parameters(), CLIP)
            self.opt.step()
            self.opt_seconds.append(time.perf_counter() - t0)
            loss = total.item()
        self.ffn_seconds.append(ffn.seconds)
        self.ffn_flops.append(ffn.flops)
        return loss


# ---------------------------------------------------------------------------------------------------- torch twin
class TorchRunner:
    """The same model in PyTorch eager, from the tinymoe model's weights (same layouts: x @ W + b)."""

    def __init__(self, name, seed=0):
        import torch

        self.torch = torch
        source = MoETransformer(model_config(name, seed))
        self.config = source.config
        self.p = {n: torch.nn.Parameter(torch.from_numpy(p.data.copy())) for n, p in source.named_parameters()}
        self.opt = torch.optim.AdamW(list(self.p.values()), lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-8)
        self.opt_seconds = []

    def num_parameters(self):
        return sum(p.numel() for p in self.p.values())

    def _linear(self, x, prefix):
        return x @ self.p[prefix + ".weight"] + self.p[prefix + ".bias"]

    def _layer_norm(self, x, prefix):
        return self.torch.nn.functional.layer_norm(x, x.shape[-1:], self.p[prefix + ".weight"],
                                                   self.p[prefix + ".bias"], 1e-5)

    def _attention(self, x, prefix):
        B, T, d = x.shape
        h = self.config.n_heads
        qkv = self._linear(x, prefix + ".qkv").reshape(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-1, -2)) * (1.0 / np.sqrt(d // h))).softmax(-1)
        return self._linear((att @ v).permute(0, 2, 1, 3).reshape(B, T, d), prefix + ".proj")

    def _moe(self, x, prefix):
        """Top-k routing, experts on their sorted rows, index_add_ back; returns (y, load_balance, z_loss)."""
        torch, tf = self.torch, self.torch.nn.functional
        E, k = self.config.num_experts, self.config.k
        w1, b1 = self.p[prefix + ".experts.w1"], self.p[prefix + ".experts.b1"]
        w2, b2 = self.p[prefix + ".experts.w2"], self.p[prefix + ".experts.b2"]
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        logits = self._linear(x, prefix + ".gate")  # (N, E)
        probs = logits.softmax(-1)
        top, idx = logits.topk(k, dim=-1)
        weights = top.softmax(-1)  # (N, k)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        tok = order // k
        xs = x[tok]
        outs, s = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                a = tf.gelu(torch.addmm(b1[e], xs[s:s + c], w1[e]), approximate="tanh")
                outs.append(torch.addmm(b2[e], a, w2[e]))
            s += c
        out = torch.cat(outs) * weights.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add_(0, tok, out)
        f = counts.to(x.dtype) / flat.numel()
        load_balance = (probs.mean(0) * f).sum() * E
        z_loss = (torch.logsumexp(logits, -1) ** 2).mean()
        return y.reshape(*lead, -1), load_balance, z_loss

    def step(self, tokens, targets) -> float:
        torch = self.torch
        tokens, targets = torch.from_numpy(tokens), torch.from_numpy(targets)
        T = tokens.shape[1]
        x = self.p["tok_emb.weight"][tokens] + self.p["pos_emb.weight"][torch.arange(T)]
        lbs, zs = [], []
        for i in range(self.config.n_layers):
            b = f"blocks.{i}"
            x = x + self._attention(self._layer_norm(x, b + ".ln1"), b + ".attn")
            y, lb, z = self._moe(self._layer_norm(x, b + ".ln2"), b + ".ffn")
            x = x + y
            lbs.append(lb)
            zs.append(z)
        logits = self._linear(self._layer_norm(x, "ln_f"), "head")
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        total = ce + 1e-2 * (sum(lbs) / len(lbs)) + 1e-3 * (sum(zs) / len(zs))
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(list(self.p.values()), CLIP)
        self.opt.step()
        self.opt_seconds.append(time.perf_counter() - t0)
        return total.item()


# ---------------------------------------------------------------------------------------------------- harness
def set_threads(threads):
    """Cap every BLAS, numba's pool and torch's at `threads` for this process."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")
    if "numba" in tm.backends.available():  # the backend first: it sets numba's OpenMP wait policy on import
        tm.backends.load("numba")
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)


def have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def make_runner(contender, name):
    return TorchRunner(name) if contender == "torch" else TinymoeRunner(name, contender)


def sgemm_rate(threads, tries=5):
    """FLOP/s of a (2048, 512) x (512, 2048) float32 GEMM at `threads` BLAS threads (best of `tries`)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2048, 512), np.float32), rng.standard_normal((512, 2048), np.float32)
    best = float("inf")
    with threadpool_limits(threads, user_api="blas"):
        for _ in range(tries):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2.0 * 2048 * 512 * 2048 / best


def time_config(name, contenders, repeat, warmup, settle, threads):
    runners = {c: make_runner(c, name) for c in contenders}
    data = batches(name, warmup + repeat)
    first = {c: r.step(*data[0]) for c, r in runners.items()}  # compiles numba kernels, checks the twin
    times = {c: [] for c in contenders}
    rates = []  # the sgemm rate, measured in every round beside the contenders (the machine's load moves)
    for i, (tokens, targets) in enumerate(data[1:]):
        for c, r in runners.items():
            time.sleep(settle)
            t0 = time.perf_counter()
            r.step(tokens, targets)
            if i >= warmup - 1:
                times[c].append(time.perf_counter() - t0)
        time.sleep(settle)
        rates.append(sgemm_rate(threads, tries=3))
    row = {"config": name, **CONFIGS[name], "first_loss": first, "seconds": times,
           "median_s": {c: statistics.median(t) for c, t in times.items()}, "sgemm_flops": statistics.median(rates)}
    params = {c: (r.num_parameters() if c == "torch" else r.model.num_parameters()) for c, r in runners.items()}
    row["parameters"] = params
    if "torch" in runners and len(first) > 1:
        ref = first["torch"]
        row["loss_rel_diff_vs_torch"] = {c: abs(v - ref) / abs(ref) for c, v in first.items() if c != "torch"}
    skip = warmup
    for c, r in runners.items():
        opt = statistics.median(r.opt_seconds[skip:])
        row.setdefault("optimizer_s", {})[c] = opt
        if c != "torch":
            row.setdefault("expert_ffn_s", {})[c] = statistics.median(r.ffn_seconds[skip:])
            row.setdefault("expert_ffn_flops", {})[c] = r.ffn_flops[-1]
    return row


def _vm_hwm_bytes():
    """This process's peak resident set (VmHWM in /proc/self/status). Not getrusage's ru_maxrss: that one is
    kept across fork + exec, so a child started by a big benchmark process reported the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@contextlib.contextmanager
def busy_processes(count):
    """`count` child processes that spin (`while 1: pass`) until the block ends: another job keeping cores busy."""
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def memory_child(contender, name, threads, steps=3):
    """Run in a subprocess: peak RSS growth over the RSS after building the model, in MB."""
    set_threads(threads)
    if contender == "numba":
        tm.backends.load("numba").warmup()
    runner = make_runner(contender, name)
    data = batches(name, steps)
    with open("/proc/self/statm") as fh:
        rss0 = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for tokens, targets in data:
        runner.step(tokens, targets)
    peak = _vm_hwm_bytes()
    return max(peak - rss0, 0) / 2**20


def peak_memory(contender, name, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", contender, name, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def format_rows(rows) -> str:
    lines = [f"{'config':<8}{'numpy ms':>10}{'numba ms':>10}{'torch ms':>10}{'np/torch':>10}{'nb/torch':>10}"
             f"{'nb/np':>8}{'ffn/bound np,nb':>17}{'opt ms np/nb/torch':>22}{'peak MB np/nb/torch':>22}"]
    for r in rows:
        m = r["median_s"]

        def ms(c):
            return f"{1e3 * m[c]:.1f}" if c in m else "-"

        def ratio(a, b):
            return f"{m[a] / m[b]:.2f}" if a in m and b in m else "-"

        bound = ",".join(f"{r['expert_ffn_s'][c] / (r['expert_ffn_flops'][c] / r['sgemm_flops']):.2f}"
                         for c in ("numpy", "numba") if c in r.get("expert_ffn_s", {}))
        opt = "/".join(f"{1e3 * r['optimizer_s'][c]:.1f}" if c in r["optimizer_s"] else "-" for c in CONTENDERS)
        mem = r.get("peak_mb", {})
        peak = "/".join(f"{mem[c]:.0f}" if mem.get(c) is not None else "-" for c in CONTENDERS)
        lines.append(f"{r['config']:<8}{ms('numpy'):>10}{ms('numba'):>10}{ms('torch'):>10}{ratio('numpy', 'torch'):>10}"
                     f"{ratio('numba', 'torch'):>10}{ratio('numba', 'numpy'):>8}{bound:>17}{opt:>22}{peak:>22}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per contender (default 15/5/3 by config)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--settle", type=float, default=0.3, help="pause (s) before each contender's step")
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="keep N extra processes spinning on the CPUs while timing (degrades-gracefully check)")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    ap.add_argument("--_memory-child", nargs=2, dest="memory_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(memory_child(*args.memory_child, args.threads))
        return 0
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json == "-" else print
    set_threads(args.threads)
    contenders = [c for c in CONTENDERS if c != "torch" or (args.torch and have_torch())]
    contenders = [c for c in contenders if c == "torch" or c in tm.backends.available()]
    if "numba" in contenders:
        tm.backends.load("numba").warmup()
    with open("/proc/loadavg") as fh:
        load_before = fh.read().split()[:3]
    rate = sgemm_rate(args.threads)
    rows = []
    for name in args.configs:
        repeat = args.repeat or {"demo": 15, "medium": 5, "big": 3}[name]
        with busy_processes(args.busy):
            row = time_config(name, contenders, repeat, args.warmup, args.settle, args.threads)
        row["busy_processes"] = args.busy
        if args.memory:
            row["peak_mb"] = {c: peak_memory(c, name, args.threads) for c in contenders}
        rows.append(row)
        log(f"{name}: " + ", ".join(f"{c} {1e3 * t:.1f} ms" for c, t in row["median_s"].items()))
    with open("/proc/loadavg") as fh:
        load_after = fh.read().split()[:3]
    busy = f", {args.busy} busy-loop processes while timing" if args.busy else ""
    log(f"\nthreads {args.threads}{busy}, sgemm {rate / 1e9:.1f} GFLOP/s at the start (ffn/bound uses each config's "
        f"rounds' median), load before {' '.join(load_before)}, after {' '.join(load_after)}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log(format_rows(rows))
    result = {"rows": rows, "threads": args.threads, "busy_processes": args.busy, "sgemm_flops": rate, "loadavg_before": load_before,
              "loadavg_after": load_after, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json:
        text = json.dumps(result, indent=1, default=float)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)
    return 0


# ---------------------------------------------------------------------------------------------------- the GPU (cupy)
# Issue 12's bar: a whole step of a d_model 512, 8-expert, 4-layer model on the GPU at least 10x faster than the
# numba backend's step on the 2-core CPU machine. `python benchmarks/train_step.py gpu [--json PATH]` times that step
# on the cupy backend (the model moved with model.to("cupy"), each batch moved once per step) and on numba in this
# process; a contender that cannot run here is skipped with the registry's reason.
def gpu_step_times(contender, steps, warmup, seed=0):
    """Seconds of fit's step (forward, cross-entropy + aux, backward, clip, AdamW) on GPU_CONFIG for `contender`:
    "cupy" (clocks read after a synchronize) or a host backend. Returns median_s, seconds and the first loss."""
    cfg, data = model_config("gpu", seed), batches("gpu", warmup + steps, seed)
    xp, sync = np, (lambda: None)
    if contender == "cupy":
        import cupy

        xp, sync = cupy, cupy.cuda.get_current_stream().synchronize
    times, losses = [], []
    with tm.use_backend(contender):  # holds the backend's session, as fit's
        model = MoETransformer(cfg)
        if contender == "cupy":
            model.to("cupy")
            tm.backends.load("cupy").warmup()
        opt = AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        for i, (tokens, targets) in enumerate(data):
            sync()
            t0 = time.perf_counter()
            tokens, targets = xp.asarray(tokens), xp.asarray(targets)  # the batch moved once per step
            total = F.cross_entropy(model(tokens), targets) + model.aux_loss()
            opt.zero_grad()
            total.backward()
            clip_grad_norm(model.parameters(), CLIP)
            opt.step()
            losses.append(total.item())  # the loss on the host, as fit reads it
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "seconds": times, "first_loss": losses[0]}


def gpu_main(argv=None):
    ap = argparse.ArgumentParser(prog="train_step.py gpu", description="A whole training step of the d512 / E8 / "
                                 "4-layer model on the cupy backend (GPU) beside the numba backend.")
    ap.add_argument("--steps", type=int, default=20, help="timed cupy steps")
    ap.add_argument("--numba-steps", type=int, default=3, help="timed numba steps (0: skip numba)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    result = {"config": GPU_CONFIG, "threads": args.threads, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for contender, steps in (("cupy", args.steps), ("numba", args.numba_steps)):
        if steps <= 0:
            continue
        if contender not in tm.backends.available():
            result[contender] = {"skipped": tm.backends.unavailable().get(contender, "not available")}
        else:
            result[contender] = gpu_step_times(contender, steps, args.warmup)
        r = result[contender]
        print(f"{contender}: " + (f"skipped ({r['skipped']})" if "skipped" in r else
                                  f"{1e3 * r['median_s']:.1f} ms per step (first loss {r['first_loss']:.4f})"))
    if "median_s" in result.get("cupy", {}) and "median_s" in result.get("numba", {}):
        result["numba_over_cupy"] = result["numba"]["median_s"] / result["cupy"]["median_s"]
        print(f"numba / cupy: {result['numba_over_cupy']:.1f}x (the bar: >= 10x against numba on the 2-core CPU "
              f"machine; this numba ran on {args.threads} threads here)")
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(gpu_main(sys.argv[2:]) if sys.argv[1:2] == ["gpu"] else main())
