"""The statistics of a distillation gain: how sure a reported difference is.

- :func:`t_interval`: mean and 95% confidence interval of per-seed values (Student's t,
  n - 1 degrees of freedom);
- :func:`paired_bootstrap`: with one seed, a 95% interval of the difference in accuracy of
  two models on the same test images, resampling the images (percentile bootstrap);
- :func:`mcnemar`: McNemar's exact test on the images one model gets right and the other
  wrong (a two-sided binomial test of the discordant pairs at p = 1/2);
- :func:`describe_gain`: the headline's words for a gain and its interval;
- :func:`wilson_interval`: a 95% interval of one model's accuracy on n test images;
- :func:`pack_outcomes` / :func:`unpack_outcomes`: which test images a model got right, as a
  compact JSON value, so that paired tests can be made later from a run's files alone.

Self-contained (no scipy): Student's t quantile comes from the regularised incomplete beta
function (Numerical Recipes' continued fraction) by bisection; the tests check every number
against scipy and textbook values.
"""

from __future__ import annotations

import base64
import math
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample standard deviation and the two-sided t-interval of the mean of
    ``values`` (e.g. one gain per seed). With one value the interval is undefined (None)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "low": None, "high": None, "confidence": confidence}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "confidence": confidence}


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """The difference of accuracies (b - a, in points) of two models on the same test
    images, and its percentile-bootstrap interval: the images are resampled with
    replacement, each resample scoring both models on the same images."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    n = len(a)
    diff = (b - a) * 100.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(n, 1))  # bounded memory for large test sets
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means[start : start + rows] = diff[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {
        "n": n,
        "mean": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "resamples": resamples,
        "confidence": confidence,
    }


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: ``only_a`` images model a gets right and b wrong, ``only_b`` the
    reverse; under "no difference" each discordant image is a fair coin. Two-sided p-value
    of the binomial test (1.0 when there is no discordant image)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def describe_gain(gain: dict[str, Any], basis: str) -> str:
    """``+1.40 points (95% CI +0.60 to +2.20, 3 seeds)`` or ``+0.30 points, not
    distinguishable from zero (95% CI -0.50 to +1.10, ...)``; ``basis`` names what the
    interval is over."""
    mean, low, high = gain["mean"], gain.get("low"), gain.get("high")
    if low is None or high is None:
        return f"{mean:+.2f} points (no interval: {basis})"
    interval = f"{round(100 * gain['confidence'])}% CI {low:+.2f} to {high:+.2f}, {basis}"
    if low > 0 or high < 0:
        return f"{mean:+.2f} points ({interval})"
    return f"{mean:+.2f} points, not distinguishable from zero ({interval})"


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Wilson's score interval of a proportion (an accuracy of ``successes`` right out of
    ``n`` test images), in points (0-100): unlike the normal approximation it stays inside
    [0, 100] and is sound near 0% and 100%."""
    if n <= 0:
        return {"n": n, "low": None, "high": None, "confidence": confidence}
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0% and 100% the bound is exactly 0 / 1 (the formula leaves a rounding error of 1e-17)
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return {"n": n, "low": 100.0 * low, "high": 100.0 * high, "confidence": confidence}


def pack_outcomes(correct: np.ndarray) -> dict[str, Any]:
    """Per-image right/wrong as ``{"n": N, "bits": base64}`` (one bit per test image)."""
    correct = np.asarray(correct, dtype=bool)
    return {"n": int(correct.size), "bits": base64.b64encode(np.packbits(correct)).decode("ascii")}


def unpack_outcomes(packed: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`pack_outcomes`."""
    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits, count=int(packed["n"])).astype(bool)
