"""Evaluate a finetuned run on one split: AUROC, AUPRC, F1, accuracy, Brier with bootstrap 95% intervals
(subjects resampled, each with all its rows), a calibration plot, and predictions in the MEDS evaluation schema.

    python -m ehr_embedded.evaluate --config configs/ehr_embedded/finetune_encoder_embedded.yaml
    python -m ehr_embedded.evaluate --config configs/ehr_embedded/finetune_encoder_embedded.yaml evaluate.split=tuning

Reads the run under `training.output_dir` (the finetune config), its `checkpoints/<evaluate.checkpoint>` and the
decision threshold finetune chose on the tuning split (reports/threshold.json). Writes
`reports/eval_<split>.json`, `plots/calibration_<split>.png`, `predictions/<split>.parquet`.

Multi-class runs (`model.num_classes > 2`, integer_value labels): accuracy, macro F1 and macro one-vs-rest AUROC
(sklearn) with the same subject bootstrap, per-class support, and predictions with the columns subject_id,
prediction_time, integer_value, predicted_integer_value (argmax), predicted_class_probabilities (list of K floats):
meds 0.4.1 defines no prediction schema and meds-evaluation's is binary only, so these names extend its
`predicted_<type>_value` pattern. No threshold and no calibration plot.

Multi-label runs (a store built from `data.task_labels`, `model.num_classes` = its number of tasks): per task the
binary metrics above on the rows where that task has a label (its own F1-best threshold from tuning); over tasks the
macro AUROC and AUPRC (mean of the per-task values) and the micro AUROC (all labelled (row, task) pairs pooled), each
with the subject bootstrap. Predictions in long form, one row per (sequence, task): subject_id, prediction_time,
task, boolean_value (null where that task has no label), predicted_boolean_value, predicted_boolean_probability.

Regression runs (`model.num_classes=1`, a store built from float_value labels): MAE, RMSE and R^2 (sklearn) of the
de-standardised predictions (finetune's reports/target_scaling.json) with the same subject bootstrap, beside the MAE
of the median predictor (the train split's median target for every row); predictions with the columns subject_id,
prediction_time, float_value, predicted_float_value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from common import metrics
from common.checkpoint import find_checkpoint, load_weights
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write, write_json
from common.logs import setup_logging
from ehr_embedded.config import TrainConfig
from ehr_embedded.engine import (
    TARGET_SCALING_FILE,
    check_table_matches,
    load_splits,
    model_for,
    pick_device,
    predict_multilabel,
    predict_probs,
    predict_values,
)
from ehr_embedded.prediction_files import (
    DEFAULT_THRESHOLD,
    run_config,
    write_multiclass_predictions,
    write_multilabel_predictions,
    write_predictions,
    write_regression_predictions,
)
from ehr_embedded.storage import CODE_TABLE_DIR

log = logging.getLogger(__name__)


def _binary_f1(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0))


def choose_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The probability threshold with the best F1 on (tuning) labels `y`; 0.5 when only one class is present."""
    from sklearn.metrics import precision_recall_curve

    if len(np.unique(y)) < 2:
        return DEFAULT_THRESHOLD
    precision, recall, thresholds = precision_recall_curve(y, score)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    return float(thresholds[int(np.argmax(f1))])


def with_intervals(out: dict, fns: dict, y: np.ndarray, pred: np.ndarray, n_boot: int, seed: int,
                   subject_ids: np.ndarray | None) -> dict:
    """`out` plus each metric of `fns` (name -> fn(y, pred)) as {value, low, high}: a percentile bootstrap 95%
    interval that resamples subjects when `subject_ids` is given (all rows of a drawn subject together), else rows."""
    if subject_ids is not None:
        out.update(n_subjects=int(len(np.unique(subject_ids))), bootstrap="subjects")
    else:
        out["bootstrap"] = "rows"
    for name, fn in fns.items():
        if subject_ids is not None:
            value, low, high = metrics.grouped_bootstrap_ci(fn, y, pred, groups=subject_ids, n_boot=n_boot, seed=seed)
        else:
            value, low, high = metrics.bootstrap_ci(fn, y, pred, n_boot=n_boot, seed=seed)
        out[name] = {"value": value, "low": low, "high": high}
    return out


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0,
                   subject_ids: np.ndarray | None = None) -> dict[str, dict[str, float] | float | int]:
    """Each metric as {value, low, high} (percentile bootstrap 95%); ranking metrics need both classes.

    With `subject_ids` the bootstrap resamples subjects (all rows of a drawn subject together), else rows.
    """
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=np.float64)
    fns = {"f1": lambda a, s: _binary_f1(a, s >= threshold),
           "accuracy": lambda a, s: metrics.accuracy(a, s >= threshold),
           "brier": metrics.brier}
    if len(np.unique(y)) == 2:
        fns = {"auroc": metrics.auroc, "auprc": metrics.auprc, **fns}
    out: dict = {"n": int(len(y)), "positives": int(y.sum()), "threshold": float(threshold)}
    return with_intervals(out, fns, y, score, n_boot, seed, subject_ids)


def macro_ovr_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest AUROC (sklearn); ValueError when a class is absent from `y`."""
    from sklearn.metrics import roc_auc_score

    n_classes = probs.shape[1]
    if len(np.unique(y)) < n_classes:
        raise ValueError("one-vs-rest AUROC needs every class in y")
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=np.arange(n_classes)))


def multiclass_metrics(y: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       subject_ids: np.ndarray | None = None) -> dict:
    """Accuracy, macro F1 (argmax prediction) and macro one-vs-rest AUROC of `[N, K]` class probabilities, each as
    {value, low, high} with a percentile bootstrap 95% interval (subjects resampled when `subject_ids` is given, else
    rows), plus `support` (rows per class). AUROC is left out when a class is absent from `y`."""
    from sklearn.metrics import f1_score

    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    classes = np.arange(probs.shape[1])
    fns = {"accuracy": lambda a, p: metrics.accuracy(a, p.argmax(1)),
           "macro_f1": lambda a, p: float(f1_score(a, p.argmax(1), labels=classes, average="macro", zero_division=0))}
    if len(np.unique(y)) == len(classes):
        fns = {"macro_auroc_ovr": macro_ovr_auroc, **fns}
    out: dict = {"n": int(len(y)), "num_classes": int(len(classes)),
                 "support": {str(c): int(n) for c, n in enumerate(np.bincount(y, minlength=len(classes)))}}
    return with_intervals(out, fns, y, probs, n_boot, seed, subject_ids)


def _per_task(fn, y: np.ndarray, probs: np.ndarray) -> list[float]:
    """`fn(labels, scores)` of each task on its labelled rows; ValueError when a task lacks a class there."""
    values = []
    for k in range(y.shape[1]):
        labelled = y[:, k] >= 0
        if len(np.unique(y[labelled, k])) < 2:
            raise ValueError(f"task {k} has one class only")
        values.append(fn(y[labelled, k], probs[labelled, k]))
    return values


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean over tasks of each task's AUROC on its labelled rows (`y` -1 = no label); ValueError when a task lacks a
    class (a bootstrap resample is then drawn again, so every resample averages the same tasks)."""
    return float(np.mean(_per_task(metrics.auroc, y, probs)))


def macro_auprc(y: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(_per_task(metrics.auprc, y, probs)))


def micro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUROC over every labelled (row, task) pair pooled (tasks with more rows or positives weigh more)."""
    labelled = y >= 0
    return metrics.auroc(y[labelled], probs[labelled])


def multilabel_metrics(y: np.ndarray, probs: np.ndarray, thresholds: list[float], task_names: list[str],
                       n_boot: int = 1000, seed: int = 0, subject_ids: np.ndarray | None = None) -> dict:
    """Multi-label scores of `[N, K]` probabilities against `[N, K]` labels (1, 0, -1 = no label): `tasks` holds
    binary_metrics per task on its labelled rows (with its threshold), then macro AUROC / AUPRC and micro AUROC over
    the tasks with both classes present (`macro_tasks`), each as {value, low, high} with the bootstrap of
    with_intervals (subjects resampled when `subject_ids` is given)."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    subject_ids = None if subject_ids is None else np.asarray(subject_ids)
    per_task: dict = {}
    scored = []
    for k, task in enumerate(task_names):
        rows = y[:, k] >= 0
        if not rows.any():
            per_task[task] = {"n": 0}
            continue
        per_task[task] = binary_metrics(y[rows, k], probs[rows, k], thresholds[k], n_boot, seed,
                                        subject_ids=None if subject_ids is None else subject_ids[rows])
        if "auroc" in per_task[task]:
            scored.append(k)
    out: dict = {"n": int(len(y)), "task": "multilabel", "tasks": per_task,
                 "macro_tasks": [task_names[k] for k in scored]}
    if scored:
        fns = {"macro_auroc": macro_auroc, "macro_auprc": macro_auprc, "micro_auroc": micro_auroc}
        with_intervals(out, fns, y[:, scored], probs[:, scored], n_boot, seed, subject_ids)
    return out


def evaluate_multilabel(cfg: TrainConfig, run_dir: Path, split: str, ckpt: Path, model, dataset, device) -> dict:
    """evaluate's multi-label branch: report and predictions of `split` (see the module docstring)."""
    tasks = dataset.store.task_names
    if cfg.model.num_classes != len(tasks):
        raise UserError(f"{cfg.data.embedding_output_dir}/{split}: the store holds {len(tasks)} tasks {tasks} but "
                        f"model.num_classes={cfg.model.num_classes}; use the run's config")
    threshold_file = run_dir / "reports" / "threshold.json"
    chosen = json.loads(threshold_file.read_text()).get("thresholds", {}) if threshold_file.is_file() else {}
    thresholds = [float(chosen.get(t, DEFAULT_THRESHOLD)) for t in tasks]
    probs, y, loss = predict_multilabel(model, dataset, cfg.training.eval_batch_size, device)
    report = {"split": split, "checkpoint": str(ckpt), "loss": loss,
              **multilabel_metrics(y, probs, thresholds, tasks, cfg.evaluate.n_bootstrap, cfg.evaluate.seed,
                                   subject_ids=dataset.store.sequences["subject_id"].to_numpy())}
    write_json(run_dir / "reports" / f"eval_{split}.json", report)
    write_multilabel_predictions(run_dir / "predictions" / f"{split}.parquet", dataset.store.sequences, y, probs,
                                 thresholds, tasks)
    shown = {t: round(r["auroc"]["value"], 4) for t, r in report["tasks"].items() if "auroc" in r}
    log.info("%s (multi-label): macro AUROC %s, per task AUROC %s", split,
             round(report["macro_auroc"]["value"], 4) if "macro_auroc" in report else None, shown)
    return report


def task_metrics(y: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int, seed: int,
                 subject_ids: np.ndarray | None = None) -> dict:
    """binary_metrics on `probs[:, 1]` for two classes, multiclass_metrics otherwise."""
    if probs.shape[1] == 2:
        return binary_metrics(y, probs[:, 1], threshold, n_boot, seed, subject_ids=subject_ids)
    return multiclass_metrics(y, probs, n_boot, seed, subject_ids=subject_ids)


def regression_metrics(y: np.ndarray, pred: np.ndarray, median: float, n_boot: int = 1000, seed: int = 0,
                       subject_ids: np.ndarray | None = None) -> dict:
    """MAE, RMSE and R^2 (sklearn) of `pred` against `y`, and `median_baseline_mae` (the MAE of predicting `median`,
    the train split's median target, for every row), each as {value, low, high} with a percentile bootstrap 95%
    interval (subjects resampled when `subject_ids` is given, else rows)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64)
    fns = {"mae": lambda a, p: float(mean_absolute_error(a, p)),
           "rmse": lambda a, p: float(np.sqrt(mean_squared_error(a, p))),
           "r2": lambda a, p: float(r2_score(a, p)),
           "median_baseline_mae": lambda a, p: float(mean_absolute_error(a, np.full(len(a), median)))}
    out: dict = {"n": int(len(y)), "task": "regression", "target_mean": float(y.mean()),
                 "median_baseline": float(median)}
    return with_intervals(out, fns, y, pred, n_boot, seed, subject_ids)


def evaluate_regression(cfg: TrainConfig, run_dir: Path, split: str, ckpt: Path, model, dataset, device) -> dict:
    """evaluate's regression branch: report and predictions of `split` (see the module docstring)."""
    scaling_file = run_dir / "reports" / TARGET_SCALING_FILE
    if not scaling_file.is_file():
        raise UserError(f"{scaling_file}: missing; this regression run has no target scaling (finetune writes it): "
                        f"rerun finetune with model.num_classes=1")
    scaling = json.loads(scaling_file.read_text())
    pred, y, loss = predict_values(model, dataset, cfg.training.eval_batch_size, device, scaling["mean"],
                                   scaling["std"])
    report = {"split": split, "checkpoint": str(ckpt), "loss": loss,
              **regression_metrics(y, pred, scaling["median"], cfg.evaluate.n_bootstrap, cfg.evaluate.seed,
                                   subject_ids=dataset.store.sequences["subject_id"].to_numpy())}
    write_json(run_dir / "reports" / f"eval_{split}.json", report)
    write_regression_predictions(run_dir / "predictions" / f"{split}.parquet", dataset.store.sequences, y, pred)
    shown = {k: round(v["value"], 4) for k, v in report.items() if isinstance(v, dict) and "value" in v}
    log.info("%s (regression): %s", split, shown)
    return report


def calibration_plot(y: np.ndarray, score: np.ndarray, path: Path, bins: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    frac_pos, mean_pred = calibration_curve(y, score, n_bins=bins, strategy="quantile")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot(mean_pred, frac_pos, "o-", label="model")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", title=title, xlim=(0, 1),
           ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def warn_if_model_differs_from_run(cfg: TrainConfig, run_dir: Path) -> None:
    """Log a warning naming each `model` key where `cfg` differs from the run's config.yaml (read as predict reads
    it, so a run written before `input_scaling` / `pooling` existed counts as `none` / `mean`): evaluate builds the
    model from `cfg`, and a key such as input_scaling changes predictions without failing to load the weights."""
    if not (run_dir / "config.yaml").is_file():
        return
    trained, given = dataclasses.asdict(run_config(run_dir).model), dataclasses.asdict(cfg.model)
    changed = [f"model.{k}: {trained[k]!r} (run) vs {given[k]!r} (config)" for k in trained if trained[k] != given[k]]
    if changed:
        log.warning("%s/config.yaml differs from the evaluate config: %s; predictions use the evaluate config "
                    "(python -m ehr_embedded.predict uses the run's)", run_dir, "; ".join(changed))


def evaluate(cfg: TrainConfig, split: str | None = None) -> dict:
    """Score `split` (default evaluate.split) with the run's chosen checkpoint; returns the report."""
    split = split or cfg.evaluate.split
    run_dir = Path(cfg.training.output_dir)
    name = cfg.evaluate.checkpoint
    ckpt = find_checkpoint(run_dir / "checkpoints" / name if name in ("best", "latest") else Path(name))
    warn_if_model_differs_from_run(cfg, run_dir)
    table, datasets = load_splits(cfg, (split,))
    check_table_matches(ckpt, table, Path(cfg.data.embedding_output_dir) / CODE_TABLE_DIR)
    device = pick_device(cfg.training.device)
    model = model_for(cfg, table, "classification").to(device)
    load_weights(ckpt, model)
    threshold_file = run_dir / "reports" / "threshold.json"
    threshold = json.loads(threshold_file.read_text())["threshold"] if threshold_file.is_file() else DEFAULT_THRESHOLD
    dataset = datasets[split]
    if len(dataset) == 0:
        raise UserError(f"{cfg.data.embedding_output_dir}/{split}: no sequences to evaluate")
    if dataset.store.is_multilabel:
        return evaluate_multilabel(cfg, run_dir, split, ckpt, model, dataset, device)
    if dataset.store.is_regression != (cfg.model.num_classes == 1):
        raise UserError(f"{cfg.data.embedding_output_dir}/{split}: the store holds "
                        f"{'float regression targets' if dataset.store.is_regression else 'class labels'} but "
                        f"model.num_classes={cfg.model.num_classes} (1 = regression); use the run's config")
    if dataset.store.is_regression:
        return evaluate_regression(cfg, run_dir, split, ckpt, model, dataset, device)
    probs, y, loss = predict_probs(model, dataset, cfg.training.eval_batch_size, device)
    if y.max(initial=0) >= probs.shape[1]:
        raise UserError(f"{cfg.data.embedding_output_dir}/{split}: labels go up to {int(y.max())} but the model has "
                        f"{probs.shape[1]} classes (model.num_classes); rebuild the store or retrain")
    report = {"split": split, "checkpoint": str(ckpt), "loss": loss,
              **task_metrics(y, probs, threshold, cfg.evaluate.n_bootstrap, cfg.evaluate.seed,
                             subject_ids=dataset.store.sequences["subject_id"].to_numpy())}
    write_json(run_dir / "reports" / f"eval_{split}.json", report)
    predictions = run_dir / "predictions" / f"{split}.parquet"
    if probs.shape[1] != 2:
        write_multiclass_predictions(predictions, dataset.store.sequences, y, probs)
        shown = {k: round(v["value"], 4) for k, v in report.items() if isinstance(v, dict) and "value" in v}
        log.info("%s: %s (%d classes, support %s)", split, shown, probs.shape[1], report["support"])
        return report
    score = probs[:, 1]
    write_predictions(predictions, dataset.store.sequences, y, score, threshold)
    if len(np.unique(y)) == 2:
        calibration_plot(y, score, run_dir / "plots" / f"calibration_{split}.png", cfg.evaluate.calibration_bins,
                         f"{split} (n={len(y)})")
    shown = {k: round(v["value"], 4) for k, v in report.items() if isinstance(v, dict)}
    log.info("%s: %s (threshold %.3f from tuning)", split, shown, threshold)
    return report


def run(cfg: TrainConfig) -> int:
    setup_logging()
    torch.set_num_threads(cfg.training.num_threads or torch.get_num_threads())
    evaluate(cfg)
    return 0


main = config_main(TrainConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
