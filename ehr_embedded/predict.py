"""Predictions of a finetuned run on one split of a store, in the columns evaluate writes; load a run for inference.

    python -m ehr_embedded.predict run_dir=runs/ehr_embedded/mimic/finetune_encoder split=held_out
    python -m ehr_embedded.predict run_dir=runs/ehr_embedded/sample/finetune_encoder \
        dataset_dir=runs/ehr_embedded/new/patients split=held_out output=runs/ehr_embedded/new/predictions.parquet

Reads the run directory alone: `config.yaml` gives the architecture, `checkpoints/<checkpoint>` the weights and
`reports/threshold.json` the decision threshold finetune chose on tuning (0.5 when absent). The store is the one the
run was trained on, or `dataset_dir` (e.g. built by create_embeddings from new MEDS data with the run's vocabulary: its
description-only rows are embedded by the same text model; a table of another width is refused). Writes one row per
label (default `<run_dir>/predictions/predict_<split>.parquet`) with the columns evaluate writes to
`<run_dir>/predictions/<split>.parquet` for the run's task (`model.num_classes`):

    binary (2)        subject_id, prediction_time, boolean_value, predicted_boolean_value, predicted_boolean_probability
                      (the MEDS predictions schema; threshold from reports/threshold.json)
    multi-class (K>2) subject_id, prediction_time, integer_value, predicted_integer_value (argmax),
                      predicted_class_probabilities (list of K floats)
    regression (1)    subject_id, prediction_time, float_value, predicted_float_value (de-standardised with the train
                      mean / std of reports/target_scaling.json, which finetune writes; refused when it is missing)
    multi-label (K)   one row per (sequence, task): subject_id, prediction_time, task, boolean_value (null where the
                      task has no label), predicted_boolean_value (each task's threshold from reports/threshold.json),
                      predicted_boolean_probability; the run is multi-label when finetune wrote per-task thresholds

A store whose labels are of another kind than the run's task (float targets for a classifier, class ids for a
regression run) is refused.

    from ehr_embedded.predict import load_run, predict_split
    model, cfg, table, threshold = load_run("runs/ehr_embedded/mimic/finetune_encoder")
    frame = predict_split("runs/ehr_embedded/mimic/finetune_encoder", split="held_out")

New MEDS data, any subjects (no splits file needed):

    python -m ehr_embedded.predict run_dir=runs/ehr_embedded/mimic/finetune_encoder meds_dir=/data/new_meds \
        labels=/data/new_meds/labels/task.parquet output=runs/ehr_embedded/new/predictions.parquet

cuts every labelled subject with the run's own store's code table (codes it has never seen get description rows from
the same text model) and sequence settings (max_length and the window options, from the store's report.json) into a
temporary store (create_embeddings with `sequences.all_to_split=held_out`), then predicts it as above. The label
file's value column must fit the run's task: float_value for a regression run, integer_value for a multi-class run,
boolean_value (or integer_value 0/1) for a binary run; another one is refused before anything is cut. A multi-label
run predicts new data through a store built with its tasks (create_embeddings with data.task_labels and the run's code
table, then `dataset_dir=`): meds_dir mode takes one label file and refuses it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.checkpoint import find_checkpoint, load_weights
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write
from common.logs import setup_logging
from ehr_embedded.config import PredictConfig, Stage1Config, TrainConfig
from ehr_embedded.engine import (
    TARGET_SCALING_FILE,
    check_table_matches,
    model_for,
    pick_device,
    predict_multilabel,
    predict_probs,
    predict_values,
)
from ehr_embedded.prediction_files import (
    DEFAULT_THRESHOLD,
    MULTILABEL_PREDICTION_SCHEMA,
    PREDICTION_SCHEMA,
    multilabel_prediction_table,
    read_thresholds,
    run_config,
    write_multiclass_predictions,
    write_regression_predictions,
)
from ehr_embedded.storage import CODE_TABLE_DIR, CodeTable, load_dataset_table, open_split

log = logging.getLogger(__name__)
# the label value columns (meds_io.read_labels' names; `label` is the original's labels CSV) each task reads
TASK_LABEL_COLUMNS = {"binary": ("boolean_value", "integer_value", "label"), "multiclass": ("integer_value", "label"),
                      "regression": ("float_value",)}
TASK_LABEL_HINT = {"binary": "boolean_value (or integer_value 0/1) labels", "multiclass": "integer_value class ids",
                   "regression": "float_value targets"}


def load_run(run_dir: Path, checkpoint: str = "best", dataset_dir: Path | None = None,
             device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig, CodeTable, float | dict[str, float]]:
    """(model in eval mode, its config, the code table, the tuning-chosen threshold: a float, or for a multi-label
    run task name -> threshold)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    store = Path(dataset_dir) if dataset_dir is not None else Path(cfg.data.embedding_output_dir)
    table = load_dataset_table(store)
    ckpt = find_checkpoint(run_dir / "checkpoints" / checkpoint if checkpoint in ("best", "latest") else checkpoint)
    check_table_matches(ckpt, table, store / CODE_TABLE_DIR)
    model = model_for(cfg, table, "classification")
    load_weights(ckpt, model)
    chosen = read_thresholds(run_dir)
    threshold = chosen["thresholds"] if "thresholds" in chosen else float(chosen.get("threshold", DEFAULT_THRESHOLD))
    return model.to(pick_device(device)).eval(), cfg, table, threshold


def run_task(cfg: TrainConfig, run_dir: Path | None = None) -> str:
    """The run's task: `multilabel` when finetune wrote per-task thresholds into `run_dir`, else from
    `model.num_classes`: `regression` (1), `binary` (2) or `multiclass` (K > 2)."""
    if run_dir is not None and "thresholds" in read_thresholds(run_dir):
        return "multilabel"
    if cfg.model.num_classes == 1:
        return "regression"
    return "binary" if cfg.model.num_classes == 2 else "multiclass"


def load_target_scaling(run_dir: Path) -> dict:
    """The train target mean / std finetune wrote for a regression run (`reports/target_scaling.json`)."""
    path = Path(run_dir) / "reports" / TARGET_SCALING_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; a regression run's outputs are de-standardised with the train mean / std "
                        f"finetune writes there: rerun finetune with model.num_classes=1")
    scaling = json.loads(path.read_text())
    if not {"mean", "std"} <= set(scaling):
        raise UserError(f"{path}: needs the keys 'mean' and 'std'; rerun finetune to rewrite it")
    return scaling


def predict_split(run_dir: Path, split: str = "held_out", dataset_dir: Path | None = None,
                  checkpoint: str = "best", batch_size: int | None = None, device: str = "cpu") -> pd.DataFrame:
    """One row per label of `split`, with the columns evaluate writes for the run's task (see the module docstring):
    binary `boolean_value, predicted_boolean_value, predicted_boolean_probability`; multi-class `integer_value,
    predicted_integer_value, predicted_class_probabilities` (a float64 array of K per row); regression `float_value,
    predicted_float_value`; each after `subject_id, prediction_time`."""
    from ehr_embedded.data import EventSequenceDataset

    model, cfg, table, threshold = load_run(run_dir, checkpoint, dataset_dir, device)
    task = run_task(cfg, run_dir)
    store_dir = Path(dataset_dir) if dataset_dir is not None else Path(cfg.data.embedding_output_dir)
    store = open_split(store_dir, split)
    if len(store) == 0:
        raise UserError(f"{store_dir / split}: no sequences to predict")
    if store.is_multilabel != (task == "multilabel") or (task == "multilabel" and store.task_names != list(threshold)):
        raise UserError(f"{store_dir / split}: the store's tasks are {store.task_names or 'one task'} but the run "
                        f"{run_dir} was trained on {list(threshold) if task == 'multilabel' else 'one task'}; predict "
                        f"a store built with the run's tasks")
    if task == "multilabel":
        dataset = EventSequenceDataset(store, table, cfg.model.max_length)
        probs, labels, _ = predict_multilabel(model, dataset, batch_size or cfg.training.eval_batch_size,
                                              pick_device(device))
        return multilabel_prediction_table(store.sequences, labels, probs, list(threshold.values()),
                                           store.task_names).to_pandas()
    if store.is_regression != (task == "regression"):
        raise UserError(f"{store_dir / split}: the store holds "
                        f"{'float regression targets' if store.is_regression else 'class labels'} but the run "
                        f"{run_dir} is a {task} task (model.num_classes={cfg.model.num_classes}); predict a store "
                        f"built from {TASK_LABEL_HINT[task]}")
    scaling = load_target_scaling(run_dir) if task == "regression" else None
    dataset = EventSequenceDataset(store, table, cfg.model.max_length)
    batch_size = batch_size or cfg.training.eval_batch_size
    keys = {"subject_id": store.sequences["subject_id"].to_numpy(np.int64),
            "prediction_time": store.sequences["prediction_time"]}
    if task == "regression":
        pred, targets, _ = predict_values(model, dataset, batch_size, pick_device(device), scaling["mean"],
                                          scaling["std"])
        return pd.DataFrame({**keys, "float_value": targets, "predicted_float_value": pred})
    probs, labels, _ = predict_probs(model, dataset, batch_size, pick_device(device))
    if task == "multiclass":
        if labels.max() >= probs.shape[1]:
            raise UserError(f"{store_dir / split}: labels go up to {int(labels.max())} but the run {run_dir} has "
                            f"{probs.shape[1]} classes (model.num_classes); predict a store of this task")
        probs = probs.astype(np.float64)
        return pd.DataFrame({**keys, "integer_value": labels.astype(np.int64),
                             "predicted_integer_value": probs.argmax(1),
                             "predicted_class_probabilities": list(probs)})
    score = probs[:, 1]
    return pd.DataFrame({**keys, "boolean_value": labels.astype(bool),
                         "predicted_boolean_value": score >= threshold,
                         "predicted_boolean_probability": score.astype(np.float64)})


def check_label_task(labels: Path, cfg: TrainConfig, label_column: str = "auto") -> str:
    """The value column create_embeddings will read from the label file `labels` (with `label_column`, as
    `meds_io.read_labels` picks it); UserError naming the file and the column when it does not fit the run's task
    (float_value for regression, integer_value for multi-class, boolean_value or integer_value for binary), or when
    a class id is beyond `model.num_classes`."""
    from ehr_embedded.meds_io import read_labels

    frame = read_labels(labels, label_column)
    column, task = frame.attrs["label_column"], run_task(cfg)
    if column not in TASK_LABEL_COLUMNS[task]:
        raise UserError(f"{labels}: labels in column '{column}' but the run is a {task} task "
                        f"(model.num_classes={cfg.model.num_classes}); pass a label file with "
                        f"{TASK_LABEL_HINT[task]}")
    if task != "regression" and len(frame) and frame["label"].max() >= cfg.model.num_classes:
        raise UserError(f"{labels}: column '{column}' goes up to {int(frame['label'].max())} but the run has "
                        f"model.num_classes={cfg.model.num_classes}; use class ids 0..{cfg.model.num_classes - 1}")
    return column


def meds_stage1_config(run_dir: Path, meds_dir: Path, labels: Path, out_dir: Path, device: str = "cpu") -> Stage1Config:
    """The create_embeddings config that cuts new MEDS data the way the run's own store was cut: the store's code
    table as vocabulary, its sequence settings, every labelled subject into `held_out`, output under `out_dir`."""
    store = Path(run_config(run_dir).data.embedding_output_dir)
    report_file = store / "report.json"
    if not (store / CODE_TABLE_DIR).is_dir() or not report_file.is_file():
        raise UserError(f"{store}: the run's store (data.embedding_output_dir of {Path(run_dir) / 'config.yaml'}) is "
                        f"missing; its code table and settings define how new data is cut: rebuild it with "
                        f"create_embeddings")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    cfg = Stage1Config(device=device)
    cfg.data.data_dir = Path(meds_dir)
    cfg.data.labels_filepath = Path(labels)
    cfg.data.vocab_embedding_path = store / CODE_TABLE_DIR
    cfg.data.embedding_output_dir = Path(out_dir) / "store"
    cfg.sequences.max_length = int(report["max_length"])
    for key, value in (report.get("sequences") or {}).items():  # absent from older stores' reports
        if key in ("embed_unseen_codes", "max_history_hours", "context_codes", "label_column"):
            setattr(cfg.sequences, key, value)
    cfg.sequences.all_to_split = "held_out"
    cfg.sequences.parts_dir = Path(out_dir) / "parts"
    return cfg


def predict_meds(run_dir: Path, meds_dir: Path, labels: Path, checkpoint: str = "best", batch_size: int | None = None,
                 device: str = "cpu") -> pd.DataFrame:
    """Predictions for every label row of `labels` on the MEDS data under `meds_dir` (see the module docstring)."""
    from ehr_embedded.create_embeddings import create_embeddings

    if run_task(run_config(run_dir), run_dir) == "multilabel":
        raise UserError(f"{run_dir}: a multi-label run; meds_dir mode reads one label file: build a store with its "
                        f"tasks (create_embeddings with data.task_labels, data.vocab_embedding_path=<its store>/"
                        f"{CODE_TABLE_DIR}) and pass dataset_dir=")
    with tempfile.TemporaryDirectory(prefix="ehr_predict_meds_") as tmp:
        stage1 = meds_stage1_config(run_dir, meds_dir, labels, Path(tmp), device)
        check_label_task(labels, run_config(run_dir), stage1.sequences.label_column)
        report = create_embeddings(stage1)
        log.info("new MEDS data %s: %d sequences; skips %s", meds_dir, report["held_out"]["sequences"],
                 {k: v for k, v in report["counts"].items() if k.startswith(("skipped", "labels_unknown"))})
        return predict_split(run_dir, "held_out", stage1.data.embedding_output_dir, checkpoint, batch_size, device)


def predict(cfg: PredictConfig) -> Path:
    """Write the predictions parquet of `cfg.split` (or of `cfg.labels` on `cfg.meds_dir`); returns its path."""
    if cfg.meds_dir is not None:
        if cfg.labels is None:
            raise UserError("meds_dir is set but labels is not; pass labels=PATH (subject_id, prediction_time and "
                            "the task's boolean_value, integer_value or float_value) naming the rows to predict")
        frame = predict_meds(cfg.run_dir, cfg.meds_dir, cfg.labels, cfg.checkpoint, cfg.batch_size, cfg.device)
        name = "predict_meds.parquet"
    else:
        frame = predict_split(cfg.run_dir, cfg.split, cfg.dataset_dir, cfg.checkpoint, cfg.batch_size, cfg.device)
        name = f"predict_{cfg.split}.parquet"
    out = Path(cfg.output) if cfg.output is not None else Path(cfg.run_dir) / "predictions" / name
    if "task" in frame:
        table = pa.Table.from_pandas(frame.astype({"prediction_time": "datetime64[us]"}),
                                     schema=MULTILABEL_PREDICTION_SCHEMA, preserve_index=False)
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
        summary = f"{int(frame['predicted_boolean_value'].sum())} predicted positive (sequence, task) pairs"
    elif "float_value" in frame:
        write_regression_predictions(out, frame, frame["float_value"].to_numpy(),
                                     frame["predicted_float_value"].to_numpy())
        summary = f"mean predicted {frame['predicted_float_value'].mean():.4g}"
    elif "integer_value" in frame:
        write_multiclass_predictions(out, frame, frame["integer_value"].to_numpy(),
                                     np.stack(frame["predicted_class_probabilities"].to_numpy()))
        summary = f"predicted classes {frame['predicted_integer_value'].value_counts().sort_index().to_dict()}"
    else:
        table = pa.Table.from_pandas(frame.astype({"prediction_time": "datetime64[us]"}), schema=PREDICTION_SCHEMA,
                                     preserve_index=False)
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
        summary = f"{int(frame['predicted_boolean_value'].sum())} predicted positive"
    log.info("%s: %d predictions (%s) -> %s", cfg.meds_dir or cfg.split, len(frame), summary, out)
    return out


def run(cfg: PredictConfig) -> int:
    setup_logging()
    predict(cfg)
    return 0


main = config_main(PredictConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
