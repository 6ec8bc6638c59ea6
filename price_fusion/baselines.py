"""Baselines as a stage: median price, kNN and ridge, each with honest out-of-fold and test predictions.

    python -m price_fusion.baselines --config configs/price_fusion/demo.yaml run_name=demo_baselines
    python -m price_fusion.baselines --config ... baselines.methods=[knn,ridge] baselines.folds=3

For each method: out-of-fold predictions of every training product over baselines.folds grouped folds (the folds
`train.kfold` and `gbt.folds` draw for the same K and seed), and test predictions from a fit on every training
product. k (kNN) and alpha (ridge) are chosen on each fit's own training rows by grouped cross-validation
(baselines.cv_folds), so no group is ever on both sides of a choice either. All regress log price (SMAPE is
scale-free) and predict dollars:

- median: the training median price (the SMAPE-optimal constant is near the median);
- knn: cosine kNN on the text embeddings (brute force: exact, and fastest at these sizes), uniform or
  distance-weighted;
- ridge: ridge regression on the text embeddings + the structural features (standardised on the training rows).

Writes <run>/<method>/predictions/oof_predictions.csv (sample_id,price,actual) and test_out.csv (sample_id,price),
laid out like a training run's predictions, so `evaluate evaluate.predictions=FILE` and `ensemble` take them as they are;
<run>/split.json and <run>/reports/baselines_summary.json (out-of-fold SMAPE and chosen parameters per method).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from common import metrics
from common.cli import config_main
from common.config import save_resolved_config
from common.logs import setup_logging, write_json

from .batching import FusionTensors, load_split
from .config import BaselinesConfig, PriceFusionConfig
from .data import grouped_folds, product_groups, read_catalog
from .prediction_files import log_to_price, write_predictions

log = logging.getLogger(__name__)


def grouped_cv(n_splits: int, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner cross-validation splits over whole groups (sklearn GroupKFold, shuffled), at most one fold per group."""
    n_splits = max(2, min(n_splits, len(np.unique(groups))))
    return list(GroupKFold(n_splits, shuffle=True, random_state=seed).split(groups, groups=groups))


def median_baseline(train_price: np.ndarray, n_test: int) -> np.ndarray:
    """The training median price for every product."""
    return np.full(n_test, float(np.median(train_price)))


def knn_baseline(train_x: np.ndarray, train_price: np.ndarray, test_x: np.ndarray, groups: np.ndarray,
                 ks: list[int], cv_folds: int = 5, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Cosine kNN regression of log price; k and the weighting chosen by grouped CV on the training rows."""
    cv = grouped_cv(cv_folds, groups, seed)
    smallest_fit = min(len(fit) for fit, _ in cv)
    k_options = [k for k in ks if k <= smallest_fit] or [1]
    search = GridSearchCV(KNeighborsRegressor(metric="cosine", algorithm="brute"),
                          {"n_neighbors": k_options, "weights": ["uniform", "distance"]},
                          scoring="neg_mean_absolute_error", cv=cv)
    search.fit(train_x, np.log(train_price))
    return np.exp(search.predict(test_x)), {k: (v.item() if hasattr(v, "item") else v)
                                            for k, v in search.best_params_.items()}


def ridge_baseline(train_x: np.ndarray, train_price: np.ndarray, test_x: np.ndarray, groups: np.ndarray,
                   alphas: list[float], cv_folds: int = 5, seed: int = 0, n_standardised: int = 0) -> tuple[np.ndarray, dict]:
    """Ridge regression of log price; the last `n_standardised` columns (the structural features) are standardised
    with the training rows' statistics; alpha chosen by grouped CV on the training rows."""
    width = train_x.shape[1]
    scale = ColumnTransformer([("struct", StandardScaler(), list(range(width - n_standardised, width)))],
                              remainder="passthrough")
    search = GridSearchCV(Pipeline([("scale", scale), ("ridge", Ridge())]), {"ridge__alpha": list(alphas)},
                          scoring="neg_mean_absolute_error", cv=grouped_cv(cv_folds, groups, seed))
    search.fit(train_x, np.log(train_price))
    return np.exp(search.predict(test_x)), {"alpha": float(search.best_params_["ridge__alpha"])}


def method_inputs(method: str, data: FusionTensors) -> np.ndarray:
    """The feature matrix a method reads: text embeddings (knn), text + structural features (ridge)."""
    text = data.text.numpy().astype(np.float64)
    return np.hstack([text, data.struct.numpy().astype(np.float64)]) if method == "ridge" else text


def fit_predict(method: str, bc: BaselinesConfig, train_data: FusionTensors, train_price: np.ndarray,
                groups: np.ndarray, query: FusionTensors, seed: int) -> tuple[np.ndarray, dict]:
    """Dollar predictions of `query` by `method` fitted on the training rows (hyperparameters chosen on them)."""
    if method == "median":
        return median_baseline(train_price, len(query)), {}
    x, q = method_inputs(method, train_data), method_inputs(method, query)
    if method == "knn":
        return knn_baseline(x, train_price, q, groups, bc.knn_ks, bc.cv_folds, seed)
    return ridge_baseline(x, train_price, q, groups, bc.ridge_alphas, bc.cv_folds, seed,
                          n_standardised=train_data.struct.shape[1])


def baselines(cfg: PriceFusionConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    setup_logging(run_dir)
    save_resolved_config(cfg, run_dir)
    bc, dc = cfg.baselines, cfg.data
    catalog, data = load_split(dc.embeddings_dir, "train", dc.train_csv, labelled=True, bad_price=dc.bad_price,
                               use_image=cfg.model.use_image, group_column=dc.group_column, structural=dc.structural)
    test_data, test_ids = None, None
    if Path(dc.test_csv).is_file() and (Path(dc.embeddings_dir) / "test").is_dir():
        _, test_data = load_split(dc.embeddings_dir, "test", dc.test_csv, labelled=False, structural=dc.structural)
        test_ids = read_catalog(dc.test_csv, require_price=False, require_text=False).sample_ids
    groups = product_groups(catalog, dc.group_key)
    folds = grouped_folds(catalog.prices, groups, bc.folds, dc.n_price_bins, dc.split_seed)
    write_json(run_dir / "split.json", {"kfold": bc.folds, "groups": dc.group_column or dc.group_key,
                                        "val_ids": [catalog.sample_ids[v].tolist() for _, v in folds]})
    summary = {}
    with threadpool_limits(limits=bc.num_threads or None):
        for method in bc.methods:
            oof, fold_params = np.zeros(len(data)), []
            for k, (fit_rows, held_out) in enumerate(folds):
                oof[held_out], params = fit_predict(method, bc, data.subset(fit_rows), catalog.prices[fit_rows],
                                                    groups[fit_rows], data.subset(held_out), dc.split_seed + k)
                fold_params.append(params)
            out = run_dir / method / "predictions"
            write_predictions(out / "oof_predictions.csv", catalog.sample_ids, oof, actual=catalog.prices)
            summary[method] = {"oof_smape": metrics.smape(catalog.prices, oof), "fold_params": fold_params}
            if test_data is not None:
                test_pred, params = fit_predict(method, bc, data, catalog.prices, groups, test_data, dc.split_seed)
                write_predictions(out / "test_out.csv", test_data.sample_ids, log_to_price(np.log(test_pred)),
                                  expected_ids=test_ids)
                summary[method]["params"] = params
            log.info("%s: out-of-fold SMAPE %.3f%% over %d grouped folds (%s)", method, summary[method]["oof_smape"],
                     len(folds), summary[method].get("params", fold_params[-1]))
    write_json(run_dir / "reports" / "baselines_summary.json", {"n": len(data), "folds": bc.folds,
                                                                 "n_groups": int(len(np.unique(groups))), **summary})
    return 0


main = config_main(PriceFusionConfig, baselines, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
