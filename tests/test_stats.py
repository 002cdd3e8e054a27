"""The paired statistics of the experiments on data with a known answer: known quantiles, a difference that must
come out significant, one that must not, exact sign-flip p-values, Holm against a hand computation, and intervals
that cover the true mean at their nominal rate on simulated data."""
from __future__ import annotations

import numpy as np
import pytest

from tinymoe.experiments.stats import (CANNOT_TELL, CONTRADICTED, HOLDS, bootstrap_interval, compare, family,
                                       holm, paired_differences, sign_flip_p, t_cdf, t_interval, t_quantile,
                                       verdict)


@pytest.mark.parametrize("df, q, expected", [(1, 0.975, 12.7062), (2, 0.975, 4.3027), (7, 0.975, 2.3646),
                                             (9, 0.975, 2.2622), (30, 0.975, 2.0423), (7, 0.95, 1.8946)])
def test_t_quantile_matches_the_tables(df, q, expected):
    assert t_quantile(q, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(1 - q, df) == pytest.approx(-expected, abs=1e-3)


def test_t_cdf_is_a_distribution_function():
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-8)  # Cauchy: ½ + atan(1)/π
    assert t_cdf(1.96, 10_000) == pytest.approx(0.975, abs=1e-3)  # → normal
    assert t_cdf(-2.0, 4) == pytest.approx(1 - t_cdf(2.0, 4))


def test_a_clear_paired_improvement_holds():
    rng = np.random.default_rng(0)
    baseline = rng.normal(0.7, 0.1, 8)  # large seed-to-seed spread...
    arm = baseline + 0.05 + rng.normal(0, 0.005, 8)  # ...but the arm is better on every seed
    c = compare(arm, baseline, claim="c", arm="A", baseline="B", metric="acc", direction=+1)
    assert c.verdict == HOLDS and c.low > 0 and c.mean == pytest.approx(0.05, abs=0.01)
    assert c.p == pytest.approx(2 / 2**8)  # every sign positive: only the observed pattern and its mirror
    # the same numbers read as a loss (lower is better) contradict the claim
    c = compare(arm, baseline, claim="c", arm="A", baseline="B", metric="mse", direction=-1)
    assert c.verdict == CONTRADICTED


def test_noise_around_zero_cannot_tell():
    rng = np.random.default_rng(1)
    baseline = rng.normal(0.7, 0.1, 8)
    arm = baseline + np.array([0.03, -0.03, 0.02, -0.02, 0.01, -0.01, 0.04, -0.04])  # mean exactly 0
    c = compare(arm, baseline, claim="c", arm="A", baseline="B", metric="acc")
    assert c.verdict == CANNOT_TELL and c.low < 0 < c.high
    assert c.p == pytest.approx(1.0)


def test_unpaired_spread_does_not_hide_a_paired_effect():
    # means differ by 0.02 against a between-seed std of 0.2: an unpaired comparison could not see it
    base = np.linspace(0.2, 0.8, 10)
    c = compare(base + 0.02, base, claim="c", arm="A", baseline="B", metric="acc")
    assert c.verdict == HOLDS and c.high - c.low < 1e-6


def test_sign_flip_p_by_hand():
    # d = (1, 2, 3): mean 2; of the 8 sign patterns only (+,+,+) and (−,−,−) reach |mean| ≥ 2
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # d = (1, 1, −1, 3): |mean| = 1; patterns with |±1 ±1 ±1 ±3| ≥ 4: 3 agreeing with the 3 (and their mirrors)
    flips = [abs(a + b + c + 3 * e) >= 4 for a in (1, -1) for b in (1, -1) for c in (1, -1) for e in (1, -1)]
    assert sign_flip_p([1.0, 1.0, -1.0, 3.0]) == pytest.approx(np.mean(flips))


def test_sign_flip_p_is_calibrated_under_the_null():
    rng = np.random.default_rng(2)
    ps = np.array([sign_flip_p(rng.standard_normal(8)) for _ in range(400)])
    assert 0.02 <= np.mean(ps < 0.05) <= 0.09  # nominal 5 % (exact test, so ≤ 5 % up to noise)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_holm_turns_a_lone_secondary_win_into_cannot_tell():
    base = np.zeros(8)
    clear = compare(base + np.linspace(0.1, 0.2, 8), base, claim="a", arm="A", baseline="B", metric="m",
                    primary=False)
    marginal = compare(base + np.array([0.1] * 6 + [0.05, -0.05]), base, claim="b", arm="C",
                       baseline="B", metric="m", primary=False)
    assert marginal.verdict == HOLDS  # its CI alone just excludes 0 ...
    family([clear, marginal, *[compare(base + s, base, claim=f"n{i}", arm="N", baseline="B", metric="m",
                                       primary=False)
                               for i, s in enumerate(np.random.default_rng(3).normal(0, 0.1, (3, 8)))]])
    assert marginal.p_holm > 0.05 and marginal.verdict == CANNOT_TELL  # ... but not after Holm
    assert clear.verdict == HOLDS and clear.p_holm < 0.05


def test_verdict_rule():
    assert verdict(0.01, 0.2) == HOLDS
    assert verdict(-0.2, -0.01) == CONTRADICTED
    assert verdict(-0.01, 0.2) == CANNOT_TELL
    assert verdict(-0.2, -0.01, direction=-1) == HOLDS  # lower is better
    assert verdict(0.01, 0.2, p_adjusted=0.2) == CANNOT_TELL
    with pytest.raises(ValueError, match="direction"):
        verdict(0, 1, direction=0)


def test_t_interval_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(4)
    true = 0.3
    hits = [lo <= true <= hi for _, lo, hi in (t_interval(rng.normal(true, 1.0, 8)) for _ in range(4000))]
    assert np.mean(hits) == pytest.approx(0.95, abs=0.012)  # binomial sd at 4000 draws: 0.0034


def test_bootstrap_interval_coverage_approaches_nominal_with_more_seeds():
    rng = np.random.default_rng(5)
    true = -0.1
    hits = [lo <= true <= hi for _, lo, hi in (bootstrap_interval(rng.normal(true, 0.5, 30), resamples=1000,
                                                                  seed=i) for i in range(600))]
    assert 0.91 <= np.mean(hits) <= 0.97  # the percentile bootstrap slightly under-covers at n = 30


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_differences([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        sign_flip_p([1.0, np.nan])


def test_sentence_names_interval_and_seeds():
    base = np.zeros(8)
    c = compare(base + 0.1 + np.arange(8) * 0.01, base, claim="claim", arm="A", baseline="B", metric="acc")
    line = c.sentence()
    assert "HOLDS" in line and "8 paired seeds" in line and c.interval() in line


def test_declared_builds_the_family_and_skips_arms_without_seeds():
    """One primary comparison (unadjusted) and the secondary ones (Holm); an arm run on < 2 seeds is left out."""
    from tinymoe.experiments.stats import declared

    rng = np.random.default_rng(0)
    base = rng.normal(size=8)
    values = {"A": base + 1.0, "B": base, "C": base + rng.normal(0, 0.01, 8), "D": [0.5]}
    comps = declared(values, ("A", "B"), [("C", "B"), ("D", "B")], claim="c", metric="m")
    assert [(c.arm, c.baseline, c.primary) for c in comps] == [("A", "B", True), ("C", "B", False)]
    assert comps[0].p_holm is None and comps[0].verdict == HOLDS
    assert comps[1].p_holm is not None and comps[1].verdict != HOLDS
