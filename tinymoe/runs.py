"""A run: build the data and the model from a RunConfig, train into a run folder, reload it, inspect its routing.

A run folder holds
    config.json              the full, validated RunConfig (re-runnable: tinymoe train --config config.json)
    metrics.jsonl            one JSON record per eval: losses, lr, aux losses, per-layer expert load, drops, val
    checkpoint.safetensors   weights + optimizer state + training state (tinymoe.checkpoint)
    results.json             per-task test metrics of the final (best-on-val) model
    routes.png               task x expert routing heatmaps and per-layer expert load (when matplotlib is there)
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
from .tensor import no_grad


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
        ds = D.load_table(d.path, d.target_columns, task_type=d.task_type)
    return D.train_val_test_split(ds, tuple(d.split), seed=seed)


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
    if mc.family != "multigate":
        raise ConfigError(f"model.family must be 'multigate' or 'shared_bottom', got {mc.family!r}")
    from .nn import MultiGateMoE

    return MultiGateMoE(train.num_features, mc.d_expert, mc.num_experts, train.num_tasks, gate=mc.gate, k=mc.k,
                        per_example=mc.per_example, seed=mc.seed, d_hidden=mc.d_hidden, tower_hidden=mc.tower_hidden,
                        out_dim=out_dim, gamma=mc.gamma, aux_weights=mc.aux_weights or None)


@contextlib.contextmanager
def run_backend(name):
    """`auto`: numba when it is installed, else the NumPy reference. Yields the backend's name."""
    if name == "auto":
        name = backends.auto()
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
    """Train per `cfg` into a run folder; returns {"dir", "test", "backend", "seconds", "plot"}."""
    from .train import evaluate, fit

    import importlib.util

    if importlib.util.find_spec("safetensors") is None:
        raise ConfigError("a run writes safetensors checkpoints: pip install 'tinymoe[train]' (safetensors, tqdm)")
    splits = build_data(cfg)
    try:
        model = build_model(cfg, splits["train"])  # before anything is written: a bad [model] leaves no folder
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[model] {e}") from None
    cfg = resolved_config(cfg, splits["train"])  # config.json keeps every model default, not just the overrides
    run_dir = run_dir or new_run_dir(cfg)
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.json")
    if resume and os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        for section in ("data", "model"):
            if saved.get(section) != cfg.to_dict()[section]:
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
    plot = None
    if has_routing(model):
        with contextlib.suppress(ImportError):
            plot = plot_routes(model, splits["test"], os.path.join(run_dir, "routes.png"))
    return {"dir": run_dir, "test": test, "backend": backend, "plot": plot, "model": model}


def resolved_config(cfg: RunConfig, train) -> RunConfig:
    """`cfg` with its [model] section filled in with every default (minus the fields the data decides)."""
    from dataclasses import asdict, replace

    from .config import _FROM_DATA

    mc = _model_config(cfg, train)
    return replace(cfg, model={k: v for k, v in asdict(mc).items() if k not in _FROM_DATA})


def load_run(run_dir):
    """(RunConfig, model with the checkpoint's weights, splits) of a finished run folder."""
    from .checkpoint import load_checkpoint

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder `tinymoe train` printed")
    with open(path) as f:
        cfg = run_config_from_dict(json.load(f))
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.safetensors"))
    model = ckpt.model  # the last weights (the resume point) ...
    if ckpt.train_state.get("has_best"):  # ... but the run's result is the best-on-validation model
        model.load_state_dict({k[len("best."):]: v for k, v in ckpt.extra_tensors.items() if k.startswith("best.")})
    model.eval()
    return cfg, model, build_data(cfg)


def has_routing(model) -> bool:
    """Whether the model routes at all (a dense transformer or shared-bottom has nothing to show)."""
    return bool(getattr(model, "moe_layers", None)) or hasattr(model, "last_weights")


# ---- routing inspection ----------------------------------------------------------------------------------------------


def routing_tables(model, data, batch_size=512) -> dict:
    """What the model routes where on `data`, in eval mode.

    Returns {"tasks": names, "layers": [per layer (num_tasks, E) share of each task's assignments per expert],
    "expert_load": [per layer (E,) share of all assignments]}. For a MultiGateMoE the one "layer" is each task's
    mean gate weight per expert.
    """
    if not has_routing(model):
        raise ValueError(f"{type(model).__name__} has no MoE layer: there is no routing to show")
    model.eval()
    names = list(data.task_names)
    if not hasattr(model, "moe_layers"):  # MultiGateMoE: every example is scored on every task
        with no_grad():
            model(data.x[:batch_size * 4])
        weights = getattr(model, "last_weights", None)
        if not weights:
            raise ValueError(f"{type(model).__name__} has no routing to show")
        table = np.stack([w.mean(axis=0) for w in weights])  # (num_tasks, E)
        return {"tasks": names, "layers": [table], "expert_load": [table.mean(axis=0)],
                "what": "mean gate weight of each task per expert"}
    layers = model.moe_layers
    counts = [np.zeros((len(names), m.num_experts)) for m in layers]
    with no_grad():
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            model(data.tokens[idx], task_ids=data.task_ids[idx])
            for c, m in zip(counts, layers):
                c += m.last_routing.task_expert_load(len(names))
    shares = [c / np.maximum(c.sum(axis=1, keepdims=True), 1) for c in counts]
    loads = [c.sum(axis=0) / max(c.sum(), 1) for c in counts]
    return {"tasks": names, "layers": shares, "expert_load": loads,
            "what": "share of each task's assignments per expert"}


def format_routing(tables) -> str:
    """The routing tables as text (the same numbers the plot shows)."""
    lines = []
    for i, (share, load) in enumerate(zip(tables["layers"], tables["expert_load"])):
        E = share.shape[1]
        lines.append(f"MoE layer {i}: {tables['what']}")
        lines.append(f"{'task':>16} " + " ".join(f"e{e:<4}" for e in range(E)))
        for name, row in zip(tables["tasks"], share):
            lines.append(f"{name[:16]:>16} " + " ".join(f"{v:5.2f}" for v in row))
        lines.append(f"{'all (load f_i)':>16} " + " ".join(f"{v:5.2f}" for v in load))
    return "\n".join(lines)


def plot_routes(model, data, path) -> str:
    """Task x expert heatmap per MoE layer plus per-layer expert load, to a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = routing_tables(model, data)
    n = len(tables["layers"])
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1) + 1, 0.35 * len(tables["tasks"]) + 2.2), squeeze=False)
    for i, share in enumerate(tables["layers"]):
        ax = axes[0, i]
        im = ax.imshow(share, vmin=0, vmax=max(float(share.max()), 1e-9), cmap="viridis", aspect="auto")
        ax.set_title(f"MoE layer {i}: task x expert")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(tables["tasks"])))
        ax.set_yticklabels(tables["tasks"], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[0, n]
    E = len(tables["expert_load"][0])
    width = 0.8 / n
    for i, load in enumerate(tables["expert_load"]):
        ax.bar(np.arange(E) + (i - (n - 1) / 2) * width, load, width, label=f"layer {i}")
    ax.axhline(1 / E, color="k", lw=0.8, ls="--", label="uniform 1/E")
    ax.set_title("expert load f_i per layer")
    ax.set_xlabel("expert")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
