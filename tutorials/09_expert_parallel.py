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
# # 9. Expert parallelism: the experts on two processes
#
# **What you will learn.** How an MoE layer runs when its experts live in different processes: each process (an
# MPI *rank*) keeps half of the experts and routes its own half of the batch; tokens travel to the rank that owns
# their expert with an *all-to-all*, come back with a second one, and the result is the same — bit for bit — as
# one process computing the whole batch. We follow every token of a small batch to see where it goes.
#
# **Run it** with two ranks: `mpiexec -n 2 python tutorials/09_expert_parallel.py` (`pip install -e ".[mpi]"`
# puts mpiexec in the virtual environment). Run as a plain script, it starts itself under `mpiexec -n 2`. In a
# notebook kernel there is only one process: read it there, run it in a terminal.
#
# **Prerequisites.** Tutorial 2 (an MoE layer by hand: route, dispatch, experts, combine).
#
# **Sources.** GShard (Lepikhin et al. 2021, §3: experts sharded over devices, all-to-all dispatch and combine);
# DeepSpeed-MoE (Rajbhandari et al. 2022, §5: expert + data parallelism); Switch (Fedus et al. 2022, eq. 4: the
# load-balance loss on the batch). The full story is in docs/distributed.md.

# %%
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import tinymoe as tm
from tinymoe.distributed import ExpertParallel, abort_on_error, launched_by_mpi, world

if not launched_by_mpi() and "__file__" in globals():  # a plain `python 09_expert_parallel.py`: start 2 ranks
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        sys.exit("this tutorial needs MPI: pip install -e '.[mpi]' (mpi4py + the MPICH wheel)")
    sys.exit(subprocess.run([mpiexec, "-n", "2", sys.executable, __file__]).returncode)

comm = world()
FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))  # where the plots are saved
rank, P = comm.Get_rank(), comm.Get_size()


def say(*args):  # rank 0 speaks for everyone, so the lines do not interleave
    if rank == 0:
        print(*args, flush=True)


def say_each(line):  # every rank's line, printed by rank 0 in rank order (a collective: all ranks call it)
    for each in comm.gather(line, root=0) or []:
        print(each, flush=True)


say(f"{P} ranks; this is rank {rank}")
assert P == 2, "written for 2 ranks: mpiexec -n 2 python tutorials/09_expert_parallel.py"

# %% [markdown]
# ## 1. The same layer on every rank, then half of the experts each
#
# Both ranks build the same layer from the same seed. `ExpertParallel` then keeps, on rank r, experts
# [r·E/P, (r+1)·E/P) — rank 0 experts 0 and 1, rank 1 experts 2 and 3 — and turns the layer into an
# expert-parallel one. Everything else (the router) stays replicated. We keep an untouched copy, `one`, as the
# single-process reference.

# %%
T, d, f, E, k = 6, 8, 16, 4, 2  # tokens per rank, width, expert width, experts, experts per token
one = tm.nn.MoE(d, f, E, gate="top_k", k=k, seed=0)  # one process, all experts
layer = tm.nn.MoE(d, f, E, gate="top_k", k=k, seed=0)
par = ExpertParallel(layer, comm)
mine = range(rank * E // P, (rank + 1) * E // P)
say_each(f"rank {rank}: experts {list(mine)}, experts.w1 {layer.experts.w1.shape}, router {layer.gate.weight.shape}")
assert layer.experts.w1.shape == (E // P, d, f)
assert np.array_equal(layer.experts.w1.numpy(), one.experts.w1.numpy()[mine.start:mine.stop])

# %% [markdown]
# ## 2. Each rank routes its own tokens
#
# The global batch is 12 tokens; rank 0 holds tokens 0–5, rank 1 tokens 6–11 (the global batch is the ranks'
# shards in rank order). Every rank runs the router on its tokens, then the layer exchanges them. We gather every
# rank's routing on rank 0 to print where each token goes.

# %%
X = np.random.default_rng(1).standard_normal((P * T, d)).astype(np.float32)  # the global batch, known to all
x = tm.Tensor(X[rank * T:(rank + 1) * T], requires_grad=True)  # my shard
with abort_on_error(comm):  # a rank that fails ends the job instead of leaving the other waiting forever
    y = layer(x)

routes = comm.gather(layer.last_routing.expert_idx, root=0)  # (T, k) per rank
if rank == 0:
    print("token  on rank  experts  owner ranks   what happens")
    for r, idx in enumerate(routes):
        for t, experts in enumerate(idx):
            owners = [int(e) // (E // P) for e in experts]
            moves = ", ".join("stays" if o == r else f"travels to rank {o}" for o in owners)
            print(f"{r * T + t:>5}  {r:>7}  {str(list(map(int, experts))):>7}  {str(owners):>11}   {moves}")

# %% [markdown]
# The same as a picture: one row per token of the global batch, one column per choice j; the colour says which
# rank computes that assignment, and a cross marks the assignments that leave the token's own rank.

# %%
if rank == 0:
    import matplotlib.pyplot as plt

    owner = np.concatenate(routes) // (E // P)  # (P·T, k) the rank that owns each chosen expert
    home = np.repeat(np.arange(P), T)[:, None]  # (P·T, 1) the rank that holds each token
    fig, ax = plt.subplots(figsize=(3.6, 4.2))
    ax.imshow(owner, cmap="coolwarm", vmin=0, vmax=P - 1, aspect="auto")
    for t, j in zip(*np.nonzero(owner != home)):
        ax.text(j, t, "×", ha="center", va="center", fontsize=12)
    ax.axhline(T - 0.5, color="k", lw=1)
    ax.set(xticks=range(k), xticklabels=[f"choice {j}" for j in range(k)], yticks=range(P * T),
           ylabel="token (rank 0 holds 0–5, rank 1 holds 6–11)",
           title="who computes each assignment\n(blue rank 0, red rank 1; × travels)")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURES / "09_where_tokens_go.png", dpi=110)
    plt.show()

# %% [markdown]
# ## 3. The all-to-all: counts first, then rows
#
# Each rank counts the rows it sends to each expert of each rank, `send[p, e]`, and exchanges those counts
# (`Alltoall`), so every rank knows how many rows it will receive: `received[s, e]`, the rows rank s sends to my
# e-th expert. Then the rows themselves go (`Alltoallv`). What rank s sends to rank r is exactly what rank r
# receives from rank s — the check below would fail if a row went astray.

# %%
send = np.bincount(layer.last_routing.expert_idx.reshape(-1), minlength=E).reshape(P, E // P)  # (P, E/P)
sends = comm.allgather(send)  # every rank's send matrix
received = layer.last_received  # (P, E/P), filled by the layer's Alltoall
say_each(f"rank {rank} received rows per (source rank, my expert): {received.tolist()}")
for s in range(P):
    assert np.array_equal(received[s], sends[s][rank]), (s, received[s], sends[s][rank])
for s in range(P):
    say(f"rank {s} sends " + ", ".join(f"{int(sends[s][p].sum())} rows to rank {p}" for p in range(P)))

# %% [markdown]
# ## 4. Same answer as one process, bit for bit
#
# Each expert meets its rows in the same order as on one process — source rank 0's rows first, then rank 1's,
# each in token order — so each expert's matrix product is the same computation and the output is *equal*, not
# just close. The one-process layer runs on the whole global batch here, on every rank.

# %%
x_one = tm.Tensor(X, requires_grad=True)
y_one = one(x_one)
diff = float(np.abs(y.numpy() - y_one.numpy()[rank * T:(rank + 1) * T]).max())
say_each(f"rank {rank}: max |y_parallel − y_one_process| = {diff} ({'bit for bit' if diff == 0 else 'approximate'})")
assert diff == 0.0

# %% [markdown]
# ## 5. Backward: the reverse all-to-all
#
# The all-to-all only moves rows between ranks — a permutation of the global batch — so its gradient is the
# inverse permutation: the reverse all-to-all. The autodiff does it for us. Each rank's loss is weighted by its
# share of the batch (here ½) so that the sum over ranks is the loss of the global batch; the router's gradient
# (replicated on both ranks) is then summed over the ranks with one Allreduce (`par.sync_gradients()`), while each
# expert's gradient is already complete on its owner.

# %%
G = np.random.default_rng(2).standard_normal((P * T, d)).astype(np.float32)  # a fixed upstream gradient
((y * tm.Tensor(G[rank * T:(rank + 1) * T])).sum() + layer.aux_loss() * (1 / P)).backward()
par.sync_gradients()
((y_one * tm.Tensor(G)).sum() + one.aux_loss()).backward()

expert_diff = float(np.abs(layer.experts.w1.grad - one.experts.w1.grad[mine.start:mine.stop]).max())
router_diff = float(np.abs(layer.gate.weight.grad - one.gate.weight.grad).max())
input_diff = float(np.abs(x.grad - x_one.grad[rank * T:(rank + 1) * T]).max())
say_each(f"rank {rank}: expert grads differ by {expert_diff}, router grads by {router_diff:.1e}, inputs by "
         f"{input_diff:.1e}")
assert expert_diff == 0.0  # same rows, same order: bit for bit
assert router_diff < 1e-5 and input_diff < 1e-5  # the Allreduce adds the ranks in another order: round-off only

# %% [markdown]
# ## 6. The load-balance loss is the batch's, not a rank's
#
# The Switch load-balance loss E·Σ f_i·P_i multiplies two batch statistics. Averaging each rank's own value would
# give a different number; the layer all-reduces the counts and the mean probabilities first, so both ranks hold
# the global batch's loss.

# %%
lb = layer.aux_losses["load_balance"].item()
say(f"load balance: parallel {lb:.6f}, one process {one.aux_losses['load_balance'].item():.6f}")
assert abs(lb - one.aux_losses["load_balance"].item()) < 1e-6
assert np.allclose(comm.allgather(lb), lb)

# %% [markdown]
# ## 7. What travelled
#
# Each rank sent every row whose expert lives on the other rank: its share of the T·k = 12 assignments, each a
# row of d = 8 float32 values, there and back again. With uniform routing, half of them leave the rank: 2·T·k·d·4 B
# · (P−1)/P per pass.

# %%
off_rank = int(send.sum() - send[rank].sum())  # rows I sent away (the rest stay on my rank)
say(f"rank 0 sent {off_rank} of {T * k} rows away: {2 * off_rank * d * 4} bytes there and back in forward "
    f"(uniform routing would send {T * k * (P - 1) // P})")
assert 0 <= off_rank <= T * k
say("all checks passed")

# %% [markdown]
# ## Exercises
#
# 1. Give the layer `capacity_factor=0.5`. Which tokens are dropped? With `ExpertParallel(..., capacity_scope=
#    "rank")` each rank applies its own capacity to its own tokens (GShard's groups): is the output still equal to
#    the one-process layer on the whole batch? On each shard alone? (docs/distributed.md §4.)
# 2. Run with `mpiexec -n 4` and E = 4 (edit the assertion on P): one expert per rank. Then try E = 6.
# 3. Train the demo on 2 ranks: `mpiexec -n 2 tinymoe train --set optim.steps=200 --run-dir runs/ep`, then
#    `tinymoe eval runs/ep` on one process: the checkpoint holds every expert.
