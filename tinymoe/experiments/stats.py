"""Paired statistics for the experiments: how sure are we that arm A beats baseline B?

Every experiment runs each arm on the same seeds (same data, same split and, where shapes allow, the same
initialisation), so the unit of evidence is the per-seed paired difference d_s = A_s − B_s. For a claim
"A is better than B" we report

* the mean paired difference d̄ with a 95 % confidence interval, from Student's t (mean ± t_{n−1, 0.975}·s/√n)
  or a percentile bootstrap of the mean (Efron & Tibshirani 1993, ch. 13);
* the exact two-sided sign-flip (paired permutation) p-value (Fisher 1935; Good 2005, ch. 3): under H0 the sign
  of each d_s is a fair coin, so p = #{ε ∈ {±1}^n : |mean(ε·d)| ≥ |mean(d)|} / 2^n. With n seeds it cannot go
  below 2/2^n (0.25 at n = 3, 0.0078 at n = 8), which is why the experiments use at least 8 seeds;
* Holm's step-down correction (Holm 1979) of the p-values of the secondary comparisons of one experiment.
  Because the exact p cannot go below 2/2^n, m secondary comparisons can only be decided when m·2/2^n < α:
  at most 6 of them at 8 seeds, 200 at 12 — so experiments with many secondary comparisons use 12 seeds.

The verdict rule, written down before the runs (`verdict`):

* **holds** — the CI excludes 0 on the side the claim predicts (and, for a secondary comparison, its
  Holm-adjusted p is below α as well);
* **contradicted** — the CI excludes 0 on the other side (same extra condition for a secondary comparison);
* **cannot tell at this scale** — anything else: the interval contains 0, so this many seeds at this model and
  data size cannot separate the arms. That is not evidence of "no effect".

Everything here is plain NumPy (the t quantile comes from a numerically integrated density, no SciPy needed).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

HOLDS, CONTRADICTED, CANNOT_TELL = "holds", "contradicted", "cannot tell at this scale"


# ---- Student's t ----------------------------------------------------------------------------------------------


def _t_pdf(x, df):
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(c - (df + 1) / 2 * np.log1p(np.asarray(x, dtype=np.float64) ** 2 / df))


def t_cdf(x, df) -> float:
    """P(T ≤ x) for Student's t with `df` degrees of freedom: ½ + ∫_0^x density (Simpson's rule, 4000 panels on
    the substitution x = tan θ, which keeps the heavy tails of df = 1 accurate to ~1e-10)."""
    if df <= 0:
        raise ValueError(f"t_cdf: degrees of freedom must be > 0, got {df}")
    theta = math.atan(float(x))
    grid = np.linspace(0.0, theta, 4001)
    f = _t_pdf(np.tan(grid), df) / np.cos(grid) ** 2  # dx = sec²θ dθ
    h = theta / 4000
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + float(integral)


@functools.lru_cache(maxsize=256)
def t_quantile(q, df) -> float:
    """The q-quantile of Student's t (bisection on `t_cdf`); t_quantile(0.975, 7) ≈ 2.3646."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


# ---- intervals, p-values, corrections ---------------------------------------------------------------------------


def _clean(values, fn) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"{fn}: need at least 2 paired values (seeds), got {v.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{fn}: values must be finite, got {v.tolist()}")
    return v


def paired_differences(arm, baseline) -> np.ndarray:
    """d_s = arm_s − baseline_s, per seed. Both must list the same seeds in the same order."""
    a, b = np.asarray(arm, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_differences: {a.size} values for the arm but {b.size} for the baseline; a paired "
                         f"comparison needs one value per seed for both")
    return a - b


def t_interval(diffs, level=0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t_{n−1, (1+level)/2} · s / √n."""
    d = _clean(diffs, "t_interval")
    n, mean, sd = d.size, float(d.mean()), float(d.std(ddof=1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap_interval(diffs, level=0.95, resamples=10_000, seed=0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap of the mean (resample seeds with replacement). Narrower than the
    t interval for few seeds (it under-covers at n = 8), so the verdicts use t; this is a cross-check."""
    d = _clean(diffs, "bootstrap_interval")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def sign_flip_p(diffs, max_exact=16, resamples=200_000, seed=0) -> float:
    """Two-sided p of H0 "each d_s is symmetric about 0": the share of the 2^n sign patterns whose |mean| is at
    least the observed |mean| (exact up to n = max_exact seeds, Monte Carlo above). The observed pattern counts,
    so p ≥ 2/2^n > 0."""
    d = _clean(diffs, "sign_flip_p")
    observed = abs(d.mean()) * (1 - 1e-12) - 1e-15  # tolerance: ties count as "at least as extreme"
    if d.size <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))  # (2^n, n)
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(resamples, d.size))
    return float(np.mean(np.abs(signs @ d / d.size) >= observed))


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input order: sort ascending, multiply the i-th
    smallest by (m − i), take the running maximum, cap at 1. Reject H0_j at level α iff adjusted p_j < α."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (p.size - np.arange(p.size)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def verdict(low, high, direction=+1, p_adjusted=None, alpha=0.05) -> str:
    """The verdict rule of this module's docstring. direction: +1 if the claim predicts arm − baseline > 0
    (e.g. accuracy), −1 if it predicts < 0 (e.g. MSE, forgetting). p_adjusted: a secondary comparison's
    Holm-adjusted p, which must also be < alpha for a decided verdict (None for the primary comparison)."""
    if direction not in (+1, -1):
        raise ValueError(f"verdict: direction must be +1 or -1, got {direction!r}")
    if p_adjusted is not None and not p_adjusted < alpha:
        return CANNOT_TELL
    lo, hi = (low, high) if direction > 0 else (-high, -low)  # flip so that "claimed" is always > 0
    if lo > 0:
        return HOLDS
    if hi < 0:
        return CONTRADICTED
    return CANNOT_TELL


# ---- one comparison, and a family of them -------------------------------------------------------------------------


@dataclass
class Comparison:
    """arm − baseline over paired seeds, with its interval, p-values and verdict."""

    claim: str
    arm: str
    baseline: str
    metric: str
    direction: int
    seeds: int
    mean: float
    low: float
    high: float
    boot_low: float
    boot_high: float
    p: float
    p_holm: float | None
    primary: bool
    verdict: str
    scale: str = ""

    def to_dict(self):
        return asdict(self)

    def interval(self, digits=3) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def sentence(self, digits=3) -> str:
        """One line for the console and the docs: the verdict, the interval and the seeds it rests on."""
        p = f"p = {self.p:.3g}" + ("" if self.p_holm is None else f", Holm p = {self.p_holm:.3g}")
        return (f"{self.claim}: {self.verdict.upper()} — {self.arm} − {self.baseline} ({self.metric}) = "
                f"{self.interval(digits)} (95 % t CI, {self.seeds} paired seeds, sign-flip {p})")


def compare(arm_values, baseline_values, *, claim, arm, baseline, metric, direction=+1, primary=True, scale="",
            level=0.95) -> Comparison:
    """A Comparison of per-seed values (same seeds, same order); Holm is filled in by `family`."""
    d = paired_differences(arm_values, baseline_values)
    mean, lo, hi = t_interval(d, level)
    _, blo, bhi = bootstrap_interval(d, level)
    return Comparison(claim=claim, arm=arm, baseline=baseline, metric=metric, direction=direction, seeds=d.size,
                      mean=mean, low=lo, high=hi, boot_low=blo, boot_high=bhi, p=sign_flip_p(d), p_holm=None,
                      primary=primary, verdict=verdict(lo, hi, direction), scale=scale)


def declared(values, primary, secondary, **compare_kw) -> list[Comparison]:
    """An experiment's pre-declared comparisons: the `primary` (arm, baseline) pair and the `secondary` pairs over
    per-seed `values[arm]`, Holm-corrected together (`family`); a pair with an arm run on fewer than 2 seeds is
    left out."""
    pairs = [(primary, True), *[(pair, False) for pair in secondary]]
    return family([compare(values[a], values[b], arm=a, baseline=b, primary=is_primary, **compare_kw)
                   for (a, b), is_primary in pairs if a in values and b in values and len(values[a]) >= 2])


def family(comparisons, alpha=0.05) -> list[Comparison]:
    """Holm-correct the secondary comparisons of one experiment together and re-apply the verdict rule; the
    primary ones (one pre-declared comparison per claim) keep their unadjusted verdict."""
    secondary = [c for c in comparisons if not c.primary]
    for c, p in zip(secondary, holm([c.p for c in secondary])):
        c.p_holm = p
        c.verdict = verdict(c.low, c.high, c.direction, p, alpha)
    return list(comparisons)
