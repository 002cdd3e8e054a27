"""Checkpoints: a model, its optimizer and the training loop's state in ONE `.safetensors` file.

    import tinymoe as tm
    tm.save("runs/a/last.safetensors", model, optimizer, train_state={"step": 100, "rng": rng.bit_generator.state})
    model = tm.load("runs/a/last.safetensors")                     # inference: the best-on-validation weights
    model = tm.load("runs/a/last.safetensors", which="last")       # the weights at the last saved step
    ck = tm.checkpoint.load_checkpoint("runs/a/last.safetensors")  # resume: model, optimizer, loop state
    optimizer = ck.make_optimizer()                                # same class, hyper-parameters and moments

File layout
-----------
A standard safetensors file (any safetensors reader opens it):

* tensors: `model.<parameter name>` for every entry of `model.state_dict()` (dtype kept as is), and
  `optim.<key>` for every array entry of `optimizer.state_dict()` (e.g. `optim.exp_avg.3`), and
  `extra.<key>` for the optional `extra_tensors` (arrays the loop keeps besides the model, e.g. the best weights).
* header metadata (string -> string; each value but the first two is JSON):

  | key              | value                                                                                    |
  |------------------|------------------------------------------------------------------------------------------|
  | `format`         | `"tinymoe-checkpoint"` (what tells a tinymoe checkpoint from any other safetensors file) |
  | `format_version` | `"1"`                                                                                    |
  | `model`          | `{"class": <registry name>, "config": <constructor config>, "rng_states": {...}}`        |
  | `optimizer`      | `null` or `{"class", "scalars" (step, lr), "hparams" (constructor kwargs), "param_names"}` |
  | `train_state`    | `null` or the loop's dict (see below)                                                    |
  | `sha256`         | hex digest of every tensor's name, dtype, shape and bytes, then of every other header     |
  |                  | entry (key and value): catches corrupted data and an edited header (format 2; format 1   |
  |                  | files, whose digest covers the tensors only, still load)                                  |
  | `tinymoe_version`| the version that wrote the file (informational)                                          |

The model is rebuilt from its registry entry (`MODELS`) and config, then the weights are loaded into it; the
generators a module keeps for itself (dropout masks, noisy top-k noise) are saved by attribute path and
restored too, so a resumed run draws the same numbers as an uninterrupted one.

`train_state` is any dict of JSON values plus tuples, NumPy scalars/arrays and dicts with non-string keys, which
are tagged (`{"__tinymoe__": "tuple" | "ndarray" | "dict", ...}`) so they come back as they went in. Python ints
of any size and floats (`repr` is exact) survive JSON unchanged, so a `Generator.bit_generator.state` dict
round-trips exactly: `rng.bit_generator.state = ck.train_state["rng"]` resumes the stream.

Atomicity
---------
`save` writes the whole file to a temporary file in the destination's directory (same file system), flushes and
fsyncs it, then `os.replace`s it over the destination, which is atomic on POSIX and Windows: a reader sees the
old checkpoint or the new one, never half of one. If anything fails before the replace (an exception, a full
disk, Ctrl-C), the temporary file is deleted and a previous checkpoint at `path` is untouched.

Why no pickle
-------------
Unpickling runs arbitrary code chosen by whoever wrote the file, so a downloaded or shared checkpoint would be a
program. Here the tensors are raw bytes (safetensors) and everything else is JSON; model classes are looked up in
an explicit registry and optimizer classes only in `tinymoe.optim`, never imported by a name read from the file.
Loading a checkpoint therefore cannot execute code from it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import os
import secrets
from dataclasses import dataclass, field

import numpy as np

from . import nn
from .model import ModelConfig, MoETransformer

FORMAT_NAME = "tinymoe-checkpoint"
FORMAT_VERSION = 2  # 2: the sha256 covers the header too (1: tensors only)
_TAG = "__tinymoe__"  # marks a tagged (non-JSON) value in train_state / hparams


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file, the problem and a fix."""


# ---- the model registry -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to save and rebuild one model class.

    cls: the class itself (never a name imported from the file). get_config(model) -> a JSON-able config;
    build(cls, config) -> a fresh model (weights loaded afterwards).
    """

    cls: type
    get_config: object
    build: object
    num_parameters: object = None  # config -> the parameter count it builds (or a lower bound); None: unknown

    def resolve(self):
        return self.cls


def _dict_config(model):
    return copy.deepcopy(model.config)


def _build_from_kwargs(cls, config):
    return cls(**config)


def _dataclass_config(model):
    return dataclasses.asdict(model.config)


def _build_transformer(cls, config):
    return cls(ModelConfig(**config))


# ---- parameter counts from a config, before anything is built ------------------------------------------------------
# A header asking for far more weights than the file holds is refused instead of allocated (a 1 MB file must not make
# the loader allocate 4 GB); tinymoe.config uses the same counts to estimate a run's memory before it starts.


def transformer_parameters(c) -> int:
    """The number of parameters of a MoETransformer with ModelConfig `c`, counted from the config (nothing is
    built): exact for token routers, a lower bound for the task-aware ones (their task embeddings are left out)."""
    d, f, E = c.d_model, c.d_ff, c.num_experts
    ffn = 2 * d * f + f + d  # one FFN or expert: W1, b1, W2, b2
    n = (c.vocab_size + c.max_seq_len) * d + (c.num_tasks * d if c.task_embedding else 0) + 2 * d  # + final norm
    for i in range(c.n_layers):
        n += 4 * d * d + 4 * d + 4 * d  # attention (q, k, v, out) + two layer norms
        if c.moe_every > 0 and (i + 1) % c.moe_every == 0:
            n += moe_layer_parameters(d, f, E, c.gate, c.k, c.num_shared_experts)
        else:
            n += ffn
    classes = c.num_classes or c.vocab_size
    return n + (d * classes + classes) * (c.num_tasks if c.head == "per_task" else 1)


def multigate_parameters(d_in, num_tasks, out_dim=1, *, family="multigate", num_experts=8, d_expert=16,
                         d_hidden=None, gate="softmax", k=2, per_example=False, tower_hidden=8) -> int:
    """The number of parameters of a MultiGateMoE (family "multigate") or SharedBottom ("shared_bottom"; its
    d_out is d_expert), counted from the constructor's arguments."""
    h = d_hidden or d_expert
    towers = num_tasks * (d_expert * tower_hidden + tower_hidden + tower_hidden * out_dim + out_dim)
    if family == "shared_bottom":
        return d_in * h + h + h * d_expert + d_expert + towers
    experts = num_experts * (d_in * h + h + h * d_expert + d_expert)
    m = (num_experts - 1).bit_length()
    if gate == "dselect_k" and not per_example:  # static: each task's z (k, m) and α (k) are the parameters
        gates = num_tasks * (k * m + k)
    else:
        gates = num_tasks * ((d_in + 1) * (k * m + k if gate == "dselect_k" else num_experts))
    return experts + gates + towers


def ple_parameters(c):
    """CGC / PLE (Tang et al. 2020): per level, every task's own experts, the shared experts, a gate per task and
    (below the last level) the shared gate; then the towers."""
    T, nt, ns, de = c["num_tasks"], c["num_task_experts"], c["num_shared_experts"], c["d_expert"]
    h, th, od, levels = c.get("d_hidden") or de, c.get("tower_hidden", 8), c.get("out_dim", 1), c.get("num_levels", 1)
    n = T * (de * th + th + th * od + od)  # towers
    for level in range(levels):
        d = c["d_in"] if level == 0 else de  # later levels read the previous level's mixtures
        n += (T * nt + ns) * (d * h + h + h * de + de) + T * (d + 1) * (nt + ns)  # experts, task gates
        n += (d + 1) * (T * nt + ns) if level < levels - 1 else 0  # the shared gate
    return n


def _transformer_parameters(config):
    return transformer_parameters(ModelConfig(**config))


def moe_layer_parameters(d, f, E, gate="top_k", k=2, num_shared_experts=0) -> int:
    """One tm.nn.MoE: the E experts and the shared ones (W1, b1, W2, b2 each) and its router(s) — two for noisy
    top-k, none for hash; a lower bound for the task-aware routers (their task tables are left out)."""
    m = (E - 1).bit_length()  # ⌈log2 E⌉ bits of a DSelect-k code
    routers = 0 if gate == "hash" else 2 if gate == "noisy_top_k" else 1
    router_out = k * m + k if gate == "dselect_k" else E
    return (E + num_shared_experts) * (2 * d * f + f + d) + routers * (d + 1) * router_out


def _moe_parameters(c):
    return moe_layer_parameters(c["d_model"], c["d_ff"], c["num_experts"], c.get("gate", "top_k"), c.get("k", 2),
                                c.get("num_shared_experts", 0))


def _multigate_parameters(c):
    return multigate_parameters(c["d_in"], c["num_tasks"], c.get("out_dim", 1), num_experts=c["num_experts"],
                                d_expert=c["d_expert"], d_hidden=c.get("d_hidden"), gate=c.get("gate", "softmax"),
                                k=c.get("k", 2), per_example=c.get("per_example", False),
                                tower_hidden=c.get("tower_hidden", 8))


def _shared_bottom_parameters(c):
    return multigate_parameters(c["d_in"], c["num_tasks"], c.get("out_dim", 1), family="shared_bottom",
                                d_expert=c["d_out"], d_hidden=c.get("d_hidden"), tower_hidden=c.get("tower_hidden", 8))


MODELS: dict[str, ModelSpec] = {
    "tinymoe.MoETransformer": ModelSpec(MoETransformer, _dataclass_config, _build_transformer, _transformer_parameters),
    "tinymoe.nn.MoE": ModelSpec(nn.MoE, _dataclass_config, _build_from_kwargs, _moe_parameters),
    "tinymoe.nn.MultiGateMoE": ModelSpec(nn.MultiGateMoE, _dict_config, _build_from_kwargs, _multigate_parameters),
    "tinymoe.nn.CGC": ModelSpec(nn.CGC, _dict_config, _build_from_kwargs, ple_parameters),
    "tinymoe.nn.PLE": ModelSpec(nn.PLE, _dict_config, _build_from_kwargs, ple_parameters),
    "tinymoe.nn.SharedBottom": ModelSpec(nn.SharedBottom, _dict_config, _build_from_kwargs, _shared_bottom_parameters),
    # the name files written before SharedBottom moved into tinymoe.nn carry (read only: saving uses the one above)
    "tinymoe.experiments.SharedBottom": ModelSpec(nn.SharedBottom, _dict_config, _build_from_kwargs,
                                                  _shared_bottom_parameters),
}


def register_model(name, cls, get_config=_dict_config, build=_build_from_kwargs, num_parameters=None):
    """Make another model class checkpointable under `name`; the defaults suit a class that keeps its constructor
    kwargs in `self.config` (see `tinymoe.nn.module.init_config`). `num_parameters(config)`, when given, lets
    `load` refuse a config asking for more weights than the file holds before building anything."""
    if not isinstance(cls, type):
        raise TypeError(f"register_model: pass the class itself, got {cls!r}")
    MODELS[name] = ModelSpec(cls, get_config, build, num_parameters)


def _model_name(model) -> str:
    for name, spec in MODELS.items():  # the first name of a class is the one it is saved under
        if type(model) is spec.cls:
            return name
    raise CheckpointError(f"save: cannot checkpoint a {type(model).__qualname__}: it is not in "
                          f"tinymoe.checkpoint.MODELS ({sorted(MODELS)}); register it with "
                          f"tinymoe.checkpoint.register_model(name, {type(model).__qualname__})")


# ---- JSON with tags: exact round trips of tuples, NumPy values and non-string keys ----------------------------------


def _encode(value, where):
    """value -> plain JSON data; raises CheckpointError naming `where` for anything that cannot come back exactly."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {_TAG: "ndarray", "dtype": value.dtype.name, "shape": list(value.shape), "data": value.ravel().tolist()}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {_TAG: "dict", "items": [[_encode(k, f"{where} key {k!r}"), _encode(v, f"{where}[{k!r}]")]
                                        for k, v in value.items()]}
    raise CheckpointError(f"save: {where} is a {type(value).__qualname__}, which a checkpoint cannot store; use "
                          "JSON values (dict, list, str, int, float, bool, None), tuples, NumPy scalars or numeric "
                          "arrays (e.g. rng.bit_generator.state rather than the Generator itself)")


def _decode(value):
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if tag == "ndarray":
        return np.array(value["data"], dtype=value["dtype"]).reshape(value["shape"])
    if tag == "dict":
        return {_hashable(_decode(k)): _decode(v) for k, v in value["items"]}
    return {k: _decode(v) for k, v in value.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def _dumps(value):
    return json.dumps(value, allow_nan=True, separators=(",", ":"))


# ---- helpers ----------------------------------------------------------------------------------------------------


def _checksum(tensors: dict, metadata: dict | None = None) -> str:
    """sha256 over every tensor's name, dtype, shape and little-endian bytes, in name order, then (format 2) over
    every header entry but the digest itself, as key and value, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{name}\0{a.dtype.name}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    if metadata is not None:
        for key in sorted(k for k in metadata if k != "sha256"):
            h.update(f"header\0{key}\0{len(metadata[key])}\0{metadata[key]}\0".encode())
    return h.hexdigest()


def _module_generators(model):
    """'path.attr' -> Generator for every np.random.Generator a (sub)module keeps as an attribute."""
    out = {}

    def walk(module, prefix):
        for attr, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                out[prefix + attr] = value
        for name, child in module.named_children():
            walk(child, prefix + name + ".")

    walk(model, "")
    return out


def _optimizer_hparams(optimizer):
    """The optimizer's constructor kwargs other than params and lr, read back from its attributes."""
    hparams = {}
    for name, param in inspect.signature(type(optimizer).__init__).parameters.items():
        if name in ("self", "params", "lr") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(optimizer, name):
            hparams[name] = _encode(getattr(optimizer, name), f"optimizer.{name}")
    return hparams


def write_atomic(path: str, data: bytes):
    """Write `data` to `path` via a temporary file in the same directory + os.replace (see the module docstring)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable (POSIX; no-op elsewhere)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---- save ---------------------------------------------------------------------------------------------------------


def save(path, model, optimizer=None, train_state=None, extra_tensors=None):
    """Write `model` (and optionally `optimizer` and the loop's `train_state` dict) atomically to ONE .safetensors file.

    extra_tensors: optional {name: array} stored as `extra.<name>` (e.g. the best weights so far) and returned as
    `Checkpoint.extra_tensors`; for arrays too big for train_state's JSON.

    The parent directory is created if needed. Raises CheckpointError for a model class that is not registered or
    a train_state value that cannot be stored exactly (nothing is written then); I/O errors propagate after the
    temporary file is removed, leaving any previous file at `path` intact. Returns `path`.
    """
    import safetensors.numpy

    from .version import __version__

    path = os.fspath(path)
    name = _model_name(model)
    config = MODELS[name].get_config(model)
    try:
        model_meta = _dumps({"class": name, "config": config,
                             "rng_states": {k: _encode(g.bit_generator.state, k)
                                            for k, g in _module_generators(model).items()}})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"save {path}: the config of {name} is not JSON-able ({e}); its constructor kwargs "
                              "must be JSON values (see tinymoe.nn.module.init_config)") from None

    tensors = {f"model.{k}": np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    optim_meta = None
    if optimizer is not None:
        scalars = {}
        for key, value in optimizer.state_dict().items():
            if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic):
                tensors[f"optim.{key}"] = np.ascontiguousarray(value.get() if hasattr(value, "get") else value)
            else:
                scalars[key] = _encode(value, f"optimizer.state_dict()[{key!r}]")
        names = {id(p): n for n, p in model.named_parameters()}
        cls = type(optimizer)
        optim_meta = {"class": f"{cls.__module__}.{cls.__qualname__}", "scalars": scalars,
                      "hparams": _optimizer_hparams(optimizer),
                      "param_names": [names.get(id(p)) for p in optimizer.params]}
    for key, value in (extra_tensors or {}).items():
        if not isinstance(key, str) or not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise CheckpointError(f"save {path}: extra_tensors must map names to arrays, got {key!r}: "
                                  f"{type(value).__qualname__}")
        tensors[f"extra.{key}"] = np.ascontiguousarray(value.get() if hasattr(value, "get") else value)
    if train_state is not None and not isinstance(train_state, dict):
        raise CheckpointError(f"save {path}: train_state must be a dict, got {type(train_state).__qualname__}")
    state_json = _dumps(_encode(train_state, "train_state"))

    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "model": model_meta,
                "optimizer": _dumps(optim_meta), "train_state": state_json, "tinymoe_version": str(__version__)}
    metadata["sha256"] = _checksum(tensors, metadata)
    write_atomic(path, safetensors.numpy.save(tensors, metadata=metadata))
    return path


# ---- load ---------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: everything a training loop needs to resume exactly.

    model: the rebuilt model with its weights (and its own generators' states).
    optimizer_class: e.g. "tinymoe.optim.Adam", or None when no optimizer was saved.
    optimizer_state: a dict ready for `Optimizer.load_state_dict` (step, lr, and the moment arrays), or None.
    optimizer_hparams: the optimizer's constructor kwargs other than params and lr (betas, eps, weight_decay...).
    optimizer_param_names: for each optimizer parameter, its name in the model (None if it was not in the model).
    train_state: the dict given to `save`, decoded (tuples, arrays and big ints as they went in), or None.
    extra_tensors: the `extra_tensors` given to `save` ({} if none).
    """

    path: str
    model: object
    model_class: str
    optimizer_class: str | None = None
    optimizer_state: dict | None = None
    optimizer_hparams: dict = field(default_factory=dict)
    optimizer_param_names: list | None = None
    train_state: dict | None = None
    extra_tensors: dict = field(default_factory=dict)

    def make_optimizer(self, params=None, cls=None):
        """A fresh optimizer of the saved class over the model's parameters (in the saved order), with the saved
        hyper-parameters and state loaded. Pass `cls` for an optimizer class outside tinymoe.optim, `params` for
        parameters that are not all in the model."""
        if self.optimizer_state is None:
            raise CheckpointError(f"{self.path}: this checkpoint holds no optimizer; save(path, model, optimizer)")
        if cls is None:
            cls = _optimizer_class(self.optimizer_class, self.path)
        if params is None:
            if None in self.optimizer_param_names:
                raise CheckpointError(f"{self.path}: the saved optimizer trained parameters outside the model; "
                                      "pass them in order as make_optimizer(params=...)")
            named = dict(self.model.named_parameters())
            params = [named[n] for n in self.optimizer_param_names]
        opt = cls(params, lr=self.optimizer_state["lr"], **self.optimizer_hparams)
        opt.load_state_dict(self.optimizer_state)
        return opt


def _optimizer_class(name, path):
    from . import optim

    module, _, cls_name = (name or "").rpartition(".")
    cls = getattr(optim, cls_name, None)
    if module != optim.__name__ or not (isinstance(cls, type) and issubclass(cls, optim.Optimizer)):
        raise CheckpointError(f"{path}: optimizer class {name!r} is not in tinymoe.optim; pass the class as "
                              "make_optimizer(cls=...), or build it yourself and load ck.optimizer_state")
    return cls


def _read(path):
    """(metadata dict, tensors dict) of a safetensors file; every failure becomes a CheckpointError."""
    import stat

    from safetensors import safe_open

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file; check the path (tinymoe.save writes it)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device never end
        raise CheckpointError(f"{path}: not a regular file; a checkpoint is a .safetensors file written by "
                              "tinymoe.save")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e})") from e
    except Exception as e:  # safetensors' own SafetensorError (a bare Exception subclass) and friends
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is "
                              "truncated or corrupt - restore it from a backup or save it again") from e
    return metadata or {}, tensors


def read_header(path) -> dict:
    """The decoded header of a tinymoe checkpoint (format, model class/config, optimizer, train_state) without
    rebuilding anything: to inspect a file, or to fix a config that no longer validates."""
    path = os.fspath(path)
    return _parse_header(path, _read(path)[0])


def _parse_header(path, metadata):
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a tinymoe checkpoint (its safetensors metadata has no format="
                              f"{FORMAT_NAME!r}); write checkpoints with tinymoe.save, or load plain weights with "
                              "safetensors.numpy.load_file + model.load_state_dict")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{path}: bad format_version {metadata.get('format_version')!r}; the header is "
                              "corrupt - restore the file from a backup") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this tinymoe reads "
                              f"({FORMAT_VERSION}); upgrade tinymoe (the file says it was written by "
                              f"{metadata.get('tinymoe_version', '?')})")
    if version < 1:
        raise CheckpointError(f"{path}: bad format_version {version}; the header is corrupt - restore the file")
    header = {"format": FORMAT_NAME, "format_version": version, "sha256": metadata.get("sha256"),
              "tinymoe_version": metadata.get("tinymoe_version")}
    for key in ("model", "optimizer", "train_state"):
        try:
            header[key] = json.loads(metadata[key])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: the {key!r} entry of the header is missing or not JSON ({e}); the file "
                                  "is corrupt - restore it from a backup or save it again") from None
    model = header["model"]
    if not (isinstance(model, dict) and isinstance(model.get("class"), str) and isinstance(model.get("config"), dict)):
        raise CheckpointError(f"{path}: the header's model entry lacks a class name or config; the file is corrupt")
    header["train_state"] = _decode(header["train_state"])
    return header


def _check_names_and_shapes(path, what, expected: dict, found: dict):
    """expected/found: name -> shape. Raise one CheckpointError listing every difference."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n} {tuple(found[n])} (expected {tuple(expected[n])})" for n in sorted(set(expected) & set(found))
             if tuple(found[n]) != tuple(expected[n])]
    if missing or unexpected or wrong:
        parts = [f"missing {_short(missing)}" if missing else "",
                 f"unexpected {_short(unexpected)}" if unexpected else "",
                 f"wrong shape {_short(wrong)}" if wrong else ""]
        raise CheckpointError(f"{path}: the saved {what} do not match the model rebuilt from its config: "
                              f"{'; '.join(p for p in parts if p)}. The model class or config changed since the file "
                              "was written: load it with the tinymoe version that wrote it, or fix the config "
                              "(tinymoe.checkpoint.read_header shows it)")


def _short(names, limit=5):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _rebuild(path, header, tensors=None):
    """A fresh model of the saved class built from the saved config (random weights)."""
    name, config = header["model"]["class"], header["model"]["config"]
    spec = MODELS.get(name)
    if spec is None:
        raise CheckpointError(f"{path}: unknown model class {name!r} (known: {sorted(MODELS)}); import the code that "
                              "defines it and call tinymoe.checkpoint.register_model before loading")
    if spec.num_parameters is not None and tensors is not None:
        # Bound what the build may allocate by what the file holds: a header asking for far more (edited, or
        # crafted with a matching checksum) is refused here. Within the bound the model is built and the exact
        # names and shapes are compared (_load_into), which names every difference.
        held = sum(int(a.size) for k, a in tensors.items() if k.startswith("model."))
        try:
            wanted = int(spec.num_parameters(config))
        except Exception:  # a config the build itself will reject, with its own message
            wanted = 0
        if wanted > 4 * held + 2**22:
            raise CheckpointError(f"{path}: the saved config asks for {wanted:,} parameters but the file holds "
                                  f"{held:,}; the header does not match the weights - restore the file from a backup")
    try:
        return spec.build(spec.resolve(), config)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the saved config no longer validates for {name}: {type(e).__name__}: {e}. "
                              "The constructor changed since the file was written: load it with the tinymoe version "
                              "that wrote it, or fix the config (tinymoe.checkpoint.read_header shows it)") from e


def _load_into(path, header, tensors, model):
    """Load the saved weights (keeping their dtype) and the modules' generator states into `model`."""
    name = header["model"]["class"]
    spec = MODELS.get(name)
    if spec is not None and type(model) is not spec.resolve():
        raise CheckpointError(f"{path}: the checkpoint holds a {name}, not a {type(model).__qualname__}; pass a "
                              "model of that class, or none to rebuild it from the saved config")
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    params = dict(model.named_parameters())
    _check_names_and_shapes(path, "weights", {n: p.shape for n, p in params.items()},
                            {n: a.shape for n, a in weights.items()})
    model.load_state_dict(weights)
    for n, p in params.items():  # keep the saved float dtype even where the rebuilt model defaults to another
        if p.dtype != weights[n].dtype:
            p.data = p.xp.array(weights[n], copy=True)  # (on the model's device)

    generators = _module_generators(model)
    for key, state in header["model"].get("rng_states", {}).items():
        if key in generators:
            try:
                generators[key].bit_generator.state = _decode(state)
            except (TypeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: the saved state of generator {key} is invalid ({e}); the header is "
                                      "corrupt - restore the file from a backup") from None
    return model


def load_checkpoint(path, model=None) -> Checkpoint:
    """Read a checkpoint written by `save`: the rebuilt model, the optimizer's state and the loop's train_state.

    model: an existing model to load the weights into (e.g. the one a training loop already built) instead of
    rebuilding one from the saved config; its class and parameter names/shapes must match the saved ones.

    Raises CheckpointError (a ValueError) naming the file, the problem and a fix for a missing, truncated or corrupt
    file, a safetensors file not written by tinymoe, an unknown model class, a config that no longer validates, or
    saved weights / optimizer state whose names or shapes do not match the rebuilt model. Never unpickles.
    """
    path = os.fspath(path)
    metadata, tensors = _read(path)
    header = _parse_header(path, metadata)
    if header["sha256"] != _checksum(tensors, metadata if header["format_version"] >= 2 else None):
        raise CheckpointError(f"{path}: the file does not match the checksum in its header (tensors"
                              f"{' and header' if header['format_version'] >= 2 else ''}); the file is corrupt or was "
                              "edited - restore it from a backup or save it again")
    if model is None:
        model = _rebuild(path, header, tensors)
    _load_into(path, header, tensors, model)
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    ck = Checkpoint(path=path, model=model, model_class=header["model"]["class"], train_state=header["train_state"],
                    extra_tensors=extra)

    optim = header["optimizer"]
    if optim is not None:
        try:
            scalars = {k: _decode(v) for k, v in optim["scalars"].items()}
            hparams = {k: _decode(v) for k, v in optim["hparams"].items()}
            param_names, cls_name = list(optim["param_names"]), optim["class"]
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path}: the header's optimizer entry is malformed; the file is corrupt - "
                                  "restore it from a backup, or load just the model with tinymoe.load") from None
        arrays = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        params = dict(model.named_parameters())
        expected, found = {}, {}
        for key, value in arrays.items():  # '<buffer>.<i>' must have the shape of the i-th optimizer parameter
            buffer, _, i = key.rpartition(".")
            if i.isdigit() and int(i) < len(param_names) and param_names[int(i)] in params:
                expected[key] = params[param_names[int(i)]].shape
                found[key] = value.shape
        _check_names_and_shapes(path, "optimizer state arrays", expected, found)
        ck.optimizer_class, ck.optimizer_hparams, ck.optimizer_param_names = cls_name, hparams, param_names
        ck.optimizer_state = {**scalars, **arrays}
    return ck


LOAD_WHICH = ("best", "last")


def load(path, which="best"):
    """The model saved at `path`, rebuilt from its config with its weights (and their float dtype) loaded.

    which="best" (the default): the best-on-validation weights when the checkpoint holds them (a checkpoint that
    `fit` wrote while evaluating on a validation set, e.g. a run's checkpoint.safetensors: the model `tinymoe eval`
    reports on), else the only weights it holds (a file written by `tm.save`).
    which="last": the weights at the last saved step (where `--resume` continues), even when best ones exist.
    See `load_checkpoint` for the optimizer and train_state, and for the errors raised."""
    if which not in LOAD_WHICH:
        raise ValueError(f"load: which must be one of {LOAD_WHICH}, got {which!r}")
    ck = load_checkpoint(path)
    if which == "best":
        best = best_weights(ck)
        if best is not None:
            ck.model.load_state_dict(best)
    return ck.model


def best_weights(ck: Checkpoint):
    """The best-on-validation weights `fit` kept in checkpoint `ck` (a state_dict), or None if it holds none."""
    if not (ck.train_state or {}).get("has_best"):
        return None
    return {k[len("best."):]: v for k, v in ck.extra_tensors.items() if k.startswith("best.")}


__all__ = ["save", "load", "load_checkpoint", "best_weights", "read_header", "Checkpoint", "CheckpointError", "register_model",
           "MODELS", "FORMAT_NAME", "FORMAT_VERSION"]
