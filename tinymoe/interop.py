"""PyTorch interop: a tinymoe model's weights as a PyTorch `state_dict` in torch's layouts, and back.

    sd = tinymoe.interop.to_torch_state_dict(model)              # {name: torch.Tensor}, torch layouts
    torch_twin.load_state_dict(sd)                               # e.g. a torch.nn.Linear for a tm.nn.Linear
    tinymoe.interop.load_torch_state_dict(model, torch_twin.state_dict())   # and back
    tinymoe.interop.to_torch_state_dict(model, as_numpy=True)    # the same layouts as NumPy arrays, no torch needed

PyTorch is optional and never a dependency: it is imported only when torch tensors are asked for or given
(pip install torch). Names are tinymoe's parameter names (`model.named_parameters()`), except for stacked experts.

Layouts that differ from tinymoe's:
* `Linear.weight`: tinymoe stores (in, out) so that y = x @ W needs no transpose; torch.nn.Linear stores
  (out, in) and computes y = x @ W.T. Exported transposed. The same holds for a router's `weight` and
  `task_weight` (a router is a linear map; with router="multi_gate" the per-task weights (tasks, in, out) become
  (tasks, out, in)).
* Stacked experts (`Experts`: w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out)): torch MoE code usually
  keeps a ModuleList of expert FFNs, so each expert i becomes `<prefix>.i.fc1.weight` (f, d), `<prefix>.i.fc1.bias`,
  `<prefix>.i.fc2.weight` (d_out, f), `<prefix>.i.fc2.bias`: the names and layouts of a torch module with
  attributes fc1 = nn.Linear(d, f) and fc2 = nn.Linear(f, d_out), like tinymoe's FeedForward.
Everything else (embeddings (num, dim), norms, biases, DSelect-k's z and α) has the same layout in both.
"""
from __future__ import annotations

import numpy as np

from .nn.layers import Linear
from .nn.module import Module, Parameter
from .nn import Router


def _named_modules(module: Module, prefix=""):
    yield prefix, module
    for name, child in module.named_children():
        yield from _named_modules(child, f"{prefix}{name}.")


def _is_experts(module) -> bool:
    """Stacked experts: Parameters w1 (E, d, f), b1, w2 (E, f, d_out), b2."""
    params = [getattr(module, n, None) for n in ("w1", "b1", "w2", "b2")]
    return all(isinstance(p, Parameter) for p in params) and params[0].ndim == 3


def _is_linear_weight(module, name) -> bool:
    return (isinstance(module, Linear) and name == "weight") or (isinstance(module, Router) and
                                                                 name in ("weight", "task_weight"))


def _own_parameters(module):
    return [(name, v) for name, v in vars(module).items() if isinstance(v, Parameter)]


def _torch_layout(model) -> dict:
    """{torch name: (tinymoe name, expert index or None, transpose?)} for every parameter of `model`."""
    layout = {}
    for prefix, module in _named_modules(model):
        stacked = _is_experts(module)
        for name, p in _own_parameters(module):
            if stacked:
                layer, part = {"w1": ("fc1", "weight"), "b1": ("fc1", "bias"), "w2": ("fc2", "weight"),
                               "b2": ("fc2", "bias")}.get(name, (None, None))
                if layer is not None:
                    for i in range(p.shape[0]):
                        layout[f"{prefix}{i}.{layer}.{part}"] = (prefix + name, i, part == "weight")
                    continue
            layout[prefix + name] = (prefix + name, None, _is_linear_weight(module, name))
    return layout


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("tinymoe.interop: PyTorch is not installed (pip install torch), or pass as_numpy=True for "
                          "NumPy arrays in torch's layouts") from None
    return torch


def to_torch_state_dict(model: Module, as_numpy=False) -> dict:
    """`model`'s weights under torch names and layouts (see the module docstring): torch tensors (CPU, same dtype,
    contiguous copies), or NumPy arrays with as_numpy=True."""
    params = dict(model.named_parameters())
    out = {}
    for torch_name, (name, expert, transpose) in _torch_layout(model).items():
        a = np.asarray(params[name].numpy())
        a = a[expert] if expert is not None else a
        out[torch_name] = np.ascontiguousarray(np.swapaxes(a, -1, -2) if transpose else a).copy()
    if as_numpy:
        return out
    torch = _torch()
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _as_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def from_torch_state_dict(model: Module, state_dict: dict) -> dict:
    """The tinymoe state_dict (tinymoe names and layouts) for `model` from a torch-layout `state_dict` (torch
    tensors or arrays). Every key of `model`'s torch layout must be there and nothing else (errors name them)."""
    layout = _torch_layout(model)
    missing = sorted(set(layout) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(layout))
    if missing or unexpected:
        raise KeyError(f"from_torch_state_dict: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                       f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; export the "
                       f"weights of the same architecture with to_torch_state_dict to see the expected names")
    params = dict(model.named_parameters())
    state = {}
    for torch_name, (name, expert, transpose) in layout.items():
        a = _as_numpy(state_dict[torch_name])
        a = np.swapaxes(a, -1, -2) if transpose else a
        if expert is None:
            state[name] = a
        else:
            if name not in state:
                state[name] = np.zeros(params[name].shape, dtype=a.dtype)
            expected = params[name].shape[1:]  # one expert's slice, in tinymoe's layout
            if a.shape != expected:
                given = _as_numpy(state_dict[torch_name]).shape
                raise ValueError(f"from_torch_state_dict: {torch_name} has shape {tuple(given)}, the model expects "
                                 f"{tuple(expected[::-1] if transpose else expected)}")
            state[name][expert] = a
    return state


def load_torch_state_dict(model: Module, state_dict: dict) -> Module:
    """Load a torch-layout `state_dict` (e.g. a torch twin's `.state_dict()`) into `model`; returns `model`.
    Shapes are checked against the model (the error names the parameter); dtypes become the model's."""
    model.load_state_dict(from_torch_state_dict(model, state_dict))
    return model


__all__ = ["to_torch_state_dict", "from_torch_state_dict", "load_torch_state_dict"]
