"""The expert-parallel MoE layer: `tm.nn.MoE` with its experts spread over the ranks of an MPI communicator.

On P ranks with E experts, rank r owns experts [r·E/P, (r+1)·E/P) (E/P = E_loc of them) and every rank routes its
own shard of the global batch — the ranks' shards concatenated in rank order. One forward (Lepikhin et al. 2021,
GShard §3; Rajbhandari et al. 2022, DeepSpeed-MoE §5):

    plan   = plan_routing(expert_idx, E, keep)   # my kept assignments grouped by expert: rank p's rows contiguous
    counts = plan.counts.reshape(P, E_loc)       # rows I send to each rank, per expert there
    Alltoall(counts) -> recv (P, E_loc)          # rows each rank sends me, per local expert
    xs  = dispatch(x, plan)                      # (R, d)
    xr  = all_to_all(xs)                         # (R_in, d) grouped by source rank, then expert
    xe  = permute_rows(xr, by expert)            # (R_in, d) grouped by local expert, then source rank
    out = grouped_ffn(xe, local experts)         # the active backend's kernel on my E_loc experts
    back = all_to_all(permute_rows(out, back))   # (R, d_out) in my plan's row order again
    y   = combine(back, weights, plan)           # (T, d_out)

Within one expert the rows arrive in source-rank order, and within a rank in token order: exactly the order of the
single-process layer on the global batch, so each expert's GEMM sees the same matrix. Backward mirrors all of it
through the autodiff (`ops.py`). The auxiliary losses use global statistics (one Allreduce each), and capacity is
global per expert (the single-process definition) or per rank (GShard's groups): docs/distributed.md.

`tinymoe.nn.MoE.forward` runs unchanged; `ExpertParallelMoE` overrides its three steps that differ across ranks:
`_capacity_keep` (global statistics, global or per-rank capacity), `_mixture` (the all-to-alls) and `_aux_losses`.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from .. import dispatch as D
from .. import functional as F
from ..moe_ops import RoutingPlan, combine, grouped_ffn, plan_routing
from ..moe_ops import gather as gather_rows
from ..nn.moe import MoE
from ..engine import Tensor
from .comm import mpi
from .ops import all_to_all, allreduce_sum, permute_rows

CAPACITY_SCOPES = ("global", "rank")


def _source_to_expert_order(recv_counts):
    """The permutation that regroups received rows from (source rank, expert) order to (expert, source) order."""
    P, E_loc = recv_counts.shape
    starts = np.concatenate([[0], np.cumsum(recv_counts.reshape(-1))[:-1]]).reshape(P, E_loc)
    blocks = [np.arange(starts[s, e], starts[s, e] + recv_counts[s, e]) for e in range(E_loc) for s in range(P)]
    return np.concatenate(blocks).astype(np.int64) if blocks else np.zeros(0, np.int64)


def expert_parallel_mixture(x: Tensor, expert_idx, weights: Tensor, keep, experts, num_experts, comm,
                            activation="gelu"):
    """y[t] = Σ_j w[t,j] · FFN_{e[t,j]}(x[t]) with the experts spread over `comm`; returns (y, plan, recv_counts).

    x (T, d) this rank's tokens; expert_idx, keep (T, k); `experts` holds this rank's E/P experts' parameters.
    recv_counts (P, E/P): the rows each rank sent to each of my experts.
    """
    P = comm.Get_size()
    E_loc = num_experts // P
    plan = plan_routing(expert_idx, num_experts, keep)  # rows grouped by global expert id
    send_counts = np.ascontiguousarray(np.asarray(plan.counts, dtype=np.int64).reshape(P, E_loc))
    recv_counts = np.empty_like(send_counts)
    comm.Alltoall(send_counts, recv_counts)  # recv_counts[s, e]: rows rank s sends to my expert e
    send, recv = send_counts.sum(axis=1), recv_counts.sum(axis=1)  # (P,) rows per destination / source

    x = x.astype(experts.w1.dtype)  # backends multiply same-dtype operands only
    xr = all_to_all(gather_rows(x, plan), send, recv, comm)  # (R_in, d) source-major
    perm = _source_to_expert_order(recv_counts)
    xe = permute_rows(xr, perm)  # (R_in, d) expert-major
    offsets = np.concatenate([[0], np.cumsum(recv_counts.sum(axis=0))]).astype(np.int64)  # (E_loc + 1,)
    local = RoutingPlan(perm, offsets, None, int(recv.sum()), 1, plan.backend)  # only offsets/backend are used
    out = grouped_ffn(xe, local, experts.w1, experts.b1, experts.w2, experts.b2, activation)  # (R_in, d_out)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    back = all_to_all(permute_rows(out, inverse), recv, send, comm)  # (R, d_out) in plan order
    return combine(back, weights, plan), plan, recv_counts


class ExpertParallelMoE(MoE):
    """A `tm.nn.MoE` whose `experts` hold only this rank's E/P experts. Made by `ExpertParallel` (parallel.py),
    which sets `comm`, `first_expert` and `capacity_scope`; `forward` must be called on every rank together."""

    comm = None
    first_expert = 0
    capacity_scope = "global"

    # MoE.forward runs as on one process; these three steps are where expert parallelism differs.

    def _capacity_keep(self, routing, chosen):
        """One Allreduce of the global batch size and the gate's choices per expert (for the aux losses and
        capacity), then the capacity drops. "rank": C = ⌈c·T_r·k/E⌉ per rank, each rank serving its own queue
        (GShard's groups). "global": C = ⌈c·N·k/E⌉ per expert over the global batch, served slot-major and in global
        token order (or by weight) — exactly the single-process layer on the concatenated batch; needs the routing of
        every rank."""
        stats = np.append(np.bincount(routing.expert_idx[chosen], minlength=self.num_experts),
                          routing.expert_idx.shape[0]).astype(np.int64)
        self.comm.Allreduce(mpi().IN_PLACE, stats)
        self._chosen_global, self._n_global = stats[:-1], int(stats[-1])
        factor = self.config.capacity_factor
        if factor is None or self.spec.capacity != "drop":
            return chosen
        be = backends.backend_module()
        priority = routing.weights.data if self.config.priority == "weight" else None
        if self.capacity_scope == "rank":
            C = D.capacity(factor, routing.expert_idx.shape[0], self.k, self.num_experts)
            return be.capacity_keep(routing.expert_idx, self.num_experts, C, priority, chosen)
        sizes = self.comm.allgather(routing.expert_idx.shape[0])
        idx_all = _allgather_rows(routing.expert_idx.astype(np.int64), sizes, self.comm)
        chosen_all = _allgather_rows(chosen.astype(np.uint8), sizes, self.comm).astype(bool)
        prio_all = None if priority is None else _allgather_rows(np.asarray(priority), sizes, self.comm)
        C = D.capacity(factor, self._n_global, self.k, self.num_experts)
        keep_all = be.capacity_keep(idx_all, self.num_experts, C, prio_all, chosen_all)
        start = sum(sizes[: self.comm.Get_rank()])
        return np.ascontiguousarray(keep_all[start : start + routing.expert_idx.shape[0]])

    def _mixture(self, tokens, routing, keep):
        """The experts' part over the ranks: all-to-all there, the local experts, all-to-all back, combine."""
        y, plan, recv_counts = expert_parallel_mixture(tokens, routing.expert_idx, routing.weights, keep, self.experts,
                                                       self.num_experts, self.comm, self.config.activation)
        self.last_received = recv_counts  # (P, E/P): rows each rank sent to each of my experts
        return y, np.asarray(plan.counts)

    def _aux_losses(self, routing, chosen):
        return self._aux_losses_global(routing, self._chosen_global, routing.expert_idx.shape[0], self._n_global)

    def _aux_losses_global(self, routing, chosen_global, n_local, n_global) -> dict:
        """The layer's auxiliary losses on the global batch (Fedus et al. 2022 eq. 4; Zoph et al. 2022 eq. 5).

        load_balance: f from the global choice counts, P_i = Σ_ranks Σ_x p_i(x) / N. z_loss: Σ_ranks Σ_x lse² / N.
        Gate-specific losses (dselect_entropy: a token mean) are combined as Σ_r (n_r / N)·loss_r, which is the
        global token mean; noisy top-k's importance_load is a batch statistic, so this gives the token-weighted mean
        of the per-rank values (docs/distributed.md)."""
        share = n_local / max(n_global, 1)
        out = {name: allreduce_sum(value * share, self.comm) for name, value in routing.aux.items()}
        if "load_balance" in self.spec.aux:
            f = (chosen_global / max(chosen_global.sum(), 1)).astype(routing.probs.dtype)  # (E,) no gradient
            P = allreduce_sum(routing.probs.sum(axis=0), self.comm) * (1.0 / max(n_global, 1))  # (E,)
            out["load_balance"] = (P * f).sum() * float(self.num_experts)
        if "z_loss" in self.spec.aux:
            lse = F.logsumexp(routing.logits, axis=-1)
            out["z_loss"] = allreduce_sum((lse * lse).sum(), self.comm) * (1.0 / max(n_global, 1))
        return out


def _allgather_rows(a, sizes, comm):
    """Concatenate every rank's rows (rank order); `sizes` the row count of each rank."""
    a = np.ascontiguousarray(a)
    width = int(np.prod(a.shape[1:]))
    counts = np.asarray(sizes, dtype=np.int64) * width
    out = np.empty((int(sum(sizes)),) + a.shape[1:], dtype=a.dtype)
    comm.Allgatherv(a, [out, (counts, np.concatenate([[0], np.cumsum(counts)[:-1]]))])
    return out
