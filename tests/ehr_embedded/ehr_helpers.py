"""Helpers shared by the ehr_embedded tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import load_config
from ehr_embedded import meds_io
from ehr_embedded.config import Stage1Config, TrainConfig
from ehr_embedded.storage import CODE_TABLE_DIR, CodeTable, load_dataset_table, open_split, write_split

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


def train_overrides(store: Path, run_dir: Path, *extra: str, model_type: str = "transformer_encoder_embedded",
                    task: str = "classification") -> list[str]:
    """The tests' tiny training setup as `dotted.key=value` overrides (in-process or on a command line)."""
    return [*TINY_MODEL, f"model.type={model_type}", f"data.embedding_output_dir={store}",
            f"training.output_dir={run_dir}", f"training.task={task}", "training.batch_size=16",
            "training.learning_rate=0.003", "training.epochs=3", "training.save_every=0", "training.class_weights=auto",
            "evaluate.n_bootstrap=100", *extra]


def train_config(store: Path, run_dir: Path, *extra: str, model_type: str = "transformer_encoder_embedded",
                 task: str = "classification") -> TrainConfig:
    return load_config(TrainConfig, None, train_overrides(store, run_dir, *extra, model_type=model_type, task=task))


def expected_sequences(meds_dir: Path, labels_path: Path, max_length: int) -> dict:
    """Independent re-derivation of every stored sequence, straight from the raw shards with pandas: the codes of
    the label's last `max_length` events strictly before prediction_time, static (null-time) events first."""
    events = meds_io.read_all_events(meds_dir).to_pandas()
    labels = meds_io.read_labels(labels_path)
    by_subject = dict(tuple(events.groupby("subject_id", sort=False)))
    out = {}
    for lab in labels.itertuples():
        ev = by_subject.get(lab.subject_id)
        if ev is None:
            continue
        static = ev[ev["time"].isna()]
        timed = ev[ev["time"].notna() & (ev["time"] < lab.prediction_time)].sort_values("time", kind="stable")
        if timed.empty:
            continue
        keep = list(static["code"]) + list(timed["code"])[-(max_length - len(static)):]
        out[(lab.subject_id, pd.Timestamp(lab.prediction_time))] = keep
    return out


def stored_codes(store_dir: Path) -> dict:
    """(subject_id, prediction_time) -> the code strings a compact store holds for that label."""
    codes = load_dataset_table(store_dir).vocab["code"].to_numpy()
    out = {}
    for split in meds_io.SPLITS:
        store = open_split(store_dir, split)
        for i in range(len(store)):
            row = store.sequences.iloc[i]
            out[(row["subject_id"], pd.Timestamp(row["prediction_time"]))] = list(codes[store[i]["token_ids"]])
    return out


def write_synthetic_code_table(store: Path, codes: list[str], dim: int, rng: np.random.Generator) -> None:
    """A code table for synthetic stores: `codes` (starting with [PAD], [UNK]) as the next-event vocabulary, random
    `dim`-d embeddings drawn from `rng`, [PAD]'s row zero."""
    n_codes = len(codes)
    vocab = pd.DataFrame({"token_id": np.arange(n_codes, dtype=np.int32), "code": codes, "description": codes,
                          "description_source": "synthetic", "train_count": np.ones(n_codes, np.int64),
                          "value_mean": np.full(n_codes, np.nan, np.float32),
                          "value_std": np.full(n_codes, np.nan, np.float32), "in_lm_vocab": np.ones(n_codes, bool)})
    embeddings = rng.normal(size=(n_codes, dim)).astype(np.float32)
    embeddings[0] = 0.0
    CodeTable(vocab, embeddings, {"model_name": "synthetic"}).save(store / CODE_TABLE_DIR)


def write_synthetic_splits(store: Path, sizes: dict[str, int], draw_row: Callable[[str, int], tuple],
                           rng: np.random.Generator) -> Path:
    """The splits of a synthetic store (its code table is written by write_synthetic_code_table): row i of a split
    holds the token ids and label `draw_row(split, i)` returns, then gaps drawn from `rng` (uniform 0-5 h) and no
    numeric values. Every third subject holds two rows, so subjects and rows differ."""
    next_subject = 1
    for split, n in sizes.items():
        rows, ids, gaps = [], [], []
        for i in range(n):
            if i % 3 != 1:
                next_subject += 1
            seq, label = draw_row(split, i)
            ids.append(np.asarray(seq, np.int32))
            gaps.append(rng.uniform(0, 5, size=len(seq)).astype(np.float32))
            rows.append({"subject_id": next_subject, "label": label, "n_static": 0,
                         "prediction_time": pd.Timestamp("2020-01-01") + pd.Timedelta(days=i),
                         "hours_last_event_to_prediction": 1.0})
        frame = pd.DataFrame(rows).astype({"prediction_time": "datetime64[us]"})
        write_split(store / split, frame, ids, [np.full(len(s), np.nan, np.float32) for s in ids], gaps)
    return store
