"""`Module` and `Parameter`: the PyTorch-like container so people can carry their habits over.

A module finds its parameters and submodules by walking its attributes in the order they were set: a
`Parameter`, a `Module`, or a list/tuple of modules (use `ModuleList` for readability). No registration calls.
"""
from __future__ import annotations

import numpy as np

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


class Module:
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

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

    def to(self, xp_or_name):
        """Move every parameter to NumPy ('numpy') or CuPy ('cupy') arrays."""
        name = xp_or_name if isinstance(xp_or_name, str) else xp_or_name.__name__
        with no_grad():
            for p in self.parameters():
                if name == "cupy":
                    import cupy

                    p.data = cupy.asarray(p.data)
                else:
                    p.data = p.numpy()
        return self

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
