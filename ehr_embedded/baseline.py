"""Baseline: count features + logistic regression on the same stored sequences and splits as the transformers.

    python -m ehr_embedded.baseline --config configs/ehr_embedded/baseline.yaml

Features: log(1 + count) of each code in the sequence (exactly the events the transformer sees: same cut at
prediction_time; set `max_length` to the model's max_length when it is shorter than the store's). L2-regularised logistic regression with balanced class weights; C picked by
tuning AUROC, threshold by tuning F1; held_out scored with bootstrap 95% intervals (reports/baseline_held_out.json).
`selection=grouped_cv cv_folds=K` picks C instead by the mean AUROC over K subject-grouped folds of train + tuning
pooled (ehr_embedded.cv_folds.assign_folds: the folds `optuna.cv_folds` cuts for the same K and seed), then fits on
train and picks the threshold on tuning as before; the report keeps every C's per-fold AUROCs (classification only).
Codes never seen in training get zero weight here: counting cannot use what only a description says.
`features=mean_embedding` instead averages the frozen description embeddings of the sequence (a linear probe of
the representation the transformers start from).
Regression stores (float_value labels): Ridge on the same features, alpha = 1 / C over `c_grid` picked by tuning MAE,
scored with evaluate's regression metrics (MAE, RMSE, R^2 and the train-median predictor's MAE) and predictions.
Multi-label stores (data.task_labels): one logistic regression per task on the rows where it has a label (C and
threshold on that task's tuning rows), scored with evaluate's multi-label metrics and long predictions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from common import metrics
from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import setup_logging
from ehr_embedded.config import BaselineConfig
from ehr_embedded.cv_folds import assign_folds
from ehr_embedded.data import kept_indices
from ehr_embedded.evaluate import binary_metrics, choose_threshold, multilabel_metrics, regression_metrics
from ehr_embedded.prediction_files import write_multilabel_predictions, write_predictions, write_regression_predictions
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
    multilabel = stores["train"].is_multilabel
    for split, store in stores.items():
        if (regression or multilabel) and len(store) == 0:
            raise UserError(f"{cfg.embedding_output_dir}/{split}: the baseline needs sequences in every split")
        if not regression and not multilabel and (len(store) == 0 or len(np.unique(store.labels)) < 2):
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
        if cfg.selection == "grouped_cv":
            raise UserError(f"{cfg.embedding_output_dir}: selection=grouped_cv is for classification stores; this one "
                            "holds float (regression) labels, use selection=tuning")
        return fit_ridge(cfg, stores, x, y)
    if multilabel:
        return fit_multilabel(cfg, stores, x, y)
    cv = grouped_cv_scores(cfg, stores, x, y) if cfg.selection == "grouped_cv" else None
    best = None
    for c in cfg.c_grid:
        clf = logistic(c, cfg).fit(x["train"], y["train"])
        tuning_auroc = metrics.auroc(y["tuning"], clf.predict_proba(x["tuning"])[:, 1])
        log.info("C=%g tuning AUROC %.4f", c, tuning_auroc)
        score = tuning_auroc if cv is None else cv[c]["mean"]
        if best is None or score > best[0]:  # the first of equal scores wins (grid order)
            best = (score, c, clf, tuning_auroc)
    _, c, clf, tuning_auroc = best
    selection = {"selection": cfg.selection}
    if cv is not None:
        selection.update(cv_folds=cfg.cv_folds, cv_seed=cfg.cv_seed,
                         selection_auroc={str(k): v["mean"] for k, v in cv.items()},
                         selection_auroc_sd={str(k): v["sd"] for k, v in cv.items()},
                         selection_fold_aurocs={str(k): v["folds"] for k, v in cv.items()})
    threshold = choose_threshold(y["tuning"], clf.predict_proba(x["tuning"])[:, 1])
    score = clf.predict_proba(x["held_out"])[:, 1]
    name = "log1p code counts" if cfg.features == "counts" else "mean MiniLM code embedding"
    report = {"model": f"{name} + logistic regression", "features": cfg.features, "C": c, "max_length": cfg.max_length,
              "tuning_auroc": tuning_auroc, **selection, "split": "held_out",
              **binary_metrics(y["held_out"], score, threshold, cfg.n_bootstrap, cfg.seed,
                               subject_ids=stores["held_out"].sequences["subject_id"].to_numpy())}
    out = Path(cfg.output_dir)
    write_json(out / "reports" / "baseline_held_out.json", report)
    write_predictions(out / "predictions" / "held_out.parquet", stores["held_out"].sequences, y["held_out"], score,
                      threshold)
    log.info("baseline held_out AUROC %.4f [%.4f, %.4f] (C=%g by %s)", report["auroc"]["value"],
             report["auroc"]["low"], report["auroc"]["high"], c, cfg.selection)
    return report


def logistic(c: float, cfg: BaselineConfig) -> LogisticRegression:
    """The classifier fitted for every C (and every fold): L2, balanced class weights."""
    return LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=cfg.seed)


def pooled_folds(cfg: BaselineConfig, stores: dict, x: dict, y: dict) -> tuple:
    """(x, y, fold) of train + tuning pooled, train's rows first: the rows and folds cv_folds.materialise_folds
    uses for the same store, `cv_folds` and `cv_seed`."""
    subjects = np.concatenate([stores[s].sequences["subject_id"].to_numpy() for s in ("train", "tuning")])
    labels = np.concatenate([y["train"], y["tuning"]])
    xs = (x["train"], x["tuning"])
    pooled = sp.vstack(xs, format="csr") if sp.issparse(x["train"]) else np.concatenate(xs)
    return pooled, labels, assign_folds(subjects, labels, cfg.cv_folds, cfg.cv_seed, key="cv_folds")


def grouped_cv_scores(cfg: BaselineConfig, stores: dict, x: dict, y: dict) -> dict[float, dict]:
    """C -> {"mean", "sd", "folds"}: the AUROC on each subject-grouped fold of a fit on the other folds."""
    pooled, labels, folds = pooled_folds(cfg, stores, x, y)
    out = {}
    for c in cfg.c_grid:
        per_fold = []
        for fold in range(cfg.cv_folds):
            test = folds == fold
            clf = logistic(c, cfg).fit(pooled[~test], labels[~test])
            per_fold.append(metrics.auroc(labels[test], clf.predict_proba(pooled[test])[:, 1]))
        out[c] = {"mean": float(np.mean(per_fold)), "sd": float(np.std(per_fold, ddof=1)), "folds": per_fold}
        log.info("C=%g grouped_cv AUROC %.4f +- %.4f over %d folds", c, out[c]["mean"], out[c]["sd"], cfg.cv_folds)
    return out


def fit_multilabel(cfg: BaselineConfig, stores: dict, x: dict, y: dict) -> dict:
    """The multi-label baseline: one logistic regression per task on the rows where that task has a label (C and the
    threshold chosen on that task's tuning rows, as for one task), scored with evaluate's multi-label metrics; each
    task's C and tuning AUROC are kept in its entry of the report's `tasks`."""
    tasks = stores["train"].task_names
    if cfg.selection == "grouped_cv":
        raise UserError(f"{cfg.embedding_output_dir}: selection=grouped_cv is for single-task classification stores; "
                        f"this one is multi-label ({tasks}), use selection=tuning")
    probs = np.zeros(y["held_out"].shape, np.float64)
    chosen = []
    for k, task in enumerate(tasks):
        rows = {s: y[s][:, k] >= 0 for s in y}
        for split in ("train", "tuning"):
            if len(np.unique(y[split][rows[split], k])) < 2:
                raise UserError(f"{cfg.embedding_output_dir}/{split}: task '{task}' needs both classes among its "
                                f"labelled rows for the baseline")
        best = None
        for c in cfg.c_grid:
            clf = logistic(c, cfg).fit(x["train"][rows["train"]], y["train"][rows["train"], k])
            tuning_auroc = metrics.auroc(y["tuning"][rows["tuning"], k],
                                         clf.predict_proba(x["tuning"][rows["tuning"]])[:, 1])
            if best is None or tuning_auroc > best[0]:  # the first of equal scores wins (grid order)
                best = (tuning_auroc, c, clf)
        tuning_auroc, c, clf = best
        threshold = choose_threshold(y["tuning"][rows["tuning"], k],
                                     clf.predict_proba(x["tuning"][rows["tuning"]])[:, 1])
        probs[:, k] = clf.predict_proba(x["held_out"])[:, 1]
        chosen.append({"C": c, "tuning_auroc": tuning_auroc, "threshold": threshold})
        log.info("task %s: C=%g tuning AUROC %.4f", task, c, tuning_auroc)
    thresholds = [t["threshold"] for t in chosen]
    name = "log1p code counts" if cfg.features == "counts" else "mean MiniLM code embedding"
    scores = multilabel_metrics(y["held_out"], probs, thresholds, tasks, cfg.n_bootstrap, cfg.seed,
                                subject_ids=stores["held_out"].sequences["subject_id"].to_numpy())
    for task, extra in zip(tasks, chosen):
        scores["tasks"][task].update(C=extra["C"], tuning_auroc=extra["tuning_auroc"])
    report = {"model": f"{name} + logistic regression per task", "features": cfg.features,
              "max_length": cfg.max_length, "selection": cfg.selection, "split": "held_out", **scores}
    out = Path(cfg.output_dir)
    write_json(out / "reports" / "baseline_held_out.json", report)
    write_multilabel_predictions(out / "predictions" / "held_out.parquet", stores["held_out"].sequences,
                                 y["held_out"], probs, thresholds, tasks)
    log.info("baseline held_out macro AUROC %s; per task %s", scores.get("macro_auroc", {}).get("value"),
             {t: scores["tasks"][t].get("auroc", {}).get("value") for t in tasks})
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
