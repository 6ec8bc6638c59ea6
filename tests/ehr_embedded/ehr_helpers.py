"""Helpers shared by the ehr_embedded tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import load_config
from ehr_embedded.config import Stage1Config, TrainConfig

N_SUBJECTS = 160
TINY_MODEL = ["model.model_dim=32", "model.n_heads=2", "model.n_layers=1", "model.max_length=64",
              "model.dropout=0.1"]


@dataclass
class Built:
    meds: Path
    vocab: Path
    store: Path
    overrides: list[str]


def stage1_overrides(meds: Path, out: Path) -> list[str]:
    return [f"data.data_dir={meds}", f"data.labels_filepath={meds}/labels/infection",
            f"data.medical_lookup_filepath={meds}/lookups/medical_lookup.csv",
            f"data.lab_lookup_filepath={meds}/lookups/lab_lookup.csv",
            f"data.vocab_embedding_path={out}/vocab", f"data.embedding_output_dir={out}/store",
            "vocab.min_count=2", "sequences.max_length=64"]


def stage1_config(meds: Path, out: Path, *extra: str) -> Stage1Config:
    return load_config(Stage1Config, None, [*stage1_overrides(meds, out), *extra])


def train_config(store: Path, run_dir: Path, *extra: str, model_type: str = "transformer_encoder_embedded",
                 task: str = "classification") -> TrainConfig:
    return load_config(TrainConfig, None, [
        *TINY_MODEL, f"model.type={model_type}", f"data.embedding_output_dir={store}",
        f"training.output_dir={run_dir}", f"training.task={task}", "training.batch_size=16",
        "training.learning_rate=0.003", "training.epochs=3", "training.save_every=0", "training.class_weights=auto",
        "evaluate.n_bootstrap=100", *extra])
