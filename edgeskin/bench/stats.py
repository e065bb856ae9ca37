"""Uncertainty for the bench, numpy + stdlib only: paired bootstrap intervals for accuracy drops,
McNemar's test on top-1 flips, and operating points on a class probability."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def mcnemar(ref_correct: np.ndarray, new_correct: np.ndarray) -> dict[str, float | int]:
    """McNemar's test on paired decisions: ``b`` = right before and wrong now, ``c`` = wrong
    before and right now. Exact two-sided binomial p-value (the discordant pairs split 50/50
    under no change), which is right for the small counts a few hundred images give."""
    a = np.asarray(ref_correct, dtype=bool)
    n_ = np.asarray(new_correct, dtype=bool)
    if a.shape != n_.shape:
        raise ValueError(f"paired decisions must have one shape, got {a.shape} and {n_.shape}")
    b = int(np.sum(a & ~n_))
    c = int(np.sum(~a & n_))
    n = b + c
    if n == 0:
        p = 1.0
    else:
        k = min(b, c)
        # P(X <= k) for X ~ Binomial(n, 1/2), in log space (n can be large)
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                for i in range(k + 1)]
        m = max(logs)
        tail = math.exp(m) * sum(math.exp(v - m) for v in logs)
        p = min(1.0, 2.0 * tail)
    # Edwards' continuity correction; no discordance beyond the correction means no evidence (0)
    chi2 = 0.0 if n == 0 else max(0, abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "discordant": n, "chi2_cc": float(chi2), "p_value": float(p)}


def bootstrap_drop(
    metric: Callable[[np.ndarray, np.ndarray], float],
    ref_probs: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap of ``metric(ref) - metric(new)`` (in the metric's units): both models are
    scored on the same resampled images each round. Returns the point estimate and the
    percentile interval."""
    y = np.asarray(labels)
    n = len(y)
    point = metric(ref_probs, y) - metric(probs, y)
    if n == 0:
        return {"point": float("nan"), "low": float("nan"), "high": float("nan"), "n_boot": 0}
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        draws[i] = metric(ref_probs[idx], y[idx]) - metric(probs[idx], y[idx])
    draws = draws[~np.isnan(draws)]
    lo, hi = np.percentile(draws, [100 * (1 - level) / 2, 100 * (1 + level) / 2]) if len(draws) else (np.nan,) * 2
    return {"point": float(point), "low": float(lo), "high": float(hi), "n_boot": int(n_boot), "level": level}


def threshold_at_specificity(score: np.ndarray, positive: np.ndarray, specificity: float) -> float:
    """The smallest threshold t such that ``score >= t`` keeps at least ``specificity`` of the
    negatives negative (scores above t are called positive)."""
    neg = np.sort(np.asarray(score, dtype=np.float64)[~np.asarray(positive, dtype=bool)])
    if len(neg) == 0:
        return 0.5
    k = int(math.ceil(specificity * len(neg)))  # negatives that must fall below t
    if k <= 0:
        return float(neg[0])
    if k >= len(neg):
        return float(np.nextafter(neg[-1], np.inf))
    return float(np.nextafter(neg[k - 1], np.inf)) if neg[k] == neg[k - 1] else float(neg[k])


def sensitivity_specificity(score: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    s = np.asarray(score, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    called = s >= threshold
    sens = float(np.mean(called[pos])) if pos.any() else float("nan")
    spec = float(np.mean(~called[~pos])) if (~pos).any() else float("nan")
    return sens, spec
