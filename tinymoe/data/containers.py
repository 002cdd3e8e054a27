"""The two dataset containers every loader returns, and a seeded train / val / test split.

* `TabularTasks`: every example is scored on every task (the multi-task setting of MMoE, Ma et al. 2018, and
  DSelect-k, Hazimeh et al. 2021): one feature row x, one target per task.
* `SequenceTasks`: every example belongs to one task (the setting of task-aware MoE, Gupta et al. 2022): a token
  sequence, per-position targets, a task id, and each task's description as a tuple of part names (so a router
  can compose a task embedding from its parts).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

TASK_TYPES = ("regression", "classification")


@dataclass(eq=False)
class TabularTasks:
    """N examples with d features, each with one target per task (T tasks)."""

    x: np.ndarray                        # (N, d) float32
    y: np.ndarray                        # (N, T) float32 (regression) or int64 class ids (classification)
    task_names: list[str]                # (T,) one name per target column
    task_type: str = "regression"        # "regression" | "classification", the same for all tasks
    num_classes: int | None = None       # classes per task (classification only)
    clusters: np.ndarray | None = None   # (T,) int64 ground-truth cluster of each task, when it is known
    meta: dict = field(default_factory=dict)  # how the data was made (generator weights, source indices, ...)

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"TabularTasks: task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        self.x = np.asarray(self.x, dtype=np.float32)
        classification = self.task_type == "classification"
        self.y = np.asarray(self.y, dtype=np.int64 if classification else np.float32)
        self.task_names = [str(name) for name in self.task_names]
        if self.x.ndim != 2 or self.y.ndim != 2 or len(self.x) != len(self.y):
            raise ValueError(f"TabularTasks: need x (N, d) and y (N, T), got x {self.x.shape} and y {self.y.shape}")
        if len(self.task_names) != self.y.shape[1]:
            raise ValueError(f"TabularTasks: {len(self.task_names)} task names for {self.y.shape[1]} target columns")
        if classification and self.num_classes is None:
            raise ValueError("TabularTasks: classification needs num_classes")
        if self.clusters is not None:
            self.clusters = np.asarray(self.clusters, dtype=np.int64)
            if self.clusters.shape != (self.num_tasks,):
                raise ValueError(f"TabularTasks: clusters must have shape ({self.num_tasks},), "
                                 f"got {self.clusters.shape}")

    @property
    def num_tasks(self) -> int:
        return self.y.shape[1]

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx) -> TabularTasks:
        """The examples at `idx` (integer indices, a boolean mask or a slice); the tasks stay the same."""
        return replace(self, x=self.x[idx], y=self.y[idx], task_names=list(self.task_names), meta=dict(self.meta))


@dataclass(eq=False)
class SequenceTasks:
    """N token sequences of length L, each belonging to one of T tasks, with per-position targets."""

    tokens: np.ndarray                       # (N, L) int64 inputs, ids in [0, vocab_size)
    targets: np.ndarray                      # (N, L) int64 per-position targets, ids in [0, vocab_size)
    task_ids: np.ndarray                     # (N,) int64 index into task_names
    task_names: list[str]                    # (T,) e.g. "reverse+cumsum"
    task_descriptions: list[tuple[str, ...]]  # (T,) e.g. ("reverse", "cumsum"): the parts, in the order applied
    description_vocab: list[str]             # every part name a description may use; its ids are stable
    vocab_size: int                          # V, the token vocabulary of tokens and targets

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.task_ids = np.asarray(self.task_ids, dtype=np.int64)
        self.task_descriptions = [tuple(d) for d in self.task_descriptions]
        if self.tokens.ndim != 2 or self.targets.shape != self.tokens.shape:
            raise ValueError(f"SequenceTasks: need tokens and targets of the same shape (N, L), got "
                             f"{self.tokens.shape} and {self.targets.shape}")
        if self.task_ids.shape != (len(self.tokens),):
            raise ValueError(f"SequenceTasks: task_ids must have shape ({len(self.tokens)},), "
                             f"got {self.task_ids.shape}")
        if len(self.task_descriptions) != len(self.task_names):
            raise ValueError(f"SequenceTasks: {len(self.task_names)} task names but "
                             f"{len(self.task_descriptions)} descriptions")
        missing = sorted({p for d in self.task_descriptions for p in d} - set(self.description_vocab))
        if missing:
            raise ValueError(f"SequenceTasks: description parts {missing} are not in description_vocab")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return len(self.tokens)

    def description_ids(self, task_index: int) -> np.ndarray:
        """The parts of task `task_index` as ids into description_vocab, in the order they are applied. (P,)"""
        index = {part: i for i, part in enumerate(self.description_vocab)}
        return np.array([index[part] for part in self.task_descriptions[task_index]], dtype=np.int64)

    def subset(self, idx) -> SequenceTasks:
        """The examples at `idx`; the task list stays whole, so task_ids keep their meaning."""
        return replace(self, tokens=self.tokens[idx], targets=self.targets[idx], task_ids=self.task_ids[idx],
                       task_names=list(self.task_names), task_descriptions=list(self.task_descriptions),
                       description_vocab=list(self.description_vocab))


def train_val_test_split(ds, fractions=(0.8, 0.1, 0.1), seed=0) -> dict:
    """Split a TabularTasks or SequenceTasks into {"train", "val", "test"} by a seeded random permutation.

    Sizes are round(cumulative fraction * N) boundaries, so the three parts are disjoint and cover every example.
    A SequenceTasks is split task by task (stratified), so even a low-resource task keeps the fractions.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"train_val_test_split: fractions must be 3 non-negative numbers summing to 1 "
                         f"(train, val, test), got {tuple(fractions.tolist())}")
    rng = np.random.default_rng(seed)
    if isinstance(ds, SequenceTasks):
        groups = [np.flatnonzero(ds.task_ids == t) for t in range(ds.num_tasks)]
    elif isinstance(ds, TabularTasks):
        groups = [np.arange(len(ds))]
    else:
        raise TypeError(f"train_val_test_split: expected TabularTasks or SequenceTasks, got {type(ds).__name__}")
    parts = {"train": [], "val": [], "test": []}
    for group in groups:
        shuffled = rng.permutation(group)
        bounds = np.round(np.cumsum(fractions) * len(group)).astype(int)  # (3,), the last one is len(group)
        for name, lo, hi in zip(parts, [0, bounds[0], bounds[1]], bounds):
            parts[name].append(shuffled[lo:hi])
    # sort each part so the examples keep their original order (only membership is random)
    return {name: ds.subset(np.sort(np.concatenate(chunks))) for name, chunks in parts.items()}
