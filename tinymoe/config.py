"""Run configuration: dataclasses validated on load, from a TOML (or JSON) file and `--set key=value` overrides.

    name = "demo"            # run folder: <out>/<name>-<time>
    backend = "auto"         # auto (numba when installed, else numpy) | numpy | numba
    seed = 0

    [data]                   # DataConfig: which generated dataset (tinymoe.data), its size and split
    kind = "sequence"
    tasks = ["copy", "reverse", "sort", "reverse+increment"]

    [model]                  # ModelConfig fields (sequence data) or MultiGateConfig fields (tabular data)
    num_experts = 8
    router = "add"

    [optim]                  # tinymoe.train.OptimConfig
    steps = 600

Every key is checked: an unknown one is named with the closest known keys, a wrong type names the expected one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import asdict, dataclass, field

from .model import ModelConfig
from .train import OptimConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and the fix."""


DATA_KINDS = ("sequence", "mmoe", "clustered", "digits", "table")


@dataclass
class DataConfig:
    kind: str = "sequence"  # sequence | mmoe | clustered | digits | table
    # sequence: task names, compositions of tinymoe.data.PRIMITIVES joined by "+", e.g. "reverse+cumsum"
    tasks: list = field(default_factory=lambda: ["copy", "reverse", "sort", "reverse+increment"])
    n_per_task: int = 1000
    seq_len: int = 8
    vocab_size: int = 10
    # mmoe / clustered (Ma et al. 2018 generator): examples, task correlation, input width
    n: int = 4000
    rho: float = 0.5
    d: int = 100
    num_tasks: int = 8  # clustered only
    num_clusters: int = 2  # clustered only
    mode: str = "side_by_side"  # digits: side_by_side | overlay
    path: str = ""  # table: a .csv or .npz file
    target_columns: list | None = None  # table: one task per column
    feature_columns: list | None = None  # table: the input columns (default: every column that is not a target)
    task_type: str = "regression"  # table: regression | classification
    standardize: bool = True  # table: z-score features (and regression targets) with the training split's mean, std
    split: list = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train / val / test fractions
    seed: int = 0

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind == "table" and not self.path:
            raise ConfigError("data.kind = 'table' needs data.path (a .csv or .npz file)")
        if self.kind == "sequence" and not self.tasks:
            raise ConfigError("data.tasks is empty; list at least one task, e.g. ['copy', 'reverse']")
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"data.split must be 3 non-negative fractions (train, val, test) summing to 1, "
                              f"got {self.split}")
        for name in ("n_per_task", "seq_len", "vocab_size", "n", "d", "num_tasks", "num_clusters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.kind == "sequence":
            from .data import make_task

            for task in self.tasks:
                try:
                    make_task(task, self.seq_len, self.vocab_size)
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"data.tasks: {e}") from None


@dataclass
class MultiGateConfig:
    """Multi-task models for tabular data: MMoE / DSelect-k (tinymoe.nn.MultiGateMoE), CGC / PLE (tinymoe.nn.CGC,
    tinymoe.nn.PLE), or shared-bottom."""

    family: str = "multigate"  # multigate (MMoE, top-k, DSelect-k) | cgc | ple | shared_bottom
    num_experts: int = 8
    d_expert: int = 16
    d_hidden: int | None = 32
    gate: str = "dselect_k"  # softmax (MMoE) | top_k | dselect_k
    k: int = 2
    per_example: bool = False
    tower_hidden: int = 8
    gamma: float = 1.0
    aux_weights: dict = field(default_factory=dict)
    num_task_experts: int = 2  # cgc / ple: experts of each task's own
    num_shared_experts: int = 2  # cgc / ple: experts every task shares
    num_levels: int = 2  # ple: stacked extraction levels (cgc is one level)
    seed: int = 0

    def __post_init__(self):
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"model.family must be one of {MODEL_FAMILIES}, got {self.family!r}")


MODEL_FAMILIES = ("multigate", "cgc", "ple", "shared_bottom")

# [data] keys per dataset kind (besides kind, split and seed, which every kind uses)
DATA_KEYS = {
    "sequence": ("tasks", "n_per_task", "seq_len", "vocab_size"),
    "mmoe": ("n", "rho", "d"),
    "clustered": ("n", "num_tasks", "num_clusters", "rho", "d"),
    "digits": ("mode", "n"),
    "table": ("path", "target_columns", "feature_columns", "task_type", "standardize"),
}
_DATA_COMMON = ("kind", "split", "seed")

# [model] keys per model family of tabular data (sequence data: every ModelConfig field the data does not decide)
MODEL_KEYS = {
    "multigate": ("num_experts", "d_expert", "d_hidden", "gate", "k", "per_example", "tower_hidden", "gamma",
                  "aux_weights"),
    "shared_bottom": ("d_expert", "d_hidden", "tower_hidden"),
    "cgc": ("num_task_experts", "num_shared_experts", "d_expert", "d_hidden", "tower_hidden"),
    "ple": ("num_task_experts", "num_shared_experts", "num_levels", "d_expert", "d_hidden", "tower_hidden"),
}


def used_keys(section, kind_or_family) -> set:
    """The [data] keys a dataset kind reads, or the [model] keys a tabular model family reads."""
    if section == "data":
        return set(_DATA_COMMON) | set(DATA_KEYS[kind_or_family])
    return {"family", "seed"} | set(MODEL_KEYS.get(kind_or_family, ()))


@dataclass
class RunConfig:
    name: str = "demo"
    out: str = "runs"
    backend: str = "auto"  # auto | numpy | numba
    seed: int = 0  # overrides the seeds of data, model and optim when they are left at 0
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # ModelConfig or MultiGateConfig fields, validated by model_config()
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def sequence(self) -> bool:
        return self.data.kind == "sequence"

    def to_dict(self) -> dict:
        """As a dict, [data] and [model] holding only the keys this dataset kind and model use."""
        out = asdict(self)
        out["data"] = {k: v for k, v in out["data"].items() if k in used_keys("data", self.data.kind)}
        if not self.sequence and "family" in self.model:
            keep = used_keys("model", self.model["family"])
            out["model"] = {k: v for k, v in out["model"].items() if k in keep}
        return out


# The built-in demo: four sequence tasks, a task-aware MoE transformer; about a minute on 2 cores.
DEMO = {
    "name": "demo",
    "data": {"kind": "sequence", "tasks": ["copy", "reverse", "sort", "reverse+increment"], "n_per_task": 1000},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "num_experts": 8, "k": 2, "moe_every": 1,
              "gate": "top_k", "router": "add", "task_embedding": True},
    "optim": {"optimizer": "adamw", "lr": 3e-3, "steps": 800, "batch_size": 64, "warmup_steps": 50,
              "eval_every": 100},
}


# ---- validation -----------------------------------------------------------------------------------------------------


def _close(name, known):
    near = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(near)}?)" if near else f"; known keys: {', '.join(sorted(known))}"


def _coerce(value, hint, where):
    """`value` checked (and int -> float widened) against the type hint `hint`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_hint_name(hint)}, got {value!r}")
    base = origin or hint
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base in (str, bool, list, dict) and isinstance(value, base):
        return list(value) if base is list else value
    if base is list and isinstance(value, tuple):
        return list(value)
    raise ConfigError(f"{where}: expected {_hint_name(hint)}, got {value!r} ({type(value).__name__})")


def _hint_name(hint):
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(cls, values: dict, section: str):
    """An instance of dataclass `cls` from `values`, every key and type checked; errors name `section.key`."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of key = value, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}{_close(key, known)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[{section}] {e}") from None


def run_config_from_dict(values: dict) -> RunConfig:
    values = dict(values)
    sections = {"data": DataConfig, "optim": OptimConfig}
    parsed = {name: from_dict(cls, values.pop(name, {}), name) for name, cls in sections.items()}
    model = values.pop("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"[model] must be a table of key = value, got {model!r}")
    top = from_dict(RunConfig, values, "run")
    cfg = dataclasses.replace(top, model=dict(model), **parsed)
    if cfg.backend not in ("auto", "numpy", "numba", "cupy"):
        raise ConfigError(f"backend must be auto, numpy, numba or cupy, got {cfg.backend!r}")
    model_config(cfg, num_tasks=1, vocab_size=cfg.data.vocab_size)  # validate the model section now
    return cfg


# fields that the data decides, not the user
_FROM_DATA = {"vocab_size", "max_seq_len", "num_tasks", "num_classes", "task_descriptions", "num_description_parts"}


def model_config(cfg: RunConfig, num_tasks, vocab_size=None, seq_len=None):
    """The validated model config: a ModelConfig for sequence data, a MultiGateConfig for tabular data."""
    values = dict(cfg.model)
    if cfg.sequence:
        fixed = sorted(_FROM_DATA & set(values))
        if fixed:
            raise ConfigError(f"model.{fixed[0]} is set from the data; remove it from [model]")
        values["seed"] = values.get("seed") or cfg.seed  # like data and optim: its own when non-zero
        values.update(vocab_size=vocab_size or cfg.data.vocab_size, max_seq_len=seq_len or cfg.data.seq_len,
                      num_tasks=num_tasks)
        return from_dict(ModelConfig, values, "model")
    values["seed"] = values.get("seed") or cfg.seed
    return from_dict(MultiGateConfig, values, "model")


# ---- files and overrides -------------------------------------------------------------------------------------------


def read_file(path) -> dict:
    """A .toml or .json run config as a dict; a missing file or a syntax error is a ConfigError."""
    try:
        if str(path).endswith(".json"):
            with open(path) as f:
                return json.load(f)
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if str(path).endswith('.json') else 'TOML'}: "
                          f"{e}") from None


def parse_value(text: str):
    """A --set value: TOML syntax (3, 0.5, true, "x", [1, 2]); none/null -> None; anything else a string."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(values: dict, overrides) -> dict:
    """`["optim.lr=0.01", "model.router=task"]` applied to a nested dict (a copy)."""
    values = json.loads(json.dumps(values))
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=0.01")
        key, text = item.split("=", 1)
        *sections, leaf = key.strip().split(".")
        target = values
        for s in sections:
            target = target.setdefault(s, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {s} is not a section")
        target[leaf] = parse_value(text.strip())
    return values


def load_config(path=None, overrides=None) -> RunConfig:
    """The built-in demo, or the file at `path`, with `--set` overrides applied, validated."""
    if path:
        return run_config_from_dict(apply_overrides(read_file(path), overrides))
    values = apply_overrides(DEMO, overrides)
    if values.get("data", {}).get("kind", "sequence") != "sequence":
        # the demo's [model] is a transformer; tabular data starts from MultiGateConfig, plus any --set model.*
        values["model"] = apply_overrides({}, [o for o in overrides or () if o.strip().startswith("model.")]).get(
            "model", {})
    return run_config_from_dict(values)
