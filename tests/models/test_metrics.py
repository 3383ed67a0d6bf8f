"""Metrics are pure numpy functions: they must equal sklearn's on fixed predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from models import metrics

NAMES = ["a", "b", "c", "d"]


@pytest.fixture
def fixed():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    y[y == 3] = 2  # class "d" never occurs in y ...
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_summary_equals_sklearn(fixed):
    y, probs = fixed
    pred = probs.argmax(1)
    assert (pred == 3).any(), "the fixture must predict the absent class sometimes"
    s = metrics.summary(y, probs, NAMES)
    assert s["top1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert s["top5"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=4, labels=range(4)))
    for ours, avg in (("macro_f1", skm.f1_score), ("macro_precision", skm.precision_score), ("macro_recall", skm.recall_score)):
        assert s[ours] == pytest.approx(avg(y, pred, average="macro", zero_division=0)), ours
    assert s["confusion"] == skm.confusion_matrix(y, pred, labels=range(4)).tolist()
    recall = skm.recall_score(y, pred, average=None, labels=range(3), zero_division=0)
    assert [s["per_class_accuracy"][n] for n in NAMES[:3]] == pytest.approx(list(recall))
    assert s["per_class_accuracy"]["d"] is None  # no support: undefined, not 0
    assert metrics.top_k(y, probs, 2) == pytest.approx(skm.top_k_accuracy_score(y, probs, k=2, labels=range(4)))


def test_ece_by_hand():
    # Two bins used: conf 0.9 (2 right of 2) and conf 0.6 (1 right of 2): ECE = .5*|1-.9| + .5*|.5-.6| = 0.1
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 0, 0, 0])
    assert metrics.ece(y, probs, bins=10) == pytest.approx(0.1)
    perfect = np.eye(3)[[0, 1, 2]]
    assert metrics.ece(np.array([0, 1, 2]), perfect) == pytest.approx(0.0)


def test_mean_std_and_plots(tmp_path, fixed):
    assert metrics.mean_std([0.8, 0.9]) == pytest.approx((0.85, np.std([0.8, 0.9], ddof=1)))
    y, probs = fixed
    s = metrics.summary(y, probs, NAMES)
    for p in (metrics.plot_confusion(np.array(s["confusion"]), NAMES, tmp_path / "cm.png"),
              metrics.plot_per_class(s["per_class_accuracy"], tmp_path / "pc.png"),
              metrics.plot_curves({"f0": [{"epoch": 0, "train/loss": 1.0, "val/loss": 1.1, "val/acc": 0.5}]}, tmp_path / "c.png")):
        assert p.stat().st_size > 1000
