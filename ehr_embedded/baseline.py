"""Baseline: count features + logistic regression on the same stored sequences and splits as the transformers.

    python -m ehr_embedded.baseline --config configs/ehr_embedded/baseline.yaml

Features: log(1 + count) of each code in the sequence (exactly the events the transformer sees: same cut at
prediction_time; set `max_length` to the model's max_length when it is shorter than the store's). L2-regularised logistic regression with balanced class weights; C picked by
tuning AUROC, threshold by tuning F1; held_out scored with bootstrap 95% intervals (reports/baseline_held_out.json).
Codes never seen in training get zero weight here: counting cannot use what only a description says.
`features=mean_embedding` instead averages the frozen description embeddings of the sequence (a linear probe of
the representation the transformers start from).
Regression stores (float_value labels): Ridge on the same features, alpha = 1 / C over `c_grid` picked by tuning MAE,
scored with evaluate's regression metrics (MAE, RMSE, R^2 and the train-median predictor's MAE) and predictions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from common import metrics
from common.cli import UserError, config_main
from common.io import write_json
from common.logs import setup_logging
from ehr_embedded.config import BaselineConfig
from ehr_embedded.data import kept_indices
from ehr_embedded.evaluate import (
    binary_metrics,
    choose_threshold,
    regression_metrics,
    write_predictions,
    write_regression_predictions,
)
from ehr_embedded.storage import SequenceStore, load_dataset_table, open_split

log = logging.getLogger(__name__)


def count_features(store: SequenceStore, n_codes: int, max_length: int | None = None) -> sp.csr_matrix:
    """`[S, n_codes]` sparse log(1 + count of each code) over the events a model with `max_length` sees."""
    rows, cols = [], []
    for i in range(len(store)):
        ids = np.asarray(store[i]["token_ids"], np.int64)[kept_indices(int(store.lengths[i]), int(store.n_static[i]),
                                                                       max_length)]
        rows.append(np.full(len(ids), i))
        cols.append(ids)
    rows_flat, cols_flat = np.concatenate(rows), np.concatenate(cols)
    counts = sp.csr_matrix((np.ones(len(rows_flat), np.float32), (rows_flat, cols_flat)), shape=(len(store), n_codes))
    counts.sum_duplicates()
    counts.data = np.log1p(counts.data)
    return counts


def mean_embedding_features(store: SequenceStore, embeddings: np.ndarray, max_length: int | None = None) -> np.ndarray:
    """`[S, D]` mean of the frozen code-description embeddings over each sequence's most recent events."""
    out = np.zeros((len(store), embeddings.shape[1]), np.float32)
    for i in range(len(store)):
        keep = kept_indices(int(store.lengths[i]), int(store.n_static[i]), max_length)
        out[i] = embeddings[np.asarray(store[i]["token_ids"], np.int64)[keep]].mean(0)
    return out


def fit_baseline(cfg: BaselineConfig) -> dict:
    table = load_dataset_table(Path(cfg.embedding_output_dir))
    stores = {s: open_split(Path(cfg.embedding_output_dir), s) for s in ("train", "tuning", "held_out")}
    regression = stores["train"].is_regression
    for split, store in stores.items():
        if regression and len(store) == 0:
            raise UserError(f"{cfg.embedding_output_dir}/{split}: the baseline needs sequences in every split")
        if not regression and (len(store) == 0 or len(np.unique(store.labels)) < 2):
            raise UserError(f"{cfg.embedding_output_dir}/{split}: the baseline needs both classes in every split")
    if cfg.features == "counts":
        x = {s: count_features(st, len(table.vocab), cfg.max_length) for s, st in stores.items()}
    else:
        emb = np.asarray(table.embeddings, np.float32)
        x = {s: mean_embedding_features(st, emb, cfg.max_length) for s, st in stores.items()}
        scaler = StandardScaler().fit(x["train"])  # the means are tiny (unit vectors averaged): standardise on train
        x = {s: scaler.transform(v) for s, v in x.items()}
    y = {s: st.labels for s, st in stores.items()}
    if regression:
        return fit_ridge(cfg, stores, x, y)
    best = None
    for c in cfg.c_grid:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=cfg.seed)
        clf.fit(x["train"], y["train"])
        tuning_auroc = metrics.auroc(y["tuning"], clf.predict_proba(x["tuning"])[:, 1])
        log.info("C=%g tuning AUROC %.4f", c, tuning_auroc)
        if best is None or tuning_auroc > best[0]:
            best = (tuning_auroc, c, clf)
    tuning_auroc, c, clf = best
    threshold = choose_threshold(y["tuning"], clf.predict_proba(x["tuning"])[:, 1])
    score = clf.predict_proba(x["held_out"])[:, 1]
    name = "log1p code counts" if cfg.features == "counts" else "mean MiniLM code embedding"
    report = {"model": f"{name} + logistic regression", "features": cfg.features, "C": c, "max_length": cfg.max_length, "tuning_auroc": tuning_auroc,
              "split": "held_out", **binary_metrics(y["held_out"], score, threshold, cfg.n_bootstrap, cfg.seed,
                                                subject_ids=stores["held_out"].sequences["subject_id"].to_numpy())}
    out = Path(cfg.output_dir)
    write_json(out / "reports" / "baseline_held_out.json", report)
    write_predictions(out / "predictions" / "held_out.parquet", stores["held_out"].sequences, y["held_out"], score,
                      threshold)
    log.info("baseline held_out AUROC %.4f [%.4f, %.4f] (C=%g)", report["auroc"]["value"], report["auroc"]["low"],
             report["auroc"]["high"], c)
    return report


def fit_ridge(cfg: BaselineConfig, stores: dict, x: dict, y: dict) -> dict:
    """The regression baseline: Ridge with alpha = 1 / C over `c_grid`, the lowest tuning MAE kept."""
    best = None
    for c in cfg.c_grid:
        reg = Ridge(alpha=1.0 / c, random_state=cfg.seed).fit(x["train"], y["train"])
        tuning_mae = float(np.mean(np.abs(reg.predict(x["tuning"]) - y["tuning"])))
        log.info("alpha=%g tuning MAE %.4f", 1.0 / c, tuning_mae)
        if best is None or tuning_mae < best[0]:
            best = (tuning_mae, c, reg)
    tuning_mae, c, reg = best
    pred = np.asarray(reg.predict(x["held_out"]), np.float64)
    name = "log1p code counts" if cfg.features == "counts" else "mean MiniLM code embedding"
    report = {"model": f"{name} + ridge regression", "features": cfg.features, "alpha": 1.0 / c,
              "max_length": cfg.max_length, "tuning_mae": tuning_mae, "split": "held_out",
              **regression_metrics(y["held_out"], pred, float(np.median(y["train"])), cfg.n_bootstrap, cfg.seed,
                                   subject_ids=stores["held_out"].sequences["subject_id"].to_numpy())}
    out = Path(cfg.output_dir)
    write_json(out / "reports" / "baseline_held_out.json", report)
    write_regression_predictions(out / "predictions" / "held_out.parquet", stores["held_out"].sequences,
                                 y["held_out"], pred)
    log.info("baseline held_out MAE %.4f [%.4f, %.4f] (median predictor %.4f; alpha=%g)", report["mae"]["value"],
             report["mae"]["low"], report["mae"]["high"], report["median_baseline_mae"]["value"], 1.0 / c)
    return report


def run(cfg: BaselineConfig) -> int:
    setup_logging()
    fit_baseline(cfg)
    return 0


main = config_main(BaselineConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
