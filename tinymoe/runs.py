"""A run: build the data and the model from a RunConfig, train into a run folder, reload it, inspect its routing.

A run folder holds
    config.json              the full, validated RunConfig (re-runnable: tinymoe train --config config.json)
    metrics.jsonl            one JSON record per eval: losses, lr, aux losses, per-layer expert load, drops, val
    checkpoint.safetensors   weights + optimizer state + training state (tinymoe.checkpoint)
    results.json             per-task test metrics of the final (best-on-val) model
    routes.png               task x expert routing heatmaps and per-layer expert load (when matplotlib is there)
    curves.png               loss, aux losses, per-task validation metric, expert load over steps (tinymoe.plots)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from datetime import datetime

import numpy as np

from . import backends, data as D
from .config import ConfigError, RunConfig, model_config, run_config_from_dict
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
        from .experiments.common import SharedBottom

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


@contextlib.contextmanager
def run_backend(name):
    """`auto`: numba when it is installed, else the NumPy reference. Yields the backend's name."""
    if name == "auto":
        name = "numba" if "numba" in backends.available() else "numpy"
    with backends.use_backend(name):
        yield name


def new_run_dir(cfg: RunConfig) -> str:
    base = os.path.join(cfg.out, f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    os.makedirs(path)
    return path


def train_run(cfg: RunConfig, run_dir=None, log=print, progress=True, resume=False) -> dict:
    """Train per `cfg` into a run folder; returns {"dir", "test", "backend", "plot", "curves", "model"}. A folder
    this call creates is removed again when the run stops on bad input before its first checkpoint."""
    import importlib.util

    if importlib.util.find_spec("safetensors") is None:
        raise ConfigError("a run writes safetensors checkpoints: pip install 'tinymoe[train]' (safetensors, tqdm)")
    splits = build_data(cfg)
    try:
        model = build_model(cfg, splits["train"])  # before anything is written: a bad [model] leaves no folder
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[model] {e}") from None
    cfg = resolved_config(cfg, splits["train"])  # config.json keeps every model default, not just the overrides
    if resume and not os.path.exists(os.path.join(run_dir or "", "checkpoint.safetensors")):
        from .checkpoint import CheckpointError

        raise CheckpointError(f"--resume: {run_dir} holds no checkpoint.safetensors to continue from; train it "
                              f"first without --resume")
    created = run_dir is None or not os.path.exists(run_dir)  # a folder this call makes goes again if it fails
    run_dir = run_dir or new_run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    try:
        return _train_in(cfg, run_dir, splits, model, log, progress, resume)
    except (ValueError, TypeError):  # bad input found only now (ConfigError, CheckpointError are ValueErrors)
        if created and not os.path.exists(os.path.join(run_dir, "checkpoint.safetensors")):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train_in(cfg, run_dir, splits, model, log, progress, resume) -> dict:
    from .train import evaluate, fit

    config_path = os.path.join(run_dir, "config.json")
    if resume and os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        for section in ("data", "model"):
            now = cfg.to_dict()[section]  # (a folder written before config.json was trimmed may hold more keys)
            if {k: (saved.get(section) or {}).get(k) for k in now} != now:
                raise ConfigError(f"--resume: [{section}] differs from the run's config.json; resume with the same "
                                  f"settings (tinymoe train --config {config_path} --run-dir {run_dir} --resume)")
    with open(config_path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    optim = cfg.optim if cfg.optim.seed else dataclasses.replace(cfg.optim, seed=cfg.seed)
    with run_backend(cfg.backend) as backend:
        log(f"run {run_dir}: {type(model).__name__}, {model.num_parameters():,} parameters, backend {backend}, "
            f"{len(splits['train'])} training examples, {splits['train'].num_tasks} tasks")
        history = fit(model, splits["train"], splits["val"], optim, run_dir=run_dir, resume=resume, log=log,
                      progress=progress)
        test = evaluate(model, splits["test"])
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        steps = history[-1]["step"] if history else cfg.optim.steps  # resuming a finished run logs nothing new
        json.dump({"test": test, "backend": backend, "steps": steps}, f, indent=2)
    plot = curves = None
    if has_routing(model):
        with contextlib.suppress(ImportError):
            plot = plot_routes(model, splits["test"], os.path.join(run_dir, "routes.png"))
    with contextlib.suppress(ImportError):
        from .plots import plot_curves

        curves = plot_curves(run_dir)
    return {"dir": run_dir, "test": test, "backend": backend, "plot": plot, "curves": curves, "model": model}


def resolved_config(cfg: RunConfig, train) -> RunConfig:
    """`cfg` with its [model] section filled in with every default (minus the fields the data decides)."""
    from dataclasses import asdict, replace

    from .config import _FROM_DATA

    mc = _model_config(cfg, train)
    return replace(cfg, model={k: v for k, v in asdict(mc).items() if k not in _FROM_DATA})


def load_run(run_dir):
    """(RunConfig, model with the checkpoint's weights, splits) of a finished run folder."""
    from .checkpoint import load

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder `tinymoe train` printed")
    with open(path) as f:
        cfg = run_config_from_dict(json.load(f))
    model = load(os.path.join(run_dir, "checkpoint.safetensors"), which="best")  # the run's result, not the last step
    model.eval()
    return cfg, model, build_data(cfg)
