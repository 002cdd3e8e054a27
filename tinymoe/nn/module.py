"""`Module` and `Parameter`: the PyTorch-like container so people can carry their habits over.

A module finds its parameters and submodules by walking its attributes in the order they were set: a
`Parameter`, a `Module`, or a list/tuple of modules (use `ModuleList` for readability). No registration calls.

Dtypes: a module computes in its parameters' float dtype (float32 unless built with dtype=np.float64 or converted
with `.to(np.float64)`). A float input of another dtype is cast to it on the way in: float32 into a float64 module
widens exactly; float64 into a float32 module loses precision, so it also warns (once per call site) and says how
to compute in float64 instead.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..arrays import CUDA_NAMES, HOST_NAMES, DeviceUnavailable, module_for, move
from ..engine import Tensor, no_grad


class Parameter(Tensor):
    """A Tensor that a Module trains: requires_grad=True, float32 unless float64 is given."""

    def __init__(self, data):
        super().__init__(data, requires_grad=True)


def make_rng(seed):
    """A np.random.Generator from an int seed, a Generator (used as is) or None (seed 0): never global state."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(0 if seed is None else seed)


def init_config(**kwargs) -> dict:
    """The constructor arguments of a module as JSON-able values, kept as `module.config` so a checkpoint can
    rebuild it with `cls(**config)`. dtypes become their names; a Generator seed becomes None (the weights come
    from the checkpoint anyway)."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, np.random.Generator):
            value = None
        elif isinstance(value, type) and issubclass(value, np.generic) or isinstance(value, np.dtype):
            value = np.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


# the float dtypes `Module.to` accepts (devices: see tinymoe.arrays.module_for)
DTYPES = ("float32", "float64")
DEVICES = HOST_NAMES + CUDA_NAMES


def device_module(device, where="Module.to"):
    """The array module of `device` (see tinymoe.arrays.module_for), None when it names no device; a missing
    CuPy or GPU is BackendUnavailable naming the install command."""
    from ..backends import BackendUnavailable

    try:
        return module_for(device, where)
    except DeviceUnavailable as e:
        raise BackendUnavailable(str(e)) from None


def module_device(module) -> str:
    """The device of a module's parameters ("cpu" for a module without any)."""
    p = next(iter(module.parameters()), None)
    return "cpu" if p is None else p.device


class Module:
    training = True

    def __call__(self, *args, **kwargs):
        if args:
            args = tuple(self._cast_input(a) for a in args)
        return self.forward(*args, **kwargs)

    def _cast_input(self, a):
        """A float array or Tensor in this module's dtype (see the module docstring); anything else as is."""
        dtype = getattr(a, "dtype", None)
        if dtype is None or getattr(dtype, "kind", None) != "f":
            return a
        p = next(self.named_parameters(), (None, None))[1]
        if p is None or p.dtype == dtype:
            return a
        if dtype.itemsize > p.dtype.itemsize:
            warnings.warn(f"{type(self).__name__}: {dtype} input cast to the module's {p.dtype} (precision is lost); "
                          f"call .to(np.{dtype}) on the module to compute in {dtype}, or pass {p.dtype} input",
                          stacklevel=4)
        return a.astype(p.dtype)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    # ---- traversal ----------------------------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Module) for v in value):
                for i, v in enumerate(value):
                    yield f"{name}.{i}", v

    def modules(self):
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """name -> a copy of the parameter's array (host NumPy arrays, ready for safetensors)."""
        return {name: np.array(p.numpy(), copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict=True):
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, value in state.items():
            if name not in params:
                continue
            p = params[name]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)}, the model expects {p.shape}")
            p.data = p.xp.asarray(value, dtype=p.dtype).copy()

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device_or_dtype):
        """Move every parameter to a device, or convert it to a float dtype; returns the module (like torch).

        device: "cpu" / "numpy" (NumPy arrays) or "cuda" / "gpu" / "cupy" (CuPy arrays; needs CuPy and a GPU:
        pip install 'tinymoe[cuda12]'), or an array module itself (numpy, cupy, or a NumPy-like module such as
        tinymoe.guarded.xp, the CPU stand-in for a GPU that the tests use). Each array is copied once; gradients
        are dropped. An optimizer built on these parameters follows them: its moments move at its next step. (Modules
        hold no other arrays that must move: their caches, e.g. a hash gate's table, are kept per device.)
        dtype: np.float32 / np.float64 (or their names). The forward pass then computes in that dtype: float64
        input into a float64 module gives float64 output. Gradients are dropped (they had the old dtype).
        Anything else raises ValueError naming the valid devices and dtypes.
        """
        target = device_or_dtype
        xp = None if isinstance(target, (bool, int, float)) else device_module(target)
        if xp is not None:
            with no_grad():
                for p in self.parameters():
                    p.data, p.grad = move(p.data, xp), None
            return self
        try:
            dtype = None if target is None else np.dtype(target)  # (np.dtype(None) would be float64)
        except TypeError:
            dtype = None
        if dtype is None or dtype.name not in DTYPES or isinstance(target, (bool, int, float)):
            raise ValueError(f"{type(self).__name__}.to({device_or_dtype!r}): expected a device "
                             f"({', '.join(repr(d) for d in DEVICES)}) or a float dtype "
                             f"(np.float32, np.float64, or 'float32', 'float64'), or an array module (numpy, cupy)")
        with no_grad():
            for p in self.parameters():
                if p.dtype != dtype:
                    p.data, p.grad = p.data.astype(dtype), None
        return self

    @property
    def device(self) -> str:
        """Where this module's parameters are: "cpu", "cuda", or another array module's device."""
        return module_device(self)

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self.named_children():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return "\n".join(lines) + ")" if len(lines) > 1 else lines[0] + ")"


class ModuleList(Module):
    """A list of modules whose parameters are named `0.…`, `1.…`."""

    def __init__(self, modules):
        self._items = list(modules)

    def named_children(self):
        for i, m in enumerate(self._items):
            yield str(i), m

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]
