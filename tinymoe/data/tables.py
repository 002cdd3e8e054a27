"""Load your own multi-task table: a CSV with a header row, or a .npz, with one target column per task.

Accepted files:
* `.csv`: a header row of column names, then one example per row, all used columns numeric (csv module, no
  pandas). Columns you do not select (ids, free text) are ignored.
* `.npz`, either one 1-D array per column (`np.savez(path, age=..., income=..., clicked=...)`), or arrays `x`
  (N, d) and `y` (N, T) (or (N,)) with optional string arrays `task_names` (T,) and `feature_names` (d,).

Every error names the file, the column (and row) at fault, and what to do about it.
"""
from __future__ import annotations

import csv
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .containers import TASK_TYPES, TabularTasks

MAX_SPARSE_CLASSES = 1000  # labels may skip ids, but C may exceed the number of rows only up to this


def _read_csv(path):
    """-> ({column: list of cell strings}, [file line of each data row]) for a CSV with a header row."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"load_table: {path} is empty; expected a header row of column names, then one row "
                         f"per example")
    header = [name.strip() for name in rows[0]]
    if any(not name for name in header) or len(set(header)) != len(header):
        raise ValueError(f"load_table: {path}: the header row (line 1) must name every column once, got {header}")
    data, lines = [], []
    for line, row in enumerate(rows[1:], start=2):
        if all(not cell.strip() for cell in row):
            continue                                   # a blank line, e.g. at the end of the file
        if len(row) != len(header):
            raise ValueError(f"load_table: {path}, line {line}: {len(row)} fields, but the header has "
                             f"{len(header)} columns {header}; fix that row")
        data.append(row)
        lines.append(line)
    if not data:
        raise ValueError(f"load_table: {path} has a header but no data rows")
    return {name: [row[j].strip() for row in data] for j, name in enumerate(header)}, lines


def _csv_column(path, name, cells, lines):
    """The cells of one CSV column as float64 numbers. (N,)"""
    values = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        if not cell:
            raise ValueError(f"load_table: {path}: column {name!r} is empty at row {i} (line {lines[i]} of the "
                             f"file); fill in the value or drop the row")
        try:
            values[i] = float(cell)
        except ValueError:
            raise ValueError(f"load_table: {path}: column {name!r}, row {i} (line {lines[i]} of the file): "
                             f"{cell!r} is not a number; encode it as a number, or leave the column out of "
                             f"feature_columns / target_columns") from None
    return values


def _read_npz(path):
    """-> ({column: 1-D array}, default targets, default features) for either .npz layout (None: not known)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"load_table: {path} is not a readable .npz archive ({type(e).__name__}: {e}); it is "
                         f"truncated or not made by np.savez - write it again") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy renamed .npz
        raise ValueError(f"load_table: {path} is a single array, not an .npz archive of named columns; save it "
                         f"with np.savez(path, x=..., y=...)")
    with archive:
        try:
            arrays = {key: archive[key] for key in archive.files}
        except ValueError as e:                        # object arrays need pickle, which we never load
            raise ValueError(f"load_table: {path} holds object arrays ({e}); save numbers as numeric arrays and "
                             f"names as fixed-width strings, e.g. np.array(names, dtype=str)") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"load_table: {path}: an array in the archive is corrupt ({type(e).__name__}: {e}); "
                             f"write the file again") from None
    if "x" in arrays and "y" in arrays:                # the x / y layout
        x, y = arrays["x"], arrays["y"]
        x = x[:, None] if x.ndim == 1 else x           # (N, d)
        y = y[:, None] if y.ndim == 1 else y           # (N, T)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"load_table: {path}: need x (N, d) and y (N, T) with the same N, got x {x.shape} and "
                             f"y {y.shape}")
        task_names = [str(s) for s in arrays.get("task_names", [f"task{t}" for t in range(y.shape[1])])]
        feature_names = [str(s) for s in arrays.get("feature_names", [f"x{j}" for j in range(x.shape[1])])]
        if len(task_names) != y.shape[1] or len(feature_names) != x.shape[1]:
            raise ValueError(f"load_table: {path}: {len(task_names)} task_names for {y.shape[1]} columns of y, "
                             f"{len(feature_names)} feature_names for {x.shape[1]} columns of x; make them match")
        names = feature_names + task_names
        if len(set(names)) != len(names):
            raise ValueError(f"load_table: {path}: feature_names and task_names must all differ, got {names}")
        columns = {name: x[:, j] for j, name in enumerate(feature_names)}
        columns.update({name: y[:, t] for t, name in enumerate(task_names)})
        return columns, task_names, feature_names
    lengths = {key: a.shape for key, a in arrays.items()}
    if any(a.ndim != 1 for a in arrays.values()) or len({a.shape for a in arrays.values()}) > 1:
        raise ValueError(f"load_table: {path}: expected one 1-D array per column, all of the same length (or "
                         f"arrays 'x' and 'y'), got shapes {lengths}")
    return arrays, None, None


def _npz_column(path, name, array):
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"load_table: {path}: column {name!r} has dtype {array.dtype}, not numbers; encode it as "
                         f"numbers, or leave it out of feature_columns / target_columns")
    return array.astype(np.float64)


def _as_list(columns):
    return [columns] if isinstance(columns, str) else list(columns)


def load_table(path, target_columns=None, feature_columns=None, task_type="regression") -> TabularTasks:
    """A TabularTasks from a .csv or .npz file: x (N, d) from feature_columns, y (N, T) from target_columns.

    target_columns: the column(s) to predict, one task each (a name or a list). May be left out only for the
    .npz x / y layout, where it defaults to every task.
    feature_columns: defaults to every column that is not a target (for the .npz x / y layout: the columns of x,
    named by `feature_names` or "x0", "x1", ...).
    task_type: "regression" (float32 targets) or "classification" (integer labels 0..C−1, num_classes = C).
    """
    path = Path(path)
    if task_type not in TASK_TYPES:
        raise ValueError(f"load_table: task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if path.exists() and not path.is_file():
        raise ValueError(f"load_table: {str(path)!r} is not a regular file; pass a .csv or .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"load_table: no such file {str(path)!r}; check the path (relative paths start "
                                f"from {str(Path.cwd())!r})")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw, lines = _read_csv(path)
        column = lambda name: _csv_column(path, name, raw[name], lines)           # noqa: E731
        where = lambda i: f"row {i} (line {lines[i]} of the file)"                # noqa: E731
        default_targets = default_features = None
    elif suffix == ".npz":
        raw, default_targets, default_features = _read_npz(path)
        column = lambda name: _npz_column(path, name, raw[name])                  # noqa: E731
        where = lambda i: f"row {i}"                                              # noqa: E731
    else:
        raise ValueError(f"load_table: {path} has extension {suffix!r}; expected .csv (with a header row) or .npz")
    available = list(raw)

    if target_columns is None:
        if default_targets is None:
            raise ValueError(f"load_table: pass target_columns naming one column per task; {path} has columns "
                             f"{available}")
        target_columns = default_targets
    targets = _as_list(target_columns)
    if feature_columns is None:  # the columns of x in the x / y layout, else every column that is not a target
        feature_columns = default_features or [c for c in available if c not in targets]
    features = _as_list(feature_columns)
    missing = [c for c in targets + features if c not in raw]
    if missing:
        raise ValueError(f"load_table: {path} has no column {missing}; available columns: {available}. "
                         f"Fix target_columns / feature_columns")
    if not targets or not features:
        raise ValueError(f"load_table: {path}: need at least one target and one feature column, got "
                         f"target_columns={targets}, feature_columns={features}")
    if set(targets) & set(features):
        raise ValueError(f"load_table: columns {sorted(set(targets) & set(features))} are both targets and "
                         f"features; a column can only be one")

    data = {}
    for name in features + targets:
        values = column(name)                                                     # (N,) float64
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"load_table: {path}: column {name!r} has a missing (NaN) or infinite value at "
                             f"{where(bad[0])} ({bad.size} such rows); fill them in or drop those rows")
        data[name] = values
    x = np.stack([data[c] for c in features], axis=1)                             # (N, d)
    y = np.stack([data[c] for c in targets], axis=1)                              # (N, T)

    num_classes = None
    if task_type == "classification":
        for t, name in enumerate(targets):
            bad = np.flatnonzero((y[:, t] != np.round(y[:, t])) | (y[:, t] < 0))
            if bad.size:
                raise ValueError(f"load_table: {path}: classification target {name!r} has {float(y[bad[0], t])!r} at "
                                 f"{where(bad[0])}; labels must be integers 0..C-1 (map class names to ids "
                                 f"first, or use task_type='regression')")
        num_classes = int(y.max()) + 1
        if num_classes > max(len(y), MAX_SPARSE_CLASSES):  # a label of 10**6 would build a million-class head
            raise ValueError(f"load_table: {path}: classification labels go up to {int(y.max())}: more classes than "
                             f"rows ({len(y)}) and than {MAX_SPARSE_CLASSES}; labels must be class ids 0..C-1 - remap "
                             f"them first, e.g. np.unique(labels, return_inverse=True)[1]")
    return TabularTasks(x=x, y=y, task_names=targets, task_type=task_type, num_classes=num_classes,
                        meta=dict(path=str(path), feature_names=features))
