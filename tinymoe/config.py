"""Run configuration: dataclasses validated on load, from a TOML (or JSON) file and `--set key=value` overrides.

    name = "demo"            # run folder: <out>/<name>-<time>
    backend = "auto"         # auto (cupy with a GPU, else numba when installed, else numpy) | numpy | numba | cupy
    seed = 0

    [data]                   # DataConfig: which generated dataset (tinymoe.data), its size and split
    kind = "sequence"
    tasks = ["copy", "reverse", "sort", "reverse+increment"]

    [model]                  # ModelConfig fields (sequence data) or MultiGateConfig fields (tabular data)
    num_experts = 8
    router = "add"

    [optim]                  # tinymoe.train.OptimConfig
    steps = 600

Every key is checked: an unknown one is named with the closest known keys, a wrong type names the expected one,
and every value against its range (sizes ≥ 1, probabilities in [0, 1), finite rates, known names). Before
anything is allocated, the run's memory is estimated (`estimate_memory`) and compared with the RAM available.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import stat
import sys
import types
import typing
from dataclasses import asdict, dataclass, field

from . import backends
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
        if not all(isinstance(t, str) for t in self.tasks) or not all(
                isinstance(c, str) for c in self.target_columns or ()):
            raise ConfigError("data.tasks and data.target_columns must be lists of names (strings), got "
                              f"{self.tasks} and {self.target_columns}")
        if self.kind == "sequence" and not self.tasks:
            raise ConfigError("data.tasks is empty; list at least one task, e.g. ['copy', 'reverse']")
        if (len(self.split) != 3 or _finite_all(self.split) or min(self.split) < 0
                or abs(sum(self.split) - 1) > 1e-6):
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


def _finite_all(values):
    """None when every value is a finite number, else a complaint (used as a truthy 'problem')."""
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    return None if ok else "not all finite numbers"


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
    backend: str = "auto"  # auto | numpy | numba | cupy
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


# ---- value rules: each returns None when the value is fine, else what it must be ------------------------------------


def _size(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "an integer ≥ 1"


def _count(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "an integer ≥ 0"


def _finite(v):
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "a finite number"


def _positive(v):
    return None if not _finite(v) and v > 0 else "a finite number > 0"


def _non_negative(v):
    return None if not _finite(v) and v >= 0 else "a finite number ≥ 0"


def _probability(v):
    return None if not _finite(v) and 0 <= v < 1 else "a probability in [0, 1)"


def _correlation(v):
    return None if not _finite(v) and -1 <= v <= 1 else "a correlation in [-1, 1]"


def _one_of(*names):
    def rule(v):
        return None if v in names else f"one of {', '.join(map(repr, names))}"
    return rule


def _optional(rule):
    return lambda v: None if v is None else rule(v)


def _aux_weights(v):
    from .losses import DEFAULT_WEIGHTS

    if not isinstance(v, dict):
        return f"a table of weights, e.g. {{dselect_entropy = 1e-5}} (names: {', '.join(DEFAULT_WEIGHTS)})"
    for name, w in v.items():
        if name not in DEFAULT_WEIGHTS:
            return f"a table whose keys are auxiliary losses ({', '.join(DEFAULT_WEIGHTS)}); {name!r} is not one"
        if _non_negative(w):
            return f"a table of finite weights ≥ 0; {name} = {w!r} is not"
    return None


def _gates():
    from .gates import GATES

    return GATES


def _activations():
    from .activations import ACTIVATIONS

    return tuple(ACTIVATIONS)


def _rules(cls) -> dict:
    """{field: rule} for the dataclass `cls` (the rules that do not depend on other fields)."""
    from .model import ModelConfig

    seed = _count
    if cls is ModelConfig:
        return {**{f: _size for f in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff",
                                      "num_experts", "k", "num_tasks")},
                "moe_every": _count, "num_shared_experts": _count, "gate": _one_of(*_gates()),
                "capacity_factor": _optional(_positive), "priority": _one_of("slot", "weight"),
                "head": _one_of("shared", "per_task"), "num_classes": _optional(_size),
                "num_description_parts": _optional(_size), "dropout": _probability,
                "activation": _one_of(*_activations()), "aux_weights": _aux_weights, "seed": seed}
    if cls is MultiGateConfig:
        return {"family": _one_of(*MODEL_FAMILIES), "num_task_experts": _size, "num_shared_experts": _count,
                "num_levels": _size, "num_experts": _size, "d_expert": _size,
                "d_hidden": _optional(_size), "gate": _one_of("softmax", "top_k", "dselect_k"), "k": _size,
                "tower_hidden": _size, "gamma": _positive, "aux_weights": _aux_weights, "seed": seed}
    if cls is DataConfig:
        return {**{f: _size for f in ("n_per_task", "seq_len", "vocab_size", "n", "d", "num_tasks", "num_clusters")},
                "kind": _one_of(*DATA_KINDS), "rho": _correlation, "mode": _one_of("side_by_side", "overlay"),
                "task_type": _one_of("regression", "classification"), "seed": seed}
    if cls is OptimConfig:
        from .train import OPTIMIZERS, SCHEDULES

        return {"optimizer": _one_of(*OPTIMIZERS), "schedule": _one_of(*SCHEDULES), "lr": _positive,
                "weight_decay": _non_negative, "momentum": _probability, "steps": _size, "batch_size": _size,
                "warmup_steps": _count,
                "min_lr_ratio": lambda v: None if not _finite(v) and 0 <= v <= 1 else "a number in [0, 1]",
                "grad_clip": _optional(_positive), "eval_every": _size, "patience": _optional(_size),
                "checkpoint_every": _optional(_size), "seed": seed}
    if cls is RunConfig:
        return {"name": lambda v: None if v and not set(v) & set("/\\\0") else "a non-empty name without / or \\",
                "out": lambda v: None if v and "\0" not in v else "a folder path",
                "backend": _one_of("auto", *backends.NAMES), "seed": seed}
    return {}


def _check_fields(cls, kwargs, section):
    rules = _rules(cls)
    for key, value in kwargs.items():
        rule = rules.get(key)
        problem = rule(value) if rule else None
        if problem:
            raise ConfigError(f"{section}.{key} must be {problem}, got {value!r}")


def _check_together(obj, section):
    """The rules that tie fields together (after the field rules, so no division by zero here)."""
    from .model import ModelConfig

    if isinstance(obj, ModelConfig):
        if obj.d_model % obj.n_heads:
            raise ConfigError(f"{section}.d_model = {obj.d_model} must be divisible by {section}.n_heads = "
                              f"{obj.n_heads}; pick n_heads among {[h for h in range(1, 17) if obj.d_model % h == 0]}")
    if isinstance(obj, (ModelConfig, MultiGateConfig)) and obj.gate != "softmax" and obj.k > obj.num_experts:
        raise ConfigError(f"{section}.k = {obj.k} is more than {section}.num_experts = {obj.num_experts}; choose "
                          "k ≤ num_experts")


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
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {str(value)[:12]}... is too large for a number") from None
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
    _check_fields(cls, kwargs, section)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"[{section}] {e}") from None
    _check_together(obj, section)
    return obj


def run_config_from_dict(values: dict) -> RunConfig:
    values = dict(values)
    sections = {"data": DataConfig, "optim": OptimConfig}
    parsed = {name: from_dict(cls, values.pop(name, {}), name) for name, cls in sections.items()}
    model = values.pop("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"[model] must be a table of key = value, got {model!r}")
    top = from_dict(RunConfig, values, "run")
    cfg = dataclasses.replace(top, model=dict(model), **parsed)
    model_config(cfg, num_tasks=1, vocab_size=cfg.data.vocab_size)  # validate the model section now
    check_memory(cfg)  # before any data or weights are allocated
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
    """A .toml or .json run config as a dict; a missing or unreadable file, a syntax error or a top level that is
    not a table is a ConfigError. Only regular files are opened (a FIFO or a device would block or never end)."""
    kind = "JSON" if str(path).endswith(".json") else "TOML"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"config file {path} is not a regular file; pass a .toml or .json file")
        if os.path.getsize(path) > 16 * 2**20:
            raise ConfigError(f"config file {path} is larger than 16 MB; a run config is a few lines of TOML")
        if kind == "JSON":
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        else:
            with open(path, "rb") as f:
                values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"config file {path} is not valid {kind}: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e}); check the path and its "
                          "permissions") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: the top level must be a table of settings (name, [data], [model], "
                          f"[optim]), got a {type(values).__name__}")
    return values


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
    """The built-in demo, or the file at `path`, with `--set` overrides applied, validated (the backend too)."""
    if path:
        return check_backend(run_config_from_dict(apply_overrides(read_file(path), overrides)))
    values = apply_overrides(DEMO, overrides)
    if values.get("data", {}).get("kind", "sequence") != "sequence":
        # the demo's [model] is a transformer; tabular data starts from MultiGateConfig, plus any --set model.*
        values["model"] = apply_overrides({}, [o for o in overrides or () if o.strip().startswith("model.")]).get(
            "model", {})
    return check_backend(run_config_from_dict(values))


def check_backend(cfg: RunConfig) -> RunConfig:
    """cfg, or a ConfigError when it names a backend that cannot run on this machine (with why and how to get it):
    checked with the config, before any data is built. `auto` always runs. (A saved run's config is not checked
    here: a run trained on a GPU still loads on a CPU-only machine.)"""
    why = None if cfg.backend == "auto" else backends.why_unavailable(cfg.backend)
    if why:
        raise ConfigError(f"backend = {cfg.backend!r} cannot run here: {why}")
    return cfg


# ---- memory estimate -------------------------------------------------------------------------------------------------


def estimate_memory(cfg: RunConfig, num_features=None, num_tasks=None, num_classes=None,
                    num_examples=None) -> tuple[int, str]:
    """(bytes, how they were counted): a rough upper estimate of what training `cfg` holds in memory at once.

    Parameters count 7 times (weights, gradients, two Adam moments, the best-on-validation copy, the checkpoint's
    copy being written, one spare) in float32. A step's activations are counted from the widest tensors the
    autodiff graph keeps (about 12 of width d_model per layer and position, 4 of width d_ff per chosen expert,
    the attention maps, the logits), for the larger of the training batch and the 512-example eval batch (which
    keeps no graph, so it counts a quarter). The data counts its arrays and the three split copies.
    For tabular data of unknown width (a table file, digits) pass `num_features`; None skips the model part.
    """
    from .checkpoint import multigate_parameters, ple_parameters, transformer_parameters
    from .model import ModelConfig

    d, B, F32 = cfg.data, cfg.optim.batch_size, 4
    if cfg.sequence:
        n_examples = len(d.tasks) * d.n_per_task
        data = n_examples * d.seq_len * 8 * 3 * 2  # tokens + targets + ids, int64, original + split copies
        values = dict(cfg.model)
        for key in _FROM_DATA:
            values.pop(key, None)
        c = ModelConfig(**{**values, "vocab_size": d.vocab_size, "max_seq_len": d.seq_len,
                           "num_tasks": num_tasks or len(d.tasks)})
        params = transformer_parameters(c)  # counted from the config, nothing built
        L = d.seq_len
        moe_layers = sum(1 for i in range(c.n_layers) if c.moe_every > 0 and (i + 1) % c.moe_every == 0)
        per_example = L * (12 * c.d_model * c.n_layers + 4 * c.d_ff * (c.k * moe_layers + c.n_layers - moe_layers)
                           + 3 * c.n_heads * L * c.n_layers + 2 * (c.num_classes or c.vocab_size)) * F32
    else:
        n_examples = num_examples or {"mmoe": d.n, "clustered": d.n, "digits": d.n}.get(d.kind, 0)
        width = num_features or (d.d if d.kind in ("mmoe", "clustered") else None)
        data = n_examples * ((width or 0) + (num_tasks or d.num_tasks)) * F32 * 2
        if width is None:
            return data, f"{n_examples:,} examples (model not counted: its input width comes from the data)"
        c = from_dict(MultiGateConfig, {**cfg.model, "seed": 0}, "model")
        T = num_tasks or (2 if d.kind == "mmoe" else d.num_tasks)
        E = c.num_experts  # CGC / PLE: each task's own experts and the shared ones, on every level
        if c.family in ("cgc", "ple"):
            levels = c.num_levels if c.family == "ple" else 1
            E = (T * c.num_task_experts + c.num_shared_experts) * levels
            params = ple_parameters(dict(d_in=width, d_expert=c.d_expert, num_tasks=T, out_dim=num_classes or 1,
                                         num_task_experts=c.num_task_experts, num_shared_experts=c.num_shared_experts,
                                         d_hidden=c.d_hidden, tower_hidden=c.tower_hidden, num_levels=levels))
        else:
            params = multigate_parameters(width, T, num_classes or 1, family=c.family, num_experts=E,
                                          d_expert=c.d_expert, d_hidden=c.d_hidden, gate=c.gate, k=c.k,
                                          per_example=c.per_example, tower_hidden=c.tower_hidden)
        per_example = (E * ((c.d_hidden or c.d_expert) * 3 + c.d_expert * 2) + width
                       + T * (E * 4 + c.tower_hidden * 3)) * F32
    activations = per_example * max(B, 512 // 4)
    total = params * F32 * 7 + activations + data
    return total, (f"{_number(params)} parameters, a batch of {B} ({_human(activations)} of activations), "
                   f"{_number(n_examples)} examples")


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (Linux: MemAvailable), or None when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: RunConfig, **data_sizes):
    """ConfigError when the estimated memory of training `cfg` exceeds the RAM available now."""
    need, how = estimate_memory(cfg, **data_sizes)
    have = available_memory()
    if have is not None and need > have:
        raise ConfigError(f"this run needs about {_human(need)} of memory ({how}) but {_human(have)} is available; "
                          "make it smaller (model.d_model, model.d_ff, model.num_experts, model.n_layers, "
                          "optim.batch_size or the data sizes)")


def _number(n) -> str:
    return f"{n:,}" if n < 10**15 else f"~10^{len(str(int(n))) - 1}"


def _human(n) -> str:
    if n >= 1024**6:  # beyond any machine (and beyond what a float may hold): just the order of magnitude
        return f"~10^{len(str(int(n))) - 1} B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
