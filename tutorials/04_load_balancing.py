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
# # 4. Load balancing
#
# **What you will learn.** Why a learned top-1 router left alone collapses onto a few experts (the experts that
# get tokens improve, so the router sends them more: rich get richer), and how the auxiliary losses fight it:
# Switch's load-balance loss and Shazeer's importance + load loss keep all experts busy; the z-loss does not
# balance anything — it keeps the router's logits small, which is a different job. We compute each loss from
# scratch, match it to `moe.aux_losses`, and plot expert load over training steps.
#
# **Prerequisites.** Tutorials 2 and 3 (top-k and noisy top-k gates).
#
# **Sources.** With $f_i$ the share of tokens routed to expert i and $P_i$ the mean router probability of expert i:
# * load balance (Switch, Fedus et al. 2022, eq. 4–6): $\mathcal{L}_{lb} = E \sum_i f_i P_i$, minimum 1 at uniform.
#   $f$ comes from an argmax and has no gradient; the gradient flows through $P$.
# * importance + load (Shazeer et al. 2017, eq. 6–10): $\mathrm{CV}(\sum_x g(x))^2 + \mathrm{CV}(\mathrm{load})^2$,
#   CV = std / mean, the load being a smooth (noise-based) count of tokens per expert.
# * z-loss (ST-MoE, Zoph et al. 2022, eq. 5): $\mathcal{L}_z = \frac{1}{T}\sum_x \big(\log\sum_i e^{h_i(x)}\big)^2$.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tinymoe as tm

FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

d, f, E = 16, 32, 8
X = rng.standard_normal((2048, d)).astype(np.float32)
Y = np.tanh(X @ (rng.standard_normal((d, d)).astype(np.float32) / 4))   # one smooth regression target

# %% [markdown]
# ## The three losses from scratch
# We route one batch through a Switch layer (top-1) and a noisy top-1 layer in evaluation mode (no noise, so the
# load is the plain count), and recompute each auxiliary loss with NumPy.

# %%
def softmax(h):
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def cv2(v):
    return v.var() / (v.mean() ** 2 + 1e-10)


xb = X[:256]
switch = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate="top_k", k=1, seed=0)
switch(tm.Tensor(xb))
h = xb @ switch.gate.weight.numpy() + switch.gate.bias.numpy()       # (T, E) router logits
P = softmax(h).mean(axis=0)                                           # (E,) mean probability
f_share = np.bincount(h.argmax(1), minlength=E) / len(h)              # (E,) share of tokens
lb = E * (f_share * P).sum()
lse = np.log(np.exp(h - h.max(1, keepdims=True)).sum(1)) + h.max(1)
z = (lse**2).mean()

noisy = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate="noisy_top_k", k=1, seed=0)
noisy.gate.weight.data[...] = switch.gate.weight.data                 # noisy top-k starts at zero; copy a router
noisy.gate.bias.data[...] = switch.gate.bias.data
noisy.eval()
noisy(tm.Tensor(xb))
g = np.zeros((len(h), E))
g[np.arange(len(h)), h.argmax(1)] = softmax(h).max(1)                 # k = 1 keeps the full-softmax p_i (Switch)
il = cv2(g.sum(0)) + cv2(np.bincount(h.argmax(1), minlength=E).astype(float))

checks = {"load_balance": (lb, switch.aux_losses["load_balance"].item()),
          "z_loss": (z, switch.aux_losses["z_loss"].item()),
          "importance_load": (il, noisy.aux_losses["importance_load"].item())}
for name, (ours, theirs) in checks.items():
    print(f"{name:16s} ours {ours:.6f}   tm {theirs:.6f}   |diff| {abs(ours - theirs):.1e}")

# %% [markdown]
# ## Training with and without them
# One MoE layer learns the regression target with Adam (written out below in five lines; `tinymoe.train.fit`
# does the same for whole models). The training loss is the task MSE plus `moe.aux_loss()`, the weighted sum of
# `moe.aux_losses`; `aux_weights=` sets the weights, and 0 switches a loss off. We record the share of tokens per
# expert (`moe.last_routing.expert_load()`) at every step, for 4 seeds. 300 steps of 128 tokens take a second or
# two per run; raise `STEPS` or `E` to see the same on a larger scale.

# %%
STEPS, SEEDS = 300, (0, 1, 2, 3)
OFF = {"load_balance": 0.0, "z_loss": 0.0, "importance_load": 0.0}
VARIANTS = {"no aux loss": ("top_k", OFF), "load balance (Switch)": ("top_k", {**OFF, "load_balance": 0.1}),
            "importance + load": ("noisy_top_k", {**OFF, "importance_load": 0.1}),
            "z-loss only": ("top_k", {**OFF, "z_loss": 0.01})}


def train(gate, aux_weights, seed, lr=1e-2, batch=128):
    moe = tm.nn.MoE(d_model=d, d_ff=f, num_experts=E, gate=gate, k=1, seed=seed, aux_weights=aux_weights)
    params = moe.parameters()
    m1, m2 = [np.zeros_like(p.data) for p in params], [np.zeros_like(p.data) for p in params]
    order, loads = np.random.default_rng(seed), []
    for step in range(1, STEPS + 1):
        i = order.integers(0, len(X), batch)
        moe.zero_grad()
        err = moe(tm.Tensor(X[i])) - tm.Tensor(Y[i])
        ((err * err).mean() + moe.aux_loss()).backward()
        for p, a, b in zip(params, m1, m2):                           # Adam (Kingma & Ba 2015, Algorithm 1)
            a[...] = 0.9 * a + 0.1 * p.grad
            b[...] = 0.999 * b + 0.001 * p.grad**2
            p.data -= lr * (a / (1 - 0.9**step)) / (np.sqrt(b / (1 - 0.999**step)) + 1e-8)
        loads.append(moe.last_routing.expert_load())
    mse = float(((moe(tm.Tensor(X[:512])).numpy() - Y[:512]) ** 2).mean())
    return np.array(loads), mse                                       # (STEPS, E), final task MSE


results = {name: [train(gate, aux, s) for s in SEEDS] for name, (gate, aux) in VARIANTS.items()}
max_share = {name: np.array([loads[-20:].mean(0).max() for loads, _ in runs]) for name, runs in results.items()}
print(f"{'variant':24s} {'max expert share per seed (last 20 steps)':44s} {'task MSE':>8s}")
for name, runs in results.items():
    print(f"{name:24s} {str(max_share[name].round(2)):44s} {np.mean([m for _, m in runs]):8.4f}")

# %%
fig, axes = plt.subplots(1, len(VARIANTS), figsize=(14, 3.2), sharey=True)
for ax, (name, runs) in zip(axes, results.items()):
    loads = runs[0][0]                                                # seed 0
    ax.stackplot(np.arange(1, STEPS + 1), loads.T, labels=[f"expert {i}" for i in range(E)])
    ax.set(title=f"{name}\nlargest share, mean of {len(SEEDS)} seeds: {max_share[name].mean():.2f}", xlabel="step",
           xlim=(1, STEPS))
axes[0].set_ylabel("share of tokens (seed 0)")
axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
fig.suptitle(f"Expert load over training, top-1 routing, {E} experts (uniform = {1 / E:.3f} each)", fontsize=10)
fig.tight_layout()
fig.savefig(FIGURES / "04_load_over_training.png", dpi=100)
plt.show()

# %% [markdown]
# **Reading the plot.** Without an auxiliary loss one colour swallows the others within a couple of hundred steps
# on most seeds (3 of the 4 here; the printed table has each seed): the layer has become a single dense FFN with 7 idle experts (the task here is easy, so the MSE barely
# shows it — on a real model those idle experts are lost capacity, and with a capacity factor, dropped tokens).
# Both balancing losses keep every band near 1/E. The z-loss alone collapses like no loss at all: it is a
# stability term, used *together with* a balancing loss in ST-MoE.

# %%
for name, (ours, theirs) in checks.items():
    assert abs(ours - theirs) < 1e-4 * max(1.0, abs(ours)), f"{name}: from-scratch and tinymoe disagree"
assert np.median(max_share["no aux loss"]) > 0.8, "without an aux loss top-1 routing should collapse on most seeds"
assert np.median(max_share["z-loss only"]) > 0.8, "the z-loss does not balance"
for name in ("load balance (Switch)", "importance + load"):
    assert max_share[name].max() < 0.25, f"{name} should keep every expert near 1/E = {1 / E}"
print("all checks passed")
