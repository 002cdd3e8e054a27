"""CGC and PLE (Tang et al. 2020, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
for Personalized Recommendations", RecSys): multi-task models whose experts are split into task-specific and
shared ones, so that tasks that disagree need not fight over the same experts (the "seesaw" MMoE can show).

    model = tm.nn.PLE(d_in=100, d_expert=16, num_tasks=2, num_task_experts=2, num_shared_experts=2, num_levels=2)
    outputs = model(x)               # x (N, d_in) -> list of num_tasks arrays (N, out_dim)
    model.last_weights               # per task (N, E_total): the last level's gate weights, in expert order
    model.expert_names               # ["t0.e0", "t0.e1", "t1.e0", ..., "shared.e0", ...]

Customized Gate Control (CGC, paper §4.2). Task k has m_k experts of its own, E_{k,1..m_k}; m_s shared experts
E_{s,1..m_s} serve every task. Task k's gate mixes only its own and the shared experts (eq. 2-3):

    g^k(x) = w^k(x) S^k(x),     w^k(x) = Softmax(W_g^k x),     W_g^k ∈ R^{(m_k + m_s) × d}
    S^k(x) = [E_{k,1}(x), ..., E_{k,m_k}(x), E_{s,1}(x), ..., E_{s,m_s}(x)]        (the selected experts)

and the tower predicts from the mixture (eq. 4):   y^k(x) = t^k(g^k(x)).

Progressive Layered Extraction (PLE, §4.3) stacks N extraction levels. At level j every task k has its own input
(the previous level's task-k mixture) and the shared experts have theirs (the previous level's shared mixture);
level 1 feeds x to all. The task gates are CGC gates on those inputs (eq. 5):

    g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)

and, at every level but the last, a shared gate mixes ALL experts of the level (every task's and the shared ones)
from the shared input, giving the shared experts' input for the next level. The towers read the last level
(eq. 6):   y^k(x) = t^k(g^{k,N}(x)).   CGC is PLE with N = 1.

Experts are one-hidden-layer MLPs d -> d_hidden -> d_expert (ReLU), the gates single Linear layers + softmax,
the towers Linear(d_expert, tower_hidden) -> ReLU -> Linear(tower_hidden, out_dim), as MultiGateMoE's. Every
gate is dense (softmax over its experts), so every expert computes every example: no dispatch is needed.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..arrays import HostCopies, array_module
from ..engine import Tensor, stack
from .layers import Linear
from .module import Module, ModuleList, init_config, make_rng
from .multitask import Tower  # Linear -> ReLU -> Linear: each expert, and each task's tower


def _mix(weights, outputs):
    """Σ_i w_i · E_i: weights (N, n), outputs n tensors (N, d) -> (N, d)."""
    S = stack(outputs, axis=1)  # (N, n, d)
    return (S * weights.reshape(weights.shape[0], weights.shape[1], 1)).sum(axis=1)


class ExtractionLevel(Module):
    """One level of PLE: per-task experts and gates, shared experts, and (unless it is the last level) a shared gate
    over all the level's experts. forward(task_inputs, shared_input) -> (task mixtures, shared mixture or None)."""

    def __init__(self, d_in, d_hidden, d_expert, num_tasks, num_task_experts, num_shared_experts, last, rng, dtype):
        self.num_tasks, self.m_k, self.m_s, self.last = num_tasks, num_task_experts, num_shared_experts, last
        self.task_experts = ModuleList([ModuleList([Tower(d_in, d_hidden, d_expert, rng, dtype)
                                                    for _ in range(num_task_experts)]) for _ in range(num_tasks)])
        self.shared_experts = ModuleList([Tower(d_in, d_hidden, d_expert, rng, dtype)
                                          for _ in range(num_shared_experts)])
        # W_g^k ∈ R^{(m_k + m_s) × d}: task k's own experts first, then the shared ones
        self.task_gates = ModuleList([Linear(d_in, num_task_experts + num_shared_experts, seed=rng, dtype=dtype)
                                      for _ in range(num_tasks)])
        total = num_tasks * num_task_experts + num_shared_experts
        self.shared_gate = None if last else Linear(d_in, total, seed=rng, dtype=dtype)

    def forward(self, task_inputs, shared_input):
        own = [[e(h) for e in experts] for experts, h in zip(self.task_experts, task_inputs)]  # K × m_k (N, d_e)
        shared = [e(shared_input) for e in self.shared_experts]  # m_s × (N, d_e)
        weights, mixtures = [], []
        for k, h in enumerate(task_inputs):
            w = F.softmax(self.task_gates[k](h), axis=-1)  # w^{k,j} (N, m_k + m_s)
            weights.append(w)
            mixtures.append(_mix(w, own[k] + shared))  # g^{k,j} (N, d_e)
        shared_mix = None
        if self.shared_gate is not None:
            w_s = F.softmax(self.shared_gate(shared_input), axis=-1)  # (N, K·m_k + m_s)
            shared_mix = _mix(w_s, [o for row in own for o in row] + shared)
        return mixtures, shared_mix, weights


class PLE(Module):
    """Progressive Layered Extraction (Tang et al. 2020, eq. 5-6); num_levels=1 is CGC (eq. 2-4). See the module
    docstring. x (N, d_in) -> list of num_tasks outputs (N, out_dim)."""

    def __init__(self, d_in, d_expert, num_tasks, num_task_experts=2, num_shared_experts=2, num_levels=2, seed=0, *,
                 d_hidden=None, tower_hidden=8, out_dim=1, dtype=np.float32):
        for name, value in (("d_in", d_in), ("d_expert", d_expert), ("num_tasks", num_tasks),
                            ("num_task_experts", num_task_experts), ("num_levels", num_levels),
                            ("tower_hidden", tower_hidden), ("out_dim", out_dim)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be an integer ≥ 1, got {value!r}")
        if not isinstance(num_shared_experts, (int, np.integer)) or num_shared_experts < 0:
            raise ValueError(f"{type(self).__name__}: num_shared_experts must be an integer ≥ 0, "
                             f"got {num_shared_experts!r}")
        self.config = init_config(d_in=d_in, d_expert=d_expert, num_tasks=num_tasks,
                                  num_task_experts=num_task_experts, num_shared_experts=num_shared_experts,
                                  num_levels=num_levels, seed=seed, d_hidden=d_hidden, tower_hidden=tower_hidden,
                                  out_dim=out_dim, dtype=dtype)
        if type(self) is CGC:
            self.config.pop("num_levels")
        rng = make_rng(seed)
        self.d_in, self.num_tasks, self.num_levels = d_in, num_tasks, num_levels
        self.num_task_experts, self.num_shared_experts = num_task_experts, num_shared_experts
        h = d_hidden or d_expert
        self.levels = ModuleList([
            ExtractionLevel(d_in if j == 0 else d_expert, h, d_expert, num_tasks, num_task_experts,
                            num_shared_experts, j == num_levels - 1, rng, dtype) for j in range(num_levels)])
        self.towers = ModuleList([Tower(d_expert, tower_hidden, out_dim, rng, dtype) for _ in range(num_tasks)])
        self.expert_names = [f"t{k}.e{i}" for k in range(num_tasks) for i in range(num_task_experts)] + \
                            [f"shared.e{i}" for i in range(num_shared_experts)]
        self.aux_losses: dict = {}  # no auxiliary loss: dense softmax gates need no balancing
        self._last_weights = HostCopies()

    @property
    def num_experts(self):
        """Experts per level: every task's own plus the shared ones."""
        return self.num_tasks * self.num_task_experts + self.num_shared_experts

    def forward(self, x):
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"{type(self).__name__}: x must be (N, {self.d_in}), got {x.shape}")
        task_inputs, shared_input = [x] * self.num_tasks, x
        for level in self.levels:
            task_inputs, shared_input, weights = level(task_inputs, shared_input)
        self._last_weights = HostCopies(self._global_weights(k, w) for k, w in enumerate(weights))
        return [tower(h) for tower, h in zip(self.towers, task_inputs)]

    @property
    def last_weights(self) -> list:
        """Per task, the last forward's last-level gate weights (N, E_total) in the global expert order (host
        arrays, copied from the device on first read)."""
        return self._last_weights.get()

    def _global_weights(self, k, w):
        """Task k's last-level gate weights (N, m_k + m_s) placed in the global expert order (N, E_total)."""
        w = w.data
        out = array_module(w).zeros((w.shape[0], self.num_experts), dtype=w.dtype)
        m = self.num_task_experts
        out[:, k * m:(k + 1) * m] = w[:, :m]
        out[:, self.num_tasks * m:] = w[:, m:]
        return out

    def aux_loss(self):
        return 0.0

    def extra_repr(self):
        return (f"d_in={self.d_in}, num_tasks={self.num_tasks}, task experts={self.num_task_experts}, "
                f"shared experts={self.num_shared_experts}, levels={self.num_levels}")


class CGC(PLE):
    """Customized Gate Control (Tang et al. 2020, eq. 2-4): one extraction level, no shared gate."""

    def __init__(self, d_in, d_expert, num_tasks, num_task_experts=2, num_shared_experts=2, seed=0, *,
                 d_hidden=None, tower_hidden=8, out_dim=1, dtype=np.float32):
        super().__init__(d_in, d_expert, num_tasks, num_task_experts, num_shared_experts, 1, seed, d_hidden=d_hidden,
                         tower_hidden=tower_hidden, out_dim=out_dim, dtype=dtype)
