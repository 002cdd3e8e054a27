# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Make it fast: backends
#
# **What you will learn.** Where an MoE layer spends its time in plain NumPy (a profile), what the Numba backend
# does instead — a counting sort to group assignments by expert, one gather, one GEMM pair per expert run in
# parallel, one weighted combine — how close that gets to a dense FFN doing the same FLOPs, and how to write your
# own backend primitive and *prove* it equal to the reference with a property test (hypothesis).
#
# **Prerequisites.** Tutorial 2 (route → gather → expert FFN → combine). Needs the `numba` extra
# (`pip install 'tinymoe[numba]'`, included in the `tutorials` extra) and `hypothesis`.
#
# **Sources.** The grouped ("sort by expert, then per-expert GEMM") formulation of sparse MoE is that of
# MegaBlocks (Gale et al. 2023, §3) and Tutel (Hwang et al. 2023); counting sort is Cormen et al., *Introduction to
# Algorithms*, §8.2 (stable, O(T·k + E)). Property-based testing: Claessen & Hughes 2000 (QuickCheck).
#
# A backend is a module with the same eight functions as the reference (`route`, `gather`, `expert_ffn`, `combine`,
# their adjoints, and `capacity_keep`); gradients are composed once above them, so a backend only has to be equal
# to the reference, function by function. `tm.backends.load(name)` returns that module.

# %%
import contextlib
import math
import cProfile
import os
import pstats
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numba
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm

FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
print("backends here:", tm.backends.available(), "  unavailable:", tm.backends.unavailable())
ref = tm.backends.load("numpy")      # the plain-NumPy reference hot path (the one place this tutorial names it)
nb = tm.backends.load("numba")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Profile the NumPy layer
# A forward and backward pass of `tm.nn.MoE` on the numpy backend, profiled with the standard library's cProfile.
# Sizes are kept small so this runs in seconds on 2 cores; the picture is the same at scale.

# %%
T, d, f, E, k = 1024, 64, 128, 8, 2
x = tm.Tensor(rng.standard_normal((T, d)).astype(np.float32))
moe = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate="top_k", k=k, seed=0)
with tm.use_backend("numpy"):
    moe(x).sum().backward()                                       # warm up
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2):
        moe.zero_grad()
        moe(x).sum().backward()
    profiler.disable()
stats = pstats.Stats(profiler)
rows = sorted(((fn[2], v[2]) for fn, v in stats.stats.items()), key=lambda r: -r[1])  # (name, own time)
total = sum(t for _, t in rows)
print(f"{'function':32s} share of time (own)")
for name, own in rows[:8]:
    print(f"{name:32s} {100 * own / total:5.1f} %")

# %% [markdown]
# Nearly all the time is inside the reference's `expert_ffn` and `expert_ffn_backward` (the per-expert matrix
# products written with `@` count as their own time) and the GELU: the useful work. What the reference adds on top
# is a Python loop over experts, a temporary array for every intermediate, and single-threaded elementwise NumPy.
# The backend's job is to keep the useful work and remove the rest.
#
# ## 2. Each primitive, reference against Numba
# We time each step of the hot path on the same routing, for both backends, and compare with the *dense
# equivalent*: one FFN of width f on all T·k rows (same FLOPs, no routing), the bound any MoE kernel aims at.
# The Numba backend runs experts (and rows) in parallel threads; we time it with one thread and with all of them.
# At these small sizes a parallel kernel can lose to the single-threaded one: waking its threads costs more than
# the work, and on a busy machine a thread may wait a whole scheduler time slice (several ms) for a free core.
# That is why backends parallelise only above a size threshold, and why `make bench` repeats and reports ranges.

# %%
xa = x.numpy()
logits = xa @ rng.standard_normal((d, E)).astype(np.float32)
expert_idx = np.argsort(-logits, axis=1)[:, :k]
weights = np.full((T, k), 0.5, np.float32)
w1, b1 = (rng.standard_normal((E, d, f)) / 8).astype(np.float32), np.zeros((E, f), np.float32)
w2, b2 = (rng.standard_normal((E, f, d)) / 16).astype(np.float32), np.zeros((E, d), np.float32)


def best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hot_path(be):
    order, offsets, inverse = be.route(expert_idx, E)
    xs = be.gather(xa, order, k)
    out, h = be.expert_ffn(xs, offsets, w1, b1, w2, b2, "gelu")
    return be.combine(out, weights, inverse)


threads = numba.get_num_threads()
timings = {}
for name, be, n_threads in (("numpy", ref, None), ("numba, 1 thread", nb, 1),
                            (f"numba, {threads} threads", nb, threads)):
    if n_threads:
        numba.set_num_threads(n_threads)
    order, offsets, inverse = be.route(expert_idx, E)
    xs = be.gather(xa, order, k)
    out, h = be.expert_ffn(xs, offsets, w1, b1, w2, b2, "gelu")
    with nb.session() if be is nb else contextlib.nullcontext():  # numba's session: NumPy's BLAS on one thread
        timings[name] = {"route": best_of(lambda: be.route(expert_idx, E), 20),
                         "gather": best_of(lambda: be.gather(xa, order, k), 20),
                         "expert_ffn": best_of(lambda: be.expert_ffn(xs, offsets, w1, b1, w2, b2, "gelu"), 20),
                         "combine": best_of(lambda: be.combine(out, weights, inverse), 20)}
rows_all = np.repeat(xa, k, axis=0)                                 # (T·k, d)
g1, g2 = w1[0], w2[0]


def gelu(h):
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h)))  # h*h*h: NumPy's h**3 is slow


dense = best_of(lambda: gelu(rows_all @ g1) @ g2, 20)              # one dense FFN of width f on T·k rows
for name, parts in timings.items():
    total_ms = 1e3 * sum(parts.values())
    print(f"{name:17s} " + "  ".join(f"{p} {1e3 * t:6.2f} ms" for p, t in parts.items())
          + f"   total {total_ms:6.2f} ms = {total_ms / (1e3 * dense):.2f}× dense")
max_diff = np.abs(hot_path(ref) - hot_path(nb)).max()
print(f"dense-equivalent FFN {1e3 * dense:.2f} ms; max |numpy − numba| over the whole hot path {max_diff:.1e}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3))
left = np.zeros(len(timings))
for part in ("route", "gather", "expert_ffn", "combine"):
    vals = np.array([1e3 * t[part] for t in timings.values()])
    ax.barh(list(timings), vals, left=left, label=part)
    left += vals
ax.axvline(1e3 * dense, color="k", ls="--", label="dense-equivalent FFN")
ax.set(xlabel="ms (forward, best of 20)", title=f"MoE hot path, T={T}, d={d}, f={f}, E={E}, k={k}")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIGURES / "08_hot_path_times.png", dpi=100)
plt.show()

# %% [markdown]
# ## 3. Counting sort, from scratch
# The reference groups assignments with a stable `argsort` (O(n log n)); the Numba backend uses a counting sort:
# count assignments per expert, turn the counts into start offsets (a prefix sum), then drop each assignment into
# the next free place of its expert. Stable, O(T·k + E), and it produces `offsets` for free.

# %%
def counting_sort_route(expert_idx, num_experts):
    flat = expert_idx.reshape(-1)
    counts = np.bincount(flat, minlength=num_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order, fill = np.empty(flat.size, np.int64), offsets[:-1].copy()
    for a, e in enumerate(flat):                                    # a Python loop: Numba compiles this kind
        order[fill[e]] = a
        fill[e] += 1
    inverse = np.empty(flat.size, np.int64)
    inverse[order] = np.arange(flat.size)
    return order, offsets, inverse


small_idx = rng.integers(0, E, (64, k))
route_same = all(np.array_equal(a, b) for a, b in zip(counting_sort_route(small_idx, E), ref.route(small_idx, E)))
print("counting sort == reference route:", route_same)

# %% [markdown]
# ## 4. Your own backend primitive, proven equal by a property test
# We write `combine` — $y_t = \sum_j w_{t,j}\, \mathrm{out}_{\mathrm{inverse}[t k + j]}$ over kept assignments — as a
# Numba kernel (one loop over tokens, no temporaries), and let hypothesis draw shapes, routings and keep-masks,
# edges included (one token, one expert, everything dropped), checking it against the reference on each draw.

# %%
@numba.njit(cache=False)
def my_combine(out, weights, inverse):
    T, k = weights.shape
    y = np.zeros((T, out.shape[1]), out.dtype)
    for t in range(T):
        for j in range(k):
            r = inverse[t * k + j]
            if r >= 0:
                y[t] += weights[t, j] * out[r]
    return y


def property_test(kernel):
    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(T=st.integers(1, 12), k=st.integers(1, 3), E=st.integers(1, 5), d=st.integers(1, 6),
           seed=st.integers(0, 2**31 - 1), drop=st.floats(0, 1))
    def check(T, k, E, d, seed, drop):
        r = np.random.default_rng(seed)
        idx = r.integers(0, E, (T, k))
        keep = r.random((T, k)) >= drop                              # drop = 1: every assignment dropped
        order, offsets, inverse = ref.route(idx, E, keep)
        out = r.standard_normal((order.size, d))
        w = r.random((T, k))
        np.testing.assert_allclose(kernel(out, w, inverse), ref.combine(out, w, inverse), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(nb.combine(out, w, inverse), ref.combine(out, w, inverse), rtol=1e-12, atol=1e-12)

    check()


property_test(my_combine)
print("my_combine == reference combine on 60 drawn cases (and so does the numba backend's)")


@numba.njit(cache=False)
def buggy_combine(out, weights, inverse):                           # overwrites instead of accumulating
    T, k = weights.shape
    y = np.zeros((T, out.shape[1]), out.dtype)
    for t in range(T):
        for j in range(k):
            r = inverse[t * k + j]
            if r >= 0:
                y[t] = weights[t, j] * out[r]                       # right only when a token keeps one expert
    return y


try:
    property_test(buggy_combine)
    bug_caught = False
except Exception as err:  # an AssertionError (or a group of them) from the smallest failing case hypothesis found
    bug_caught = True
    print(f"the property test catches the bug ({type(err).__name__}):",
          [line for line in str(err).splitlines() if line.strip()][0][:100])

# %% [markdown]
# ## 5. The whole layer
# Switching backend is one line (`tm.use_backend`, or `TINYMOE_BACKEND=numba`); outputs agree to float32
# rounding. Timings here are small-size and noisy on a shared machine: `make bench` measures properly.
#
# One side effect to know: while numba is the current backend, NumPy's BLAS in this whole process runs on one
# thread and tinymoe's dense layers run their products on numba's threads (OpenBLAS's idle threads busy-wait after
# each call and would slow the next expert kernel 2x). Switching back to numpy gives NumPy its threads back.

# %%
def layer_time(backend):
    with tm.use_backend(backend):  # numba holds its session while current: NumPy's BLAS on one thread, dense
        return best_of(lambda: moe(x).sum().backward(), repeats=3)  # products on numba's threads


with tm.use_backend("numpy"):
    y_numpy = moe(x).numpy()
with tm.use_backend("numba"):
    y_numba = moe(x).numpy()
ffn = tm.nn.FeedForward(d, k * f, seed=0)
t_ffn = best_of(lambda: ffn(x).sum().backward(), repeats=3)
t_np, t_nb = layer_time("numpy"), layer_time("numba")
print(f"forward+backward: MoE numpy {1e3 * t_np:.1f} ms, MoE numba {1e3 * t_nb:.1f} ms, "
      f"dense FFN (width k·f) {1e3 * t_ffn:.1f} ms; layer max |numpy − numba| {np.abs(y_numpy - y_numba).max():.1e}")

# %%
assert max_diff < 1e-4 * max(1.0, np.abs(hot_path(ref)).max()), "numba hot path must match the reference"
assert np.abs(y_numpy - y_numba).max() < 1e-4 * max(1.0, np.abs(y_numpy).max())
assert route_same, "a counting sort is a stable sort by expert"
assert bug_caught, "the property test must reject a kernel that ignores dropped assignments"
print("all checks passed")
