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
# # 2. An MoE layer by hand
#
# **What you will learn.** The five steps of a sparsely activated Mixture-of-Experts layer — router, top-k gate,
# dispatch (sort the assignments by expert), one FFN per expert, combine — written in plain NumPy; what a
# *capacity factor* does and which tokens it drops; then `tm.nn.MoE` doing the same, with equal outputs and
# gradients; and what the layer costs next to a dense FFN that does the same number of FLOPs per token.
#
# **Prerequisites.** Tutorial 1 (a `tm.Tensor`, `backward`, gradient checks).
#
# **Sources.** Shazeer et al. 2017, *Outrageously Large Neural Networks*, eq. 1–3: $y = \sum_i G(x)_i E_i(x)$
# with $G(x) = \mathrm{softmax}(\mathrm{KeepTopK}(x W_g, k))$. Expert FFN as in Vaswani et al. 2017, eq. 2:
# $E_i(x) = \mathrm{gelu}(x W_1^{(i)} + b_1^{(i)}) W_2^{(i)} + b_2^{(i)}$. Capacity $C = \lceil c\,T k / E\rceil$
# assignments per expert, the overflow dropped (GShard, Lepikhin et al. 2021 §2.2; Switch, Fedus et al. 2022 §2.2).

# %%
import math
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tinymoe as tm
from tinymoe.gradcheck import check_vjp

FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

T, d, f, E, k = 16, 8, 16, 4, 2           # tokens, model width, expert width, experts, experts per token
moe = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate="top_k", k=k, capacity_factor=None, seed=0,
                dtype=np.float64)         # float64 so that "equal" can mean 1e-12
print(moe)
print({name: p.shape for name, p in moe.named_parameters()})

# %% [markdown]
# We read the layer's weights once and use them in the from-scratch version, so both compute the same function.

# %%
Wg, bg = moe.gate.weight.numpy(), moe.gate.bias.numpy()          # (d, E), (E,)
W1, B1 = moe.experts.w1.numpy(), moe.experts.b1.numpy()          # (E, d, f), (E, f)
W2, B2 = moe.experts.w2.numpy(), moe.experts.b2.numpy()          # (E, f, d), (E, d)
x = rng.standard_normal((T, d))


def gelu(h):  # the tanh form (Hendrycks & Gimpel 2016), which tinymoe uses
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h)))  # h*h*h: NumPy's h**3 is slow


# %% [markdown]
# ## Steps 1–2: router and top-k gate
# Logits $h = x W_g + b$ (T, E); keep the k largest per token (ties to the lower expert id), and the weights are
# a softmax over those k logits only.

# %%
def route_top_k(x, k):
    logits = x @ Wg + bg                                        # (T, E)
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]     # (T, k) chosen experts, best first
    top = np.take_along_axis(logits, idx, axis=1)               # (T, k)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return idx, w / w.sum(axis=1, keepdims=True)                # (T, k) weights, each row sums to 1


idx, w = route_top_k(x, k)
print("token 0 goes to experts", idx[0], "with weights", w[0].round(3))

# %% [markdown]
# ## Steps 3–5: dispatch, experts, combine
# Assignment $a = t\cdot k + j$ is (token t, its j-th expert). Sorting the assignments by expert id (stably)
# makes each expert's rows contiguous, so each expert is **one dense matrix product** over its rows — this
# grouping is the whole trick of fast MoE kernels (tutorial 8). Combine scatters the rows back, weighted.

# %%
def moe_forward(x, idx, w, keep=None):
    flat = idx.reshape(-1)                                          # (T·k,) expert of each assignment
    ids = np.arange(flat.size) if keep is None else np.flatnonzero(keep.reshape(-1))
    order = ids[np.argsort(flat[ids], kind="stable")]               # (R,) assignments grouped by expert
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat[ids], minlength=E))])
    xs = x[order // k]                                              # (R, d) gather: the token of each row
    out = np.empty_like(xs)
    for e in range(E):                                              # one GEMM pair per expert
        s, t = offsets[e], offsets[e + 1]
        out[s:t] = gelu(xs[s:t] @ W1[e] + B1[e]) @ W2[e] + B2[e]
    y = np.zeros_like(x)
    np.add.at(y, order // k, w.reshape(-1)[order, None] * out)     # combine: y[t] += w[t, j] · out[row]
    return y


y_ours = moe_forward(x, idx, w)
y_tm = moe(tm.Tensor(x)).numpy()
print(f"dropless: max |ours − tm.nn.MoE| = {np.abs(y_ours - y_tm).max():.2e}")
print("assignments per expert:", moe.last_routing.counts)

# %% [markdown]
# ## Capacity and dropped tokens
# With a capacity factor $c$, each expert computes at most $C = \lceil c\,T k/E\rceil$ assignments. Who gets in?
# GShard/Switch serve all first choices ($j = 0$) in token order, then all second choices, and so on
# ("slot-major"). A dropped assignment contributes nothing; a token with *all* its assignments dropped gets a
# zero MoE output (in a transformer the residual connection carries it on unchanged).

# %%
def capacity_keep(idx, C):
    keep, used = np.zeros(idx.shape, bool), np.zeros(E, int)
    for j in range(idx.shape[1]):          # slot-major ...
        for t in range(idx.shape[0]):      # ... then token order
            e = idx[t, j]
            if used[e] < C:
                keep[t, j], used[e] = True, used[e] + 1
    return keep


c = 0.5
C = math.ceil(c * T * k / E)
keep = capacity_keep(idx, C)
y_ours_c = moe_forward(x, idx, w, keep)

moe_c = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate="top_k", k=k, capacity_factor=c, seed=0, dtype=np.float64)
y_tm_c = moe_c(tm.Tensor(x)).numpy()
stats = moe_c.last_routing
print(f"capacity C = {C}; kept per expert {stats.counts}, dropped per expert {stats.dropped}")
print(f"tokens with every assignment dropped: {stats.tokens_dropped}")
print(f"capacity {c}: max |ours − tm.nn.MoE| = {np.abs(y_ours_c - y_tm_c).max():.2e}")

# %%
fig, ax = plt.subplots(figsize=(7, 2.9))
cmap = plt.get_cmap("tab10")
for t in range(T):
    for j in range(k):
        ax.add_patch(plt.Rectangle((t, j), 0.95, 0.95, color=cmap(idx[t, j]), alpha=1.0 if keep[t, j] else 0.25))
        ax.text(t + 0.47, j + 0.47, str(idx[t, j]) if keep[t, j] else f"×{idx[t, j]}", ha="center", va="center", fontsize=9)
ax.set(xlim=(0, T), ylim=(k, 0), xlabel="token t", ylabel="slot j",
       title=f"Expert of each assignment; × = dropped\n(capacity factor {c}, C = {C} per expert; all first "
             "choices\nserved before any second choice, in token order)")
ax.set_yticks([0.5, 1.5], ["1st choice", "2nd choice"])
fig.tight_layout()
fig.savefig(FIGURES / "02_capacity_drops.png", dpi=100)
plt.show()

# %% [markdown]
# ## Gradients
# The expert weights' gradient is easy by hand: for $L = \sum y \odot G$ (G a fixed random "upstream gradient"),
# $\partial L/\partial W_2^{(e)} = \sum_{\text{rows } r \text{ of } e} w_r\, \mathrm{gelu}(h_r)^\top G_{t(r)}$ and
# $\partial L/\partial b_2^{(e)} = \sum_r w_r G_{t(r)}$. The gradient with respect to the input, through the
# router *and* the experts, we check against finite differences with `check_vjp` (tutorial 1).

# %%
G = rng.standard_normal((T, d))
dW2, dB2 = np.zeros_like(W2), np.zeros_like(B2)
for t in range(T):
    for j in range(k):
        e = idx[t, j]
        a = gelu(x[t] @ W1[e] + B1[e])
        dW2[e] += w[t, j] * np.outer(a, G[t])
        dB2[e] += w[t, j] * G[t]

moe.zero_grad()
(moe(tm.Tensor(x)) * tm.Tensor(G)).sum().backward()
grad_diff = max(np.abs(moe.experts.w2.grad - dW2).max(), np.abs(moe.experts.b2.grad - dB2).max())
print(f"max |d w2, d b2: ours − tm| = {grad_diff:.2e}")

engine, numeric = check_vjp(lambda xt: moe(xt), [x])
print(f"d/dx through router + experts: backward {engine:.8f}, finite differences {numeric:.8f}")

# %% [markdown]
# ## What does it cost?
# Per token, top-k MoE runs k expert FFNs of width f: the same multiply-adds as **one dense FFN of width k·f**,
# while holding E/k times as many parameters. We time the whole layer (router, gate, auxiliary losses, dispatch)
# against `tm.nn.FeedForward(d, k·f)` on the same tokens. Sizes are small so this runs in seconds on 2 cores;
# raise `Tb`, `db`, `fb` to see the gap shrink as the expert GEMMs dominate (`make bench` does it properly).

# %%
Tb, db, fb, Eb, kb = 1024, 64, 128, 8, 2
xb = tm.Tensor(rng.standard_normal((Tb, db)).astype(np.float32))
layers = {"MoE (E=8, k=2, f=128)": tm.nn.MoE(d_model=db, d_ff=fb, num_experts=Eb, gate="top_k", k=kb, seed=0),
          "dense FFN (f=256)": tm.nn.FeedForward(db, kb * fb, seed=0)}
times = {}
for name, layer in layers.items():
    best = []
    for _ in range(5):
        start = time.perf_counter()
        layer(xb).sum().backward()
        best.append(time.perf_counter() - start)
    times[name] = min(best)
    n_params = sum(p.size for p in layer.parameters())
    print(f"{name:24s} forward+backward {1e3 * times[name]:6.2f} ms   parameters {n_params}")
ratio = times["MoE (E=8, k=2, f=128)"] / times["dense FFN (f=256)"]
print(f"MoE / dense time: {ratio:.2f} (backend: {tm.get_backend()})")

# %% [markdown]
# ## What is now a tested fact

# %%
assert np.abs(y_ours - y_tm).max() < 1e-12, "dropless outputs must agree"
assert np.abs(y_ours_c - y_tm_c).max() < 1e-12, "capacity outputs must agree"
assert (stats.keep == keep).all(), "the same assignments must be dropped"
assert stats.counts.max() <= C and stats.dropped.sum() == (~keep).sum() > 0
assert grad_diff < 1e-12
assert abs(engine - numeric) < 1e-6 * max(1.0, abs(numeric))
print("all checks passed")
