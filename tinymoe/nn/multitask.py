"""Multi-task models for tabular data: every example is scored on every task, one tower per task.

* `MultiGateMoE`: shared experts, one gate per task — MMoE (Ma et al. 2018) with gate="softmax", Top-k, and
  DSelect-k (Hazimeh et al. 2021), static or per example.
* `SharedBottom`: the baseline both papers compare against (Caruana 1997) — one shared MLP, then the towers.

Both take x (N, d_in) and return a list of num_tasks outputs (N, out_dim); `tinymoe train` builds them for
tabular data and the E1 experiment compares them.
"""
from __future__ import annotations

import numpy as np

from .. import gates
from ..arrays import HostCopies
from .. import losses as L
from ..moe_ops import combine, gather, grouped_ffn, plan_routing
from ..engine import Tensor
from .layers import Linear
from .module import Module, ModuleList, Parameter, init_config, make_rng
from .moe import GATE_SPECS, Experts, GateInputs, check_k, init_dselect_k_


class Tower(Module):
    """Linear(d_in, hidden) -> ReLU -> Linear(hidden, out_dim): one task's tower (MMoE, Ma et al. 2018), and
    one expert of CGC / PLE (nn/ple.py)."""

    def __init__(self, d_in, hidden, out_dim, rng, dtype):
        self.fc1 = Linear(d_in, hidden, seed=rng, dtype=dtype)
        self.fc2 = Linear(hidden, out_dim, seed=rng, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


class MultiGateMoE(Module):
    """Shared experts, one gate and one tower per task; every example is scored on every task.

    MMoE (Ma et al. 2018) with gate="softmax"; Top-k; DSelect-k (Hazimeh et al. 2021) static (per_example=False:
    each task's z (k, m) and α (k) are free parameters) or per-example (one Dense(k·m + k) per task). Experts are
    one-hidden-layer MLPs d_in -> d_hidden -> d_expert; towers Linear(d_expert, tower_hidden) -> ReLU ->
    Linear(tower_hidden, out_dim). Only (example, expert) pairs with a nonzero weight in some task are computed.
    """

    GATES = ("softmax", "top_k", "dselect_k")

    def __init__(self, d_in, d_expert, num_experts, num_tasks, gate="softmax", k=2, per_example=False, seed=0, *,
                 d_hidden=None, tower_hidden=8, out_dim=1, activation="relu", gamma=1.0, aux_weights=None,
                 dtype=np.float32):
        if gate not in self.GATES:
            raise ValueError(f"MultiGateMoE: gate must be 'softmax', 'top_k' or 'dselect_k', got {gate!r}")
        spec = GATE_SPECS[gate]
        k = num_experts if spec.dense else k
        check_k("MultiGateMoE", k, num_experts)
        self.config = init_config(d_in=d_in, d_expert=d_expert, num_experts=num_experts, num_tasks=num_tasks,
                                  gate=gate, k=k, per_example=per_example, seed=seed, d_hidden=d_hidden,
                                  tower_hidden=tower_hidden, out_dim=out_dim, activation=activation, gamma=gamma,
                                  aux_weights=aux_weights, dtype=dtype)
        rng = make_rng(seed)
        self.d_in, self.num_experts, self.num_tasks, self.k = d_in, num_experts, num_tasks, k
        self.gate_name, self.per_example, self.gamma, self.activation = gate, per_example, gamma, activation
        self.aux_weights = L.aux_weights(aux_weights, type(self).__name__)
        self.experts = Experts(num_experts, d_in, d_hidden or d_expert, d_expert, seed=rng, dtype=dtype)
        n = spec.width(num_experts, k)  # gate outputs per task
        if self.static:  # each task's selectors are free parameters: rows [z (k·m) | α (k)]
            za = np.empty((num_tasks, n), dtype)
            init_dselect_k_([za], k, num_experts, gamma, rng)
            self.z = Parameter(za[:, : n - k].reshape(num_tasks, k, -1))  # (tasks, k, m)
            self.alpha = Parameter(za[:, n - k :].copy())  # (tasks, k)
        else:
            self.gates = ModuleList([Linear(d_in, n, seed=rng, dtype=dtype) for _ in range(num_tasks)])
            if gate == "dselect_k":
                init_dselect_k_([p.data for lin in self.gates for p in (lin.weight, lin.bias)], k, num_experts,
                                gamma, rng)
        self.towers = ModuleList([Tower(d_expert, tower_hidden, out_dim, rng, dtype) for _ in range(num_tasks)])
        self.aux_losses: dict = {}
        self._last_weights = HostCopies()

    @property
    def last_weights(self) -> list:
        """Per task, the last forward's gate weights q (N, E) (host arrays, copied from the device on first read)."""
        return self._last_weights.get()

    @property
    def static(self):
        """Static DSelect-k: the gate does not look at the example."""
        return self.gate_name == "dselect_k" and not self.per_example

    def task_weights(self, x):
        """Each task's dense gate weights (N, E) and the gates' auxiliary losses."""
        N, E, aux, out = x.shape[0], self.num_experts, [], []
        g = GateInputs(self.k, E, self.training, self.gamma)
        for t in range(self.num_tasks):
            if self.static:
                q, a = gates.dselect_k_weights(self.z[t], self.alpha[t], E, self.gamma, self.training)
                q = q.reshape(1, -1) * Tensor(x.xp.ones((N, 1), q.dtype))  # (N, E): the same for every example
            else:
                r = GATE_SPECS[self.gate_name].route(self.gates[t](x), g)
                q, a = gates.scatter_rows(r.weights, r.expert_idx, E), r.aux  # (N, E)
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
        xp = x.xp
        needed = xp.zeros((N, E), bool)
        for q in weights:
            needed |= q.data != 0
        idx = xp.broadcast_to(xp.arange(E), (N, E)).copy()
        plan = plan_routing(idx, E, needed)
        xs = x.astype(self.experts.w1.dtype)
        out = grouped_ffn(gather(xs, plan), plan, self.experts.w1, self.experts.b1, self.experts.w2,
                          self.experts.b2, self.activation)
        self._last_weights = HostCopies(q.data for q in weights)
        return [tower(combine(out, q, plan)) for tower, q in zip(self.towers, weights)]

    def aux_loss(self):
        return L.weighted_total(self.aux_losses, self.aux_weights)

    def selected_experts(self, threshold=0.0):
        """Per task, the experts with mean weight above `threshold` in the last forward (for cluster recovery)."""
        return [set(np.flatnonzero(q.mean(axis=0) > threshold)) for q in self.last_weights]


class SharedBottom(Module):
    """Shared-bottom multi-task model (Caruana 1997): one MLP d_in -> d_hidden -> d_out shared by every task, then
    one tower per task. Same call convention as MultiGateMoE: model(x (N, d_in)) -> list of (N, out_dim) tensors.

    With d_hidden = k · (an expert's hidden width) it does the same work per example as a top-k MultiGateMoE.
    """

    def __init__(self, d_in, d_out, num_tasks, seed=0, *, d_hidden=None, tower_hidden=8, out_dim=1,
                 dtype=np.float32):
        self.config = init_config(d_in=d_in, d_out=d_out, num_tasks=num_tasks, seed=seed, d_hidden=d_hidden,
                                  tower_hidden=tower_hidden, out_dim=out_dim, dtype=dtype)
        rng = make_rng(seed)
        self.num_tasks = num_tasks
        self.fc1 = Linear(d_in, d_hidden or d_out, seed=rng, dtype=dtype)
        self.fc2 = Linear(d_hidden or d_out, d_out, seed=rng, dtype=dtype)
        self.towers = ModuleList([Tower(d_out, tower_hidden, out_dim, rng, dtype) for _ in range(num_tasks)])
        self.aux_losses: dict = {}

    def forward(self, x):
        shared = self.fc2(self.fc1(x).relu())  # (N, d_out), linear output like an expert of MultiGateMoE
        return [tower(shared) for tower in self.towers]

    def aux_loss(self):
        return 0.0
