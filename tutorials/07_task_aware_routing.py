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
# # 7. Task-aware routing
#
# **What you will learn.** What changes when the router sees the *task* as well as the token: a token router cannot
# tell two tasks apart when their inputs look alike; a task router can, and the experts then specialise in the
# *parts* the tasks are made of. With tasks described by their parts, the router can send a task it has never seen
# to the right experts (zero-shot); a new task with very few examples can reuse the experts by learning only its
# routing; and an unrelated task added to the mix keeps to its own experts.
#
# **Prerequisites.** Tutorials 2–4 (an MoE layer, gates, the load-balance loss).
#
# **Sources.** Gupta et al. 2022, *Sparsely Activated Mixture-of-Experts are Robust Multi-Task Learners*, §3: the
# router input is the token $x$, the task embedding $e_\tau$, or both — `router="token"`: $h = x W_g + b$;
# `"task"` (task-level routing, Kudugunta et al. 2021): $h = e_\tau U + b$; `"add"`: $h = x W_g + e_\tau U + b$;
# `"concat"`: $h = [x; e_\tau] W_g + b$. A task *description* composes the embedding from parts,
# $e_\tau = \sum_{p \in \tau} e_p$, so an unseen combination of known parts gets an embedding too.
#
# **The toy problem.** 4 *parts*; part p is a function $f_p(x) = \tanh(x A_p)$ that writes into its own 2 of the
# 8 output coordinates. A task is a pair of parts, target $y = f_p(x) + f_q(x)$, and every task sees the same
# inputs $x \sim N(0, I_8)$. 4 experts, top-2. Of the 6 pairs we train on 5 and keep (2, 3) unseen.

# %%
import itertools
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tinymoe as tm

FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
d, E, NUM_PARTS, STEPS = 8, 4, 4, 1000
A = rng.standard_normal((NUM_PARTS + 1, d, 2)) / np.sqrt(d) * 1.5


def part(p, x):
    out = np.zeros((len(x), d))
    out[:, 2 * p : 2 * p + 2] = np.tanh(x @ A[p])
    return out


def make_data(tasks, n_per_task, seed, target=None):
    """Examples of every task in `tasks` (lists of parts); returns x (N, d), y (N, d), task ids (N,)."""
    r = np.random.default_rng(seed)
    xs, ys, ids = [], [], []
    for t, parts in enumerate(tasks):
        x = r.standard_normal((n_per_task, d))
        xs.append(x)
        ys.append(sum(part(p, x) for p in parts) if target is None or t < len(tasks) - 1 else target(x))
        ids.append(np.full(n_per_task, t))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32), np.concatenate(ids)


unseen = [2, 3]
seen = [list(p) for p in itertools.combinations(range(NUM_PARTS), 2) if list(p) != unseen]
train_set, test_set = make_data(seen, 500, seed=1), make_data(seen, 200, seed=2)
print("seen tasks:", seen, " unseen:", unseen)

# %% [markdown]
# A plain Adam loop trains a layer (MSE + `moe.aux_loss()`), optionally only some of its parameters.

# %%
def train(moe, data, steps=STEPS, lr=1e-2, batch=128, params=None, seed=0):
    X, Y, ids = data
    params = params or moe.parameters()
    m1, m2 = [np.zeros_like(p.data) for p in params], [np.zeros_like(p.data) for p in params]
    order = np.random.default_rng(seed)
    moe.train()
    for step in range(1, steps + 1):
        i = order.integers(0, len(X), min(batch, len(X)))
        moe.zero_grad()
        err = moe(tm.Tensor(X[i]), task_ids=ids[i]) - tm.Tensor(Y[i])
        ((err * err).mean() + moe.aux_loss()).backward()
        for p, a, b in zip(params, m1, m2):
            a[...] = 0.9 * a + 0.1 * p.grad
            b[...] = 0.999 * b + 0.001 * p.grad**2
            p.data -= lr * (a / (1 - 0.9**step)) / (np.sqrt(b / (1 - 0.999**step)) + 1e-8)
    moe.eval()
    return moe


def mse_per_task(moe, data):
    X, Y, ids = data
    out = moe(tm.Tensor(X), task_ids=ids).numpy()
    return np.array([((out[ids == t] - Y[ids == t]) ** 2).mean() for t in np.unique(ids)])


# %% [markdown]
# ## Token router vs task routers
# Three layers, identical but for the router: `token`, `task` with a learned embedding per task id, and `task`
# with embeddings composed from the descriptions (`task_descriptions=` lists each task's parts).

# %%
def layer(router, **kw):
    return tm.nn.MoE(d_model=d, d_ff=16, num_experts=E, gate="top_k", k=2, router=router, num_tasks=len(seen),
                     seed=0, **kw)


routers = {"token": train(layer("token"), train_set),
           "task (id)": train(layer("task"), train_set),
           "task (description)": train(layer("task", task_descriptions=seen, num_description_parts=NUM_PARTS + 1),
                                       train_set)}
mse = {name: mse_per_task(moe, test_set) for name, moe in routers.items()}
usage = {}
for name, moe in routers.items():
    moe(tm.Tensor(test_set[0]), task_ids=test_set[2])
    usage[name] = moe.last_routing.task_expert_load(len(seen))
    print(f"{name:20s} test MSE per task {mse[name].round(4)}")
print(f"(target variance {test_set[1].var():.3f})")

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
for ax, (name, table) in zip(axes, usage.items()):
    ax.imshow(table / table.sum(1, keepdims=True), cmap="Blues", vmin=0, vmax=0.5)
    ax.set(title=f"{name}\nMSE {mse[name].mean():.4f}", xlabel="expert", xticks=range(E), yticks=range(len(seen)),
           yticklabels=[f"task {p}" for p in seen])
fig.suptitle("Share of each task's assignments per expert", fontsize=10)
fig.tight_layout()
fig.savefig(FIGURES / "07_task_expert_usage.png", dpi=100)
plt.show()

# %% [markdown]
# The token router spreads every task over all experts: the input does not say which task it belongs to. Both
# task routers send each task to exactly 2 experts, and with descriptions the assignment is *factorised*: each
# part has its own expert. We can read that off the router, from scratch: the task-level router's logits are
# $h = (\sum_{p} e_p) U + b$, so part p on its own scores $e_p U$.

# %%
desc = routers["task (description)"]
P = desc.gate.task_embedding.part_weight.numpy()                  # (parts, d_task) e_p
U, b = desc.gate.weight.numpy(), desc.gate.bias.numpy()          # (d_task, E), (E,)
expert_of_part = (P[:NUM_PARTS] @ U).argmax(axis=1)               # each part's favourite expert
print("expert of each part:", expert_of_part)
ours = [sorted(np.argsort(-(P[p].sum(0) @ U + b))[:2].tolist()) for p in seen]  # top-2 of h for each seen task
theirs = [np.flatnonzero(row).tolist() for row in usage["task (description)"]]
print("top-2 from scratch:", ours, "\nused by the layer:  ", theirs)
# and the combine weights: a softmax over each task's two largest logits
first = [np.flatnonzero(test_set[2] == t)[0] for t in range(len(seen))]   # one example of each task
h_tasks = np.stack([P[p].sum(0) @ U + b for p in seen])                   # (tasks, E)
top2 = np.sort(h_tasks, axis=1)[:, ::-1][:, :2]
w_ours = np.exp(top2) / np.exp(top2).sum(1, keepdims=True)
desc(tm.Tensor(test_set[0]), task_ids=test_set[2])
weight_diff = np.abs(w_ours - desc.last_routing.weights[first]).max()
print(f"max |combine weights ours − layer| = {weight_diff:.1e}")

# %% [markdown]
# ## An unseen task, routed from its description (zero-shot)
# `add_task(parts)` registers a new task whose embedding is the sum of parts learned on other tasks. No training.
# As a control we also route the same examples as if they were task (0, 1).

# %%
new_id = desc.gate.task_embedding.add_task(unseen)
X_new, Y_new, _ = make_data([unseen], 300, seed=3)
zero_shot = mse_per_task(desc, (X_new, Y_new, np.full(len(X_new), new_id)))[0]
wrong_id = desc.gate.task_embedding.add_task([0, 1])
misrouted = mse_per_task(desc, (X_new, Y_new, np.full(len(X_new), wrong_id)))[0]
desc(tm.Tensor(X_new), task_ids=np.full(len(X_new), new_id))
routed_to = np.unique(desc.last_routing.expert_idx).tolist()
print(f"unseen task {unseen}: routed to experts {routed_to} (its parts' experts {sorted(expert_of_part[unseen].tolist())}); "
      f"zero-shot MSE {zero_shot:.4f}, routed as (0, 1) {misrouted:.4f}, variance {Y_new.var():.3f}")

# %% [markdown]
# ## A new low-resource task: learn only its routing
# Now the new task has only 16 examples and no description, just a fresh task id (the layer was built with room
# for one more id; that row of `gate.task_embedding.weight` saw no data yet). We train **only the task embedding**
# on the 16 examples, reusing the experts, and compare with a fresh layer trained on the same 16 examples.

# %%
new_task = len(seen)                                              # the next free task id
few = make_data([unseen], 16, seed=4)[:2] + (np.full(16, new_task),)
few_test = make_data([unseen], 300, seed=5)[:2] + (np.full(300, new_task),)
per_id = tm.nn.MoE(d_model=d, d_ff=16, num_experts=E, gate="top_k", k=2, router="task", num_tasks=len(seen) + 1,
                   seed=0)
train(per_id, train_set)                                          # the 5 seen tasks, as before
train(per_id, few, steps=200, params=[per_id.gate.task_embedding.weight])
reuse = mse_per_task(per_id, few_test)[0]
scratch = train(tm.nn.MoE(d_model=d, d_ff=16, num_experts=E, gate="top_k", k=2, router="task",
                          num_tasks=len(seen) + 1, seed=1), few, steps=200)
alone = mse_per_task(scratch, few_test)[0]
print(f"16 examples of task {unseen}: reuse experts, learn routing only {reuse:.4f}; fresh layer {alone:.4f}")

# %% [markdown]
# ## Adding an unrelated task
# Finally a sixth task that shares no part with the others (description part 4, target a random dense map of all
# coordinates) joins training, with one more expert. Does it hurt the five related tasks? Here it shares an
# expert or two with them, and their error rises a little, but stays a small fraction of the target variance
# (Gupta et al.'s robustness claim is this mild form: an unrelated task costs the others little). Try more experts
# or `router="add"` to see how much isolation routing can buy.

# %%
unrelated = np.random.default_rng(6).standard_normal((d, d)) / np.sqrt(d)
tasks6 = seen + [[4]]
with_unrel = tm.nn.MoE(d_model=d, d_ff=16, num_experts=E + 1, gate="top_k", k=2, router="task", num_tasks=6,
                       task_descriptions=tasks6, num_description_parts=NUM_PARTS + 1, seed=0)
train(with_unrel, make_data(tasks6, 500, seed=1, target=lambda x: np.tanh(x @ unrelated)))
test6 = make_data(tasks6, 200, seed=2, target=lambda x: np.tanh(x @ unrelated))
mse6 = mse_per_task(with_unrel, test6)
with_unrel(tm.Tensor(test6[0]), task_ids=test6[2])
table6 = with_unrel.last_routing.task_expert_load(6)
experts_unrel = np.flatnonzero(table6[5]).tolist()
experts_related = np.flatnonzero(table6[:5].sum(0)).tolist()
print(f"related tasks' MSE without / with the unrelated task: {mse['task (description)'].mean():.4f} / "
      f"{mse6[:5].mean():.4f}; unrelated task MSE {mse6[5]:.4f}")
print(f"experts of the unrelated task {experts_unrel}, of the related ones {experts_related}")

# %%
assert mse["token"].mean() > 10 * mse["task (id)"].mean(), "a token router cannot tell the tasks apart"
assert (usage["task (id)"] > 0).sum(1).max() == 2 and (usage["task (description)"] > 0).sum(1).max() == 2
assert len(set(expert_of_part)) == NUM_PARTS, "with descriptions, each part gets its own expert"
assert ours == theirs and weight_diff < 1e-5, "the from-scratch router must pick the layer's experts and weights"
assert routed_to == sorted(expert_of_part[unseen]), "the unseen task goes to its parts' experts"
assert zero_shot < 0.1 * Y_new.var() and zero_shot < 0.1 * misrouted, "zero-shot routing works"
assert reuse < 0.5 * alone, "with 16 examples, reusing experts beats learning from scratch"
assert mse6[:5].mean() < 0.05 * test_set[1].var(), "with an unrelated task added, the related ones stay well fit"
assert mse6[5] < 0.2 * test6[1][test6[2] == 5].var(), "and the unrelated task is learned too"
print("all checks passed")
