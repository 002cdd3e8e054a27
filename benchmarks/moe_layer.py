"""Benchmark of the MoE hot path against its dense equivalent: `tinymoe bench`, `make bench`, or
`python -m benchmarks.moe_layer` from the repository root. The model behind the numbers is in docs/design.md §6.

What is timed, per backend and shape (T tokens, width d, FFN width f, E experts, top-k), float32, one fixed
top-k routing drawn once (k distinct experts per token, uniformly: ~T·k/E rows each):

* **MoE** — the backend's primitives, as `tinymoe.moe_ops` calls them in a training step:
  forward  = route + gather + expert_ffn + combine,
  backward = combine_backward + expert_ffn_backward + gather_backward.
* **dense** — the dense-equivalent FFN: the same FFN (same f, same activation, same dtype, same biases) with one
  weight matrix, applied to T·k rows with np.dot in this process, written like the reference expert FFN
  (backward recomputes the activation from the saved pre-activation, as every backend does).
  It costs 4·T·k·d·f FLOPs forward, ×3 forward+backward — exactly what the MoE layer costs (`dense_flops`).
  GELU here is `bench.gelu`: the formula of tinymoe.activations.gelu with in-place NumPy and h·h·h, never h**3
  (NumPy's float32 power is ~200× slower than a product and would dominate the dense time, flattering every
  ratio), so the yardstick is the best plain-NumPy FFN whatever the library's activation code does.

Each contender in turn (dense, numpy, the backends, torch, ...) sleeps `--settle` seconds, runs `--warmup` times,
then `--repeat` timed runs; each run records its forward and backward time, and every number below is a median
over the timed runs. Contenders are not interleaved run by run on purpose: OpenBLAS and OpenMP worker threads
busy-wait for a while after a parallel region (OpenBLAS ~2^28 cycles), so the threads of one runtime (scipy's
OpenBLAS under numba, numba's OpenMP pool, torch's) would steal the cores from the next contender on a small
machine — that made the dense baseline up to 5× slower on 2 cores before the settle pause.

The numbers (table column -> JSON key):

* `fwd`, `f+b` (ratio_fwd, ratio_fwdbwd): MoE time / dense-equivalent time. The promise of MoE is ≈ 1, flat in E.
* `/tb` (tbound_ratio_fwd, tbound_ratio_fwdbwd): MoE time / t_bound, where (docs/design.md §6)
      t_bound = max(FLOPs / P_dense, (E·weight_bytes + activation_bytes) / copy_bandwidth)
  P_dense = FLOPs / dense time (measured here, so FLOPs / P_dense is the dense time itself); copy_bandwidth is
  a large single-threaded np.copyto counted STREAM-style (read + written bytes / s); weight_bytes is one
  expert's W1, b1, W2, b2 (×3 for forward+backward: read forward, read again backward, gradient written);
  activation_bytes is x, y, the dispatched rows xs and out, and the saved pre-activation h, each moved once
  (×2 for forward+backward). With few rows per expert the layer must stream E weight matrices and the bound
  rises above the dense time; at ≥ 256 rows/expert it is the dense time and `/tb` equals the ratio.
* `disp%` (dispatch_share_fwd / _fwdbwd): (route + gather + combine [+ their adjoints]) / MoE time.
* `vs np` (vs_numpy_*): backend time / the NumPy reference backend's time on the same shape and data.
* `vs torch` (vs_torch_*): backend time / an idiomatic PyTorch CPU MoE layer (loop over experts, index_select,
  index_add_, autograd backward), same threads, when `import torch` works (never a dependency).
* `err` (rel_err_vs_numpy): max over y, dx, dweights, dW1, dW2 of max|backend − numpy| / max|numpy|.
* `*` after the backend (cpu_busy_by_others): other processes kept > 15 % of the CPUs busy just before some
  contender of that row ran (sampled from /proc/stat during the settle pause): the row is noisy.
* `--layer` adds the whole `tm.nn.MoE` (gate, aux losses, autodiff graph) against `tm.nn.FeedForward` on T·k
  rows: layer_ratio_* (framework overhead included) and layer_overhead_* (layer / hot-path MoE time).

Threads: `--threads N` (default: the CPUs this process may use) caps BLAS with threadpoolctl for the whole run
(the dense baseline and every backend see the same BLAS), and sets numba's and torch's thread counts when they
are loaded. A backend may still pin BLAS lower inside its own kernels (one BLAS thread per expert
under prange). The summary compares with the Numba-CPU targets of docs/design.md §6.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from tinymoe import backends
from tinymoe.activations import get_activation
from tinymoe.arrays import to_host

DTYPE = np.float32
STAGES_FWD = ("route", "gather", "expert_ffn", "combine")
STAGES_BWD = ("combine_backward", "expert_ffn_backward", "gather_backward")
DISPATCH_STAGES = ("route", "gather", "combine", "combine_backward", "gather_backward")
# the targets for a CPU backend (docs/design.md §6, the Numba-CPU column)
TARGETS = {"ratio_fwd": 1.10, "tbound_ratio_fwd": 1.15, "ratio_fwdbwd": 1.15, "e_growth": 1.2, "dispatch": 0.03,
           "rel_err": 1e-5}
NOISY = 0.15  # share of the CPUs busy with other work before a contender ran, above which a row is flagged "!"
MANY_ROWS = 256  # "≥ 256 rows/expert": the regime where the ratio targets apply


# ---- shapes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    T: int  # tokens
    d: int  # model width
    f: int  # FFN width
    E: int  # experts
    k: int  # experts per token

    @property
    def rows_per_expert(self):
        return self.T * self.k / self.E

    def __str__(self):
        return f"{self.T},{self.d},{self.f},{self.E},{self.k}"


MODEL_SHAPES = [Shape(4096, 512, 2048, 8, 2), Shape(2048, 256, 1024, 16, 2), Shape(8192, 256, 512, 32, 2),
               Shape(1024, 512, 1024, 64, 4)]  # the shapes docs/design.md §6 reports
E_SWEEP = [Shape(8192, 256, 512, E, 2) for E in (4, 8, 16, 32, 64)]  # T·k = 16384 fixed: 4096..256 rows/expert
QUICK_SHAPES = [Shape(256, 32, 64, 4, 2), Shape(128, 32, 64, 8, 2)]  # smoke test: 128 and 32 rows/expert
STANDARD_SHAPES = [MODEL_SHAPES[1], MODEL_SHAPES[3]]  # 256 and 64 rows/expert: about a minute on 2 cores
SHAPE_SETS = {"quick": QUICK_SHAPES, "standard": STANDARD_SHAPES,
              "full": MODEL_SHAPES + [s for s in E_SWEEP if s not in MODEL_SHAPES]}  # full: ~9 minutes on 2 cores

LEGEND = """columns (forward / forward+backward where a column shows two numbers):
  rows/E     token-expert assignments per expert, T·k/E (below ~256 the layer streams E weight matrices)
  MoE/dense  MoE layer time / the dense-equivalent FFN on the same T·k rows (1.00 = the promise of MoE)
  /bound     MoE layer time / t_bound, the least time its FLOPs and its weight + activation bytes allow
  dispatch%  share of the MoE time spent routing, gathering and combining (and their adjoints)
  vs numpy   this backend's time / the NumPy reference backend's time (below 1 = faster)
  vs torch   this backend's time / an idiomatic PyTorch MoE layer's time (empty without torch)
  err        largest relative difference from the NumPy reference over y and every gradient
  *          after the backend: other processes kept the CPUs busy during that row, so it is noisy"""


# ---- the physics (docs/design.md §6) ------------------------------------------------------------------------------
def dense_flops(T, k, d, f, backward=False):
    """FLOPs of the FFN on T·k rows: 2 GEMMs of 2·(T·k)·d·f forward = 4·T·k·d·f; backward adds 2× that."""
    return 4 * T * k * d * f * (3 if backward else 1)


def expert_weight_bytes(d, f, itemsize=4):
    """Bytes of one expert's W1 (d, f), b1 (f), W2 (f, d), b2 (d)."""
    return (2 * d * f + f + d) * itemsize


def activation_bytes(T, k, d, f, itemsize=4, backward=False):
    """Activation traffic, each array moved once: x and y (T, d), xs and out (T·k, d), h (T·k, f); ×2 with backward
    (dy, dx, dout, dxs and h again)."""
    once = (2 * T * d + 2 * T * k * d + T * k * f) * itemsize
    return once * (2 if backward else 1)


def t_bound(flops, p_dense, num_experts, weight_bytes, act_bytes, copy_bandwidth):
    """t_bound = max(FLOPs / P_dense, (E·weight_bytes + activation_bytes) / copy_bandwidth), in seconds.

    flops in FLOP, p_dense in FLOP/s, bytes in bytes, copy_bandwidth in bytes/s.
    """
    return max(flops / p_dense, (num_experts * weight_bytes + act_bytes) / copy_bandwidth)


def bound_columns(shape, mode, backward, m, dense, itemsize, copy_bandwidth) -> dict:
    """One mode's ("fwd" or "fwdbwd") columns of a result row: the MoE and dense times and their ratio, the
    dense-equivalent FLOPs and the rate P_dense they ran at, t_bound and the ratios against it, and the dispatch
    stages' time and share. m, dense: median seconds per stage/mode of the MoE backend and of the dense baseline."""
    flops = dense_flops(shape.T, shape.k, shape.d, shape.f, backward=backward)
    p_dense = flops / dense[mode]
    wbytes = expert_weight_bytes(shape.d, shape.f, itemsize) * (3 if backward else 1)
    abytes = activation_bytes(shape.T, shape.k, shape.d, shape.f, itemsize, backward=backward)
    tb = t_bound(flops, p_dense, shape.E, wbytes, abytes, copy_bandwidth)
    dispatch_s = sum(m[s] for s in (DISPATCH_STAGES if backward else DISPATCH_STAGES[:3]))
    return {f"moe_{mode}_s": m[mode], f"dense_{mode}_s": dense[mode], f"ratio_{mode}": m[mode] / dense[mode],
            f"flops_{mode}": flops, f"p_dense_{mode}": p_dense, f"t_bound_{mode}_s": tb,
            f"bound_ratio_{mode}": tb / dense[mode], f"tbound_ratio_{mode}": m[mode] / tb,
            f"dispatch_{mode}_s": dispatch_s, f"dispatch_share_{mode}": dispatch_s / m[mode]}


def measure_copy_bandwidth(nbytes=128 * 2**20, repeat=5):
    """Bytes/s of a large np.copyto (single-threaded), counted STREAM-style: read + written bytes."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times)


# ---- the problem -------------------------------------------------------------------------------------------------
def make_problem(shape: Shape, seed=0):
    """Inputs for one shape: a fixed uniform top-k routing, expert weights, and the dense-equivalent's weights."""
    T, d, f, E, k = shape.T, shape.d, shape.f, shape.E, shape.k
    rng = np.random.default_rng(seed)

    def uniform(shape_, scale):
        return ((rng.random(shape_, dtype=DTYPE) * 2 - 1) * DTYPE(scale)).astype(DTYPE, copy=False)

    expert_idx = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int64)  # k distinct experts per token
    weights = rng.random((T, k)) + 0.5
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(DTYPE)  # like a renormalised top-k softmax
    return dict(
        x=rng.standard_normal((T, d), dtype=DTYPE), dy=rng.standard_normal((T, d), dtype=DTYPE),
        expert_idx=expert_idx, weights=weights,
        w1=uniform((E, d, f), 1 / math.sqrt(d)), b1=uniform((E, f), 0.1),
        w2=uniform((E, f, d), 1 / math.sqrt(f)), b2=uniform((E, d), 0.1),
        # the dense equivalent: one FFN on T·k rows
        xd=rng.standard_normal((T * k, d), dtype=DTYPE), dyd=rng.standard_normal((T * k, d), dtype=DTYPE),
        W1=uniform((d, f), 1 / math.sqrt(d)), B1=uniform((f,), 0.1),
        W2=uniform((f, d), 1 / math.sqrt(f)), B2=uniform((d,), 0.1),
    )


# ---- one timed run of each contender: returns ({stage or "fwd"/"bwd": seconds}, outputs) ---------------------------
def run_moe(be, p, num_experts, activation):
    """The hot path of one training step on backend module `be`, each primitive timed."""
    k, T = p["expert_idx"].shape[1], p["expert_idx"].shape[0]
    c = [time.perf_counter()]
    order, offsets, inverse = be.route(p["expert_idx"], num_experts, None)
    c.append(time.perf_counter())
    xs = be.gather(p["x"], order, k)  # (T·k, d)
    c.append(time.perf_counter())
    out, h = be.expert_ffn(xs, offsets, p["w1"], p["b1"], p["w2"], p["b2"], activation)
    c.append(time.perf_counter())
    y = be.combine(out, p["weights"], inverse)  # (T, d)
    c.append(time.perf_counter())
    dout, dweights = be.combine_backward(p["dy"], out, p["weights"], inverse)
    c.append(time.perf_counter())
    dxs, dw1, _, dw2, _ = be.expert_ffn_backward(dout, xs, h, offsets, p["w1"], p["w2"], activation)
    c.append(time.perf_counter())
    dx = be.gather_backward(dxs, inverse, k, T)
    c.append(time.perf_counter())
    times = {name: c[i + 1] - c[i] for i, name in enumerate(STAGES_FWD + STAGES_BWD)}
    times["fwd"], times["bwd"] = c[4] - c[0], c[7] - c[4]
    return times, dict(y=y, dx=dx, dweights=dweights, dw1=dw1, dw2=dw2)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(h):
    """tinymoe.activations.gelu (tanh form) in in-place NumPy: h·h·h, not h**3, which NumPy computes with powf,
    ~60 ns per element against ~0.3 for a product — it would make the yardstick slow, not the MoE fast."""
    t = h * h
    t *= h
    t *= 0.044715
    t += h
    t *= _GELU_C
    np.tanh(t, out=t)
    t += 1
    t *= h
    t *= 0.5
    return t


def gelu_grad(h):
    """tinymoe.activations.gelu_grad, written like `gelu` above."""
    h2 = h * h
    t = h2 * 0.044715
    t += 1
    t *= h
    t *= _GELU_C
    np.tanh(t, out=t)  # tanh(c·(h + 0.044715·h³))
    d = 1 - t * t
    d *= h
    h2 *= 3 * 0.044715
    h2 += 1
    d *= h2
    d *= _GELU_C  # h·(1 − t²)·c·(1 + 3·0.044715·h²)
    d += 1
    d += t
    d *= 0.5
    return d


def dense_activation(name):
    """(act, act_grad) for the dense equivalent: the same functions as tinymoe.activations, GELU written fast."""
    return (gelu, gelu_grad) if name == "gelu" else get_activation(name)


def run_dense(p, activation):
    """The dense-equivalent FFN on T·k rows, the same arithmetic as one expert of the reference expert_ffn."""
    act, act_grad = dense_activation(activation)
    x, W1, W2, dy = p["xd"], p["W1"], p["W2"], p["dyd"]
    t0 = time.perf_counter()
    h = np.dot(x, W1)  # (T·k, f), biases added in place: the best plain NumPy, not the most literal
    h += p["B1"]
    out = np.dot(act(h), W2)  # (T·k, d)
    out += p["B2"]
    t1 = time.perf_counter()
    a = act(h)  # recomputed from the saved pre-activation, as the backends do
    _dW2, _db2 = np.dot(a.T, dy), dy.sum(axis=0)
    dh = np.dot(dy, W2.T)
    dh *= act_grad(h)
    _dW1, _db1 = np.dot(x.T, dh), dh.sum(axis=0)
    _dx = np.dot(dh, W1.T)
    t2 = time.perf_counter()
    return {"fwd": t1 - t0, "bwd": t2 - t1}, None


class TorchMoE:
    """An idiomatic PyTorch MoE layer (as in HF Mixtral): experts as separate parameters; per expert, select its
    tokens, index_select, FFN, index_add_ the weighted output; backward by autograd. Also the same FFN dense on T·k
    rows (`run_dense`). device "cuda": the same on the GPU (eager CUDA, clocks read after a synchronize)."""

    def __init__(self, p, num_experts, activation, threads, device="cpu"):
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        self.torch, self.E, self.device = torch, num_experts, device
        self.act = {"gelu": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "silu": F.silu}[activation]

        def t(a, grad=True):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device).requires_grad_(grad)

        self.x, self.weights, self.dy = t(p["x"]), t(p["weights"]), t(p["dy"], False)
        # one leaf tensor per expert weight, like nn.ModuleList([Expert() ...]): indexing a stacked (E, d, f)
        # parameter as w1[e] in the loop would make autograd build E full-size (E, d, f) gradients
        self.experts = [tuple(t(p[key][e]) for key in ("w1", "b1", "w2", "b2")) for e in range(num_experts)]
        self.expert_idx = t(p["expert_idx"], False)
        self.xd, self.dyd = t(p["xd"]), t(p["dyd"], False)
        self.W1, self.B1, self.W2, self.B2 = t(p["W1"]), t(p["B1"]), t(p["W2"]), t(p["B2"])

    def _zero(self, *tensors):
        for tensor in tensors:
            tensor.grad = None

    def _clock(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def run(self):
        torch = self.torch
        self._zero(self.x, self.weights, *(w for expert in self.experts for w in expert))
        T, k = self.expert_idx.shape
        t0 = self._clock()
        flat_e = self.expert_idx.reshape(-1)  # (T·k,)
        flat_w = self.weights.reshape(-1)
        y = torch.zeros_like(self.x)
        for e in range(self.E):
            sel = torch.nonzero(flat_e == e).squeeze(1)  # assignments t·k + j routed to e
            if sel.numel() == 0:
                continue
            tok = torch.div(sel, k, rounding_mode="floor")
            w1, b1, w2, b2 = self.experts[e]
            h = torch.addmm(b1, self.x.index_select(0, tok), w1)
            out = torch.addmm(b2, self.act(h), w2)
            y.index_add_(0, tok, out * flat_w.index_select(0, sel)[:, None])
        t1 = self._clock()
        y.backward(self.dy)
        t2 = self._clock()
        return {"fwd": t1 - t0, "bwd": t2 - t1}, dict(y=y.detach().cpu().numpy(), dx=self.x.grad.cpu().numpy())

    def run_dense(self):
        torch = self.torch
        self._zero(self.xd, self.W1, self.B1, self.W2, self.B2)
        t0 = self._clock()
        out = torch.addmm(self.B2, self.act(torch.addmm(self.B1, self.xd, self.W1)), self.W2)
        t1 = self._clock()
        out.backward(self.dyd)
        t2 = self._clock()
        return {"fwd": t1 - t0, "bwd": t2 - t1}, None


class Layer:
    """The whole framework: tm.nn.MoE (gate + aux losses + autodiff) vs tm.nn.FeedForward on T·k rows."""

    def __init__(self, name, shape: Shape, p, activation):
        from tinymoe import nn
        from tinymoe.engine import Tensor

        self.name, self.Tensor = name, Tensor
        self.moe = nn.MoE(shape.d, shape.f, shape.E, gate="top_k", k=shape.k, activation=activation, seed=0)
        self.ffn = nn.FeedForward(shape.d, shape.f, activation, seed=0)
        self.p = p

    def _time(self, module, x, dy):
        module.zero_grad()
        x = self.Tensor(x, requires_grad=True)
        t0 = time.perf_counter()
        y = module(x)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        return {"fwd": t1 - t0, "bwd": t2 - t1}, None

    def run_moe(self):
        # use_backend holds the backend's session, as fit() runs it (numba: NumPy's BLAS on one thread, the dense
        # products on numba's threads, so no busy-waiting OpenBLAS worker sits on the expert kernels' cores)
        with backends.use_backend(self.name):
            return self._time(self.moe, self.p["x"], self.p["dy"])

    def run_dense(self):
        return self._time(self.ffn, self.p["xd"], self.p["dyd"])


# ---- helpers -----------------------------------------------------------------------------------------------------
def rel_err(got, ref):
    """max over arrays of max|got − ref| / max|ref|."""
    return max(float(np.max(np.abs(np.asarray(got[key], np.float64) - ref[key])) / max(np.max(np.abs(ref[key])), 1e-30))
               for key in got if key in ref)


def _timed(fn):
    """One run with the garbage collector held off."""
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


def _median_times(runs):
    """[{stage: s}, ...] -> {stage: median s}, plus fwdbwd = fwd + bwd."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    out["fwdbwd"] = statistics.median(r["fwd"] + r["bwd"] for r in runs)
    return out


def resolve_backends(names):
    """(runnable: {name: module}, skipped: {name: reason}); unknown names raise ValueError.

    With no names: every backend that `tm.backends.available()` lists. A backend runs only when it loads and has
    every primitive of `tm.backends.PRIMITIVES`; the others are skipped with the reason.
    """
    known = set(backends.available()) | set(backends.unavailable())
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known backends are {sorted(known)}")
    runnable, skipped = {}, {}
    for name in dict.fromkeys(names or backends.available()):
        try:
            module = backends.load(name)
        except Exception as e:  # unavailable, or a half-written backend that fails to import
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        missing = [prim for prim in backends.PRIMITIVES if not callable(getattr(module, prim, None))]
        if missing:
            skipped[name] = f"incomplete: missing primitives {missing}"
        else:
            runnable[name] = module
    return runnable, skipped


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads, blas_info):
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    info = dict(python=platform.python_version(), platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
                cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                numpy=np.__version__, numba=_version("numba"), scipy=_version("scipy"), torch=_version("torch"),
                threads=threads, blas=blas_info, OPENBLAS_CORETYPE=os.environ.get("OPENBLAS_CORETYPE"),
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), loadavg_start=_loadavg(),
                cpu_busy_by_others_start=cpu_busy_by_others())
    if "numba" in sys.modules:
        info["numba_threads"] = sys.modules["numba"].get_num_threads()
    return info


@contextlib.contextmanager
def blas_threads(n):
    """Cap BLAS at n threads for the whole run; yields what threadpoolctl saw (or a note when it is missing)."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        yield [{"note": "threadpoolctl not installed: BLAS threads left at their default"}]
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield [{key: lib.get(key) for key in ("internal_api", "version", "num_threads", "architecture")}
               for lib in threadpool_info() if lib.get("user_api") == "blas"]


def describe_blas(info) -> str:
    """threadpoolctl's BLAS records as one readable phrase, e.g. "openblas 0.3.31 (SkylakeX kernels, 2 threads)"."""
    parts = []
    for lib in info:
        if "note" in lib:
            parts.append(lib["note"])
            continue
        arch = f"{lib['architecture']} kernels, " if lib.get("architecture") else ""
        parts.append(f"{lib.get('internal_api')} {lib.get('version') or ''} ({arch}{lib.get('num_threads')} threads)")
    return "; ".join(parts) or "none found"


def _loadavg():
    """1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_busy_by_others(seconds=0.25):
    """Share of all CPUs busy while this process sleeps `seconds` (from /proc/stat; None elsewhere).

    Other work on a small machine skews every timing; this says how much there was when the run began.
    """
    def sample():
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- the benchmark -----------------------------------------------------------------------------------------------
def bench_shape(shape, modules, *, repeat, warmup, activation, torch_on, layer, threads, copy_bw, machine,
                settle=0.3):
    """Every contender on one shape; one result dict per backend in `modules`."""
    p = make_problem(shape)
    ref_module = backends.load("numpy")
    contenders = {"dense": lambda: run_dense(p, activation)}
    for name, module in {"numpy": ref_module, **modules}.items():
        contenders[name] = lambda m=module: run_moe(m, p, shape.E, activation)
    torch_moe = TorchMoE(p, shape.E, activation, threads) if torch_on else None
    if torch_moe is not None:
        contenders["torch"], contenders["torch_dense"] = torch_moe.run, torch_moe.run_dense
    if layer:
        layers = {name: Layer(name, shape, p, activation) for name in modules}
        contenders["layer_dense"] = next(iter(layers.values())).run_dense
        for name, lay in layers.items():
            contenders[f"layer:{name}"] = lay.run_moe

    outputs, runs, busy = {}, {}, {}
    for key, fn in contenders.items():  # one contender at a time, after the previous one's threads went idle
        time.sleep(settle / 2)
        busy[key] = cpu_busy_by_others(settle / 2)  # what else runs on the machine now
        for _ in range(warmup):  # compiles JIT kernels, faults pages in
            fn()
        runs[key] = []
        for _ in range(repeat):
            times, outputs[key] = _timed(fn)  # the outputs of the last run feed the error check
            runs[key].append(times)
    med = {key: _median_times(r) for key, r in runs.items()}

    itemsize = np.dtype(DTYPE).itemsize
    dense = med["dense"]
    rows = []
    for name in modules:
        m, ref = med[name], med["numpy"]
        row = dict(backend=name, shape=str(shape), T=shape.T, d=shape.d, f=shape.f, E=shape.E, k=shape.k,
                   rows_per_expert=shape.rows_per_expert, dtype=np.dtype(DTYPE).name, activation=activation,
                   repeat=repeat, warmup=warmup, settle_s=settle,
                   copy_bandwidth=copy_bw)
        for mode, bwd in (("fwd", False), ("fwdbwd", True)):
            row.update(bound_columns(shape, mode, bwd, m, dense, itemsize, copy_bw))
            row.update({f"numpy_{mode}_s": ref[mode], f"vs_numpy_{mode}": m[mode] / ref[mode]})
            if "torch" in med:
                row.update({f"torch_{mode}_s": med["torch"][mode], f"vs_torch_{mode}": m[mode] / med["torch"][mode],
                            f"torch_dense_{mode}_s": med["torch_dense"][mode]})
            if f"layer:{name}" in med:
                lay, lay_dense = med[f"layer:{name}"][mode], med["layer_dense"][mode]
                row.update({f"layer_{mode}_s": lay, f"layer_dense_{mode}_s": lay_dense,
                            f"layer_ratio_{mode}": lay / lay_dense, f"layer_overhead_{mode}": lay / m[mode]})
        row["stage_s"] = {s: m[s] for s in STAGES_FWD + STAGES_BWD}
        row["rel_err_vs_numpy"] = 0.0 if name == "numpy" else rel_err(outputs[name], outputs["numpy"])
        if "torch" in outputs:
            row["torch_rel_err_vs_numpy"] = rel_err(outputs["torch"], outputs["numpy"])
        row["cpu_busy_by_others"] = busy  # per contender, just before it ran: > 0.1 means other load
        row["times_s"] = {key: [dict(r) for r in runs[key]] for key in runs}  # every raw run, every contender
        row["machine"] = machine
        rows.append(row)
    return rows


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _noisy(row):
    """Whether other processes kept the CPUs busy just before any contender of this row ran."""
    return any((share or 0) > NOISY for share in row.get("cpu_busy_by_others", {}).values())


def format_table(rows, skipped):
    """One line per backend × shape."""
    layer = any("layer_ratio_fwd" in r for r in rows)
    head = (f"{'backend':8} {'T,d,f,E,k':22} {'rows/E':>6} {'MoE/dense':>11} {'/bound':>11} "
            f"{'dispatch%':>11} {'vs numpy':>11} {'vs torch':>11} {'err':>7}"
            + (f" {'layer/FFN':>13}" if layer else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        def pair(key, spec=".2f", scale=1):  # "forward/forward+backward"
            return "/".join(_fmt(None if r.get(f"{key}_{m}") is None else r[f"{key}_{m}"] * scale, spec)
                            for m in ("fwd", "fwdbwd"))

        line = (f"{r['backend'] + ('*' if _noisy(r) else ''):8} {r['shape']:22} {r['rows_per_expert']:6.0f} "
                f"{pair('ratio'):>11} {pair('tbound_ratio'):>11} "
                f"{pair('dispatch_share', '.1f', 100):>11} {pair('vs_numpy'):>11} {pair('vs_torch'):>11} "
                f"{r['rel_err_vs_numpy']:7.1e}")
        if layer:
            line += f" {pair('layer_ratio'):>13}"
        lines.append(line)
    for name, why in skipped.items():
        lines.append(f"{name:8} skipped: {why}")
    if any(_noisy(r) for r in rows):
        lines.append(f"* other processes kept > {NOISY:.0%} of the CPUs busy just before some contender ran: noisy")
    lines.append(LEGEND + ("\n  layer/FFN  the whole tm.nn.MoE (gate, aux losses, autodiff) / tm.nn.FeedForward on T·k rows"
                           if layer else ""))
    return "\n".join(lines)


def targets_summary(rows):
    """One line per backend: the Numba-CPU targets, met or missed, on the shapes measured."""
    lines = []
    for name in dict.fromkeys(r["backend"] for r in rows):
        rs = [r for r in rows if r["backend"] == name]
        many = [r for r in rs if r["rows_per_expert"] >= MANY_ROWS]
        few = [r for r in rs if r["rows_per_expert"] < MANY_ROWS]
        parts = []

        def check(label, shown, target, ok):
            parts.append(f"{label} {shown} ({'ok' if ok else 'MISS'} vs {target})")

        if many:
            v = max(r["ratio_fwd"] for r in many)
            check("fwd≥256r", f"{v:.2f}", f"≤{TARGETS['ratio_fwd']}", v <= TARGETS["ratio_fwd"])
            v = max(r["ratio_fwdbwd"] for r in many)
            check("f+b≥256r", f"{v:.2f}", f"≤{TARGETS['ratio_fwdbwd']}", v <= TARGETS["ratio_fwdbwd"])
        if few:
            v = max(r["tbound_ratio_fwd"] for r in few)
            check("fwd/t_bound<256r", f"{v:.2f}", f"≤{TARGETS['tbound_ratio_fwd']}", v <= TARGETS["tbound_ratio_fwd"])
        sweep = {r["E"]: r for r in many if (r["T"], r["d"], r["f"], r["k"]) == (8192, 256, 512, 2)}
        if 4 in sweep and 64 in sweep:
            v = sweep[64]["ratio_fwd"] / sweep[4]["ratio_fwd"]
            check("E4→64 growth", f"{v:.2f}×", f"≤{TARGETS['e_growth']}×", v <= TARGETS["e_growth"])
        v = max(r["dispatch_share_fwdbwd"] for r in rs)
        check("dispatch", f"{v:.1%}", f"≤{TARGETS['dispatch']:.0%}", v <= TARGETS["dispatch"])
        if all("vs_torch_fwd" in r for r in rs):
            v = max(max(r["vs_torch_fwd"], r["vs_torch_fwdbwd"]) for r in rs)
            check("vs torch", f"{v:.2f}", "<1 = faster", v < 1)
        if name != "numpy":
            v = max(r["rel_err_vs_numpy"] for r in rs)
            check("err", f"{v:.1e}", f"≤{TARGETS['rel_err']:g}", v <= TARGETS["rel_err"])
        lines.append(f"targets [{name}]: " + "; ".join(parts))
    return "\n".join(lines)


# ---- the GPU (cupy backend) ---------------------------------------------------------------------------------------
# The GPU bars (issue 12; float32, TF32 as CUPY_TF32 says): forward+backward MoE / dense-equivalent ≤ 1.25 at
# ≥ 256 rows per expert with d ≥ 1024 and E ≤ 16, ≤ 1.5 at E = 64; faster than eager PyTorch CUDA; t_bound reported
# at 64 rows per expert. The dense equivalent is the cupy backend's own expert FFN with ONE expert on the T·k rows:
# the same cuBLAS calls, compute type and fused bias/activation kernels, one weight matrix.
GPU_SHAPES = [Shape(2048, 1024, 4096, 16, 2), Shape(8192, 1024, 4096, 64, 2), Shape(2048, 1024, 4096, 64, 2),
              Shape(8192, 1024, 4096, 8, 2)]  # 256, 256, 64 and 2048 rows per expert: the bars' shapes first, so a
# run cut short by a time limit (gpu_check.sh) still has them (rows are saved shape by shape)
GPU_QUICK_SHAPES = [Shape(1024, 256, 512, 8, 2), Shape(512, 256, 512, 64, 2)]  # smoke test
GPU_TARGETS = {"ratio_fwdbwd": 1.25, "ratio_fwdbwd_e64": 1.5, "dispatch": 0.10, "rel_err": 1e-4,
               "rel_err_tf32": 1e-2}


def gpu_copy_bandwidth(nbytes=1 << 30, repeat=5):
    """Bytes/s of a large device-to-device copy (read + written bytes), timed with CUDA events."""
    import cupy

    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    dst[...] = src
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return 2 * src.nbytes / statistics.median(times)


class _Events:
    """CUDA events recorded on the current stream between stages; seconds between them after one synchronize."""

    def __init__(self):
        import cupy

        self.cupy, self.events = cupy, []

    def mark(self):
        event = self.cupy.cuda.Event()
        event.record()
        self.events.append(event)

    def seconds(self):
        self.events[-1].synchronize()
        get = self.cupy.cuda.get_elapsed_time
        return [get(a, b) / 1e3 for a, b in zip(self.events, self.events[1:])]


def run_moe_gpu(be, p, num_experts, activation):
    """run_moe on device arrays, each stage timed by CUDA events (host time that leaves the GPU idle counts too)."""
    k, T = p["expert_idx"].shape[1], p["expert_idx"].shape[0]
    ev = _Events()
    ev.mark()
    order, offsets, inverse = be.route(p["expert_idx"], num_experts, None)
    ev.mark()
    xs = be.gather(p["x"], order, k)
    ev.mark()
    out, h = be.expert_ffn(xs, offsets, p["w1"], p["b1"], p["w2"], p["b2"], activation)
    ev.mark()
    y = be.combine(out, p["weights"], inverse)
    ev.mark()
    dout, dweights = be.combine_backward(p["dy"], out, p["weights"], inverse)
    ev.mark()
    dxs, dw1, _, dw2, _ = be.expert_ffn_backward(dout, xs, h, offsets, p["w1"], p["w2"], activation)
    ev.mark()
    dx = be.gather_backward(dxs, inverse, k, T)
    ev.mark()
    times = dict(zip(STAGES_FWD + STAGES_BWD, ev.seconds()))
    times["fwd"] = sum(times[s] for s in STAGES_FWD)
    times["bwd"] = sum(times[s] for s in STAGES_BWD)
    return times, dict(y=y, dx=dx, dweights=dweights, dw1=dw1, dw2=dw2)


def run_dense_gpu(be, p, activation):
    """The dense-equivalent FFN on the T·k rows: the cupy backend's expert FFN with one expert (one weight matrix)."""
    rows = p["xd"].shape[0]
    offsets = np.array([0, rows], dtype=np.int64)
    ev = _Events()
    ev.mark()
    out, h = be.expert_ffn(p["xd"], offsets, p["W1"][None], p["B1"][None], p["W2"][None], p["B2"][None], activation)
    ev.mark()
    be.expert_ffn_backward(p["dyd"], p["xd"], h, offsets, p["W1"][None], p["W2"][None], activation)
    ev.mark()
    fwd, bwd = ev.seconds()
    return {"fwd": fwd, "bwd": bwd}, None


class GpuLayer:
    """The whole framework on the GPU (`--layer`): tm.nn.MoE moved with .to("cupy") (gate, aux losses, autodiff)
    against tm.nn.FeedForward on the T·k rows, also on the GPU; CUDA-event clocks."""

    def __init__(self, shape: Shape, p, activation):
        import cupy

        from tinymoe import nn
        from tinymoe.engine import Tensor

        self.Tensor = Tensor
        self.moe = nn.MoE(shape.d, shape.f, shape.E, gate="top_k", k=shape.k, activation=activation, seed=0).to("cupy")
        self.ffn = nn.FeedForward(shape.d, shape.f, activation, seed=0).to("cupy")
        self.x, self.dy, self.xd, self.dyd = (cupy.asarray(p[key]) for key in ("x", "dy", "xd", "dyd"))

    def _time(self, module, x, dy):
        module.zero_grad()
        x = self.Tensor(x, requires_grad=True)
        ev = _Events()
        ev.mark()
        y = module(x)
        ev.mark()
        y.backward(dy)
        ev.mark()
        fwd, bwd = ev.seconds()
        return {"fwd": fwd, "bwd": bwd}, None

    def run_moe(self):
        with backends.use_backend("cupy"):
            return self._time(self.moe, self.x, self.dy)

    def run_dense(self):
        with backends.use_backend("cupy"):
            return self._time(self.ffn, self.xd, self.dyd)


def bench_gpu_shape(shape, be, *, repeat, warmup, activation, torch_on, copy_bw, machine, layer=False):
    """The cupy backend, the dense equivalent and (when torch has CUDA) eager PyTorch CUDA on one shape: one row."""
    import cupy

    from tinymoe import dispatch

    p = make_problem(shape)
    dev = {key: cupy.asarray(value) for key, value in p.items()}
    contenders = {"dense": lambda: run_dense_gpu(be, dev, activation),
                  "cupy": lambda: run_moe_gpu(be, dev, shape.E, activation)}
    torch_moe = TorchMoE(p, shape.E, activation, 1, device="cuda") if torch_on else None
    if torch_moe is not None:
        contenders["torch"], contenders["torch_dense"] = torch_moe.run, torch_moe.run_dense
    errors = {}  # contender -> why it could not run (the whole layer needs the engine on the device)
    if layer:
        try:
            gpu_layer = GpuLayer(shape, p, activation)
            contenders["layer_dense"], contenders["layer:cupy"] = gpu_layer.run_dense, gpu_layer.run_moe
        except Exception as e:
            errors["layer"] = f"{type(e).__name__}: {e}"
    runs, outputs = {}, {}
    for key, fn in contenders.items():
        try:
            for _ in range(warmup):
                fn()
            runs[key] = []
            for _ in range(repeat):
                times, outputs[key] = _timed(fn)
                runs[key].append(times)
        except Exception as e:
            if not key.startswith("layer"):
                raise
            errors[key] = f"{type(e).__name__}: {e}"
            runs.pop(key, None)
    med = {key: _median_times(r) for key, r in runs.items() if r}
    _, ref_out = run_moe(dispatch, p, shape.E, activation)  # the NumPy reference once, untimed, for the error
    got = {key: to_host(value) for key, value in outputs["cupy"].items()}

    itemsize = np.dtype(DTYPE).itemsize
    m, dense = med["cupy"], med["dense"]
    from tinymoe.backends.cupy import _gemm

    row = dict(backend="cupy", device="gpu", shape=str(shape), T=shape.T, d=shape.d, f=shape.f, E=shape.E, k=shape.k,
               rows_per_expert=shape.rows_per_expert, dtype=np.dtype(DTYPE).name, tf32=_gemm.tf32(),
               activation=activation, repeat=repeat, warmup=warmup, copy_bandwidth=copy_bw)
    for mode, bwd in (("fwd", False), ("fwdbwd", True)):
        row.update(bound_columns(shape, mode, bwd, m, dense, itemsize, copy_bw))
        if "torch" in med:
            row.update({f"torch_{mode}_s": med["torch"][mode], f"vs_torch_{mode}": m[mode] / med["torch"][mode],
                        f"torch_dense_{mode}_s": med["torch_dense"][mode]})
        if "layer:cupy" in med and "layer_dense" in med:
            lay, lay_dense = med["layer:cupy"][mode], med["layer_dense"][mode]
            row.update({f"layer_{mode}_s": lay, f"layer_dense_{mode}_s": lay_dense,
                        f"layer_ratio_{mode}": lay / lay_dense, f"layer_overhead_{mode}": lay / m[mode]})
    if errors:
        row["errors"] = errors
        _log(f"  {shape}: could not time {', '.join(f'{k} ({v})' for k, v in errors.items())}")
    row["stage_s"] = {s: m[s] for s in STAGES_FWD + STAGES_BWD}
    row["rel_err_vs_numpy"] = rel_err(got, ref_out)
    if "torch" in outputs:
        row["torch_rel_err_vs_numpy"] = rel_err(outputs["torch"], ref_out)
    row["times_s"] = {key: [dict(r) for r in runs[key]] for key in runs}
    row["machine"] = machine
    return row


def gpu_machine_info():
    """The GPU, its driver and the CUDA / CuPy / torch versions."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return dict(gpu=name, gpu_memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
                compute_capability=cupy.cuda.Device().compute_capability,
                driver=cupy.cuda.runtime.driverGetVersion(), runtime=cupy.cuda.runtime.runtimeGetVersion(),
                cupy=cupy.__version__, torch=_version("torch"), python=platform.python_version(),
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _torch_cuda():
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def gpu_targets_summary(rows):
    """The GPU bars, met or missed, on the shapes measured."""
    parts = []

    def check(label, shown, target, ok):
        parts.append(f"{label} {shown} ({'ok' if ok else 'MISS'} vs {target})")

    many = [r for r in rows if r["rows_per_expert"] >= MANY_ROWS and r["d"] >= 1024]
    small_e = [r for r in many if r["E"] <= 16]
    if small_e:
        v = max(r["ratio_fwdbwd"] for r in small_e)
        check("f+b E≤16", f"{v:.2f}", f"≤{GPU_TARGETS['ratio_fwdbwd']}", v <= GPU_TARGETS["ratio_fwdbwd"])
    e64 = [r for r in many if r["E"] == 64]
    if e64:
        v = max(r["ratio_fwdbwd"] for r in e64)
        check("f+b E=64", f"{v:.2f}", f"≤{GPU_TARGETS['ratio_fwdbwd_e64']}", v <= GPU_TARGETS["ratio_fwdbwd_e64"])
    for r in rows:
        if r["rows_per_expert"] < MANY_ROWS:
            parts.append(f"{r['shape']}: f+b/t_bound {r['tbound_ratio_fwdbwd']:.2f} (t_bound "
                         f"{1e3 * r['t_bound_fwdbwd_s']:.2f} ms)")
    if rows:
        v = max(r["dispatch_share_fwdbwd"] for r in rows)
        check("dispatch", f"{v:.1%}", f"≤{GPU_TARGETS['dispatch']:.0%}", v <= GPU_TARGETS["dispatch"])
        tol = GPU_TARGETS["rel_err_tf32" if rows[0]["tf32"] else "rel_err"]
        v = max(r["rel_err_vs_numpy"] for r in rows)
        check("err", f"{v:.1e}", f"≤{tol:g}", v <= tol)
    if rows and all("vs_torch_fwdbwd" in r for r in rows):
        v = max(r["vs_torch_fwdbwd"] for r in rows)
        check("vs torch CUDA", f"{v:.2f}", "<1 = faster", v < 1)
    return "targets [cupy, GPU]: " + "; ".join(parts)


def bench_gpu(be, shapes, *, repeat, warmup, activation, torch_on, on_row=None, layer=False):
    """Every GPU shape; returns the rows. on_row(rows so far) after each shape (to save partial results)."""
    from tinymoe.backends.cupy import _gemm

    be.warmup()
    copy_bw = gpu_copy_bandwidth()
    machine = gpu_machine_info()
    torch_on = torch_on and _torch_cuda()
    if torch_on:  # the same TF32 setting as the cupy backend's GEMMs
        import torch

        torch.backends.cuda.matmul.allow_tf32 = _gemm.tf32()
    _log(f"GPU: {machine['gpu']}; copy bandwidth {copy_bw / 1e9:.0f} GB/s; TF32 "
         f"{'on (CUPY_TF32=1)' if _gemm.tf32() else 'off'}; PyTorch CUDA comparison {'on' if torch_on else 'off'}")
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        rows.append(bench_gpu_shape(shape, be, repeat=repeat, warmup=warmup, activation=activation,
                                    torch_on=torch_on, copy_bw=copy_bw, machine=machine, layer=layer))
        _log(f"  GPU shape T,d,f,E,k={shape}: {time.perf_counter() - t0:.1f} s")
        if on_row is not None:
            on_row(rows)
    return rows


def _torch_importable():
    try:
        import torch  # noqa: F401
    except Exception:  # not installed, or a broken install: torch is optional
        return False
    return True


def build_parser():
    parser = argparse.ArgumentParser(prog="tinymoe bench", description=(
        "Time the MoE hot path (route, gather, expert FFN, combine and adjoints) of each backend against the "
        "dense-equivalent FFN on T·k rows (docs/design.md §6). Ratios are MoE time / dense time; see "
        "benchmarks/moe_layer.py's docstring for every column."))
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend to time (repeatable; default: every available one)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the results as a JSON list of dicts to PATH ('-' or no PATH: stdout)")
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="standard",
                        help="standard (default, about a minute): one shape at 256 and one at 64 rows per expert; "
                             "quick: two small shapes (smoke test); full (~9 minutes): the four reference shapes and "
                             "an E sweep")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per contender (default 5; quick: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (JIT compile, page faults)")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS / numba / torch threads (default: the CPUs this process may use)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds of idle before each contender, so busy-waiting thread pools go to sleep")
    parser.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu"])
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                        help="time an idiomatic PyTorch MoE layer too (default: when torch imports)")
    parser.add_argument("--layer", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the whole tm.nn.MoE layer against tm.nn.FeedForward")
    parser.add_argument("--tf32", action="store_true",
                        help="cupy backend: let float32 GEMMs use TF32 tensor cores (sets CUPY_TF32=1; the dense "
                             "baseline and the PyTorch comparison follow)")
    return parser


def main(argv=None) -> int:
    """Entry point of `tinymoe bench`; returns the exit status (1 when a backend asked for by name was skipped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be ≥ 1 and --warmup ≥ 0")
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"
    try:
        modules, skipped = resolve_backends(args.backend)
    except ValueError as e:
        parser.error(str(e))
    gpu = modules.pop("cupy", None)  # the GPU backend has its own shapes, clocks and baselines (bench_gpu)
    repeat = args.repeat or (3 if args.shapes == "quick" else 5)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch_on = _torch_importable() if args.torch is None else args.torch
    if torch_on and not _torch_importable():
        _log("torch: not importable, skipping the PyTorch comparison")
        torch_on = False
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    for name, why in skipped.items():
        _log(f"backend {name}: skipped ({why})")

    rows = []
    with blas_threads(threads) as blas_info:
        copy_bw = measure_copy_bandwidth()
        machine = machine_info(threads, blas_info)
        _log(f"{threads} threads; BLAS: {describe_blas(blas_info)}; copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
             f"PyTorch comparison {'on' if torch_on else 'off'}")
        if (machine["cpu_busy_by_others_start"] or 0) > 0.1:
            _log(f"warning: {machine['cpu_busy_by_others_start']:.0%} of the CPUs were busy with other processes "
                 "before starting: timings will be noisy")
        for shape in SHAPE_SETS[args.shapes] if modules else []:
            t0 = time.perf_counter()
            rows += bench_shape(shape, modules, repeat=repeat, warmup=args.warmup, activation=args.activation,
                                torch_on=torch_on, layer=args.layer, threads=threads, copy_bw=copy_bw, machine=machine,
                                settle=args.settle)
            _log(f"  shape T,d,f,E,k={shape}: {time.perf_counter() - t0:.1f} s")

    machine["loadavg_end"] = _loadavg()  # the same dict sits in every row
    report = format_table(rows, skipped) + ("\n" + targets_summary(rows) if rows else "")
    if gpu is not None and not rows and not skipped:  # only the GPU was asked for: no empty CPU table
        report = ""
    if gpu is not None:
        def save_partial(gpu_rows):  # a GPU run cut short by a time limit still leaves the shapes it finished
            if args.json and args.json != "-":
                with open(args.json, "w") as fh:
                    fh.write(json.dumps(rows + gpu_rows, indent=1, default=float) + "\n")

        gpu_rows = bench_gpu(gpu, GPU_QUICK_SHAPES if args.shapes == "quick" else GPU_SHAPES, repeat=repeat,
                             warmup=max(args.warmup, 2), activation=args.activation, torch_on=torch_on,
                             on_row=save_partial, layer=args.layer)
        report += (("\n\n" if report else "") + "GPU (cupy backend):\n" + format_table(gpu_rows, {}) + "\n"
                   + gpu_targets_summary(gpu_rows))
        rows += gpu_rows
    to_stdout = args.json == "-"
    print(report, file=sys.stderr if to_stdout else sys.stdout, flush=True)
    if args.json:
        records = rows + [dict(backend=name, skipped=why, machine=machine) for name, why in skipped.items()]
        text = json.dumps(records, indent=1, default=float)
        if to_stdout:
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 1 if args.backend and skipped else 0


if __name__ == "__main__":
    sys.exit(main())
