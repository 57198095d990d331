"""The statistics of a gain, against textbook values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kdistill.stats import (
    describe_gain,
    mcnemar,
    pack_outcomes,
    paired_bootstrap,
    t_interval,
    t_quantile,
    unpack_outcomes,
    wilson_interval,
)


@pytest.mark.parametrize("df, textbook", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)])
def test_t_quantile_matches_the_tables_and_scipy(df: int, textbook: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(textbook, abs=5e-4)  # Student's t table, two-sided 95%
    assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
    assert t_quantile(0.9, df) == pytest.approx(scipy_stats.t.ppf(0.9, df), rel=1e-9)


def test_t_interval_of_three_seeds() -> None:
    """The full-CIFAR gains of the seed pair (-0.02, +1.35, +0.68): the interval a user should see."""
    r = t_interval([-0.02, 1.35, 0.68])
    mean, sd = 2.01 / 3, float(np.std([-0.02, 1.35, 0.68], ddof=1))
    half = scipy_stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert (r["n"], r["mean"], r["std"]) == (3, pytest.approx(mean), pytest.approx(sd))
    assert (r["low"], r["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert r["low"] < 0 < r["high"]  # +0.67 is not distinguishable from zero with 3 seeds
    assert t_interval([1.0])["low"] is None  # one seed: no t-interval


@pytest.mark.parametrize("only_a, only_b", [(10, 3), (0, 5), (7, 7), (40, 25), (0, 0)])
def test_mcnemar_exact_p_values(only_a: int, only_b: int) -> None:
    both, neither = 50, 20
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * neither, dtype=bool)
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"]) == (only_a, only_b)
    expected = scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    assert r["p_value"] == pytest.approx(expected, rel=1e-12)
    if (only_a, only_b) == (10, 3):
        assert r["p_value"] == pytest.approx(0.0923, abs=1e-4)  # the textbook 10-vs-3 example


def test_paired_bootstrap_covers_a_known_difference() -> None:
    """Model b is right on 5 more images in every 100 (60% -> 65%): the interval covers +5 and excludes 0
    with 4,000 images; it is centred on the observed difference and reproducible from its seed."""
    rng = np.random.default_rng(1)
    a = rng.random(4000) < 0.60
    b = a.copy()
    flip = rng.choice(np.flatnonzero(~a), size=200, replace=False)  # +5 points, paired
    b[flip] = True
    r = paired_bootstrap(a, b, resamples=1000, seed=0)
    assert r["mean"] == pytest.approx(5.0)
    assert 0 < r["low"] < 5.0 < r["high"] < 10
    assert r == paired_bootstrap(a, b, resamples=1000, seed=0)


@pytest.mark.parametrize(
    "gain, says",
    [
        ({"mean": 1.4, "low": 0.6, "high": 2.2, "confidence": 0.95}, "+1.40 points (95% CI +0.60 to +2.20, 3 seeds)"),
        (
            {"mean": 0.3, "low": -0.5, "high": 1.1, "confidence": 0.95},
            "+0.30 points, not distinguishable from zero (95% CI -0.50 to +1.10, 3 seeds)",
        ),
        (
            {"mean": -1.0, "low": -1.8, "high": -0.2, "confidence": 0.95},
            "-1.00 points (95% CI -1.80 to -0.20, 3 seeds)",
        ),
    ],
)
def test_gain_wording_on_both_sides_of_zero(gain: dict, says: str) -> None:
    assert describe_gain(gain, "3 seeds") == says


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (623, 1000), (7912, 10000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    r = wilson_interval(k, n)
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (r["low"], r["high"]) == (pytest.approx(100 * ci.low, abs=1e-9), pytest.approx(100 * ci.high, abs=1e-9))
    assert 0.0 <= r["low"] <= 100.0 * k / n <= r["high"] <= 100.0


def test_outcomes_round_trip_through_json() -> None:
    import json

    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 1000, 10001):
        correct = rng.random(n) < 0.5
        packed = json.loads(json.dumps(pack_outcomes(correct)))
        assert np.array_equal(unpack_outcomes(packed), correct)
