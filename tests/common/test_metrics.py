"""Metrics against hand-computed values and sklearn; the bootstrap interval's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from common import metrics as M


def test_regression_hand_values() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.0, 2.0, 3.0, 6.0])
    assert M.mae(y, p) == pytest.approx(0.5)
    assert M.rmse(y, p) == pytest.approx(1.0)
    assert M.r2(y, p) == pytest.approx(1 - 4 / 5)
    assert M.smape(y, p) == pytest.approx(100 * (2 / 5) / 4)
    assert M.smape([0.0, 1.0], [0.0, 1.0]) == 0.0
    assert M.smape([10.0], [0.0]) == pytest.approx(200.0)
    assert M.mae(torch.tensor([1.0]), torch.tensor([3.0])) == 2.0  # tensors accepted


def test_classification_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    scores = rng.random((200, 4)) + np.eye(4)[y] * 0.5
    pred = scores.argmax(1)
    assert M.accuracy(y, pred) == pytest.approx((pred == y).mean())
    assert M.macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    top2 = np.mean([yi in np.argsort(-s)[:2] for yi, s in zip(y, scores)])
    assert M.top_k_accuracy(y, scores, k=2) == pytest.approx(top2)
    assert M.top_k_accuracy(y, scores, k=4) == 1.0


def test_binary_hand_values() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert M.auroc(y, s) == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered correctly
    assert M.auprc(y, s) == pytest.approx((1.0 + 2 / 3) / 2)
    assert M.brier(y, s) == pytest.approx(np.mean((s - y) ** 2))
    assert M.auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=2000)
    p = y + rng.normal(scale=0.5, size=2000)
    point, low, high = M.bootstrap_ci(M.mae, y, p, n_boot=300, seed=0)
    assert low < point < high
    assert high - low < 0.1  # ~ 4 standard errors of a mean of 2000 |N(0, 0.5)| draws
    assert M.bootstrap_ci(M.mae, y, p, n_boot=300, seed=0) == (point, low, high)  # seeded
    # Undefined resamples (one class only) are redrawn, not crashed on.
    yb = np.array([0] * 9 + [1])
    sb = np.linspace(0, 1, 10)
    point, low, high = M.bootstrap_ci(M.auroc, yb, sb, n_boot=200)
    assert point == 1.0 and low <= high <= 1.0
    with pytest.raises(ValueError, match="equal length"):
        M.bootstrap_ci(M.mae, [1.0, 2.0], [1.0])


def test_smape_terms_per_row() -> None:
    terms = M.smape_terms([100.0, 0.0, 10.0], [110.0, 0.0, 0.0])
    assert terms == pytest.approx([200 * 10 / 210, 0.0, 200.0])
    assert M.smape([100.0, 0.0, 10.0], [110.0, 0.0, 0.0]) == pytest.approx(terms.mean())


def test_grouped_bootstrap_draws_whole_groups():
    """The fast mean-of-terms path draws the same groups as the generic grouped bootstrap (same seeded stream), and
    with one row per group the grouped bootstrap is the row bootstrap."""
    rng = np.random.default_rng(1)
    terms, groups = rng.random(100), rng.integers(0, 17, 100)
    generic = M.grouped_bootstrap_ci(lambda t: float(np.mean(t)), terms, groups=groups, n_boot=300, seed=4)
    assert generic[0] == pytest.approx(terms.mean())
    assert M.grouped_mean_bootstrap_ci(terms, groups, n_boot=300, seed=4) == pytest.approx(generic[1:])
    by_rows = M.bootstrap_ci(lambda t: float(np.mean(t)), terms, n_boot=300, seed=4)
    assert M.grouped_bootstrap_ci(lambda t: float(np.mean(t)), terms, groups=np.arange(100), n_boot=300,
                                        seed=4) == pytest.approx(by_rows)
    # a group of 40 identical rows moves as one: its draws make the interval wider than the row bootstrap's
    heavy = np.r_[np.ones(40), rng.random(60) * 0.2]
    owners = np.r_[np.zeros(40, int), np.arange(1, 61)]
    low, high = M.grouped_mean_bootstrap_ci(heavy, owners, n_boot=500, seed=0)
    row_low, row_high = M.bootstrap_ci(lambda t: float(np.mean(t)), heavy, n_boot=500, seed=0)[1:]
    assert high - low > 2 * (row_high - row_low)
