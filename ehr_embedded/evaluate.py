"""Evaluate a finetuned run on one split: AUROC, AUPRC, F1, accuracy, Brier with bootstrap 95% intervals,
a calibration plot, and predictions in the MEDS evaluation schema.

    python -m ehr_embedded.evaluate --config configs/ehr_embedded/finetune_encoder_embedded.yaml
    python -m ehr_embedded.evaluate --config configs/ehr_embedded/finetune_encoder_embedded.yaml evaluate.split=tuning

Reads the run under `training.output_dir` (the finetune config), its `checkpoints/<evaluate.checkpoint>` and the
decision threshold finetune chose on the tuning split (reports/threshold.json). Writes
`reports/eval_<split>.json`, `plots/calibration_<split>.png`, `predictions/<split>.parquet`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import metrics
from common.checkpoint import find_checkpoint, load_weights
from common.cli import UserError, config_main
from common.io import atomic_write, write_json
from common.logs import setup_logging
from ehr_embedded.config import TrainConfig
from ehr_embedded.engine import check_table_matches, load_splits, model_for, pick_device, predict_probs
from ehr_embedded.storage import CODE_TABLE_DIR

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.5
PREDICTION_SCHEMA = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                               ("boolean_value", pa.bool_()), ("predicted_boolean_value", pa.bool_()),
                               ("predicted_boolean_probability", pa.float64())])


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


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, dict[str, float] | float | int]:
    """Each metric as {value, low, high} (percentile bootstrap 95%); ranking metrics need both classes."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=np.float64)
    fns = {"f1": lambda a, s: _binary_f1(a, s >= threshold),
           "accuracy": lambda a, s: metrics.accuracy(a, s >= threshold),
           "brier": metrics.brier}
    if len(np.unique(y)) == 2:
        fns = {"auroc": metrics.auroc, "auprc": metrics.auprc, **fns}
    out: dict = {"n": int(len(y)), "positives": int(y.sum()), "threshold": float(threshold)}
    for name, fn in fns.items():
        value, low, high = metrics.bootstrap_ci(fn, y, score, n_boot=n_boot, seed=seed)
        out[name] = {"value": value, "low": low, "high": high}
    return out


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


def write_predictions(path: Path, sequences, y: np.ndarray, score: np.ndarray, threshold: float) -> Path:
    table = pa.table({"subject_id": sequences["subject_id"].to_numpy(np.int64),
                      "prediction_time": sequences["prediction_time"].astype("datetime64[us]").to_numpy(),
                      "boolean_value": y.astype(bool), "predicted_boolean_value": score >= threshold,
                      "predicted_boolean_probability": score.astype(np.float64)}, schema=PREDICTION_SCHEMA)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def evaluate(cfg: TrainConfig, split: str | None = None) -> dict:
    """Score `split` (default evaluate.split) with the run's chosen checkpoint; returns the report."""
    split = split or cfg.evaluate.split
    run_dir = Path(cfg.training.output_dir)
    name = cfg.evaluate.checkpoint
    ckpt = find_checkpoint(run_dir / "checkpoints" / name if name in ("best", "latest") else Path(name))
    if cfg.model.num_classes != 2:
        raise UserError(f"model.num_classes={cfg.model.num_classes}: evaluate reports binary metrics; use 2 classes")
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
    probs, y, loss = predict_probs(model, dataset, cfg.training.eval_batch_size, device)
    score = probs[:, 1]
    report = {"split": split, "checkpoint": str(ckpt), "loss": loss,
              **binary_metrics(y, score, threshold, cfg.evaluate.n_bootstrap, cfg.evaluate.seed)}
    write_json(run_dir / "reports" / f"eval_{split}.json", report)
    write_predictions(run_dir / "predictions" / f"{split}.parquet", dataset.store.sequences, y, score, threshold)
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
