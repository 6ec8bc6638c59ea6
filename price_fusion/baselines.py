"""Baselines measured beside the fusion model on the same split: median price, kNN and ridge on text embeddings.

All regress log price (SMAPE is scale-free, so log space is the natural one) and return dollar predictions.
Hyperparameters (k, ridge alpha) are chosen by cross-validation on the training rows only.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KNeighborsRegressor

KNN_KS = (1, 3, 5, 10, 20, 40)
RIDGE_ALPHAS = tuple(np.logspace(-3, 3, 13))
CV_FOLDS = 5


def median_baseline(train_price: np.ndarray, n_test: int) -> np.ndarray:
    """The training median price for every product (the SMAPE-optimal constant is near the median)."""
    return np.full(n_test, float(np.median(train_price)))


def knn_baseline(train_x: np.ndarray, train_price: np.ndarray, test_x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Cosine kNN regression of log price (brute force: exact, and fastest at these sizes); k and weighting by CV."""
    k_options = [k for k in KNN_KS if k <= int(len(train_x) * (1 - 1 / CV_FOLDS))]
    search = GridSearchCV(KNeighborsRegressor(metric="cosine", algorithm="brute"),
                          {"n_neighbors": k_options, "weights": ["uniform", "distance"]},
                          scoring="neg_mean_absolute_error", cv=KFold(CV_FOLDS, shuffle=True, random_state=seed))
    search.fit(train_x, np.log(train_price))
    return np.exp(search.predict(test_x)), dict(search.best_params_)


def ridge_baseline(train_x: np.ndarray, train_price: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Ridge regression of log price; alpha by efficient leave-one-out CV (RidgeCV)."""
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(train_x, np.log(train_price))
    return np.exp(model.predict(test_x)), {"alpha": float(model.alpha_)}
