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
"""

from __future__ import annotations

import json
import logging
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
from ehr_embedded.config import PredictConfig, TrainConfig
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


def predict(cfg: PredictConfig) -> Path:
    """Write the predictions parquet of `cfg.split`; returns its path."""
    frame = predict_split(cfg.run_dir, cfg.split, cfg.dataset_dir, cfg.checkpoint, cfg.batch_size, cfg.device)
    out = Path(cfg.output) if cfg.output is not None else Path(cfg.run_dir) / "predictions" / f"predict_{cfg.split}.parquet"
    table = pa.Table.from_pandas(frame.astype({"prediction_time": "datetime64[us]"}), schema=PREDICTION_SCHEMA,
                                 preserve_index=False)
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))
    log.info("%s: %d predictions (%d predicted positive) -> %s", cfg.split, len(frame),
             int(frame["predicted_boolean_value"].sum()), out)
    return out


def run(cfg: PredictConfig) -> int:
    setup_logging()
    predict(cfg)
    return 0


main = config_main(PredictConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
