"""Load a finetuned run for inference from its directory alone, and score a stored split.

    from ehr_embedded.predict import load_run, predict_split
    model, cfg, table, threshold = load_run("runs/ehr_embedded/mimic/finetune_encoder")
    frame = predict_split("runs/ehr_embedded/mimic/finetune_encoder", split="held_out")   # MEDS prediction columns

The run's `config.yaml` gives the architecture; the code table comes from the store it was trained on (or
`dataset_dir`, e.g. a store rebuilt with newer codes: its rows are embedded by the same text model, and a table
of another width is refused); the decision threshold is the one finetune chose on tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.checkpoint import find_checkpoint, load_weights
from common.cli import UserError
from common.config import load_config
from ehr_embedded.config import TrainConfig
from ehr_embedded.engine import check_table_matches, model_for, predict_probs
from ehr_embedded.storage import CODE_TABLE_DIR, CodeTable, load_dataset_table, open_split

DEFAULT_THRESHOLD = 0.5


def run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run was trained with (its config.yaml, minus the `_meta` block)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found; pass the output_dir of a finetune run")
    return load_config(TrainConfig, path)


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
    return model.to(device).eval(), cfg, table, float(threshold)


def predict_split(run_dir: Path, split: str = "held_out", dataset_dir: Path | None = None,
                  checkpoint: str = "best") -> pd.DataFrame:
    """subject_id, prediction_time, boolean_value, predicted_boolean_value, predicted_boolean_probability."""
    from ehr_embedded.data import EventSequenceDataset

    model, cfg, table, threshold = load_run(run_dir, checkpoint, dataset_dir)
    store = open_split(Path(dataset_dir) if dataset_dir is not None else Path(cfg.data.embedding_output_dir), split)
    probs, labels, _ = predict_probs(model, EventSequenceDataset(store, table, cfg.model.max_length),
                                     cfg.training.eval_batch_size, torch.device("cpu"))
    score = probs[:, 1]
    return pd.DataFrame({"subject_id": store.sequences["subject_id"].to_numpy(np.int64),
                         "prediction_time": store.sequences["prediction_time"], "boolean_value": labels.astype(bool),
                         "predicted_boolean_value": score >= threshold,
                         "predicted_boolean_probability": score.astype(np.float64)})
