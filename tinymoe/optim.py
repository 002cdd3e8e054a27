"""Optimizers (SGD with momentum, Adam, AdamW), global-norm gradient clipping and a warmup + cosine schedule.

Each optimizer updates `p.data` in place from `p.grad` and keeps its state as arrays keyed by parameter index,
so `state_dict()` / `load_state_dict()` can save it next to the weights (exact resume).
"""
from __future__ import annotations

import math

from .arrays import array_module


class Optimizer:
    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.lr = lr
        self.step_count = 0
        self.state: dict[str, list] = {}  # name -> one array (or None) per parameter

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _buffers(self, name):
        if name not in self.state:
            self.state[name] = [array_module(p.data).zeros_like(p.data) for p in self.params]
        return self.state[name]

    def step(self):
        self.step_count += 1
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(i, p, p.grad)

    def _update(self, i, p, g):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Flat dict of host arrays and numbers: 'step', 'lr', and '<buffer>.<i>' for every state array."""
        out = {"step": self.step_count, "lr": self.lr}
        for name, arrays in self.state.items():
            for i, a in enumerate(arrays):
                out[f"{name}.{i}"] = a.get() if hasattr(a, "get") else a  # CuPy -> host
        return out

    def load_state_dict(self, state: dict):
        self.step_count, self.lr = int(state["step"]), float(state["lr"])
        names = {key.rsplit(".", 1)[0] for key in state if "." in key}
        for name in names:
            buffers = self._buffers(name)
            for i, p in enumerate(self.params):
                value = state[f"{name}.{i}"]
                if tuple(value.shape) != p.shape:
                    raise ValueError(f"optimizer state {name}.{i} has shape {tuple(value.shape)}, parameter {p.shape}")
                buffers[i] = array_module(p.data).asarray(value, dtype=p.dtype).copy()


class SGD(Optimizer):
    """p -= lr · v with v = momentum · v + g (+ weight_decay · p), as PyTorch's SGD."""

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def _update(self, i, p, g):
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            v = self._buffers("momentum")
            v[i] = self.momentum * v[i] + g
            g = v[i]
        p.data -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Alg. 1) with bias correction; weight_decay adds L2 to the gradient."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def _update(self, i, p, g):
        b1, b2 = self.betas
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * p.data
        m, v = self._buffers("exp_avg"), self._buffers("exp_avg_sq")
        m[i] = b1 * m[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        m_hat = m[i] / (1 - b1**self.step_count)
        v_hat = v[i] / (1 - b2**self.step_count)
        if self.weight_decay and self.decoupled:
            p.data -= self.lr * self.weight_decay * p.data
        p.data -= (self.lr * m_hat / (array_module(v_hat).sqrt(v_hat) + self.eps)).astype(p.dtype)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): p -= lr · wd · p, apart from the moments."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


def clip_grad_norm(params, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm; returns the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = array_module(grads[0])
    total = float(xp.sqrt(sum(xp.sum(g.astype("float64") ** 2) for g in grads)))
    if not math.isfinite(total):
        raise FloatingPointError(f"clip_grad_norm: the gradient norm is {total}; lower the learning rate or check the loss")
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * scale
    return total


def warmup_cosine(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warmup from 0 to base_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
