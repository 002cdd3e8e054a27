"""Gates: from router outputs to a routing (which experts each token uses, and with what weight).

A gate takes the router's output h (T, ·) — see `tinymoe.nn.routers` for how h depends on the token and the task —
and returns a `Routing`: for each token t, k_slots pairs (expert_idx[t, j], weights[t, j]) in descending weight,
and `keep[t, j]` saying whether the pair is computed (False for zero weights: sparse execution). The gradient
reaches the router through `weights` only; the discrete choice has none.

| gate           | paper                                  | h needed          | aux losses                            |
|----------------|----------------------------------------|-------------------|---------------------------------------|
| softmax        | MMoE, Ma et al. 2018                   | logits (T, E)     | load_balance, z_loss                  |
| top_k          | Shazeer et al. 2017; k=1 Switch        | logits (T, E)     | load_balance, z_loss                  |
| noisy_top_k    | Shazeer et al. 2017, eq. 3-5           | logits + noise    | load_balance, importance_load, z_loss |
| dselect_k      | Hazimeh et al. 2021, eq. 5-7           | (T, k·m + k)      | load_balance, dselect_entropy (+ dselect_reachability if E ≠ 2^m) |
| expert_choice  | Zhou et al. 2022, §3.1                 | logits (T, E)     | z_loss                                |
| hash           | Roller et al. 2021                     | ids only          | —                                     |

Task-level routing (Kudugunta et al. 2021) is router="task" with any of these gates.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .arrays import array_module, move
from .engine import Tensor, where

GATES = ("softmax", "top_k", "noisy_top_k", "dselect_k", "expert_choice", "hash")


@dataclass
class Routing:
    expert_idx: np.ndarray  # (T, k_slots) int64, descending weight per row (expert_choice: column j = expert j)
    weights: Tensor  # (T, k_slots) combine weights; the gate's gradient flows through these
    keep: np.ndarray | None = None  # (T, k_slots) bool, False = not computed; None = all computed
    # (the arrays live on the router's device: NumPy's on the CPU, CuPy's on the GPU)
    probs: Tensor | None = None  # (T, E) router probabilities (P_i of the load-balance loss)
    logits: Tensor | None = None  # (T, E) router logits (z-loss)
    aux: dict = field(default_factory=dict)  # gate-specific auxiliary losses (name -> scalar Tensor)


def descending(scores):
    """Expert indices by descending score, ties broken by the lower index (a stable sort of -score)."""
    return array_module(scores).argsort(-scores, axis=-1, kind="stable")


def _pick(t: Tensor, idx):
    """t[row, idx[row, j]] for every row: (T, E), (T, k) -> (T, k)."""
    rows = t.xp.arange(idx.shape[0])[:, None]
    return t[rows, idx]


# ---- softmax, top-k, noisy top-k ---------------------------------------------------------------------------------
def softmax_gate(logits: Tensor) -> Routing:
    """Dense: g = softmax(h); every expert computes (MMoE's gate). Slots sorted by descending weight."""
    probs = F.softmax(logits, axis=-1)
    idx = descending(probs.data)
    return Routing(idx, _pick(probs, idx), None, probs, logits)


def top_k_gate(logits: Tensor, k: int, renormalize=None) -> Routing:
    """Keep the k largest logits; g = softmax over those k (Shazeer et al. 2017, eq. 3 without noise).

    k = 1 is Switch (Fedus et al. 2022, eq. 2): the weight is the full-softmax probability p_i of the chosen expert,
    because a softmax over one logit is constantly 1 and would leave the router without gradient. `renormalize`
    overrides that choice (True: softmax over the k; False: full-softmax probabilities).
    """
    renormalize = k > 1 if renormalize is None else renormalize
    probs = F.softmax(logits, axis=-1)
    idx = descending(logits.data)[:, :k]
    weights = F.softmax(_pick(logits, idx), axis=-1) if renormalize else _pick(probs, idx)
    return Routing(idx, weights, None, probs, logits)


def noisy_top_k_gate(logits: Tensor, noise_logits: Tensor, k: int, rng, training: bool, renormalize=None) -> Routing:
    """H = h + ε ⊙ softplus(h_noise), ε ~ N(0, 1) in training only; then top-k of H (Shazeer et al. 2017, eq. 4-5).

    In eval there is no noise, so routing is deterministic. Adds Shazeer's importance + load loss (eq. 6-10): the
    load of expert i is Σ_x P(x, i), P(x, i) = Φ((h_i − kth_excluding(H, k, i)) / softplus(h_noise_i)).
    """
    if training:
        noise_std = F.softplus(noise_logits) + 1e-2  # small floor keeps Φ's argument finite (as Shazeer's code)
        eps = logits.xp.asarray(rng.standard_normal(logits.shape).astype(logits.dtype))  # host draw, one copy
        noisy = logits + noise_std * eps
    else:
        noisy = logits
    routing = top_k_gate(noisy, k, renormalize)
    dense_gates = scatter_rows(routing.weights, routing.expert_idx, logits.shape[1])
    importance = dense_gates.sum(axis=0)  # (E,)
    if training and k < logits.shape[1]:
        load = _smooth_load(logits, noisy, noise_std, k)
    else:  # no noise: the load is the (non-differentiable) count of tokens per expert
        xp = logits.xp
        load = Tensor(xp.bincount(routing.expert_idx.reshape(-1), minlength=logits.shape[1]).astype(logits.dtype))
    routing.aux["importance_load"] = cv_squared(importance) + cv_squared(load)
    routing.logits = logits
    return routing


def _smooth_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Σ_x P(x, i): the probability that expert i stays in the top k under a fresh draw of its own noise."""
    T, xp = noisy.shape[0], noisy.xp
    ranked = descending(noisy.data)  # (T, E) expert ids, largest H first
    kth, next_ = ranked[:, k - 1 : k], ranked[:, k : k + 1]  # (T, 1) the k-th and (k+1)-th largest
    in_top = noisy.data >= xp.take_along_axis(noisy.data, kth, axis=-1)  # (T, E) is i among the k largest?
    # the k-th largest of H excluding i — a differentiable pick from H, so the gradient reaches other experts' h
    column = xp.where(in_top, next_, kth)  # (T, E)
    threshold = noisy[xp.arange(T)[:, None], column]  # (T, E)
    return F.normal_cdf((clean - threshold) / noise_std).sum(axis=0)


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation var(v) / mean(v)² (population variance; Shazeer et al. 2017 eq. 7)."""
    mean = v.mean()
    return v.var() / (mean * mean + 1e-10)


def scatter_rows(values: Tensor, idx, num_experts) -> Tensor:
    """(T, k) values at columns idx -> dense (T, E) with zeros elsewhere (differentiable in values)."""
    T, k = idx.shape
    xp = values.xp
    flat = values.reshape(-1)  # (T·k,)
    index = xp.full((T, num_experts), T * k, dtype=np.int64)  # points at an appended zero
    index[xp.arange(T)[:, None], idx] = xp.arange(T * k).reshape(T, k)
    padded = F.concatenate([flat, Tensor(xp.zeros(1, dtype=values.dtype))])
    return padded[index]


# ---- DSelect-k -----------------------------------------------------------------------------------------------------
def smooth_step(t: Tensor, gamma=1.0) -> Tensor:
    """S(t) = 0 for t ≤ −γ/2, 1 for t ≥ γ/2, else −(2/γ³)t³ + (3/(2γ))t + ½ (Hazimeh et al. 2021, eq. 2).

    C¹, and its gradient is exactly zero once saturated (so selectors can become exactly one-hot).
    """
    cubic = t * t * t * (-2.0 / gamma**3) + t * (1.5 / gamma) + 0.5
    return where(t.data <= -gamma / 2, 0.0, where(t.data >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts, xp=np):
    """(E, m) 0/1 matrix: row i is the m-bit binary code of i, most significant bit first; m = ⌈log2 E⌉.

    One expert needs no bits (m = 0): its selector is the empty product, 1. `xp`: the array module to build it in."""
    m = math.ceil(math.log2(num_experts))
    return (xp.arange(num_experts)[:, None] >> xp.arange(m - 1, -1, -1)) & 1


def dselect_selector(z: Tensor, num_experts, gamma=1.0) -> Tensor:
    """r(z)_i = Π_{j: bit_j(i)=1} S(z_j) · Π_{j: bit_j(i)=0} (1 − S(z_j)) (Hazimeh et al. 2021, eq. 3).

    z (..., m) -> r (..., E). At most one nonzero once every S(z_j) is saturated.
    """
    codes = binary_codes(num_experts, z.xp).astype(z.dtype)  # (E, m), on z's device
    s = smooth_step(z, gamma)  # (..., m)
    r = Tensor(z.xp.ones(z.shape[:-1] + (num_experts,), dtype=z.dtype))  # m = 0: the empty product
    for j in range(codes.shape[1]):
        sj = s[..., j : j + 1]  # (..., 1)
        factor = sj * codes[:, j] + (1.0 - sj) * (1.0 - codes[:, j])  # (..., E)
        r = factor if j == 0 else r * factor
    return r


def dselect_k_weights(z: Tensor, alpha: Tensor, num_experts, gamma=1.0, training=True):
    """q = Σ_l softmax(α)_l · r(z⁽ˡ⁾) (Hazimeh et al. 2021, eq. 5), and the regularisers.

    z (..., k, m), alpha (..., k) -> q (..., E), aux. Aux (training only), each averaged over the leading
    (example) dimensions:
    * "dselect_entropy": Σ_l H(r(z⁽ˡ⁾)) with H(p) = −Σ p log(p + 1e-6) (eq. 7), which pushes each selector to
      become one-hot (a small weight, 1e-6 by default);
    * "dselect_reachability", only when E is not a power of two: Σ_l 1/Σ_i r(z⁽ˡ⁾)_i. With m = ⌈log2 E⌉ bits
      there are 2^m − E codes that name no expert; a selector drifting onto one loses its mass (Σ_i r_i → 0) and
      q stops summing to 1. The term grows without bound as that happens, so it is weighted 1 (as the authors'
      layer adds it), independently of the entropy regulariser.
    """
    r = dselect_selector(z, num_experts, gamma)  # (..., k, E)
    q = (F.softmax(alpha, axis=-1)[..., None] * r).sum(axis=-2)  # (..., E)
    aux = {}
    if training:
        entropy = -(r * (r + 1e-6).log()).sum(axis=-1).sum(axis=-1)  # (...,)
        aux["dselect_entropy"] = entropy.mean()
        if num_experts & (num_experts - 1):  # not a power of two: some codes are unreachable
            aux["dselect_reachability"] = (1.0 / r.sum(axis=-1)).sum(axis=-1).mean()
    return q, aux


def dselect_k_gate(h: Tensor, num_experts, k, gamma=1.0, training=True) -> Routing:
    """Per-example DSelect-k: h (T, k·m + k) holds every token's selector logits z and selector weights α.

    Only experts with nonzero weight are computed (sparse execution); early in training, before the smooth steps
    saturate, that is all of them, as in the official dense layer.
    """
    m = binary_codes(num_experts).shape[1]
    T = h.shape[0]
    z = h[:, : k * m].reshape(T, k, m)
    alpha = h[:, k * m :]
    q, aux = dselect_k_weights(z, alpha, num_experts, gamma, training)
    return routing_from_dense(q, aux)


def routing_from_dense(q: Tensor, aux=None) -> Routing:
    """A dense weight matrix (T, E) as a routing over all E slots, computing only the nonzero ones.

    A NaN weight (a NaN token) counts as nonzero, so the NaN reaches the output instead of a silent 0."""
    idx = descending(q.data)
    weights = _pick(q, idx)
    return Routing(idx, weights, weights.data != 0, q, None, dict(aux or {}))


# ---- expert choice, hash ---------------------------------------------------------------------------------------------
def expert_choice_gate(logits: Tensor, capacity: int) -> Routing:
    """Each expert takes its top-C tokens by S = softmax(h) (Zhou et al. 2022, eq. 1-2).

    Perfect balance: every expert gets exactly C = min(capacity, T) tokens; a token may get several experts or none.
    Ties go to the lower token index. Not causal (it looks at the whole batch). A token whose scores are NaN (a
    NaN input) is given to every expert, so its output is NaN rather than a silent 0 from "no expert chose it".
    """
    T, E = logits.shape
    probs = F.softmax(logits, axis=-1)  # (T, E)
    C, xp = min(capacity, T), logits.xp
    chosen = xp.zeros((T, E), dtype=bool)
    top_tokens = descending(probs.data.T)[:, :C]  # (E, C)
    chosen[top_tokens, xp.arange(E)[:, None]] = True
    chosen |= xp.isnan(probs.data)  # NaN in, NaN out
    idx = xp.broadcast_to(xp.arange(E), (T, E)).copy()  # slot j is expert j
    return Routing(idx, probs, chosen, probs, logits)


def hash_gate(ids, num_experts, k, table_size=4096, seed=0, dtype=np.float32) -> Routing:
    """Each id (token id or task id) goes to k fixed pseudo-random distinct experts, weight 1/k (Roller et al. 2021).

    The table is a seeded random permutation of experts per id (ids taken modulo table_size). No parameters.
    `ids` may live on any device; the table is drawn once on the host and kept on each device it is used on.
    """
    xp = array_module(ids)
    ids = xp.asarray(ids).astype(np.int64) % table_size
    idx = _hash_table(table_size, num_experts, k, seed, xp)[ids]  # (T, k)
    return Routing(idx, Tensor(xp.full(idx.shape, 1.0 / k, dtype=dtype)))


@functools.lru_cache(maxsize=32)
def _hash_table(table_size, num_experts, k, seed, xp):
    """(table_size, k) experts per id: a seeded random permutation per row (host draw, one copy to xp's device)."""
    table = np.random.default_rng(seed).random((table_size, num_experts)).argsort(axis=1)[:, :k]
    return move(table, xp)
