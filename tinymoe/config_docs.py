"""The run config explained by itself: which keys each dataset kind and model family use, and the full default
config as commented TOML (`tinymoe config [--data KIND] [--set key=value ...]`).

Which keys each dataset kind and model family read is `tinymoe.config.DATA_KEYS` / `MODEL_KEYS`. The comment
of a key is the comment on its dataclass field (DataConfig, ModelConfig, MultiGateConfig, OptimConfig,
RunConfig), or, where the field has none, the entry in `_COMMENTS` below; a test checks that every key printed
has one.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re

from .config import _FROM_DATA, DataConfig, MultiGateConfig, RunConfig, load_config, model_config
from .model import ModelConfig
from .train import OptimConfig

_COMMENTS = {
    ("run", "name"): "the run folder is <out>/<name>-<date>-<time>",
    ("run", "out"): "where run folders go",
    ("data", "tasks"): "sequence: one task per name, primitives joined by '+' (copy, reverse, sort, increment, ...)",
    ("data", "n_per_task"): "sequence: examples per task",
    ("data", "seq_len"): "sequence: tokens per example",
    ("data", "vocab_size"): "sequence: token values 0 .. vocab_size-1",
    ("data", "n"): "examples in all (split below)",
    ("data", "rho"): "mmoe / clustered: correlation between the tasks (Ma et al. 2018)",
    ("data", "d"): "mmoe / clustered: input features",
    ("data", "seed"): "data generation and split; 0 = the run's seed",
    ("model", "dropout"): "dropout rate in the transformer blocks",
    ("model", "activation"): "the experts' activation: gelu | relu | silu",
    ("optim", "batch_size"): "examples per step",
    ("optim", "min_lr_ratio"): "the cosine schedule ends at min_lr_ratio · lr",
    ("model", "num_experts"): "experts shared by every task (multigate)",
    ("model", "d_expert"): "width of each expert's output (the towers' input)",
    ("model", "d_hidden"): "hidden width inside each expert (an MLP d_in -> d_hidden -> d_expert)",
    ("model", "k"): "experts per task for top_k / dselect_k (softmax uses all)",
    ("model", "per_example"): "dselect_k: one selection per example (true) or one per task (false)",
    ("model", "tower_hidden"): "hidden width of each task's tower",
    ("model", "gamma"): "dselect_k: the smooth-step's width γ",
    ("model", "aux_weights"): "weights of the auxiliary losses, e.g. { dselect_entropy = 0.01 }",
    ("model", "seed"): "weight init; 0 = the run's seed",
}

_TEMPLATE_TABLE = {"path": "data.csv", "target_columns": ["target_a", "target_b"]}  # placeholders for kind = table


def field_comments(cls) -> dict:
    """{field name: the comment after it} from the dataclass's source ("" where a field has none)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # pragma: no cover - no source (frozen app)
        source = ""
    found = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=#]+(?:=[^#]*)?#\s*(.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return {f.name: found.get(f.name, "") for f in dataclasses.fields(cls)}


def toml_value(value) -> str:
    """A Python value as a TOML value (None has no TOML form: callers comment such keys out)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML form for {value!r}")


def _lines(values: dict, comments: dict, section: str) -> list[str]:
    lines = []
    for key, value in values.items():
        comment = comments.get(key) or _COMMENTS.get((section, key), "")
        if value is None:
            lines.append(f"# {key} = ...  # unset (None) by default; {comment}")
        else:
            lines.append(f"{key} = {toml_value(value)}  # {comment}")
    return lines


def default_config(kind="sequence", overrides=()):
    """The resolved RunConfig `tinymoe train --set data.kind=KIND [--set ...]` would run, as a dict of sections
    holding only the keys that dataset and model use (for kind = table: placeholder path and targets)."""
    sets = [f"data.kind={kind}"] + list(overrides)
    if kind == "table":
        given = {o.split("=", 1)[0].strip() for o in overrides}
        sets += [f"data.{k}={toml_value(v)}" for k, v in _TEMPLATE_TABLE.items() if f"data.{k}" not in given]
    cfg = load_config(None, sets)
    mc = dataclasses.asdict(model_config(cfg, num_tasks=1))
    cfg = dataclasses.replace(cfg, model={k: v for k, v in mc.items() if k not in _FROM_DATA})
    return cfg.to_dict()


def default_config_toml(kind="sequence", overrides=()) -> str:
    """The full default run config for dataset `kind` as TOML, one comment per key (see the module docstring)."""
    values = default_config(kind, overrides)
    sequence = kind == "sequence"
    head = [f"# tinymoe run config: data.kind = {kind!r}, every key at its default "
            f"({'the built-in demo' if sequence else 'the demo optimizer, MultiGateConfig model'}).",
            "# Train with: tinymoe train --config run.toml   (any key can be overridden: --set optim.steps=200)",
            "# A key left out takes the value shown here; a commented-out key is unset (None) by default.", ""]
    if kind == "table":
        head.insert(1, "# Replace path and target_columns with your CSV (header row, numbers only) or .npz file.")
    top = {k: v for k, v in values.items() if k not in ("data", "model", "optim")}
    out = head + _lines(top, field_comments(RunConfig), "run")
    model_cls = ModelConfig if sequence else MultiGateConfig
    model_note = ("tinymoe.ModelConfig: the MoE transformer" if sequence else
                  f"{values['model']['family']} model (model.family: multigate | cgc | ple | shared_bottom); "
                  "other families have other keys: tinymoe config --data KIND --set model.family=ple")
    for section, cls, note in (("data", DataConfig, f"the {kind} dataset (tinymoe.data)"),
                               ("model", model_cls, model_note),
                               ("optim", OptimConfig, "tinymoe.train.OptimConfig: optimizer, schedule, evals")):
        out += ["", f"[{section}]  # {note}"] + _lines(values[section], field_comments(cls), section)
    return "\n".join(out) + "\n"
