"""Differentiable MoE ops: gather (the "dispatch" of the MoE papers), grouped expert FFN and combine as graph nodes.

Each op calls the current backend's primitive forward and, in `_backward`, the same backend's adjoint — the
backends supply primitives, the gradients are composed here, once (tinygrad's rule).

    plan = plan_routing(expert_idx, num_experts, keep)   # which row each kept assignment occupies
    xs   = gather(x, plan)                               # (R, d)
    out  = grouped_ffn(xs, plan, w1, b1, w2, b2, act)    # (R, d_out)
    y    = combine(out, weights, plan)                   # (T, d_out); gradient flows into weights too

The discrete choice (expert_idx, keep) has no gradient; the weights, x and every expert parameter do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backends
from .arrays import to_host
from .engine import Tensor


@dataclass
class RoutingPlan:
    """Where each kept assignment goes: rows offsets[e]:offsets[e+1] of the dispatched batch are expert e's."""

    order: np.ndarray  # (R,) assignment ids t·k + j, grouped by expert (on the device of the routing)
    offsets: np.ndarray  # (E + 1,) host ints
    inverse: np.ndarray  # (T·k,) row of each assignment, -1 if not kept
    num_tokens: int
    k: int
    backend: object  # the backend module that made the plan: the ops below use the same one

    @property
    def counts(self):
        """Kept assignments per expert (E,), on the host (the offsets are there already, see dispatch.route)."""
        return np.diff(to_host(self.offsets))


def plan_routing(expert_idx, num_experts, keep=None) -> RoutingPlan:
    """Route on the backend for where expert_idx lives (`backends.for_arrays`: CuPy arrays -> cupy, NumPy arrays ->
    the current host backend). expert_idx (T, k) ints, keep (T, k) bool or None (all kept)."""
    be = backends.for_arrays(expert_idx, keep)
    order, offsets, inverse = be.route(expert_idx, num_experts, keep)
    return RoutingPlan(order, offsets, inverse, expert_idx.shape[0], expert_idx.shape[1], be)


def gather(x: Tensor, plan: RoutingPlan) -> Tensor:
    """(T, d) -> (R, d): one row per kept assignment, grouped by expert (the backends' `gather`, differentiable)."""
    be = plan.backend
    out = x._make(be.gather(x.data, plan.order, plan.k), (x,), "gather")
    out._backward = lambda g: x._accumulate(be.gather_backward(g, plan.inverse, plan.k, plan.num_tokens))
    return out


def grouped_ffn(xs: Tensor, plan: RoutingPlan, w1, b1, w2, b2, activation="gelu") -> Tensor:
    """Every expert's FFN on its rows of xs (R, d) -> (R, d_out); one graph node for all experts."""
    be = plan.backend
    data, h = be.expert_ffn(xs.data, plan.offsets, w1.data, b1.data, w2.data, b2.data, activation)
    out = xs._make(data, (xs, w1, b1, w2, b2), "grouped_ffn")

    def _backward(g):
        grads = be.expert_ffn_backward(g, xs.data, h, plan.offsets, w1.data, w2.data, activation)
        for tensor, grad in zip((xs, w1, b1, w2, b2), grads):
            if tensor.requires_grad:
                tensor._accumulate(grad)

    out._backward = _backward
    return out


def combine(out: Tensor, weights: Tensor, plan: RoutingPlan) -> Tensor:
    """(R, d) rows and (T, k) weights -> (T, d): y[t] = Σ_j w[t, j] · out[row of (t, j)]."""
    be = plan.backend
    if weights.shape != (plan.num_tokens, plan.k):
        raise ValueError(f"combine: weights must be (T, k) = {(plan.num_tokens, plan.k)}, got {weights.shape}")
    weights = weights.astype(out.dtype)
    y = out._make(be.combine(out.data, weights.data, plan.inverse), (out, weights), "combine")

    def _backward(g):
        dout, dweights = be.combine_backward(g, out.data, weights.data, plan.inverse)
        if out.requires_grad:
            out._accumulate(dout)
        if weights.requires_grad:
            weights._accumulate(dweights)

    y._backward = _backward
    return y


def sparse_mixture(x: Tensor, expert_idx, weights: Tensor, keep, experts, num_experts, activation="gelu"):
    """y[t] = Σ_j w[t,j] · FFN_{e[t,j]}(x[t]) over kept assignments; returns (y, plan).

    `experts` is any object with Parameters w1 (E, d, f), b1 (E, f), w2 (E, f, d_out), b2 (E, d_out).
    Only routed (token, expert) pairs are computed (sparse execution).
    """
    plan = plan_routing(expert_idx, num_experts, keep)
    x = x.astype(experts.w1.dtype)  # backends multiply same-dtype operands only
    out = grouped_ffn(gather(x, plan), plan, experts.w1, experts.b1, experts.w2, experts.b2, activation)
    return combine(out, weights, plan), plan
