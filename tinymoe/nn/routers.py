"""Routers: the learned map from a token (and its task) to the gate's input h.

Task-aware routing (Gupta et al. 2022, §3) is a choice of router input, not a new gate:

| router      | h                                   | parameters                                         |
|-------------|-------------------------------------|----------------------------------------------------|
| token       | x·W_g + b                           | weight (d, n), bias (n)                            |
| concat      | [x; e_task]·W_g + b                 | weight (d + d_task, n), bias, task embedding       |
| add         | x·W_g + e_task·U + b                | weight (d, n), task_weight (d_task, n), bias, emb. |
| task        | e_task·U + b (task-level, Kudugunta et al. 2021) | weight (d_task, n), bias, task embedding |
| multi_gate  | x·W_g[task] + b[task] (one router per task, MMoE) | weight (tasks, d, n), bias (tasks, n)  |

The task embedding e_task is learned per task id, or composed from a task description — the sum of learned
embeddings of its parts — so that a task never seen in training is routed like the seen tasks it shares parts
with (Gupta et al. 2022's claim (ii)).
"""
from __future__ import annotations

import numpy as np

from ..arrays import device_name, move
from ..engine import Tensor, concatenate
from .module import Module, Parameter, make_rng

ROUTERS = ("token", "concat", "add", "task", "multi_gate")
TASK_ROUTERS = ("concat", "add", "task", "multi_gate")


class TaskEmbedding(Module):
    """e_task (T, d_task) for task ids: a learned row per task, or the sum of a task description's part embeddings.

    descriptions: list (one per task) of lists of part ids in [0, num_parts). `add_task(parts)` registers a new
    (unseen) task and returns its id; its embedding comes from parts learned on other tasks.
    """

    def __init__(self, num_tasks, dim, descriptions=None, num_parts=None, seed=None, dtype=np.float32):
        rng = make_rng(seed)
        self.num_tasks, self.dim = num_tasks, dim
        self.descriptions = None
        if descriptions is None:
            self.weight = Parameter((rng.standard_normal((num_tasks, dim)) * 0.02).astype(dtype))
            return
        if len(descriptions) != num_tasks:
            raise ValueError(f"TaskEmbedding: {len(descriptions)} descriptions for {num_tasks} tasks")
        num_parts = num_parts or 1 + max(p for d in descriptions for p in d)
        self.part_weight = Parameter((rng.standard_normal((num_parts, dim)) * 0.02).astype(dtype))
        self.descriptions = []
        for parts in descriptions:
            self.add_task(parts)

    def add_task(self, parts) -> int:
        if self.descriptions is None:
            raise ValueError("TaskEmbedding.add_task: this embedding is per task id; build it with descriptions=")
        parts = [int(p) for p in parts]
        if not parts or min(parts) < 0 or max(parts) >= self.part_weight.shape[0]:
            raise ValueError(f"TaskEmbedding: description parts must be non-empty ids in [0, {self.part_weight.shape[0]})")
        self.descriptions.append(parts)
        self.num_tasks = len(self.descriptions)
        return self.num_tasks - 1

    def forward(self, task_ids):
        if self.descriptions is None:
            return self.weight[task_ids]
        xp = self.part_weight.xp
        padded = concatenate([self.part_weight, Tensor(xp.zeros((1, self.dim), self.part_weight.dtype))])
        return padded[self._part_table(xp)[task_ids]].sum(axis=1)  # index -1 picks the zero row

    def _part_table(self, xp):
        """(tasks, parts) part ids per task, -1 = padding; built on the host, kept on xp's device until the
        descriptions change (add_task)."""
        key = (device_name(xp), tuple(map(tuple, self.descriptions)))  # (names, not modules: a model deep-copies)
        cached = getattr(self, "_table", None)
        if cached is None or cached[0] != key:
            width = max(len(d) for d in self.descriptions)
            table = np.full((self.num_tasks, width), -1)
            for i, parts in enumerate(self.descriptions):
                table[i, : len(parts)] = parts
            self._table = cached = (key, move(table, xp))
        return cached[1]


class Router(Module):
    """h (T, num_outputs) from tokens x (T, d) and their task ids (T,), per the `router` option above."""

    def __init__(self, d_model, num_outputs, router="token", num_tasks=None, task_dim=None, task_descriptions=None,
                 num_description_parts=None, bias=True, init_scale=None, seed=None, dtype=np.float32):
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {list(ROUTERS)}")
        if router in TASK_ROUTERS and not num_tasks:
            raise ValueError(f"router={router!r} routes by task: pass num_tasks (the number of task ids)")
        rng = make_rng(seed)
        self.kind, self.d_model, self.num_outputs = router, d_model, num_outputs
        task_dim = task_dim or d_model
        scale = init_scale if init_scale is not None else 1 / np.sqrt(d_model)

        def init(*shape):
            return Parameter(rng.uniform(-scale, scale, shape).astype(dtype))

        if router in ("concat", "add", "task"):
            self.task_embedding = TaskEmbedding(num_tasks, task_dim, task_descriptions, num_description_parts, rng, dtype)
        if router == "multi_gate":
            self.weight = init(num_tasks, d_model, num_outputs)
        else:
            self.weight = init({"token": d_model, "concat": d_model + task_dim, "add": d_model, "task": task_dim}[router],
                               num_outputs)
        if router == "add":
            self.task_weight = init(task_dim, num_outputs)
        if bias:
            self.bias = init(num_tasks, num_outputs) if router == "multi_gate" else init(num_outputs)
        else:
            self.bias = None

    @property
    def needs_tasks(self):
        return self.kind in TASK_ROUTERS

    def forward(self, x, task_ids=None):
        if self.kind == "token":
            h = x @ self.weight
        elif self.kind == "multi_gate":
            h = (x.reshape(x.shape[0], 1, -1) @ self.weight[task_ids]).reshape(x.shape[0], -1)  # (T, n)
        else:
            e = self.task_embedding(task_ids)  # (T, d_task)
            if self.kind == "concat":
                h = concatenate([x, e.astype(x.dtype)], axis=-1) @ self.weight
            elif self.kind == "add":
                h = x @ self.weight + e @ self.task_weight
            else:  # task-level: h depends on the task only
                h = e @ self.weight
        if self.bias is not None:
            h = h + (self.bias[task_ids] if self.kind == "multi_gate" else self.bias)
        return h

    def linear_parameters(self):
        """The parameters of the map to h (weight, task_weight, bias), not the task embedding: what a gate's own
        initialisation rewrites (noisy top-k's zeros, DSelect-k's small uniform)."""
        return [p for p in (self.weight, getattr(self, "task_weight", None), self.bias) if p is not None]
