"""Gradient checks: the engine's reverse-mode gradients against finite differences, in float64.

* `check_grad` compares every element of every gradient with a central difference
  (f(x + eps·e_i) - f(x - eps·e_i)) / 2eps, whose error is O(eps²) plus rounding O(ulp·|f| / eps):
  exact enough in float64 with eps = 1e-6, and 2·(number of elements) evaluations, so for small inputs.
* `check_vjp` is the random-projection check of HIPS/autograd (`autograd.test_util.check_vjp`): for a random
  direction v (one array per input) and a random cotangent u (the output's shape),
      <u, J v>  ≈  (<u, f(x + eps·v)> - <u, f(x - eps·v)>) / 2eps     (a finite-difference JVP)
  must equal  sum_i <VJP(u)_i, v_i>  (what backward computes). Two evaluations and one backward, whatever the
  size, so it suits big ops (attention, a whole loss). A wrong gradient passes it only for a measure-zero set
  of (u, v), and a seeded draw makes a failure reproducible.

Both take `fn(*tensors) -> Tensor` and the inputs as float64 arrays (or Tensors); anything not to be
differentiated (integer targets, masks, a module's weights) is closed over by `fn`. Plain NumPy.
"""
from __future__ import annotations

import numpy as np

from .engine import Tensor, no_grad

__all__ = ["check_grad", "check_vjp"]


def _as_float64_arrays(inputs, who):
    arrays = []
    for i, x in enumerate(inputs):
        a = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
        if a.dtype != np.float64:
            raise TypeError(f"{who}: input {i} has dtype {a.dtype}; finite differences need float64 inputs")
        arrays.append(np.array(a, copy=True))
    return arrays


def _evaluate(fn, arrays):
    """fn on fresh constant Tensors, no graph: the plain function value as a float64 array."""
    with no_grad():
        out = fn(*[Tensor(a) for a in arrays])
    return np.asarray(out.numpy() if isinstance(out, Tensor) else out, dtype=np.float64)


def _engine_grads(fn, arrays, cotangent=None):
    """One forward and backward through the engine; returns (output array, gradient per input)."""
    leaves = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    if not isinstance(out, Tensor):
        raise TypeError(f"fn must return a Tensor, got {type(out).__name__}")
    if cotangent is None and out.size != 1:
        raise ValueError(f"check_grad: fn must return a scalar, got shape {out.shape}; use check_vjp instead")
    if out.requires_grad:
        out.backward(cotangent if cotangent is not None else np.ones(out.shape))
    grads = [np.zeros_like(a) if t.grad is None else np.asarray(t.grad, dtype=np.float64) for a, t in zip(arrays, leaves)]
    return out.numpy(), grads


def check_grad(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5):
    """Assert that the engine's gradient of the scalar `fn(*inputs)` matches central finite differences.

    For each input i and element j:  |engine - numeric| <= atol + rtol·|numeric|, with
    numeric = (fn(x + eps·e_j) - fn(x - eps·e_j)) / (2·eps). Raises AssertionError naming the input index,
    the worst element, both values, and the largest error. Returns the engine's gradients (a list of arrays).
    """
    arrays = _as_float64_arrays(inputs, "check_grad")
    _, grads = _engine_grads(fn, arrays)
    for i, (x, g) in enumerate(zip(arrays, grads)):
        numeric = np.zeros_like(x)
        for j in np.ndindex(x.shape):
            original = x[j]
            x[j] = original + eps
            f_plus = _evaluate(fn, arrays)
            x[j] = original - eps
            f_minus = _evaluate(fn, arrays)
            x[j] = original
            numeric[j] = (f_plus - f_minus).item() / (2 * eps)
        excess = np.abs(g - numeric) - (atol + rtol * np.abs(numeric))
        if x.size and (excess.max() > 0 or not np.all(np.isfinite(g))):
            j = np.unravel_index(np.argmax(np.where(np.isfinite(g), excess, np.inf)), x.shape)
            raise AssertionError(
                f"check_grad: gradient of input {i} (shape {x.shape}) is wrong at element {tuple(int(k) for k in j)}: "
                f"engine {float(g[j])!r}, finite differences {float(numeric[j])!r} (atol={atol}, rtol={rtol}, "
                f"eps={eps}); largest |difference| {float(np.nanmax(np.abs(g - numeric)))!r}"
            )
    return grads


def check_vjp(fn, inputs, seed=0, eps=1e-6, atol=1e-6, rtol=1e-5):
    """Random-projection check: <u, VJP> against the finite-difference directional derivative along v.

    u (a cotangent of the output's shape) and v (one direction per input) are standard normal draws from
    `np.random.default_rng(seed)`. Asserts |<u, J v>_engine - <u, J v>_numeric| <= atol + rtol·|numeric|
    and returns both numbers. O(1) evaluations: two forwards and one backward.
    """
    arrays = _as_float64_arrays(inputs, "check_vjp")
    rng = np.random.default_rng(seed)
    directions = [rng.standard_normal(a.shape) for a in arrays]
    out = _evaluate(fn, arrays)
    u = rng.standard_normal(out.shape)
    _, grads = _engine_grads(fn, arrays, cotangent=u)
    engine = float(sum(np.sum(g * v) for g, v in zip(grads, directions)))
    f_plus = _evaluate(fn, [a + eps * v for a, v in zip(arrays, directions)])
    f_minus = _evaluate(fn, [a - eps * v for a, v in zip(arrays, directions)])
    numeric = float(np.sum(u * (f_plus - f_minus)) / (2 * eps))
    if not (np.isfinite(engine) and abs(engine - numeric) <= atol + rtol * abs(numeric)):
        raise AssertionError(
            f"check_vjp: <u, VJP(u)·v> = {engine!r} from the engine, but the finite-difference directional "
            f"derivative is {numeric!r} (difference {engine - numeric!r}, atol={atol}, rtol={rtol}, seed={seed})"
        )
    return engine, numeric
