"""MoE layers: `MoE` (token routing in a transformer) and `MultiGateMoE` (MMoE / DSelect-k multi-task).

    moe = tm.nn.MoE(d_model=32, d_ff=64, num_experts=8, gate="top_k", k=2, capacity_factor=None, router="token")
    y = moe(x, task_ids=None)        # x (N, d) or (B, T, d)
    moe.aux_losses                   # {"load_balance": Tensor, "z_loss": Tensor, ...} for the last call
    moe.last_routing                 # RoutingStats: per-expert counts, drops, the routing itself

The layer is: router (tinymoe.routers) -> gate (tinymoe.gates) -> [capacity] -> dispatch / experts / combine
(tinymoe.moe_ops, on the current backend) -> + shared experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import dispatch, gates
from .. import losses as L
from ..moe_ops import combine, grouped_ffn, plan_routing, sparse_mixture
from ..moe_ops import dispatch as gather_rows
from ..routers import Router
from ..tensor import Tensor
from .layers import FeedForward, Linear
from .module import Module, ModuleList, Parameter, init_config, make_rng


class Experts(Module):
    """E independent FFNs stored stacked: w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out).

    Each expert is initialised like a Linear pair: U(−1/√d, 1/√d) and U(−1/√f, 1/√f), biases zero.
    """

    def __init__(self, num_experts, d_model, d_ff, d_out=None, seed=None, dtype=np.float32):
        rng = make_rng(seed)
        d_out = d_out or d_model
        self.w1 = Parameter(rng.uniform(-1, 1, (num_experts, d_model, d_ff)).astype(dtype) / np.sqrt(d_model).astype(dtype))
        self.b1 = Parameter(np.zeros((num_experts, d_ff), dtype))
        self.w2 = Parameter(rng.uniform(-1, 1, (num_experts, d_ff, d_out)).astype(dtype) / np.sqrt(d_ff).astype(dtype))
        self.b2 = Parameter(np.zeros((num_experts, d_out), dtype))

    def extra_repr(self):
        E, d, f = self.w1.shape
        return f"num_experts={E}, d={d}, f={f}, d_out={self.w2.shape[2]}"


@dataclass
class RoutingStats:
    """What the last forward did: the routing and per-expert counts (for logs, plots and tests)."""

    expert_idx: np.ndarray  # (T, k_slots)
    weights: np.ndarray  # (T, k_slots)
    keep: np.ndarray  # (T, k_slots) bool: the assignments actually computed
    chosen: np.ndarray  # (T, k_slots) bool: the assignments the gate asked for (before capacity drops)
    counts: np.ndarray  # (E,) assignments computed per expert
    dropped: np.ndarray  # (E,) assignments dropped by capacity per expert
    task_ids: np.ndarray | None  # (T,)
    num_experts: int

    def expert_load(self):
        """f_i: the share of computed assignments that went to each expert (E,); uniform is 1/E."""
        return self.counts / max(self.counts.sum(), 1)

    def task_expert_load(self, num_tasks=None):
        """(num_tasks, E) count of computed assignments per task and expert (needs task ids)."""
        if self.task_ids is None:
            raise ValueError("task_expert_load: the last forward had no task_ids")
        num_tasks = num_tasks or int(self.task_ids.max()) + 1
        table = np.zeros((num_tasks, self.num_experts), dtype=np.int64)
        tasks = np.broadcast_to(self.task_ids[:, None], self.keep.shape)
        np.add.at(table, (tasks[self.keep], self.expert_idx[self.keep]), 1)
        return table

    @property
    def tokens_dropped(self):
        """Tokens that the gate routed somewhere but that no expert computed (their MoE output is 0)."""
        return int((self.chosen.any(axis=1) & ~self.keep.any(axis=1)).sum())


def _check_k(name, k, num_experts):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name}: k must be an integer ≥ 1, got {k!r}")
    if k > num_experts:
        raise ValueError(f"{name}: k={k} > num_experts={num_experts}; choose k ≤ num_experts")


class MoE(Module):
    """A sparsely activated FFN layer: each token goes to k of E experts (see the module docstring).

    gate: softmax | top_k | noisy_top_k | dselect_k | expert_choice | hash (tinymoe.gates).
    router: token | concat | add | task | multi_gate (tinymoe.routers); the task ones need num_tasks and task_ids.
    capacity_factor: None = dropless; c > 0 = at most ⌈c·T·k/E⌉ assignments per expert, served slot-major and in
    token order (priority="slot") or by weight (priority="weight"). For expert_choice it is the c of C = c·T·k/E
    (default 1.0). num_shared_experts: always-on dense FFNs added to the output (DeepSeekMoE-style shared experts).
    """

    def __init__(self, d_model, d_ff, num_experts, gate="top_k", k=2, capacity_factor=None, router="token",
                 num_tasks=None, activation="gelu", seed=0, *, priority="slot", num_shared_experts=0, task_dim=None,
                 task_descriptions=None, num_description_parts=None, gamma=1.0, renormalize=None, aux_weights=None,
                 dtype=np.float32):
        if gate not in gates.GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {list(gates.GATES)}")
        if num_experts < 1:
            raise ValueError(f"MoE: num_experts must be ≥ 1, got {num_experts}")
        k = num_experts if gate == "softmax" else k
        _check_k("MoE", k, num_experts)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        if priority not in ("slot", "weight"):
            raise ValueError(f"MoE: priority must be 'slot' or 'weight', got {priority!r}")
        self.config = init_config(d_model=d_model, d_ff=d_ff, num_experts=num_experts, gate=gate, k=k,
                                  capacity_factor=capacity_factor, router=router, num_tasks=num_tasks,
                                  activation=activation, seed=seed, priority=priority,
                                  num_shared_experts=num_shared_experts, task_dim=task_dim,
                                  task_descriptions=task_descriptions, num_description_parts=num_description_parts,
                                  gamma=gamma, renormalize=renormalize, aux_weights=aux_weights, dtype=dtype)
        rng = make_rng(seed)
        self.d_model, self.d_ff, self.num_experts, self.k = d_model, d_ff, num_experts, k
        self.gate_name, self.capacity_factor, self.priority = gate, capacity_factor, priority
        self.activation, self.gamma, self.renormalize, self.num_tasks = activation, gamma, renormalize, num_tasks
        self.aux_weights = L.aux_weights(aux_weights, type(self).__name__)
        self.noise_rng = np.random.default_rng(rng.integers(2**63))  # noisy top-k's own stream

        router_kwargs = dict(router=router, num_tasks=num_tasks, task_dim=task_dim, task_descriptions=task_descriptions,
                             num_description_parts=num_description_parts, dtype=dtype)
        if gate == "hash":
            self.gate = None  # no parameters: routes by token or task id
        elif gate == "dselect_k":
            m = gates.binary_codes(num_experts).shape[1]
            self.gate = Router(d_model, k * m + k, seed=rng, **router_kwargs)
            self.gate.init_uniform_(slice(0, k * m), gamma / 100, rng)  # S(z) ≈ ½: all experts equal at start
            self.gate.init_uniform_(slice(k * m, None), 0.05, rng)
        else:
            self.gate = Router(d_model, num_experts, seed=rng, **router_kwargs)
        if gate == "noisy_top_k":  # Shazeer et al. 2017: W_g and W_noise start at zero
            self.noise = Router(d_model, num_experts, seed=rng, **router_kwargs)
            for r in (self.gate, self.noise):
                for p in (r.weight, getattr(r, "task_weight", None), r.bias):
                    if p is not None:
                        p.data[...] = 0
        self.experts = Experts(num_experts, d_model, d_ff, seed=rng, dtype=dtype)
        self.shared = ModuleList([FeedForward(d_model, d_ff, activation, rng, dtype) for _ in range(num_shared_experts)])
        self.aux_losses: dict = {}
        self.last_routing: RoutingStats | None = None

    @property
    def router(self):
        return self.gate.router if self.gate is not None else "token"

    def extra_repr(self):
        return (f"gate={self.gate_name!r}, router={self.router!r}, E={self.num_experts}, k={self.k}, "
                f"capacity_factor={self.capacity_factor}")

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x, task_ids=None, token_ids=None):
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.shape[-1] != self.d_model or x.ndim not in (2, 3):
            raise ValueError(f"MoE: x must be (N, {self.d_model}) or (B, T, {self.d_model}), got {x.shape}")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.d_model)  # (N, d)
        task_tok = self._token_task_ids(task_ids, lead)
        routing = self._route(tokens, task_tok, token_ids, lead)

        chosen = np.ones(routing.expert_idx.shape, bool) if routing.keep is None else routing.keep
        keep = chosen
        if self.capacity_factor is not None and self.gate_name != "expert_choice":
            C = dispatch.capacity(self.capacity_factor, tokens.shape[0], self.k, self.num_experts)
            priority = routing.weights.data if self.priority == "weight" else None
            keep = self._backend().capacity_keep(routing.expert_idx, self.num_experts, C, priority, chosen)
        y, plan = sparse_mixture(tokens, routing.expert_idx, routing.weights, keep, self.experts, self.num_experts,
                                 self.activation)
        for ffn in self.shared:
            y = y + ffn(tokens)

        self.aux_losses = self._aux_losses(routing, chosen)
        E = self.num_experts
        self.last_routing = RoutingStats(
            routing.expert_idx, np.asarray(routing.weights.numpy()), keep, chosen, np.asarray(plan.counts),
            np.bincount(routing.expert_idx[chosen & ~keep], minlength=E), task_tok, E)
        return y.reshape(*lead, -1)

    def _backend(self):
        from .. import backends

        return backends.backend_module()

    def _token_task_ids(self, task_ids, lead):
        """Task id per token (N,), from (N,) or (B,) ids; validated when the router needs them."""
        needs = self.gate is not None and self.gate.needs_tasks  # (a hash layer checks its ids in _route)
        if task_ids is None:
            if needs:
                raise ValueError(f"MoE: router={self.router!r} needs task_ids of shape {lead[:1]}")
            return None
        ids = np.asarray(task_ids.data if isinstance(task_ids, Tensor) else task_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"MoE: task_ids must be integers, got dtype {ids.dtype}")
        if ids.shape != lead[:1] and ids.shape != lead:
            raise ValueError(f"MoE: task_ids must have shape {lead[:1]} (one per example), got {ids.shape}")
        limit = self._num_task_ids()
        if ids.size and limit is not None and (ids.min() < 0 or ids.max() >= limit):
            raise ValueError(f"MoE: task_ids must lie in [0, {limit}), got [{ids.min()}, {ids.max()}]")
        return np.broadcast_to(ids.reshape(ids.shape + (1,) * (len(lead) - ids.ndim)), lead).reshape(-1)

    def _num_task_ids(self):
        emb = getattr(self.gate, "task_embedding", None)
        return emb.num_tasks if emb is not None else self.num_tasks

    def _route(self, tokens, task_tok, token_ids, lead) -> gates.Routing:
        g = self.gate_name
        if g == "hash":
            ids = token_ids if token_ids is not None else task_tok
            if ids is None:
                raise ValueError("MoE: gate='hash' routes by id: pass token_ids= (vocabulary ids) or task_ids=")
            ids = np.asarray(ids).reshape(-1)
            if ids.size != tokens.shape[0]:
                raise ValueError(f"MoE: token_ids must have one id per token ({tokens.shape[0]}), got {ids.size}")
            return gates.hash_gate(ids, self.num_experts, self.k, dtype=tokens.dtype)
        h = self.gate(tokens, task_tok)
        if g == "softmax":
            return gates.softmax_gate(h)
        if g == "top_k":
            return gates.top_k_gate(h, self.k, self.renormalize)
        if g == "noisy_top_k":
            return gates.noisy_top_k_gate(h, self.noise(tokens, task_tok), self.k, self.noise_rng, self.training,
                                          self.renormalize)
        if g == "dselect_k":
            return gates.dselect_k_gate(h, self.num_experts, self.k, self.gamma, self.training)
        C = dispatch.capacity(self.capacity_factor or 1.0, tokens.shape[0], self.k, self.num_experts)
        return gates.expert_choice_gate(h, C)

    def _aux_losses(self, routing: gates.Routing, chosen) -> dict:
        out = dict(routing.aux)
        if routing.probs is not None and self.gate_name not in ("expert_choice", "softmax"):
            out["load_balance"] = L.load_balance(routing.probs, routing.expert_idx, chosen)
        if routing.logits is not None:
            out["z_loss"] = L.z_loss(routing.logits)
        return out

    def aux_loss(self):
        """Σ weight · loss over this layer's auxiliary losses (0.0 if it has none)."""
        return L.weighted_total(self.aux_losses, self.aux_weights)


class MultiGateMoE(Module):
    """Shared experts, one gate and one tower per task; every example is scored on every task.

    MMoE (Ma et al. 2018) with gate="softmax"; Top-k; DSelect-k (Hazimeh et al. 2021) static (per_example=False:
    each task's z (k, m) and α (k) are free parameters) or per-example (one Dense(k·m + k) per task). Experts are
    one-hidden-layer MLPs d_in -> d_hidden -> d_expert; towers Linear(d_expert, tower_hidden) -> ReLU ->
    Linear(tower_hidden, out_dim). Only (example, expert) pairs with a nonzero weight in some task are computed.
    """

    def __init__(self, d_in, d_expert, num_experts, num_tasks, gate="softmax", k=2, per_example=False, seed=0, *,
                 d_hidden=None, tower_hidden=8, out_dim=1, activation="relu", gamma=1.0, aux_weights=None,
                 dtype=np.float32):
        if gate not in ("softmax", "top_k", "dselect_k"):
            raise ValueError(f"MultiGateMoE: gate must be 'softmax', 'top_k' or 'dselect_k', got {gate!r}")
        k = num_experts if gate == "softmax" else k
        _check_k("MultiGateMoE", k, num_experts)
        self.config = init_config(d_in=d_in, d_expert=d_expert, num_experts=num_experts, num_tasks=num_tasks,
                                  gate=gate, k=k, per_example=per_example, seed=seed, d_hidden=d_hidden,
                                  tower_hidden=tower_hidden, out_dim=out_dim, activation=activation, gamma=gamma,
                                  aux_weights=aux_weights, dtype=dtype)
        rng = make_rng(seed)
        self.d_in, self.num_experts, self.num_tasks, self.k = d_in, num_experts, num_tasks, k
        self.gate_name, self.per_example, self.gamma, self.activation = gate, per_example, gamma, activation
        self.aux_weights = L.aux_weights(aux_weights, type(self).__name__)
        self.experts = Experts(num_experts, d_in, d_hidden or d_expert, d_expert, seed=rng, dtype=dtype)
        m = gates.binary_codes(num_experts).shape[1]
        if gate == "dselect_k" and not per_example:
            self.z = Parameter(rng.uniform(-gamma / 100, gamma / 100, (num_tasks, k, m)).astype(dtype))
            self.alpha = Parameter(rng.uniform(-0.05, 0.05, (num_tasks, k)).astype(dtype))
        else:
            n = k * m + k if gate == "dselect_k" else num_experts
            self.gates = ModuleList([Linear(d_in, n, seed=rng, dtype=dtype) for _ in range(num_tasks)])
            if gate == "dselect_k":  # official init: z part U(±γ/100) (S ≈ ½), α part U(±0.05)
                for p in (param for lin in self.gates for param in (lin.weight, lin.bias)):
                    p.data[..., : k * m] = rng.uniform(-gamma / 100, gamma / 100, p.data[..., : k * m].shape)
                    p.data[..., k * m :] = rng.uniform(-0.05, 0.05, p.data[..., k * m :].shape)
        self.towers = ModuleList([Tower(d_expert, tower_hidden, out_dim, rng, dtype) for _ in range(num_tasks)])
        self.aux_losses: dict = {}
        self.last_weights: list = []

    def task_weights(self, x):
        """Each task's dense gate weights (N, E) and the gates' auxiliary losses."""
        N, aux, out = x.shape[0], [], []
        for t in range(self.num_tasks):
            if self.gate_name == "dselect_k" and not self.per_example:
                q, a = gates.dselect_k_weights(self.z[t], self.alpha[t], self.num_experts, self.gamma, self.training)
                q = q.reshape(1, -1) * Tensor(np.ones((N, 1), q.dtype))  # (N, E): the same for every example
            else:
                h = self.gates[t](x)
                if self.gate_name == "dselect_k":
                    r = gates.dselect_k_gate(h, self.num_experts, self.k, self.gamma, self.training)
                else:
                    r = gates.softmax_gate(h) if self.gate_name == "softmax" else gates.top_k_gate(h, self.k)
                q, a = gates._scatter_rows(r.weights, r.expert_idx, self.num_experts), r.aux
            out.append(q)
            aux.append(a)
        return out, L.average_over_layers(aux)

    def forward(self, x):
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MultiGateMoE: x must be (N, {self.d_in}), got {x.shape}")
        N, E = x.shape[0], self.num_experts
        weights, self.aux_losses = self.task_weights(x)
        # compute each (example, expert) pair once, if any task gives it weight: slot j is expert j
        needed = np.zeros((N, E), bool)
        for q in weights:
            needed |= q.data != 0
        idx = np.broadcast_to(np.arange(E), (N, E)).copy()
        plan = plan_routing(idx, E, needed)
        xs = x.astype(self.experts.w1.dtype)
        out = grouped_ffn(gather_rows(xs, plan), plan, self.experts.w1, self.experts.b1, self.experts.w2,
                          self.experts.b2, self.activation)
        self.last_weights = [np.asarray(q.numpy()) for q in weights]
        return [tower(combine(out, q, plan)) for tower, q in zip(self.towers, weights)]

    def aux_loss(self):
        return L.weighted_total(self.aux_losses, self.aux_weights)

    def selected_experts(self, threshold=0.0):
        """Per task, the experts with mean weight above `threshold` in the last forward (for cluster recovery)."""
        return [set(np.flatnonzero(q.mean(axis=0) > threshold)) for q in self.last_weights]


class Tower(Module):
    """One task's tower: Linear(d_in, hidden) -> ReLU -> Linear(hidden, out_dim) (MMoE, Ma et al. 2018)."""

    def __init__(self, d_in, hidden, out_dim, rng, dtype):
        self.fc1 = Linear(d_in, hidden, seed=rng, dtype=dtype)
        self.fc2 = Linear(hidden, out_dim, seed=rng, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())
