"""Auxiliary losses of an MoE layer: formulas, minima, and what to plot.

| name            | formula                                         | minimum                     | default weight |
|-----------------|-------------------------------------------------|-----------------------------|----------------|
| load_balance    | E · Σ_i f_i · P_i (Switch, Fedus et al. 2022 eq. 4) | 1, when f and P are uniform | 1e-2        |
| importance_load | CV(Σ_x g(x))² + CV(load)² (Shazeer et al. 2017 eq. 6-11) | 0, balanced        | 1e-2           |
| z_loss          | mean_x logsumexp(h(x))² (ST-MoE, Zoph et al. 2022 eq. 5) | small logits → 0   | 1e-3           |
| dselect_entropy | Σ_l H(r(z⁽ˡ⁾)) (Hazimeh et al. 2021, eq. 7)    | 0, one-hot selectors        | 1e-6           |
| dselect_reachability | Σ_l 1/Σ_i r_i, only when E ≠ 2^m (Hazimeh et al. 2021) | k, all mass on real experts | 1 |

f_i is the share of the (kept-by-the-gate) assignments sent to expert i and P_i the mean router probability of
expert i. Only P carries a gradient (f comes from an argmax). A load-balance value of 1.0 therefore does not mean
"balanced" unless f is uniform too: plot f_i and P_i per expert per layer (`MoE.last_routing`), and dropped
assignments, rather than reading the scalar alone.

DSelect-k's reachability term keeps its own name and weight 1 (the authors' layer adds it unweighted, always): with
E not a power of two, 2^m − E of the m-bit codes name no expert, and a selector that settles on one sends its
weight nowhere (Σ_i r_i = 0, so 1/Σ_i r_i = ∞). Weighted like the entropy (1e-6) it cannot stop that drift.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from .engine import Tensor

DEFAULT_WEIGHTS = {"load_balance": 1e-2, "importance_load": 1e-2, "z_loss": 1e-3, "dselect_entropy": 1e-6,
                   "dselect_reachability": 1.0}


def aux_weights(overrides, where) -> dict:
    """DEFAULT_WEIGHTS with `overrides` applied; a misspelled name is an error (it would silently weigh nothing)."""
    unknown = sorted(set(overrides or {}) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"{where}: unknown aux_weights {unknown}; the auxiliary losses are {list(DEFAULT_WEIGHTS)}")
    return {**DEFAULT_WEIGHTS, **(overrides or {})}


def load_balance(probs: Tensor, expert_idx, keep=None) -> Tensor:
    """E · Σ_i f_i · P_i. probs (T, E); expert_idx (T, k) the choices; keep (T, k) marks real assignments."""
    E, xp = probs.shape[1], probs.xp
    chosen = expert_idx.reshape(-1)  # (T·k,)
    if keep is None:
        f = xp.bincount(chosen, minlength=E) / max(chosen.size, 1)  # (E,) no gradient: an argmax
    else:  # the kept ones counted by weight (no boolean selection: its size would have to come from a GPU)
        kept = keep.reshape(-1)
        f = xp.bincount(chosen, weights=kept.astype(np.float64), minlength=E) / xp.maximum(kept.sum(), 1)
    P = probs.mean(axis=0)  # (E,)
    return (P * f.astype(probs.dtype)).sum() * float(E)


def z_loss(logits: Tensor) -> Tensor:
    """mean_x (logsumexp h(x))²: keeps router logits small so the softmax stays well conditioned."""
    lse = F.logsumexp(logits, axis=-1)
    return (lse * lse).mean()


def weighted_total(losses: dict, weights: dict) -> Tensor | float:
    """Σ_name weight[name] · loss[name] over the losses present; 0.0 when there are none."""
    total = 0.0
    for name, value in losses.items():
        w = weights.get(name, DEFAULT_WEIGHTS.get(name, 0.0))
        if w:
            total = value * w + total
    return total


def average_over_layers(per_layer: list) -> dict:
    """{name: mean over the layers that report it} (several MoE layers in one model)."""
    sums, counts = {}, {}
    for losses in per_layer:
        for name, value in losses.items():
            sums[name] = value if name not in sums else sums[name] + value
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] * (1.0 / counts[name]) for name in sums}
