"""Synthetic multi-task regression with a known task relatedness.

`mmoe_synthetic` is the generator of Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts" (KDD), section 3.2, also used by Hazimeh et al. 2021 (DSelect-k), section 5.1:

    u1 ⊥ u2 orthonormal in R^d
    w1 = c·u1,   w2 = c·(ρ·u1 + sqrt(1 − ρ²)·u2)          so cos(w1, w2) = ρ exactly
    x ~ N(0, I_d)
    y_t = w_tᵀx + Σ_{i=1..m} sin(α_i·w_tᵀx + β_i) + ε,    α_i, β_i ~ N(0, 1) shared by the tasks, ε ~ N(0, 0.01)

Since x ~ N(0, I) and |w1| = |w2| = c, the Pearson correlation of w1ᵀx and w2ᵀx is ρ too; the sinusoids make the
tasks non-linear so that a higher ρ means related, not identical, tasks.

`clustered_synthetic` is the many-task variant (DSelect-k, section 5.1, up to 128 tasks): tasks come in clusters,
tasks of one cluster share a base direction (relatedness ρ), and the base directions of different clusters are
orthogonal — so the "right" expert sharing is known and can be compared with the learned one.
"""
from __future__ import annotations

import numpy as np

from .containers import TabularTasks


def _check(condition, message):
    if not condition:
        raise ValueError(message)


def _check_common(fn, n, rho, d, m, noise_std):
    _check(isinstance(n, (int, np.integer)) and n >= 1, f"{fn}: n (number of examples) must be an int ≥ 1, got {n!r}")
    _check(np.isfinite(rho) and -1.0 <= rho <= 1.0, f"{fn}: rho (task correlation) must lie in [-1, 1], got {rho!r}")
    _check(isinstance(d, (int, np.integer)) and d >= 2, f"{fn}: d (input dimension) must be an int ≥ 2, got {d!r}")
    _check(isinstance(m, (int, np.integer)) and m >= 0, f"{fn}: m (number of sinusoids) must be an int ≥ 0, got {m!r}")
    _check(np.isfinite(noise_std) and noise_std >= 0, f"{fn}: noise_std must be ≥ 0, got {noise_std!r}")


def _targets(x, weights, alpha, beta, noise_std, rng):
    """y_t = w_tᵀx + Σ_i sin(α_i·w_tᵀx + β_i) + N(0, noise_std²), all tasks at once (Ma et al. 2018, eq. in 3.2)."""
    z = x @ weights.T                                                    # (N, T) the linear parts w_tᵀx
    waves = np.sin(alpha * z[:, :, None] + beta).sum(axis=-1)            # (N, T, m) summed over the m sinusoids
    return z + waves + noise_std * rng.standard_normal(z.shape)          # (N, T)


def mmoe_synthetic(n, rho, d=100, c=1.0, m=10, noise_std=0.1, seed=0, generator_seed=None) -> TabularTasks:
    """Two regression tasks whose weight vectors have cosine similarity exactly `rho` (Ma et al. 2018).

    generator_seed: draws the generator (u1, u2, α, β); `seed` draws the examples and the noise. By default both
    come from `seed`. Fix generator_seed to compare seeds on one function: α and β decide how non-linear the
    tasks are (a linear model explains anywhere from ~0 to ~95 % of the variance, depending on the draw).

    Returns TabularTasks with x (n, d), y (n, 2), task_names ["task0", "task1"], and meta holding the generator:
    "weights" (2, d), "alpha" (m,), "beta" (m,), "rho", "c", "noise_std".
    """
    _check_common("mmoe_synthetic", n, rho, d, m, noise_std)
    rng = np.random.default_rng(seed)
    gen = rng if generator_seed is None else np.random.default_rng([generator_seed, 7])
    u, _ = np.linalg.qr(gen.standard_normal((d, 2)))                     # (d, 2) orthonormal columns u1, u2
    u1, u2 = u[:, 0], u[:, 1]
    weights = c * np.stack([u1, rho * u1 + np.sqrt(1.0 - rho**2) * u2])  # (2, d)
    alpha, beta = gen.standard_normal(m), gen.standard_normal(m)         # (m,), (m,) shared by both tasks
    x = rng.standard_normal((n, d))                                      # (n, d)
    y = _targets(x, weights, alpha, beta, noise_std, rng)                # (n, 2)
    meta = dict(weights=weights, alpha=alpha, beta=beta, rho=rho, c=c, noise_std=noise_std)
    return TabularTasks(x=x, y=y, task_names=["task0", "task1"], task_type="regression", meta=meta)


def cluster_of_tasks(num_tasks, num_clusters) -> np.ndarray:
    """Contiguous blocks of near-equal size: task t goes to cluster floor(t·K / T). (T,) int64

    e.g. 8 tasks in 3 clusters -> [0 0 0 1 1 1 2 2] (blocks make the task-similarity matrix block-diagonal).
    """
    return (np.arange(num_tasks) * num_clusters) // num_tasks


def clustered_synthetic(n, num_tasks, num_clusters, rho=0.9, d=100, c=1.0, m=10, noise_std=0.1,
                        seed=0, generator_seed=None) -> TabularTasks:
    """`num_tasks` regression tasks in `num_clusters` clusters of related tasks (the DSelect-k many-task setting).

    One orthonormal base vector u_k per cluster; task t of cluster k has
        w_t = c·(ρ·u_k + sqrt(1 − ρ²)·v_t),    v_t a unit vector orthogonal to every u_k,
    so cos(w_s, w_t) = ρ² + (1 − ρ²)·v_sᵀv_t within a cluster and (1 − ρ²)·v_sᵀv_t across clusters. When
    num_clusters + num_tasks ≤ d the v_t are also orthonormal, so these are exactly ρ² and 0; otherwise each v_t is
    a random unit vector of the (d − K)-dimensional complement and v_sᵀv_t ≈ 0 (of order 1/sqrt(d − K)).
    Tasks are assigned to clusters in contiguous blocks (`cluster_of_tasks`); `clusters` holds the assignment.
    The targets use the same sinusoid formula, with α, β shared by all tasks, as `mmoe_synthetic`;
    generator_seed, when given, draws the directions, α and β (the examples still come from `seed`).
    """
    fn = "clustered_synthetic"
    _check_common(fn, n, rho, d, m, noise_std)
    _check(isinstance(num_tasks, (int, np.integer)) and num_tasks >= 1, f"{fn}: num_tasks must be an int ≥ 1, got "
           f"{num_tasks!r}")
    _check(isinstance(num_clusters, (int, np.integer)) and 1 <= num_clusters <= num_tasks,
           f"{fn}: num_clusters must be an int in [1, num_tasks={num_tasks}] (every cluster needs a task), got "
           f"{num_clusters!r}")
    _check(num_clusters < d, f"{fn}: num_clusters={num_clusters} must be < d={d}: the cluster base vectors are "
           f"orthogonal and the task directions v_t must lie outside them; raise d or lower num_clusters")
    rng = np.random.default_rng(seed)
    gen = rng if generator_seed is None else np.random.default_rng([generator_seed, 7])
    K, T = num_clusters, num_tasks
    if K + T <= d:
        q, _ = np.linalg.qr(gen.standard_normal((d, K + T)))             # (d, K+T) orthonormal
        u, v = q[:, :K], q[:, K:]                                        # (d, K) bases, (d, T) task directions
    else:
        u, _ = np.linalg.qr(gen.standard_normal((d, K)))                 # (d, K)
        v = gen.standard_normal((d, T))
        v -= u @ (u.T @ v)                                               # project out every cluster base
        v /= np.linalg.norm(v, axis=0, keepdims=True)                    # (d, T) unit columns
    clusters = cluster_of_tasks(T, K)                                    # (T,)
    weights = c * (rho * u[:, clusters] + np.sqrt(1.0 - rho**2) * v).T   # (T, d)
    alpha, beta = gen.standard_normal(m), gen.standard_normal(m)         # (m,), (m,)
    x = rng.standard_normal((n, d))                                      # (n, d)
    y = _targets(x, weights, alpha, beta, noise_std, rng)                # (n, T)
    meta = dict(weights=weights, alpha=alpha, beta=beta, rho=rho, c=c, noise_std=noise_std)
    return TabularTasks(x=x, y=y, task_names=[f"task{t}" for t in range(T)], task_type="regression",
                        clusters=clusters, meta=meta)
