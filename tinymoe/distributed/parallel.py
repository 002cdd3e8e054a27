"""`ExpertParallel`: one model trained by every rank of a communicator — experts sharded, the rest replicated.

    par = ExpertParallel(model, world())          # every MoE layer keeps only this rank's E/P experts
    fit(model, train, val, optim, parallel=par)   # what fit asks of it: shard_batch, sync_gradients, ...

Data parallelism for everything that is not an expert. Each rank computes ℓ_r = (n_r / N) · loss(its shard), so that
Σ_r ℓ_r is the loss of the global batch of N examples; the gradient of a replicated parameter is then Σ_r ∂ℓ_r/∂θ,
one Allreduce (sum) per bucket of gradients (not one per parameter: PyTorch DDP's buckets, Li et al. 2020 §3.2.3).
An expert's gradient needs no reduction: its owner already received, through the reverse all-to-all, the gradient
of every token that any rank sent to it.

Checkpoints hold all experts: `gathered()` assembles them (and their optimizer moments) on every rank for the
duration of a `with` block and re-shards on exit, so saving writes one ordinary single-process checkpoint and
loading one (from any number of ranks) shards it again.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..nn import CGC, PLE, MoE, MultiGateMoE
from .comm import check_layout, mpi, world
from .layer import CAPACITY_SCOPES, ExpertParallelMoE

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


class ExpertParallel:
    """Shard `model`'s MoE layers over `comm` (default COMM_WORLD) and provide what a data-parallel loop needs.

    capacity_scope: "global" (capacity per expert over the global batch, equal to one process) or "rank"
    (per rank, GShard's groups: no extra communication). bucket_mb: size of the gradient Allreduce buckets.
    Every rank must build the same model; the root's weights are broadcast so the replicas start equal.
    """

    def __init__(self, model, comm=None, *, capacity_scope="global", bucket_mb=4.0):
        self.comm = comm if comm is not None else world()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"ExpertParallel: capacity_scope must be one of {CAPACITY_SCOPES}, got {capacity_scope!r}")
        layers = [m for m in model.modules() if isinstance(m, MoE)]
        dense_multitask = [type(m).__name__ for m in model.modules() if isinstance(m, (MultiGateMoE, CGC, PLE))]
        if dense_multitask or not layers:
            why = (f"{dense_multitask[0]} weighs every expert for every example" if dense_multitask else
                   f"{type(model).__name__} has no tm.nn.MoE layer")
            raise ValueError(f"ExpertParallel: {why}, so there is nothing to spread over ranks. Expert parallelism "
                             "shards the token-routed tm.nn.MoE layers of a transformer (MoETransformer); train "
                             "multi-task models on one process")
        for i, m in enumerate(layers):  # every check before any communication: the same error on every rank
            check_layout(m.num_experts, self.size, f"MoE layer {i}")
            if m.spec.capacity == "choose":
                raise ValueError("ExpertParallel: gate='expert_choice' ranks the whole batch per expert; it is not "
                                 "supported across ranks (use top_k, noisy_top_k, dselect_k, softmax or hash)")
        self.model, self.layers = model, layers
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._broadcast_parameters()
        names = {id(p): n for n, p in model.named_parameters()}
        self.expert_params = {}  # id -> (name, parameter, experts per rank)
        for m in layers:
            E_loc = m.num_experts // self.size
            for attr in EXPERT_PARAMS:
                p = getattr(m.experts, attr)
                p.data = p.data[self.rank * E_loc : (self.rank + 1) * E_loc].copy()
                self.expert_params[id(p)] = (names[id(p)], p, E_loc)
            m.__class__ = ExpertParallelMoE
            m.comm, m.first_expert, m.capacity_scope = self.comm, self.rank * E_loc, capacity_scope
        self.dense = [p for p in model.parameters() if id(p) not in self.expert_params]
        self.buckets = self._make_buckets()

    @property
    def is_root(self):
        return self.rank == 0

    def _broadcast_parameters(self):
        for p in self.model.parameters():
            data = np.ascontiguousarray(p.data)
            self.comm.Bcast(data, root=0)
            p.data = data

    # ---- the batch -------------------------------------------------------------------------------------------
    def check_batches(self, n, batch_size, where="fit"):
        """Every batch must give every rank at least one example (a rank with none would still have to join the
        all-to-alls with an empty model call)."""
        last = n % batch_size
        if batch_size < self.size or 0 < last < self.size:
            raise ValueError(f"{where}: with {self.size} ranks every batch needs ≥ {self.size} examples; got "
                             f"batch_size={batch_size} and a last batch of {last or batch_size} per epoch "
                             f"({n} examples). Choose a batch_size ≥ {self.size} that leaves no remainder below "
                             f"{self.size}.")

    def shard_batch(self, idx):
        """This rank's contiguous part of the global batch `idx`, and its share n_r / N of the batch loss."""
        local = np.array_split(np.asarray(idx), self.size)[self.rank]
        return local, len(local) / max(len(idx), 1)

    def eval_batches(self, n, batch_size):
        """Batches of the same boundaries on every rank (a last batch smaller than P joins the one before), each
        cut to this rank's part."""
        starts = list(range(0, n, batch_size))
        if len(starts) > 1 and n - starts[-1] < self.size:
            starts.pop()
        ends = starts[1:] + [n]
        return [self.shard_batch(np.arange(s, e))[0] for s, e in zip(starts, ends)]

    def sum(self, values):
        """Σ over ranks of a number or float array (metrics, loss values)."""
        array = np.array(values, dtype=np.float64, order="C")
        out = np.empty_like(array)
        self.comm.Allreduce(array, out)
        return out if np.ndim(values) else float(out[()])

    # ---- gradients -----------------------------------------------------------------------------------------------
    def _make_buckets(self):
        """Replicated parameters in groups of at most bucket_bytes (same dtype): one Allreduce per group."""
        buckets, current, size = [], [], 0
        for p in self.dense:
            if current and (size + p.data.nbytes > self.bucket_bytes or p.dtype != current[0].dtype):
                buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.data.nbytes
        return buckets + ([current] if current else [])

    def sync_gradients(self):
        """Σ over ranks of every replicated parameter's gradient, one Allreduce per bucket. A parameter that got no
        gradient on any rank keeps none (the optimizer then skips it, as on one process)."""
        MPI = mpi()
        has = np.array([p.grad is not None for p in self.dense], dtype=np.int32)
        self.comm.Allreduce(MPI.IN_PLACE, has, op=MPI.MAX)
        got = {id(p): bool(h) for p, h in zip(self.dense, has)}
        for bucket in self.buckets:
            flat = np.concatenate([(p.grad if p.grad is not None else np.zeros_like(p.data)).reshape(-1)
                                   for p in bucket]).astype(bucket[0].dtype, copy=False)
            self.comm.Allreduce(MPI.IN_PLACE, flat)
            start = 0
            for p in bucket:
                if got[id(p)]:
                    p.grad = flat[start : start + p.size].reshape(p.shape)
                start += p.size

    def clip_grad_norm(self, max_norm):
        """Global-norm clipping over the whole model (replicated parameters counted once, every rank's experts):
        the same norm and scale as `tinymoe.optim.clip_grad_norm` on one process."""
        import math

        def sq(params):
            return sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params if p.grad is not None)

        experts = [p for _, p, _ in self.expert_params.values()]
        total = math.sqrt(sq(self.dense) + self.sum(sq(experts)))
        if not math.isfinite(total):
            raise FloatingPointError(f"clip_grad_norm: the gradient norm is {total}; lower the learning rate")
        if total > max_norm:
            scale = max_norm / (total + 1e-6)
            for p in self.dense + experts:
                if p.grad is not None:
                    p.grad = p.grad * scale
        return total

    # ---- whole experts: checkpoints ------------------------------------------------------------------------------
    def _gather(self, local):
        out = np.empty((local.shape[0] * self.size,) + local.shape[1:], dtype=local.dtype)
        self.comm.Allgather(np.ascontiguousarray(local), out)
        return out

    def _slice(self, full, E_loc):
        return np.ascontiguousarray(full[self.rank * E_loc : (self.rank + 1) * E_loc]).copy()

    @contextlib.contextmanager
    def gathered(self, optimizer=None):
        """Inside the block every rank's model (and optimizer moments) holds all E experts, as a single-process
        model would: save or load a checkpoint there. On exit each rank keeps its slice of what is there then."""
        for holder, key, _ in self._expert_slots(optimizer):
            self._set(holder, key, self._gather(self._get(holder, key)))
        try:
            yield
        finally:  # slots again: loading optimizer state inside the block may have created the moment buffers
            for holder, key, E_loc in self._expert_slots(optimizer):
                self._set(holder, key, self._slice(self._get(holder, key), E_loc))

    def _expert_slots(self, optimizer):
        """(container, key, experts per rank) for every expert array: the parameters and their optimizer moments."""
        index = {id(p): i for i, p in enumerate(optimizer.params)} if optimizer is not None else {}
        slots = []
        for _, p, E_loc in self.expert_params.values():
            slots.append((p, "data", E_loc))
            if id(p) in index:
                slots += [(buffers, index[id(p)], E_loc) for buffers in optimizer.state.values()]
        return slots

    @staticmethod
    def _get(holder, key):
        return getattr(holder, key) if isinstance(key, str) else holder[key]

    @staticmethod
    def _set(holder, key, value):
        if isinstance(key, str):
            setattr(holder, key, value)
        else:
            holder[key] = value

    def full_state_dict(self, state):
        """A state dict with this rank's expert slices -> one with all experts (every rank calls it)."""
        names = {name: E_loc for name, _, E_loc in self.expert_params.values()}
        return {k: self._gather(v) if k in names else v for k, v in state.items()}

    def local_state_dict(self, state):
        """A state dict with all experts -> this rank's slices."""
        names = {name: E_loc for name, _, E_loc in self.expert_params.values()}
        return {k: self._slice(v, names[k]) if k in names else v for k, v in state.items()}

    def unshard(self):
        """Gather every expert on every rank and turn the layers back into single-process `MoE` layers."""
        for _, p, _ in self.expert_params.values():
            p.data = self._gather(p.data)
        for m in self.layers:
            m.__class__ = MoE
        self.expert_params, self.dense = {}, self.model.parameters()
        return self.model
