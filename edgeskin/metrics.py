"""Classification metrics from probabilities, numpy only (shared by evaluate, compile and bench).

Conventions: ``probs`` is (N, C), ``labels`` is (N,) class indices. Top-k counts a sample as
correct when its true class is among the k highest probabilities; ties are broken towards the
lower class index (a stable sort), so a result never depends on the platform.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .labels import MALIGNANT_CODES


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) and labels (N,), got {p.shape} and {y.shape}")
    return p, y


def ranking(probs: np.ndarray) -> np.ndarray:
    """Class indices by decreasing probability; ties keep the lower index first."""
    return np.argsort(-np.asarray(probs, dtype=np.float64), axis=1, kind="stable")


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    p, y = _check(probs, labels)
    if len(y) == 0:
        return float("nan")
    top = ranking(p)[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Recall, precision, F1 and support per class (NaN where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        # P = R = 0 (predicted and present, never right) is an F1 of 0, not undefined.
        f1 = np.where(
            (precision + recall) > 0, 2 * precision * recall / (precision + recall), 0.0
        )
    f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1)
    return {"recall": recall, "precision": precision, "f1": f1, "support": support}


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    rec = per_class(confusion_matrix(pred, labels, num_classes))["recall"]
    return float(np.nanmean(rec)) if np.any(~np.isnan(rec)) else float("nan")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence with ``bins`` equal-width bins on (0, 1]."""
    p, y = _check(probs, labels)
    if len(y) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (ranking(p)[:, 0] == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def binary_sensitivity_specificity(positive: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    positive = np.asarray(positive, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    sens = float(np.mean(positive[truth])) if truth.any() else float("nan")
    spec = float(np.mean(~positive[~truth])) if (~truth).any() else float("nan")
    return sens, spec


def classification_report(
    probs: np.ndarray, labels: np.ndarray, codes: Sequence[str], *, ece_bins: int = 15
) -> dict[str, object]:
    """Everything ``edgeskin evaluate`` reports, as plain JSON-ready values."""
    p, y = _check(probs, labels)
    codes = list(codes)
    c = len(codes)
    if p.shape[1] != c:
        raise ValueError(f"probs have {p.shape[1]} classes, label set has {c}")
    pred = ranking(p)[:, 0]
    cm = confusion_matrix(pred, y, c)
    pc = per_class(cm)
    out: dict[str, object] = {
        "n": int(len(y)),
        "top1": topk_accuracy(p, y, 1),
        "top2": topk_accuracy(p, y, min(2, c)),
        "top3": topk_accuracy(p, y, min(3, c)),
        "balanced_accuracy": balanced_accuracy(pred, y, c),
        "ece": expected_calibration_error(p, y, ece_bins),
        "per_class": {
            code: {**{k: _num(pc[k][i]) for k in ("recall", "precision", "f1")},
                   "support": int(pc["support"][i])}
            for i, code in enumerate(codes)
        },
        "confusion_matrix": cm.tolist(),
        "class_order": codes,
    }
    positive = "mel" if "mel" in codes else ("malignant" if "malignant" in codes else None)
    if positive is not None:
        k = codes.index(positive)
        sens, spec = binary_sensitivity_specificity(pred == k, y == k)
        out["positive_class"] = positive
        out["mel_sensitivity" if positive == "mel" else "malignant_sensitivity"] = sens
        out["mel_specificity" if positive == "mel" else "malignant_specificity"] = spec
    if set(MALIGNANT_CODES) <= set(codes):
        mal = np.array([code in MALIGNANT_CODES for code in codes])
        sens, spec = binary_sensitivity_specificity(mal[pred], mal[y])
        out["malignant_sensitivity"] = sens
        out["malignant_specificity"] = spec
    return out


def _num(x: float) -> float | None:
    x = float(x)
    if np.isnan(x):
        return None
    return x


#: the drops every budget and report speaks of, and the classification-report key each is read from
DROP_KEYS = {"top1": "top1", "top2": "top2", "top3": "top3", "balanced": "balanced_accuracy", "mel_recall": None}


def drops_points(reference: dict[str, Any], ours: dict[str, Any],
                 keys: tuple[str, ...] = ("top1", "balanced", "mel_recall")) -> dict[str, float | None]:
    """How far ``ours`` falls below ``reference`` (two :func:`classification_report` results on the
    same images), in percentage points; positive: worse. ``mel_recall`` is the sensitivity of the
    report's positive class (``mel``, or ``malignant`` for the binary label set; None without one)."""
    out: dict[str, float | None] = {}
    for k in keys:
        src = DROP_KEYS[k]
        if src is None:
            pos = reference.get("positive_class")
            src = f"{pos}_sensitivity" if pos else None
        a = reference.get(src) if src else None
        b = ours.get(src) if src else None
        out[k] = None if a is None or b is None else 100 * (float(a) - float(b))
    return out


def best_member(val_balanced_accuracy: Mapping[str, float]) -> str:
    """The one rule for "the best member": the highest validation balanced accuracy (ties: the
    first in the ensemble's order). Used by distillation (``init = member``) and the benchmarks."""
    if not val_balanced_accuracy:
        raise ValueError("no members to choose from")
    return max(val_balanced_accuracy, key=lambda name: (val_balanced_accuracy[name], -list(val_balanced_accuracy).index(name)))


# ----------------------------------------------------------------------------- compile-check uncertainty

def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (fractions); it stays inside
    [0, 1] and is sound near 0 and 1, where the normal-approximation interval is not. ``n == 0``:
    (nan, nan)."""
    from statistics import NormalDist

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, not 1e-17 off
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return float(lo), float(hi)


def paired_bootstrap_drops(
    reference: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    positive: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float] | None]:
    """How far ``probs`` falls below ``reference`` in top-1, balanced accuracy and the recall of class
    ``positive`` (melanoma), in percentage points (positive: worse), with a paired bootstrap
    percentile interval: each of ``n_boot`` rounds draws n image indices with replacement and scores
    both models on the same draw. Vectorised, numpy only. The point estimates equal
    :func:`drops_points` on the two :func:`classification_report` results. ``mel_recall`` is None
    without a positive class; rounds that draw no positive image are left out of its interval."""
    r, y = _check(reference, labels)
    p, _ = _check(probs, labels)
    if r.shape != p.shape:
        raise ValueError(f"reference and probs must have one shape, got {r.shape} and {p.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    n, k = r.shape
    keys = ("top1", "balanced") + (("mel_recall",) if positive is not None else ())
    out: dict[str, dict[str, float] | None] = {"mel_recall": None}
    if n == 0:
        out.update({key: {"point": float("nan"), "low": float("nan"), "high": float("nan")} for key in keys})
        return out
    right = np.stack([ranking(r)[:, 0] == y, ranking(p)[:, 0] == y]).astype(np.float64)  # (2, n)

    def scores(idx: np.ndarray) -> dict[str, np.ndarray]:
        """Drops (points) for each row of image indices ``idx`` (b, n)."""
        b = idx.shape[0]
        flat = (np.arange(b)[:, None] * k + y[idx]).ravel()
        support = np.bincount(flat, minlength=b * k).reshape(b, k).astype(np.float64)
        present = support > 0
        res = {"top1": 100 * (right[0][idx].mean(1) - right[1][idx].mean(1))}
        recall = []
        for m in range(2):
            hits = np.bincount(flat, weights=right[m][idx].ravel(), minlength=b * k).reshape(b, k)
            recall.append(np.divide(hits, support, out=np.full((b, k), np.nan), where=present))
        res["balanced"] = 100 * (np.where(present, recall[0] - recall[1], 0.0).sum(1) / present.sum(1))
        if positive is not None:
            res["mel_recall"] = 100 * (recall[0][:, positive] - recall[1][:, positive])
        return res

    point = scores(np.arange(n)[None, :])
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    chunk = max(1, 2_000_000 // n)  # bounds the (chunk, n) index matrix to ~16 MB
    for start in range(0, n_boot, chunk):
        part = scores(rng.integers(0, n, (min(chunk, n_boot - start), n)))
        for key in keys:
            draws[key].append(part[key])
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    for key in keys:
        d = np.concatenate(draws[key])
        d = d[~np.isnan(d)]
        lo, hi = np.percentile(d, q) if len(d) else (np.nan, np.nan)
        out[key] = {"point": float(point[key][0]), "low": float(lo), "high": float(hi)}
    return out


def budget_steps(labels: np.ndarray, codes: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """How far one flipped image moves each budgeted drop on this split, in points: top-1
    100/n; balanced accuracy (the mean recall over the classes present) 100/(K * the smallest
    class's count), for an image of that class; melanoma recall (``mel``, or ``malignant`` in the
    binary label set) 100/n_mel. ``images``: the images that step is counted on; ``mel_recall``
    is None without a positive class in ``codes``, and has ``step_points`` None when the split
    holds no image of it."""
    y = np.asarray(labels, dtype=np.int64)
    codes = list(codes)
    counts = np.bincount(y, minlength=len(codes)) if len(y) else np.zeros(len(codes), dtype=np.int64)
    n = int(len(y))
    out: dict[str, dict[str, Any] | None] = {
        "top1": {"step_points": 100.0 / n if n else None, "images": n},
        "balanced": None, "mel_recall": None}
    present = np.flatnonzero(counts)
    if len(present):
        smallest = int(present[np.argmin(counts[present])])
        out["balanced"] = {"step_points": 100.0 / (len(present) * counts[smallest]),
                           "images": int(counts[smallest]), "class": codes[smallest], "classes": int(len(present))}
    pos = "mel" if "mel" in codes else ("malignant" if "malignant" in codes else None)
    if pos is not None:
        c = int(counts[codes.index(pos)])
        out["mel_recall"] = {"step_points": 100.0 / c if c else None, "images": c, "class": pos}
    return out
