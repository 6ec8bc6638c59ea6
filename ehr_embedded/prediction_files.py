"""Prediction files of a finetuned run, and the run read back from its directory; evaluate and predict both use it.

The files, one row per label, in the columns the MEDS evaluation schema uses (see `ehr_embedded.evaluate`):

    binary       PREDICTION_SCHEMA               subject_id, prediction_time, boolean_value, predicted_boolean_value,
                                                 predicted_boolean_probability
    multi-class  MULTICLASS_PREDICTION_COLUMNS   ..., integer_value, predicted_integer_value,
                                                 predicted_class_probabilities (list of K floats)
    regression   REGRESSION_PREDICTION_SCHEMA    ..., float_value, predicted_float_value
    multi-label  MULTILABEL_PREDICTION_SCHEMA    one row per (sequence, task): ..., task, boolean_value, ...

and what a run directory says about them: `run_config` (the config it was trained with, legacy model keys filled in)
and `read_thresholds` (the decision thresholds finetune chose on tuning; `DEFAULT_THRESHOLD` where none was chosen).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from common.config import load_config
from common.errors import UserError
from common.io import atomic_write
from ehr_embedded.config import TrainConfig

DEFAULT_THRESHOLD = 0.5
PREDICTION_SCHEMA = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                               ("boolean_value", pa.bool_()), ("predicted_boolean_value", pa.bool_()),
                               ("predicted_boolean_probability", pa.float64())])
REGRESSION_PREDICTION_SCHEMA = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                                          ("float_value", pa.float64()), ("predicted_float_value", pa.float64())])
MULTILABEL_PREDICTION_SCHEMA = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                                          ("task", pa.string()), ("boolean_value", pa.bool_()),
                                          ("predicted_boolean_value", pa.bool_()),
                                          ("predicted_boolean_probability", pa.float64())])
MULTICLASS_PREDICTION_COLUMNS = ("subject_id", "prediction_time", "integer_value", "predicted_integer_value",
                                 "predicted_class_probabilities")

# model keys added after runs were already written, with the behaviour those runs were trained with
LEGACY_MODEL_KEYS = {"input_scaling": "none", "pooling": "mean", "code_embedding": "frozen"}


def write_predictions(path: Path, sequences, y: np.ndarray, score: np.ndarray, threshold: float) -> Path:
    """`PREDICTION_SCHEMA` (binary): the label, `score >= threshold` and the positive-class probability per row."""
    table = pa.table({"subject_id": sequences["subject_id"].to_numpy(np.int64),
                      "prediction_time": sequences["prediction_time"].astype("datetime64[us]").to_numpy(),
                      "boolean_value": y.astype(bool), "predicted_boolean_value": score >= threshold,
                      "predicted_boolean_probability": score.astype(np.float64)}, schema=PREDICTION_SCHEMA)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_multiclass_predictions(path: Path, sequences, y: np.ndarray, probs: np.ndarray) -> Path:
    """`MULTICLASS_PREDICTION_COLUMNS`: the true class, the argmax class and the `[K]` probabilities per row."""
    probs = np.asarray(probs, dtype=np.float64)
    flat = pa.array(probs.reshape(-1), pa.float64())
    table = pa.table({"subject_id": sequences["subject_id"].to_numpy(np.int64),
                      "prediction_time": sequences["prediction_time"].astype("datetime64[us]").to_numpy(),
                      "integer_value": np.asarray(y, np.int64), "predicted_integer_value": probs.argmax(1),
                      "predicted_class_probabilities": pa.FixedSizeListArray.from_arrays(flat, probs.shape[1])})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_regression_predictions(path: Path, sequences, y: np.ndarray, pred: np.ndarray) -> Path:
    """`REGRESSION_PREDICTION_SCHEMA`: the target and the de-standardised prediction per row."""
    table = pa.table({"subject_id": sequences["subject_id"].to_numpy(np.int64),
                      "prediction_time": sequences["prediction_time"].astype("datetime64[us]").to_numpy(),
                      "float_value": np.asarray(y, np.float64), "predicted_float_value": np.asarray(pred, np.float64)},
                     schema=REGRESSION_PREDICTION_SCHEMA)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def multilabel_prediction_table(sequences, y: np.ndarray, probs: np.ndarray, thresholds: list[float],
                                task_names: list[str]) -> pa.Table:
    """`MULTILABEL_PREDICTION_SCHEMA`, one row per (sequence, task) in sequence order; boolean_value null where the
    task has no label."""
    n, k = probs.shape
    y = np.asarray(y)
    truth = pa.array((y == 1).reshape(-1), pa.bool_(), mask=(y < 0).reshape(-1))
    table = pa.table({"subject_id": np.repeat(sequences["subject_id"].to_numpy(np.int64), k),
                      "prediction_time": np.repeat(sequences["prediction_time"].astype("datetime64[us]").to_numpy(), k),
                      "task": np.tile(np.asarray(task_names, dtype=object), n),
                      "boolean_value": truth,
                      "predicted_boolean_value": (probs >= np.asarray(thresholds)[None, :]).reshape(-1),
                      "predicted_boolean_probability": probs.astype(np.float64).reshape(-1)},
                     schema=MULTILABEL_PREDICTION_SCHEMA)
    return table


def write_multilabel_predictions(path: Path, sequences, y: np.ndarray, probs: np.ndarray, thresholds: list[float],
                                 task_names: list[str]) -> Path:
    """`multilabel_prediction_table` written atomically to `path` (parquet)."""
    table = multilabel_prediction_table(sequences, y, probs, thresholds, task_names)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run was trained with (its config.yaml, minus the `_meta` block).

    A config.yaml written before a model key existed describes a model built the old way, so each key of
    `LEGACY_MODEL_KEYS` it lacks loads with its old value (today's default would feed that checkpoint inputs it never
    saw, or pool its states another way).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found; pass the output_dir of a finetune run")
    cfg = load_config(TrainConfig, path)
    written = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    for key, old_value in LEGACY_MODEL_KEYS.items():
        if key not in written:
            setattr(cfg.model, key, old_value)
    return cfg


def read_thresholds(run_dir: Path) -> dict:
    """The run's reports/threshold.json ({} when absent): `threshold`, or per-task `thresholds` (multi-label)."""
    path = Path(run_dir) / "reports" / "threshold.json"
    return json.loads(path.read_text()) if path.is_file() else {}
