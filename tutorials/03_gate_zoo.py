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
# # 3. The gate zoo
#
# **What you will learn.** Seven ways to decide which experts see a token — softmax (MMoE), top-k, noisy top-k,
# Switch (k = 1), expert choice, hash and DSelect-k — run on the *same* tokens with the *same* router weights, and
# compared by what they produce: the routing matrix (a heatmap), its sparsity, the load per expert, and whether a
# gradient reaches the router.
#
# **Prerequisites.** Tutorial 2 (router → gate → dispatch → experts → combine).
#
# **Sources** (h = x W_g + b are the router logits, T tokens, E experts):
#
# | gate | weights | paper |
# |---|---|---|
# | softmax | $g = \mathrm{softmax}(h)$, all E experts | Ma et al. 2018 (MMoE), eq. 5 |
# | top-k | softmax over the k largest $h_i$ | Shazeer et al. 2017, eq. 3 |
# | noisy top-k | top-k of $h + \varepsilon \odot \mathrm{softplus}(x W_{noise})$, $\varepsilon \sim N(0,1)$ (training only) | Shazeer et al. 2017, eq. 4–5 |
# | Switch | k = 1, weight $p_i = \mathrm{softmax}(h)_i$ of the full softmax | Fedus et al. 2022, eq. 1–2 |
# | expert choice | expert i takes its top-C tokens by $\mathrm{softmax}(h)_{t,i}$ | Zhou et al. 2022, eq. 1–2 |
# | hash | a fixed random table from token id to k experts, weight 1/k | Roller et al. 2021 |
# | DSelect-k | k smooth-step selectors over binary codes (tutorial 5) | Hazimeh et al. 2021, eq. 5 |

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tinymoe as tm

FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

T, d, f, E, k = 24, 8, 16, 8, 2
x = rng.standard_normal((T, d))
token_ids = rng.integers(0, 5, T)     # for the hash gate: a vocabulary of 5 token ids
Wg = rng.standard_normal((d, E)) * 0.8
bg = np.zeros(E)


def softmax(h):
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make(gate, k=k, **kw):
    moe = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate=gate, k=k, seed=0, dtype=np.float64, **kw)
    if moe.gate is not None and gate != "dselect_k":   # the same router for every gate that has one
        moe.gate.weight.data[...] = Wg
        moe.gate.bias.data[...] = bg
    return moe


def dense_weights(stats):
    """The routing as a (T, E) matrix: the weight token t gives expert i (0 = not computed)."""
    Q = np.zeros((T, E))
    rows = np.broadcast_to(np.arange(T)[:, None], stats.expert_idx.shape)
    Q[rows[stats.keep], stats.expert_idx[stats.keep]] = stats.weights[stats.keep]
    return Q


# %% [markdown]
# ## From scratch: four gates in a few lines each

# %%
h = x @ Wg + bg                                                  # (T, E)
p = softmax(h)
top = np.argsort(-h, axis=1, kind="stable")


def scratch_top_k(k):
    Q = np.zeros((T, E))
    rows = np.arange(T)[:, None]
    Q[rows, top[:, :k]] = softmax(h[rows, top[:, :k]]) if k > 1 else p[rows, top[:, :1]]  # Switch keeps p_i
    return Q


def scratch_expert_choice(C):
    Q = np.zeros((T, E))
    for i in range(E):
        chosen = np.argsort(-p[:, i], kind="stable")[:C]        # expert i picks its C favourite tokens
        Q[chosen, i] = p[chosen, i]
    return Q


C = int(np.ceil(1.0 * T * k / E))                                # capacity factor 1: C = T·k/E
scratch = {"softmax": p, "top_k": scratch_top_k(k), "switch": scratch_top_k(1),
           "expert_choice": scratch_expert_choice(C)}

# %% [markdown]
# ## The same with `tm.nn.MoE(gate=...)`
# `moe.last_routing` holds the routing of the last call: `expert_idx`, `weights`, `keep` (computed or not), and
# per-expert `counts`. Noisy top-k and DSelect-k behave differently in training and in evaluation, so we run
# each layer in both modes. We also backpropagate a random upstream gradient and ask: did the router get one?

# %%
layers = {"softmax": make("softmax"), "top_k": make("top_k"), "noisy_top_k": make("noisy_top_k"),
          "switch": make("top_k", k=1), "expert_choice": make("expert_choice"), "hash": make("hash"),
          "dselect_k": make("dselect_k")}
layers["noisy_top_k"].noise.weight.data[...] = rng.standard_normal((d, E))  # noise scale depends on the token
G = rng.standard_normal((T, d))
routing, loads, router_grad = {}, {}, {}
for name, moe in layers.items():
    moe.train()
    moe.zero_grad()
    y = moe(tm.Tensor(x), token_ids=token_ids) if name == "hash" else moe(tm.Tensor(x))
    (y * tm.Tensor(G)).sum().backward()
    routing[name], loads[name] = dense_weights(moe.last_routing), moe.last_routing.counts
    router_grad[name] = 0.0 if moe.gate is None else float(np.abs(moe.gate.weight.grad).sum())
moe = layers["noisy_top_k"]
moe.eval()
moe(tm.Tensor(x))
noisy_eval = dense_weights(moe.last_routing)

for name in scratch:
    print(f"{name:14s} max |scratch − tm| = {np.abs(scratch[name] - routing[name]).max():.1e}")
print(f"noisy top-k in eval == top-k: {np.allclose(noisy_eval, routing['top_k'])}; "
      f"in training, tokens whose experts changed: {((routing['noisy_top_k'] > 0) != (routing['top_k'] > 0)).any(1).sum()}")

# %%
print(f"{'gate':14s} {'experts/token':>13s} {'min..max load':>14s} {'router grad':>12s}")
for name in layers:
    nnz = (routing[name] > 0).sum(axis=1)
    print(f"{name:14s} {nnz.mean():13.2f} {loads[name].min():>6d}..{loads[name].max():<6d} "
          f"{'yes' if router_grad[name] > 0 else 'no (no router)' if layers[name].gate is None else 'no':>12s}")

# %%
fig, axes = plt.subplots(1, len(layers), figsize=(15, 3.6), sharey=True)
for ax, (name, Q) in zip(axes, routing.items()):
    ax.imshow(Q, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"{name}\n{(Q > 0).sum(1).mean():.1f} experts/token", fontsize=9)
    ax.set_xlabel("expert")
axes[0].set_ylabel("token")
fig.suptitle("Routing weights on the same tokens (bright = large weight, dark = not computed)", fontsize=10)
fig.tight_layout()
fig.savefig(FIGURES / "03_gate_heatmaps.png", dpi=100)
plt.show()

fig, ax = plt.subplots(figsize=(8, 2.8))
width = 0.8 / len(layers)
for i, (name, load) in enumerate(loads.items()):
    ax.bar(np.arange(E) + i * width, load, width, label=name)
ax.axhline(C, color="k", ls="--", lw=1, label=f"C = T·k/E = {C}")
ax.set(xlabel="expert", ylabel="assignments", title="Load per expert: only expert choice is balanced by construction")
ax.legend(fontsize=7, ncol=4)
fig.tight_layout()
fig.savefig(FIGURES / "03_gate_loads.png", dpi=100)
plt.show()

# %% [markdown]
# **Reading the pictures.** Softmax is dense: every expert computes every token (MMoE's choice; fine for a few
# experts, not for many). Top-k and Switch are sparse and cheap but nothing stops them from piling tokens onto one
# expert (tutorial 4). Expert choice is balanced by construction — every column has exactly C tokens — but a token
# can get several experts or none, and it must see the whole batch (not causal). Hash needs no router at all: no
# gradient, no collapse, no learning. DSelect-k starts dense (every selector near ½) and becomes sparse as
# training saturates its smooth steps (tutorial 5). The gradient reaches the router through the *weights* of
# the chosen experts only — the choice itself (an argmax) has none.

# %%
assert max(np.abs(scratch[n] - routing[n]).max() for n in scratch) < 1e-12, "from-scratch gates disagree"
assert np.allclose(noisy_eval, routing["top_k"]), "noisy top-k without noise must be top-k"
assert (routing["softmax"] > 0).all() and np.allclose(routing["softmax"].sum(1), 1)
assert ((routing["switch"] > 0).sum(1) == 1).all() and ((routing["top_k"] > 0).sum(1) == k).all()
assert (loads["expert_choice"] == C).all(), "expert choice gives every expert exactly C tokens"
assert layers["hash"].gate is None and router_grad["hash"] == 0.0
for tid in np.unique(token_ids):                                # hash: same token id, same experts
    same = routing["hash"][token_ids == tid] > 0
    assert (same == same[0]).all()
assert all(router_grad[n] > 0 for n in layers if n != "hash"), "every learned gate passes a gradient to its router"
print("all checks passed")
