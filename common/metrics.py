"""Evaluation metrics on numpy arrays (sklearn where it has them) and a bootstrap confidence interval.

Every function takes array-likes and returns a python float, so results go straight into JSON.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn import metrics as skm


def _arr(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x)


def mae(y_true: object, y_pred: object) -> float:
    return float(skm.mean_absolute_error(_arr(y_true), _arr(y_pred)))


def rmse(y_true: object, y_pred: object) -> float:
    return float(np.sqrt(skm.mean_squared_error(_arr(y_true), _arr(y_pred))))


def r2(y_true: object, y_pred: object) -> float:
    return float(skm.r2_score(_arr(y_true), _arr(y_pred)))


def smape_terms(y_true: object, y_pred: object) -> np.ndarray:
    """Per-row SMAPE in percent, 0 to 200: 200 |p - a| / (|a| + |p|); a row with a = p = 0 counts 0."""
    a = _arr(y_true).astype(np.float64)
    p = _arr(y_pred).astype(np.float64)
    denom = np.abs(a) + np.abs(p)
    return np.divide(200.0 * np.abs(p - a), denom, out=np.zeros_like(denom), where=denom > 0)


def smape(y_true: object, y_pred: object) -> float:
    """SMAPE in percent, 0 to 200: 100 * mean(|p - a| / ((|a| + |p|) / 2)); a term with a = p = 0 counts 0."""
    return float(smape_terms(y_true, y_pred).mean())


def accuracy(y_true: object, y_pred: object) -> float:
    return float(skm.accuracy_score(_arr(y_true), _arr(y_pred)))


def top_k_accuracy(y_true: object, scores: object, k: int = 5) -> float:
    """Fraction of rows whose true class is among the k highest scores (`scores` is `[N, C]`)."""
    s = _arr(scores)
    return float(skm.top_k_accuracy_score(_arr(y_true), s, k=k, labels=np.arange(s.shape[1])))


def macro_f1(y_true: object, y_pred: object) -> float:
    return float(skm.f1_score(_arr(y_true), _arr(y_pred), average="macro", zero_division=0))


def auroc(y_true: object, y_score: object) -> float:
    """Area under the ROC curve for binary labels and scores (probabilities of the positive class)."""
    return float(skm.roc_auc_score(_arr(y_true), _arr(y_score)))


def auprc(y_true: object, y_score: object) -> float:
    """Area under the precision-recall curve (average precision)."""
    return float(skm.average_precision_score(_arr(y_true), _arr(y_score)))


def brier(y_true: object, y_prob: object) -> float:
    """Mean squared difference between the predicted probability and the 0/1 outcome."""
    return float(skm.brier_score_loss(_arr(y_true), _arr(y_prob)))


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: object, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, lower, upper) of a percentile bootstrap (1 - alpha) interval over rows.

    Rows are resampled jointly across `arrays`. Resamples where the metric is undefined (e.g. one class only for
    AUROC) are drawn again, up to `n_boot` extra draws.
    """
    arrs = [_arr(a) for a in arrays]
    n = len(arrs[0])
    if n == 0 or any(len(a) != n for a in arrs):
        raise ValueError(f"bootstrap_ci needs non-empty arrays of equal length, got {[len(a) for a in arrs]}")
    point = float(metric_fn(*arrs))
    rng = np.random.default_rng(seed)
    stats: list[float] = []
    attempts = 0
    while len(stats) < n_boot and attempts < 2 * n_boot:
        attempts += 1
        idx = rng.integers(0, n, size=n)
        try:
            with warnings.catch_warnings():  # sklearn warns (and returns nan) on one-class resamples
                warnings.simplefilter("ignore")
                value = float(metric_fn(*(a[idx] for a in arrs)))
        except ValueError:
            continue
        if np.isfinite(value):
            stats.append(value)
    if not stats:
        raise ValueError("bootstrap_ci: the metric was undefined on every resample")
    low, high = np.quantile(np.asarray(stats), [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)


def _rows_of_groups(groups: object) -> list[np.ndarray]:
    """Row indices of each distinct group (groups in sorted order)."""
    _, group_of = np.unique(_arr(groups), return_inverse=True)
    order = np.argsort(group_of, kind="stable")
    starts = np.searchsorted(group_of[order], np.arange(group_of.max() + 1))
    return np.split(order, starts[1:])


def grouped_bootstrap_ci(metric_fn: Callable[..., float], *arrays: object, groups: object, n_boot: int = 1000,
                         alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, lower, upper) of a percentile bootstrap interval that resamples whole groups (subjects,
    patients, product families) with replacement, each drawn group bringing all its rows.

    Rows of one group are not independent, so resampling rows gives intervals that are too narrow. bootstrap_ci draws
    the group indices here (same retry rule for undefined resamples); each draw scores `metric_fn` on the
    concatenated rows of the drawn groups. With one row per group this equals the row bootstrap on group order.
    """
    arrs = [_arr(a) for a in arrays]
    rows_of = _rows_of_groups(groups)

    def on_groups(drawn: np.ndarray) -> float:
        rows = np.concatenate([rows_of[g] for g in drawn])
        return metric_fn(*(a[rows] for a in arrs))

    return bootstrap_ci(on_groups, np.arange(len(rows_of)), n_boot=n_boot, alpha=alpha, seed=seed)


def grouped_mean_bootstrap_ci(terms: object, groups: object, n_boot: int = 1000, alpha: float = 0.05,
                              seed: int = 0) -> tuple[float, float]:
    """(lower, upper) percentile bootstrap interval of the mean of per-row `terms` (absolute errors, SMAPE terms, a
    paired difference of them) when whole groups are resampled with replacement: each draw's mean is the drawn groups'
    term sums over their row counts, computed for every draw at once (no Python loop over draws)."""
    terms = _arr(terms).astype(np.float64)
    _, group_of = np.unique(_arr(groups), return_inverse=True)
    n_groups = int(group_of.max()) + 1
    term_sum = np.bincount(group_of, weights=terms, minlength=n_groups)
    count = np.bincount(group_of, minlength=n_groups).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    stats = term_sum[draws].sum(1) / count[draws].sum(1)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
