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
