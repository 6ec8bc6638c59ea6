"""Baseline: count features + logistic regression on the same stored sequences and splits as the transformers.

    python -m ehr_embedded.baseline --config configs/ehr_embedded/baseline.yaml

Features: log(1 + count) of each code in the sequence (exactly the events the transformer sees: same cut at
prediction_time; set `max_length` to the model's max_length when it is shorter than the store's). L2-regularised logistic regression with balanced class weights; C picked by
tuning AUROC, threshold by tuning F1; held_out scored with bootstrap 95% intervals (reports/baseline_held_out.json).
Codes never seen in training get zero weight here: counting cannot use what only a description says.
`features=mean_embedding` instead averages the frozen description embeddings of the sequence (a linear probe of
the representation the transformers start from).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from common import metrics
from common.cli import UserError, config_main
from common.io import write_json
from common.logs import setup_logging
from ehr_embedded.config import BaselineConfig
from ehr_embedded.data import kept_indices
from ehr_embedded.evaluate import binary_metrics, choose_threshold, write_predictions
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
    for split, store in stores.items():
        if len(store) == 0 or len(np.unique(store.labels)) < 2:
            raise UserError(f"{cfg.embedding_output_dir}/{split}: the baseline needs both classes in every split")
    if cfg.features == "counts":
        x = {s: count_features(st, len(table.vocab), cfg.max_length) for s, st in stores.items()}
    else:
        emb = np.asarray(table.embeddings, np.float32)
        x = {s: mean_embedding_features(st, emb, cfg.max_length) for s, st in stores.items()}
        scaler = StandardScaler().fit(x["train"])  # the means are tiny (unit vectors averaged): standardise on train
        x = {s: scaler.transform(v) for s, v in x.items()}
    y = {s: st.labels for s, st in stores.items()}
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


def run(cfg: BaselineConfig) -> int:
    setup_logging()
    fit_baseline(cfg)
    return 0


main = config_main(BaselineConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
