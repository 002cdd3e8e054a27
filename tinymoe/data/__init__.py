"""Datasets that need no download (REFERENCE.md section 5), all returned as two containers:

* `TabularTasks` — every example scored on every task: `mmoe_synthetic` (Ma et al. 2018), its clustered
  many-task variant `clustered_synthetic` (Hazimeh et al. 2021), `multi_digits` (scikit-learn's 8×8 digits),
  and your own CSV / .npz files through `load_table`.
* `SequenceTasks` — every example belongs to one task: compositions of primitive operations on digit sequences
  (`sequence_tasks`, Gupta et al. 2022), plus unrelated random mappings (`random_mapping_tasks`).

`train_val_test_split` splits either container by a seeded permutation.
"""
from .containers import SequenceTasks, TabularTasks, train_val_test_split
from .digits import multi_digits
from .sequences import (PRIMITIVES, all_compositions, make_task, parse_task, random_mapping_tasks, sequence_tasks,
                        task_name)
from .synthetic import cluster_of_tasks, clustered_synthetic, mmoe_synthetic
from .tables import load_table

__all__ = ["TabularTasks", "SequenceTasks", "train_val_test_split", "mmoe_synthetic", "clustered_synthetic",
           "cluster_of_tasks", "PRIMITIVES", "make_task", "parse_task", "task_name", "all_compositions",
           "random_mapping_tasks", "sequence_tasks", "multi_digits", "load_table"]
