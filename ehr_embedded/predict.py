"""Predictions of a finetuned run on one split of a store, in the MEDS predictions schema; load a run for inference.

    python -m ehr_embedded.predict run_dir=runs/ehr_embedded/mimic/finetune_encoder split=held_out
    python -m ehr_embedded.predict run_dir=runs/ehr_embedded/sample/finetune_encoder \
        dataset_dir=runs/ehr_embedded/new/patients split=held_out output=runs/ehr_embedded/new/predictions.parquet

Reads the run directory alone: `config.yaml` gives the architecture, `checkpoints/<checkpoint>` the weights and
`reports/threshold.json` the decision threshold finetune chose on tuning (0.5 when absent). The store is the one the
run was trained on, or `dataset_dir` (e.g. built by create_embeddings from new MEDS data with the run's vocabulary: its
description-only rows are embedded by the same text model; a table of another width is refused). Writes one row per
label: subject_id, prediction_time, boolean_value, predicted_boolean_value, predicted_boolean_probability
(default `<run_dir>/predictions/predict_<split>.parquet`).

    from ehr_embedded.predict import load_run, predict_split
    model, cfg, table, threshold = load_run("runs/ehr_embedded/mimic/finetune_encoder")
    frame = predict_split("runs/ehr_embedded/mimic/finetune_encoder", split="held_out")

New MEDS data, any subjects (no splits file needed):

    python -m ehr_embedded.predict run_dir=runs/ehr_embedded/mimic/finetune_encoder meds_dir=/data/new_meds \
        labels=/data/new_meds/labels/task.parquet output=runs/ehr_embedded/new/predictions.parquet

cuts every labelled subject with the run's own store's code table (codes it has never seen get description rows from
the same text model) and sequence settings (max_length and the window options, from the store's report.json) into a
temporary store (create_embeddings with `sequences.all_to_split=held_out`), then predicts it as above.
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
import yaml

from common.checkpoint import find_checkpoint, load_weights
from common.cli import UserError, config_main
from common.config import load_config
from common.io import atomic_write
from common.logs import setup_logging
from ehr_embedded.config import PredictConfig, Stage1Config, TrainConfig
from ehr_embedded.engine import check_table_matches, model_for, pick_device, predict_probs
from ehr_embedded.evaluate import DEFAULT_THRESHOLD, PREDICTION_SCHEMA
from ehr_embedded.storage import CODE_TABLE_DIR, CodeTable, load_dataset_table, open_split

log = logging.getLogger(__name__)
# model keys added after runs were already written, with the behaviour those runs were trained with
LEGACY_MODEL_KEYS = {"input_scaling": "none", "pooling": "mean", "code_embedding": "frozen"}


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


def load_run(run_dir: Path, checkpoint: str = "best", dataset_dir: Path | None = None,
             device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig, CodeTable, float]:
    """(model in eval mode, its config, the code table, the tuning-chosen threshold)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    store = Path(dataset_dir) if dataset_dir is not None else Path(cfg.data.embedding_output_dir)
    table = load_dataset_table(store)
    ckpt = find_checkpoint(run_dir / "checkpoints" / checkpoint if checkpoint in ("best", "latest") else checkpoint)
    check_table_matches(ckpt, table, store / CODE_TABLE_DIR)
    model = model_for(cfg, table, "classification")
    load_weights(ckpt, model)
    threshold_file = run_dir / "reports" / "threshold.json"
    threshold = json.loads(threshold_file.read_text())["threshold"] if threshold_file.is_file() else DEFAULT_THRESHOLD
    return model.to(pick_device(device)).eval(), cfg, table, float(threshold)


def predict_split(run_dir: Path, split: str = "held_out", dataset_dir: Path | None = None,
                  checkpoint: str = "best", batch_size: int | None = None, device: str = "cpu") -> pd.DataFrame:
    """subject_id, prediction_time, boolean_value, predicted_boolean_value, predicted_boolean_probability."""
    from ehr_embedded.data import EventSequenceDataset

    model, cfg, table, threshold = load_run(run_dir, checkpoint, dataset_dir, device)
    if cfg.model.num_classes != 2:
        raise UserError(f"{run_dir}: model.num_classes={cfg.model.num_classes}; the MEDS predictions schema is binary")
    store = open_split(Path(dataset_dir) if dataset_dir is not None else Path(cfg.data.embedding_output_dir), split)
    probs, labels, _ = predict_probs(model, EventSequenceDataset(store, table, cfg.model.max_length),
                                     batch_size or cfg.training.eval_batch_size, pick_device(device))
    score = probs[:, 1]
    return pd.DataFrame({"subject_id": store.sequences["subject_id"].to_numpy(np.int64),
                         "prediction_time": store.sequences["prediction_time"], "boolean_value": labels.astype(bool),
                         "predicted_boolean_value": score >= threshold,
                         "predicted_boolean_probability": score.astype(np.float64)})


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
    for key, value in (report.get("sequences") or {}).items():  # written since issue 12 section 3
        if key in ("embed_unseen_codes", "max_history_hours", "context_codes", "label_column"):
            setattr(cfg.sequences, key, value)
    cfg.sequences.all_to_split = "held_out"
    cfg.sequences.parts_dir = Path(out_dir) / "parts"
    return cfg


def predict_meds(run_dir: Path, meds_dir: Path, labels: Path, checkpoint: str = "best", batch_size: int | None = None,
                 device: str = "cpu") -> pd.DataFrame:
    """Predictions for every label row of `labels` on the MEDS data under `meds_dir` (see the module docstring)."""
    from ehr_embedded.create_embeddings import create_embeddings

    with tempfile.TemporaryDirectory(prefix="ehr_predict_meds_") as tmp:
        stage1 = meds_stage1_config(run_dir, meds_dir, labels, Path(tmp), device)
        report = create_embeddings(stage1)
        log.info("new MEDS data %s: %d sequences; skips %s", meds_dir, report["held_out"]["sequences"],
                 {k: v for k, v in report["counts"].items() if k.startswith(("skipped", "labels_unknown"))})
        return predict_split(run_dir, "held_out", stage1.data.embedding_output_dir, checkpoint, batch_size, device)


def predict(cfg: PredictConfig) -> Path:
    """Write the predictions parquet of `cfg.split` (or of `cfg.labels` on `cfg.meds_dir`); returns its path."""
    if cfg.meds_dir is not None:
        if cfg.labels is None:
            raise UserError("meds_dir is set but labels is not; pass labels=PATH (subject_id, prediction_time, "
                            "boolean_value) naming the rows to predict")
        frame = predict_meds(cfg.run_dir, cfg.meds_dir, cfg.labels, cfg.checkpoint, cfg.batch_size, cfg.device)
        name = "predict_meds.parquet"
    else:
        frame = predict_split(cfg.run_dir, cfg.split, cfg.dataset_dir, cfg.checkpoint, cfg.batch_size, cfg.device)
        name = f"predict_{cfg.split}.parquet"
    out = Path(cfg.output) if cfg.output is not None else Path(cfg.run_dir) / "predictions" / name
    table = pa.Table.from_pandas(frame.astype({"prediction_time": "datetime64[us]"}), schema=PREDICTION_SCHEMA,
                                 preserve_index=False)
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    log.info("%s: %d predictions (%d predicted positive) -> %s", cfg.meds_dir or cfg.split, len(frame),
             int(frame["predicted_boolean_value"].sum()), out)
    return out


def run(cfg: PredictConfig) -> int:
    setup_logging()
    predict(cfg)
    return 0


main = config_main(PredictConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
