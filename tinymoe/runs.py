"""A run: build the data and the model from a RunConfig, train into a run folder, reload it, inspect its routing.

A run folder holds
    config.json              the full, validated RunConfig (re-runnable: tinymoe train --config config.json)
    metrics.jsonl            one JSON record per eval: losses, lr, aux losses, per-layer expert load, drops, val
    checkpoint.safetensors   weights + optimizer state + training state (tinymoe.checkpoint)
    results.json             per-task test metrics of the final (best-on-val) model
    routes.png               task x expert routing heatmaps and per-layer expert load (when matplotlib is there)
    curves.png               loss, aux losses, per-task validation metric, expert load over steps (tinymoe.plots)
    .lock                    an empty file a running `tinymoe train` holds a lock on (flock), so two runs never share it

Every file is written atomically (temporary file + rename) except metrics.jsonl, which is only appended to and, on
resume, cut back to the last record the checkpoint covers: a run killed at any moment resumes exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from datetime import datetime

import numpy as np

from . import backends, data as D
from .config import ConfigError, RunConfig, check_memory, model_config, run_config_from_dict
from .plots import format_routing, has_routing, plot_routes, routing_tables  # noqa: F401  (re-exported)


def _seed(own, run_seed):
    """A section's seed: its own when set (non-zero), else the run's."""
    return own or run_seed


def build_data(cfg: RunConfig) -> dict:
    """{"train", "val", "test"} splits of the configured dataset (deterministic in the seeds)."""
    try:
        return _build_data(cfg)
    except (ValueError, TypeError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"[data] {e}") from None


def _build_data(cfg: RunConfig) -> dict:
    d, seed = cfg.data, _seed(cfg.data.seed, cfg.seed)
    if d.kind == "sequence":
        ds = D.sequence_tasks(d.tasks, d.n_per_task, d.seq_len, d.vocab_size, seed=seed)
    elif d.kind == "mmoe":
        ds = D.mmoe_synthetic(d.n, d.rho, d=d.d, seed=seed)
    elif d.kind == "clustered":
        ds = D.clustered_synthetic(d.n, d.num_tasks, d.num_clusters, rho=d.rho, d=d.d, seed=seed)
    elif d.kind == "digits":
        ds = D.multi_digits(d.mode, n=d.n, seed=seed)
    else:
        ds = D.load_table(d.path, d.target_columns, d.feature_columns, task_type=d.task_type)
    splits = D.train_val_test_split(ds, tuple(d.split), seed=seed)
    empty = [name for name, part in splits.items() if len(part) == 0]
    if empty:  # an empty split would train on nothing, or write NaN metrics
        raise ConfigError(f"[data] {len(ds)} examples leave the {' and '.join(empty)} split(s) empty with data.split = "
                          f"{list(d.split)}; use more examples (at least one per split), or change data.split")
    return standardized(splits) if d.kind == "table" and d.standardize else splits


def standardized(splits: dict) -> dict:
    """Every split's features (and regression targets) z-scored with the TRAINING split's mean and std, so raw
    columns of any scale train alike and each task's MSE is in units of its target's variance (1 = predicting the
    mean). The statistics go in meta ("x_mean", "x_std", "y_mean", "y_std") to map predictions back: y·std + mean."""
    train = splits["train"]
    stats = {"x_mean": train.x.mean(axis=0), "x_std": train.x.std(axis=0)}
    regression = train.task_type == "regression"
    if regression:
        stats.update(y_mean=train.y.mean(axis=0), y_std=train.y.std(axis=0))
    stats = {k: np.where(v > 0, v, 1.0) if k.endswith("std") else v for k, v in stats.items()}  # constant: as is
    out = {}
    for name, ds in splits.items():
        y = (ds.y - stats["y_mean"]) / stats["y_std"] if regression else ds.y
        meta = {**ds.meta, **{k: v.tolist() for k, v in stats.items()}}
        out[name] = dataclasses.replace(ds, x=(ds.x - stats["x_mean"]) / stats["x_std"], y=y, meta=meta)
    return out


def _model_config(cfg: RunConfig, train):
    """The validated model config for this training set (its tasks, vocabulary and length fill the data fields)."""
    if cfg.sequence:
        return model_config(cfg, train.num_tasks, train.vocab_size, train.seq_len)
    return model_config(cfg, train.num_tasks)


def build_model(cfg: RunConfig, train):
    """A MoETransformer for sequence data; a MultiGateMoE (or shared-bottom) for tabular data."""
    mc = _model_config(cfg, train)
    if cfg.sequence:
        from .model import MoETransformer

        return MoETransformer(mc)
    out_dim = train.num_classes if train.task_type == "classification" else 1
    if mc.family == "shared_bottom":
        from .nn import SharedBottom

        return SharedBottom(train.num_features, mc.d_expert, train.num_tasks, mc.seed, d_hidden=mc.d_hidden,
                            tower_hidden=mc.tower_hidden, out_dim=out_dim)
    if mc.family in ("cgc", "ple"):
        from .nn import CGC, PLE

        levels = {"num_levels": mc.num_levels} if mc.family == "ple" else {}
        return (PLE if mc.family == "ple" else CGC)(
            train.num_features, mc.d_expert, train.num_tasks, mc.num_task_experts, mc.num_shared_experts,
            seed=mc.seed, d_hidden=mc.d_hidden, tower_hidden=mc.tower_hidden, out_dim=out_dim, **levels)
    from .nn import MultiGateMoE

    return MultiGateMoE(train.num_features, mc.d_expert, mc.num_experts, train.num_tasks, gate=mc.gate, k=mc.k,
                        per_example=mc.per_example, seed=mc.seed, d_hidden=mc.d_hidden, tower_hidden=mc.tower_hidden,
                        out_dim=out_dim, gamma=mc.gamma, aux_weights=mc.aux_weights or None)


def resolve_backend(name) -> str:
    """The backend a run uses, checked before anything is written: the config's, or for `auto` the environment's
    TINYMOE_BACKEND when set, else numba when it is installed, else the NumPy reference. A TINYMOE_BACKEND that
    names no usable backend is an error even when the config names its own (it would fail elsewhere later)."""
    env = os.environ.get("TINYMOE_BACKEND", "").strip()
    if env:
        try:
            backends.load(env)
        except backends.BackendUnavailable as e:
            raise backends.BackendUnavailable(f"TINYMOE_BACKEND={env}: {e}; unset it or pick one of "
                                              f"{backends.available()}") from None
    if name == "auto":
        name = env or backends.auto()
    backends.load(name)  # BackendUnavailable with the reason and the install command
    return name


@contextlib.contextmanager
def run_backend(name):
    """Run on the backend `resolve_backend(name)` picks. Yields its name. A saved run whose backend cannot run on
    this machine (trained on a GPU, evaluated on a CPU-only one) runs on the best backend here instead: the weights
    are the same on any device."""
    if name != "auto" and backends.why_unavailable(name):
        name = "auto"
    name = resolve_backend(name)
    with backends.use_backend(name):
        yield name


RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "results.json", "routes.png", "curves.png")


def new_run_dir(cfg: RunConfig) -> str:
    """A fresh folder <out>/<name>-<time> (a suffix -1, -2, ... when it exists)."""
    if os.path.lexists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"out = {cfg.out!r} exists and is not a folder; set out to a folder for the run folders")
    base = os.path.join(cfg.out, f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
    path, i = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            if i > 1000:
                raise
            path, i = f"{base}-{i}", i + 1


def holds_run(run_dir) -> bool:
    """Whether `run_dir` holds (part of) a run."""
    return any(os.path.lexists(os.path.join(run_dir, name)) for name in RUN_FILES)


class RunLock:
    """An exclusive lock on a run folder while a run writes to it (a second run gets a clear error).

    An advisory `flock` on RUN_DIR/.lock (an empty file, never rewritten): the kernel drops the lock when the
    process ends, even on SIGKILL, so a lock is never stale. No-op where fcntl is missing (Windows)."""

    def __init__(self, run_dir):
        self.path, self.fd = os.path.join(run_dir, ".lock"), None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise  # e.g. no locks on this file system: the CLI names the error
            raise ConfigError(f"{os.path.dirname(self.path)} is in use by another tinymoe run; wait for it to "
                              "finish, or train into another --run-dir") from None
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def remove_stale_temp_files(run_dir):
    """Delete the temporary files of writes that were killed before their rename (.NAME.PID.RANDOM.tmp)."""
    for name in os.listdir(run_dir):
        if name.startswith(".") and (name.endswith(".tmp") or ".tmp." in name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, name))


def write_json(path, value):
    """Write JSON atomically (temporary file + rename): a reader sees the old file or the new one, never half."""
    from .checkpoint import write_atomic

    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path, what) -> dict:
    """A run's JSON file as a dict; anything else is a ConfigError naming the file."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{path} is not a regular file; the {what} must be a JSON file")
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e}); the run folder is damaged - train it again "
                          "with --overwrite") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: the {what} is not a JSON object; the run folder is damaged - train it again "
                          "with --overwrite")
    return value


class RunFailed(RuntimeError):
    """Training stopped on an error after the run folder was set up; the message says what is kept and what next."""


def train_run(cfg: RunConfig, run_dir=None, log=print, progress=True, resume=False, overwrite=False,
              comm=None) -> dict:
    """Train per `cfg` into a run folder; returns {"dir", "test", "backend", "plot", "curves", "model"}.

    Everything is checked before anything is written (config, backend, data, memory, the folder). A folder that
    already holds a run needs `resume` (continue it) or `overwrite` (replace it). The folder is locked while
    the run uses it. If training fails before the first checkpoint, nothing of the run is left behind; after it,
    the last good checkpoint is kept and the error says how to resume.

    comm: an MPI communicator (`tinymoe.distributed`): every rank calls train_run, the experts are spread over the
    ranks, and the root alone owns the run folder (it locks and writes it: one checkpoint with every expert).
    """
    import importlib.util

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one (resume continues the run, "
                          "overwrite replaces it)")
    if importlib.util.find_spec("safetensors") is None:
        raise ConfigError("a run writes safetensors checkpoints: pip install 'tinymoe[train]' (safetensors, tqdm)")
    backend = resolve_backend(cfg.backend)
    if run_dir is not None:
        if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
            raise ConfigError(f"--run-dir {run_dir} exists and is not a folder; pass a folder path")
        root_rank = comm is None or comm.Get_rank() == 0  # other ranks would see the root's new files
        if root_rank and not resume and not overwrite and os.path.isdir(run_dir) and holds_run(run_dir):
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume, or replace it with "
                              "--overwrite")
    config_path = os.path.join(run_dir, "config.json") if run_dir else None
    if resume and not os.path.isfile(config_path):
        raise ConfigError(f"--resume: no checkpoint to resume in {run_dir} (no config.json there); train without "
                          "--resume first")
    splits = build_data(cfg)
    if not cfg.sequence:  # now the input width is known: the model's memory too, before it is allocated
        train = splits["train"]
        check_memory(cfg, num_features=train.num_features, num_tasks=train.num_tasks, num_examples=len(train),
                     num_classes=train.num_classes if train.task_type == "classification" else None)
    try:
        model = build_model(cfg, splits["train"])  # before anything is written: a bad [model] leaves no folder
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[model] {e}") from None
    num_parameters = model.num_parameters()  # (counted before expert parallelism leaves each rank a share)
    parallel = None
    if comm is not None:  # distributed hook: shard the experts (a bad layout fails here, before any write)
        from .distributed import ExpertParallel

        parallel = ExpertParallel(model, comm)
    cfg = resolved_config(cfg, splits["train"])  # config.json keeps every model default, not just the overrides
    if resume:
        saved = read_json(config_path, "run config")
        for section in ("data", "model"):
            now = cfg.to_dict()[section]  # (a folder written before config.json was trimmed may hold more keys)
            if {k: (saved.get(section) or {}).get(k) for k in now} != now:
                raise ConfigError(f"--resume: [{section}] differs from the run's config.json; resume with the same "
                                  f"settings (tinymoe train --config {config_path} --run-dir {run_dir} --resume)")
    if parallel is not None and not parallel.is_root:  # distributed hook: the root owns the folder; wait for it
        run_dir = comm.bcast(None, root=0)
        return _train_locked(cfg, run_dir, splits, model, num_parameters, backend, log, progress, resume, overwrite,
                             parallel)

    created = run_dir is None or not os.path.exists(run_dir)
    if run_dir is None:
        run_dir = new_run_dir(cfg)
    else:
        os.makedirs(run_dir, exist_ok=True)
    try:
        lock = RunLock(run_dir).__enter__()
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        if parallel is not None:
            comm.bcast(run_dir, root=0)
        return _train_locked(cfg, run_dir, splits, model, num_parameters, backend, log, progress, resume, overwrite,
                             parallel)
    except BaseException:
        ckpt = os.path.join(run_dir, "checkpoint.safetensors")
        if not resume and not os.path.exists(ckpt):  # nothing worth keeping: leave no half-written run behind
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for name in RUN_FILES:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(run_dir, name))
        raise
    finally:
        lock.__exit__()


def _train_locked(cfg, run_dir, splits, model, num_parameters, backend, log, progress, resume, overwrite, parallel):
    """Train into run_dir (locked by the caller). With `parallel` (expert parallelism) every rank trains and only
    the root touches the folder."""
    from .train import TrainingDiverged, evaluate, fit

    root = parallel is None or parallel.is_root
    config_path = os.path.join(run_dir, "config.json")
    ckpt_path = os.path.join(run_dir, "checkpoint.safetensors")
    if root:
        remove_stale_temp_files(run_dir)
        if overwrite:
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(run_dir, name))
        if not resume or read_json(config_path, "run config") != json.loads(json.dumps(cfg.to_dict())):
            write_json(config_path, cfg.to_dict())  # a resume may change [optim] (e.g. more steps): keep it current
    if parallel is not None:  # every rank sees the root's folder as it is now (config written, old files gone)
        parallel.comm.Barrier()
    optim = cfg.optim if cfg.optim.seed else dataclasses.replace(cfg.optim, seed=cfg.seed)
    from_checkpoint = resume and os.path.exists(ckpt_path)  # killed before the first checkpoint: start over
    try:
        with backends.use_backend(backend):
            log(f"run {run_dir}: {type(model).__name__}, {num_parameters:,} parameters, backend {backend}, "
                f"{len(splits['train'])} training examples, {splits['train'].num_tasks} tasks"
                + (", resumed" if from_checkpoint else ""))
            history = fit(model, splits["train"], splits["val"], optim, run_dir=run_dir, resume=from_checkpoint,
                          log=log, progress=progress, parallel=parallel)  # no checkpoint: from step 0, metrics emptied
            test = evaluate(model, splits["test"], parallel=parallel)
        if parallel is not None:  # every rank gets every expert back; the root writes the rest alone
            parallel.unshard()
            if not root:
                return {"dir": run_dir, "test": test, "backend": backend, "plot": None, "model": model}
        steps = history[-1]["step"] if history else cfg.optim.steps  # resuming a finished run logs nothing new
        write_json(os.path.join(run_dir, "results.json"), {"test": test, "backend": backend, "steps": steps})
        plot = curves = None
        if has_routing(model):
            with contextlib.suppress(ImportError), backends.use_backend(backend):
                plot = plot_routes(model, splits["test"], os.path.join(run_dir, "routes.png"))
        with contextlib.suppress(ImportError):
            from .plots import plot_curves

            curves = plot_curves(run_dir)
    except (OSError, MemoryError, TrainingDiverged) as e:
        raise RunFailed(_failure(e, run_dir)) from e
    return {"dir": run_dir, "test": test, "backend": backend, "plot": plot, "curves": curves, "model": model}


def _failure(e, run_dir) -> str:
    """One line: what failed while training into run_dir, what is kept, what to do."""
    kept = os.path.exists(os.path.join(run_dir, "checkpoint.safetensors"))
    then = (f"the last good checkpoint is kept: fix that, then tinymoe train --config {run_dir}/config.json "
            f"--run-dir {run_dir} --resume" if kept else "no checkpoint was written, so nothing of the run is kept")
    if isinstance(e, MemoryError):
        return f"out of memory while training; make the model or batch smaller ({then})"
    if not isinstance(e, OSError):
        return f"{e} ({then})"
    return f"{describe_os_error(e)} ({then})"


def describe_os_error(e: OSError) -> str:
    """An OSError as the problem and the fix, e.g. "No space left on device: runs/r/x.tmp; free some disk space"."""
    no_write = "write to another folder (--run-dir, out) or fix the permissions"
    fix = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota)",
           errno.EROFS: "the file system is read-only: write to another folder (--run-dir, out)",
           errno.EACCES: f"no permission: {no_write}", errno.EPERM: f"no permission: {no_write}",
           errno.ENOENT: "check the path"}.get(e.errno, "check the path and the disk")
    return f"{e.strerror or e}{f': {e.filename}' if getattr(e, 'filename', None) else ''}; {fix}"


def resolved_config(cfg: RunConfig, train) -> RunConfig:
    """`cfg` with its [model] section filled in with every default (minus the fields the data decides)."""
    from dataclasses import asdict, replace

    from .config import _FROM_DATA

    mc = _model_config(cfg, train)
    return replace(cfg, model={k: v for k, v in asdict(mc).items() if k not in _FROM_DATA})


def load_run(run_dir):
    """(RunConfig, model with the checkpoint's weights, splits) of a finished run folder.

    The model is built from the run's config.json, and the checkpoint must hold that very model: a checkpoint
    whose saved config differs (copied in from another run, or config.json edited) is refused, naming the keys."""
    from .checkpoint import CheckpointError, MODELS, best_weights, load_checkpoint, read_header

    path = os.path.join(run_dir, "config.json")
    if not os.path.lexists(path):
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder `tinymoe train` printed")
    cfg = run_config_from_dict(read_json(path, "run config"))
    splits = build_data(cfg)
    try:
        model = build_model(cfg, splits["train"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: [model] {e}") from None
    ckpt_path = os.path.join(run_dir, "checkpoint.safetensors")
    header = read_header(ckpt_path)
    spec = MODELS.get(header["model"]["class"])
    mine = json.loads(json.dumps(spec.get_config(model))) if spec is not None else None
    saved = header["model"]["config"]
    if spec is None or type(model) is not spec.resolve() or mine != saved:
        keys = sorted(k for k in set(mine or {}) | set(saved) if (mine or {}).get(k) != saved.get(k))
        raise CheckpointError(f"{ckpt_path}: the checkpoint's model ({header['model']['class']}) differs from the "
                              f"run's config.json in {_short_keys(keys) or 'its class'}; it belongs to another run - "
                              "evaluate that run's folder, or retrain this one with --overwrite")
    ckpt = load_checkpoint(ckpt_path, model=model)
    model = ckpt.model  # the last weights (the resume point) ...
    best = best_weights(ckpt)
    if best is not None:  # ... but the run's result is the best-on-validation model
        try:
            model.load_state_dict(best)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path}: the best-on-validation weights do not fit the model ({e}); the file "
                                  "is damaged - restore it or retrain with --overwrite") from None
    model.eval()
    return cfg, model, splits


def _short_keys(keys, limit=4):
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

