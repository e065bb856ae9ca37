"""Metrics on small hand-worked examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeskin.metrics import (
    balanced_accuracy,
    binary_sensitivity_specificity,
    budget_steps,
    classification_report,
    confusion_matrix,
    drops_points,
    expected_calibration_error,
    paired_bootstrap_drops,
    per_class,
    ranking,
    topk_accuracy,
    wilson_interval,
)

HAM = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IDX = {c: i for i, c in enumerate(HAM)}


def _probs_for(pred: list[int], num_classes: int, top: float = 0.4) -> np.ndarray:
    """Rows whose arg-max is ``pred`` (the rest of the mass spread evenly)."""
    rest = (1.0 - top) / (num_classes - 1)
    p = np.full((len(pred), num_classes), rest)
    p[np.arange(len(pred)), pred] = top
    return p


# --------------------------------------------------------------------------- top-k and ties


def test_ranking_breaks_ties_towards_lower_index() -> None:
    r = ranking(np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.2, 0.7]]))
    assert r.tolist() == [[0, 1, 2], [1, 2, 0], [0, 1, 2], [2, 1, 0]]


def test_ranking_is_stable_for_many_tied_classes() -> None:
    p = np.full((2, 40), 1 / 40)
    p[1, 17] = 0.5
    r = ranking(p)
    assert r[0].tolist() == list(range(40))
    assert r[1].tolist() == [17] + [i for i in range(40) if i != 17]
    assert topk_accuracy(p, np.array([39, 0]), 39) == 0.5
    assert topk_accuracy(p, np.array([38, 0]), 39) == 1.0


def test_tie_is_not_top1_for_the_higher_index() -> None:
    p = np.array([[0.5, 0.5, 0.0]])
    assert topk_accuracy(p, np.array([1]), 1) == 0.0
    assert topk_accuracy(p, np.array([1]), 2) == 1.0
    assert topk_accuracy(p, np.array([0]), 1) == 1.0
    assert topk_accuracy(p, np.array([2]), 2) == 0.0


def test_topk_hand_computed() -> None:
    p = np.array([
        [0.5, 0.5, 0.0],        # label 1: tie lost at top-1, top-2 ok
        [0.2, 0.3, 0.5],        # label 2: top-1
        [0.1, 0.6, 0.3],        # label 0: ranked last -> only top-3
        [1 / 3, 1 / 3, 1 / 3],  # label 2: three-way tie, ranked last
    ])
    y = np.array([1, 2, 0, 2])
    assert topk_accuracy(p, y, 1) == pytest.approx(0.25)
    assert topk_accuracy(p, y, 2) == pytest.approx(0.5)
    assert topk_accuracy(p, y, 3) == pytest.approx(1.0)


def test_topk_empty_and_bad_shapes() -> None:
    assert math.isnan(topk_accuracy(np.zeros((0, 3)), np.zeros(0, int), 1))
    with pytest.raises(ValueError):
        topk_accuracy(np.zeros((3, 2)), np.zeros(2, int), 1)
    with pytest.raises(ValueError):
        topk_accuracy(np.zeros(3), np.zeros(3, int), 1)


# --------------------------------------------------------------------------- confusion and per class

# 4 classes; class 3 never occurs in the labels but is predicted once.
Y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
P = np.array([0, 0, 0, 1, 1, 1, 2, 0, 0, 3])


def test_confusion_matrix_rows_are_truth() -> None:
    cm = confusion_matrix(P, Y, 4)
    assert cm.tolist() == [
        [3, 1, 0, 0],
        [0, 2, 0, 0],
        [2, 0, 1, 1],
        [0, 0, 0, 0],
    ]
    assert cm.dtype.kind == "i"
    assert confusion_matrix([1], [0], 2).tolist() == [[0, 1], [0, 0]]


def test_balanced_accuracy_is_mean_recall_over_present_classes() -> None:
    # recalls: 3/4, 2/2, 1/4 (class 3 absent -> not counted)
    assert balanced_accuracy(P, Y, 4) == pytest.approx((0.75 + 1.0 + 0.25) / 3)
    # plain accuracy would be 0.6, a mean over all four classes 0.5
    assert balanced_accuracy(np.array([0, 1]), np.array([0, 0]), 2) == pytest.approx(0.5)
    assert balanced_accuracy(np.array([1, 1, 1, 0]), np.array([0, 1, 1, 1]), 2) == pytest.approx(
        (0 + 2 / 3) / 2
    )


def test_per_class_hand_computed() -> None:
    pc = per_class(confusion_matrix(P, Y, 4))
    np.testing.assert_allclose(pc["recall"][:3], [0.75, 1.0, 0.25])
    assert math.isnan(pc["recall"][3])
    np.testing.assert_allclose(pc["precision"], [3 / 5, 2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(pc["f1"][:3], [2 / 3, 0.8, 0.4])
    assert math.isnan(pc["f1"][3])
    assert pc["support"].tolist() == [4, 2, 4, 0]


def test_f1_of_a_class_predicted_and_present_but_never_right_is_zero() -> None:
    pc = per_class(confusion_matrix([1, 1, 0], [0, 0, 1], 2))
    assert pc["precision"].tolist() == [0.0, 0.0]
    assert pc["recall"].tolist() == [0.0, 0.0]
    assert pc["f1"].tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- calibration


# conf, correct: (.9, yes) (.9, no) (.7, yes) (.7, yes) (.55, no) (.35, yes)
ECE_P = np.array([
    [0.90, 0.05, 0.05],
    [0.90, 0.05, 0.05],
    [0.20, 0.70, 0.10],
    [0.10, 0.20, 0.70],
    [0.25, 0.55, 0.20],
    [0.35, 0.33, 0.32],
])
ECE_Y = np.array([0, 1, 1, 2, 0, 0])


def test_ece_hand_worked() -> None:
    # 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]:
    #   (.8,1]: 2 samples, acc .5, conf .9  -> 2/6 * .4
    #   (.6,.8]: 2 samples, acc 1, conf .7  -> 2/6 * .3
    #   (.4,.6]: 1 sample, acc 0, conf .55  -> 1/6 * .55
    #   (.2,.4]: 1 sample, acc 1, conf .35  -> 1/6 * .65
    expected = (2 * 0.4 + 2 * 0.3 + 0.55 + 0.65) / 6
    assert expected == pytest.approx(0.433333, abs=1e-6)
    assert expected_calibration_error(ECE_P, ECE_Y, bins=5) == pytest.approx(expected)
    # one bin: |accuracy - mean confidence| = |4/6 - 4.1/6|
    assert expected_calibration_error(ECE_P, ECE_Y, bins=1) == pytest.approx(0.1 / 6)


def test_ece_bins_are_closed_on_the_right() -> None:
    # 4 bins with exact edges .25/.5/.75: conf .5 sits on an edge and belongs to (.25,.5].
    p = np.array([
        [0.50, 0.50, 0.00],  # conf .5, tie -> class 0, wrong
        [0.70, 0.30, 0.00],  # conf .7, right
        [0.40, 0.35, 0.25],  # conf .4, right
    ])
    y = np.array([1, 0, 0])
    # (.25,.5]: .5 wrong + .4 right: acc .5, conf .45 -> 2/3 * .05
    # (.5,.75]: .7 right                               -> 1/3 * .3
    # ([.5,.75) would give 2/3 * .1 + 1/3 * .6 instead)
    assert expected_calibration_error(p, y, bins=4) == pytest.approx(2 / 3 * 0.05 + 1 / 3 * 0.3)


def test_ece_extremes() -> None:
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(1.0)
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)))


def test_binary_sensitivity_specificity() -> None:
    sens, spec = binary_sensitivity_specificity([1, 0, 0, 1, 0], [1, 1, 1, 0, 0])
    assert sens == pytest.approx(1 / 3) and spec == pytest.approx(1 / 2)
    sens, spec = binary_sensitivity_specificity([0, 1], [0, 0])
    assert math.isnan(sens) and spec == 0.5


# --------------------------------------------------------------------------- the report


def test_classification_report_ham10000() -> None:
    truth = ["mel", "mel", "mel", "nv", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
    preds = ["mel", "nv", "bcc", "mel", "nv", "akiec", "nv", "bkl", "df", "vasc"]
    y = np.array([IDX[c] for c in truth])
    probs = _probs_for([IDX[c] for c in preds], 7)
    rep = classification_report(probs, y, HAM)
    json.dumps(rep)  # JSON-ready
    assert rep["n"] == 10
    assert rep["top1"] == pytest.approx(0.5)
    assert rep["class_order"] == list(HAM)
    assert rep["positive_class"] == "mel"
    # melanoma: 3 true, 1 found; 7 non-melanoma, 1 called melanoma
    assert rep["mel_sensitivity"] == pytest.approx(1 / 3)
    assert rep["mel_specificity"] == pytest.approx(6 / 7)
    # malignant (mel, bcc, akiec): mel->mel, mel->bcc, bcc->akiec count; mel->nv, akiec->nv do not
    assert rep["malignant_sensitivity"] == pytest.approx(3 / 5)
    # benign truths nv, nv, bkl, df, vasc: one (nv->mel) called malignant
    assert rep["malignant_specificity"] == pytest.approx(4 / 5)
    cm = np.array(rep["confusion_matrix"])
    assert cm.sum() == 10 and cm[IDX["mel"], IDX["nv"]] == 1 and cm[IDX["mel"], IDX["mel"]] == 1
    assert cm[IDX["nv"], IDX["mel"]] == 1 and np.trace(cm) == 5
    mel = rep["per_class"]["mel"]
    assert mel["recall"] == pytest.approx(1 / 3)
    assert mel["precision"] == pytest.approx(1 / 2)
    assert mel["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert mel["support"] == 3
    # akiec: predicted once (for a bcc), its one true image called nv
    assert rep["per_class"]["akiec"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 1}
    # balanced accuracy: recalls akiec 0, bcc 0, bkl 1, df 1, mel 1/3, nv 1/2, vasc 1
    assert rep["balanced_accuracy"] == pytest.approx((0 + 0 + 1 + 1 + 1 / 3 + 1 / 2 + 1) / 7)


def test_classification_report_class_never_predicted() -> None:
    codes = ("a", "b", "c")
    probs = np.array([
        [0.8, 0.1, 0.1],  # a -> a
        [0.6, 0.1, 0.3],  # c -> a (c second)
        [0.2, 0.7, 0.1],  # c -> b
        [0.1, 0.8, 0.1],  # b -> b
    ])
    y = np.array([0, 2, 2, 1])
    rep = classification_report(probs, y, codes)
    c = rep["per_class"]["c"]
    assert c["precision"] is None  # never predicted: undefined, not 0
    assert c["recall"] == 0.0
    assert c["support"] == 2
    assert rep["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert rep["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert rep["top1"] == pytest.approx(0.5)
    assert rep["top2"] == pytest.approx(0.75)  # row 3: c is ranked third
    assert rep["top3"] == pytest.approx(1.0)
    assert rep["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert "positive_class" not in rep and "mel_sensitivity" not in rep
    assert "malignant_sensitivity" not in rep


def test_classification_report_absent_class_is_all_none() -> None:
    probs = _probs_for([0, 1, 1], 3, top=0.5)
    rep = classification_report(probs, np.array([0, 1, 0]), ("a", "b", "c"))
    assert rep["per_class"]["c"] == {"recall": None, "precision": None, "f1": None, "support": 0}
    assert rep["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)


def test_classification_report_binary() -> None:
    # benign=0, malignant=1
    probs = _probs_for([1, 0, 1, 0, 0, 1], 2, top=0.8)
    y = np.array([1, 1, 1, 0, 0, 0])
    rep = classification_report(probs, y, ("benign", "malignant"))
    assert rep["positive_class"] == "malignant"
    assert rep["malignant_sensitivity"] == pytest.approx(2 / 3)
    assert rep["malignant_specificity"] == pytest.approx(2 / 3)
    assert "mel_sensitivity" not in rep
    assert rep["top2"] == 1.0 and rep["top3"] == 1.0


def test_classification_report_rejects_wrong_class_count() -> None:
    with pytest.raises(ValueError):
        classification_report(np.full((2, 3), 1 / 3), np.array([0, 1]), HAM)


# --------------------------------------------------------------------------- compile-check intervals


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(95, 100)
    assert (lo, hi) == (pytest.approx(0.8883, abs=5e-4), pytest.approx(0.9785, abs=5e-4))
    # at the edges it stays in [0, 1] and is not empty (the normal approximation gives [1, 1] here)
    assert wilson_interval(10, 10) == (pytest.approx(10 / 13.8415, abs=1e-3), 1.0)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.8415 / 13.8415, abs=1e-3))
    lo99, hi99 = wilson_interval(95, 100, level=0.99)
    assert lo99 < lo and hi99 > hi
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def _pair(n: int, right: int, lost: int, gained: int, num_classes: int = 7) -> tuple[np.ndarray, ...]:
    """Labels, a reference right on the first ``right`` images, and a model that turns ``lost`` of
    those wrong and ``gained`` of the others right."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, num_classes, n)
    wrong = (y + 1) % num_classes
    ref_pred = np.where(np.arange(n) < right, y, wrong)
    new_pred = ref_pred.copy()
    new_pred[:lost] = wrong[:lost]
    new_pred[right:right + gained] = y[right:right + gained]
    return y, _probs_for(list(ref_pred), num_classes), _probs_for(list(new_pred), num_classes)


def test_paired_bootstrap_interval_includes_zero_when_flips_cancel() -> None:
    y, ref, new = _pair(400, right=300, lost=5, gained=5)
    d = paired_bootstrap_drops(ref, new, y, positive=IDX["mel"])
    assert d["top1"]["point"] == 0.0
    assert d["top1"]["low"] < 0 < d["top1"]["high"]
    assert d["balanced"]["low"] < 0 < d["balanced"]["high"]
    assert d["mel_recall"] is not None and d["mel_recall"]["low"] <= d["mel_recall"]["point"] <= d["mel_recall"]["high"]


def test_paired_bootstrap_interval_excludes_zero_for_a_consistent_loss() -> None:
    # 30 of 400 images lost and none gained: 7.5 points, never 0 in a resample of this size
    y, ref, new = _pair(400, right=300, lost=30, gained=0)
    d = paired_bootstrap_drops(ref, new, y, positive=IDX["mel"])
    assert d["top1"]["point"] == pytest.approx(7.5)
    assert 0 < d["top1"]["low"] < 7.5 < d["top1"]["high"] < 15
    assert d["balanced"]["low"] > 0
    # paired: the same 30 losses on top of a different base accuracy give the same interval
    y2, ref2, new2 = _pair(400, right=200, lost=30, gained=0)
    assert paired_bootstrap_drops(ref2, new2, y2)["top1"]["high"] < 15


def test_paired_bootstrap_matches_drops_points_and_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 120)
    y[y == 3], y[:2] = 2, 3  # a class of two images: many resamples miss it, and balanced accuracy skips it there
    ref = rng.dirichlet(np.ones(7), 120)
    new = np.abs(ref + rng.normal(0, 0.05, ref.shape))
    d = paired_bootstrap_drops(ref, new, y, positive=IDX["mel"], n_boot=200, seed=3)
    points = drops_points(classification_report(ref, y, HAM), classification_report(new, y, HAM))
    assert {k: d[k]["point"] for k in points} == pytest.approx(points)
    # the vectorised rounds are the rounds of the obvious loop, same generator, same draws
    gen = np.random.default_rng(3)
    loop = []
    for _ in range(200):
        i = gen.integers(0, 120, 120)
        loop.append(100 * (balanced_accuracy(ranking(ref[i])[:, 0], y[i], 7)
                           - balanced_accuracy(ranking(new[i])[:, 0], y[i], 7)))
    assert [d["balanced"]["low"], d["balanced"]["high"]] == pytest.approx(np.percentile(loop, [2.5, 97.5]))
    assert d == paired_bootstrap_drops(ref, new, y, positive=IDX["mel"], n_boot=200, seed=3)  # a fixed seed repeats
    assert paired_bootstrap_drops(ref, new, y, n_boot=200)["mel_recall"] is None


def test_budget_steps_one_flipped_image_per_metric() -> None:
    y = np.repeat(np.arange(7), [24, 40, 97, 9, 83, 119, 12])  # the quick recipe's 384 validation images
    s = budget_steps(y, HAM)
    assert s["top1"] == {"step_points": pytest.approx(100 / 384), "images": 384}
    assert s["balanced"] == {"step_points": pytest.approx(100 / (7 * 9)), "images": 9, "class": "df", "classes": 7}
    assert s["mel_recall"] == {"step_points": pytest.approx(100 / 83), "images": 83, "class": "mel"}
    # an absent class does not count towards K, and no melanoma means no step
    s = budget_steps(np.array([0, 0, 1, 1, 1]), HAM)
    assert s["balanced"]["step_points"] == pytest.approx(100 / (2 * 2))
    assert s["mel_recall"] == {"step_points": None, "images": 0, "class": "mel"}
    assert budget_steps(np.array([0, 1]), ("a", "b"))["mel_recall"] is None
