"""Bad MEDS input gives exit code 2 and one line naming the file and the column; every shipped config parses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ehr_helpers import stage1_overrides

from common.config import load_config
from ehr_embedded import create_embeddings as create_embeddings_stage
from ehr_embedded import create_vocab_embeddings as vocab_stage
from ehr_embedded.config import BaselineConfig, ConvertConfig, ExportConfig, Stage1Config, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "ehr_embedded"


def copy_meds(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(meds: Path, fn) -> Path:
    shard = meds / "data" / "train" / "0.parquet"
    pq.write_table(fn(pq.read_table(shard)), shard)
    return shard


@pytest.mark.parametrize("mutate, needles", [
    (lambda t: t.drop_columns(["numeric_value"]).append_column("value", t.column("numeric_value")),
     ["numeric_value", "rename 'value'"]),
    (lambda t: t.set_column(1, "time", t.column("time").cast(pa.string())), ["'time'", "timestamp"]),
    (lambda t: t.set_column(0, "subject_id", t.column("subject_id").cast(pa.string())), ["'subject_id'", "int64"]),
    (lambda t: t.set_column(2, "code", pa.array([None] * len(t), pa.string())), ["null 'code'"]),
])
def test_bad_meds_shards_exit_2(built, tmp_path, capsys, mutate, needles):
    meds = copy_meds(built.meds, tmp_path / "meds")
    shard = rewrite_shard(meds, mutate)
    assert vocab_stage.main(stage1_overrides(meds, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(shard) in err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "out" / "vocab").exists()  # nothing half-written


def test_bad_splits_and_labels_exit_2(built, tmp_path, capsys):
    meds = copy_meds(built.meds, tmp_path / "meds")
    splits = pd.read_parquet(meds / "metadata" / "subject_splits.parquet")
    splits.loc[0, "split"] = "validation"
    splits.to_parquet(meds / "metadata" / "subject_splits.parquet")
    assert vocab_stage.main(stage1_overrides(meds, tmp_path / "out")) == 2
    assert "validation" in capsys.readouterr().err

    labels = tmp_path / "labels.parquet"
    pq.write_table(pq.read_table(built.meds / "labels" / "infection").drop_columns(["prediction_time"]), labels)
    args = [*stage1_overrides(built.meds, tmp_path / "out2"), f"data.vocab_embedding_path={built.vocab}",
            f"data.labels_filepath={labels}"]
    assert create_embeddings_stage.main(args) == 2
    assert "prediction_time" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "store").exists()


def test_original_labels_csv_is_accepted(built, tmp_path):
    args = [*stage1_overrides(built.meds, tmp_path), f"data.vocab_embedding_path={built.vocab}",
            f"data.labels_filepath={built.meds / 'labels.csv'}"]
    assert create_embeddings_stage.main(args) == 0
    parquet_store = pd.read_parquet(built.store / "train" / "sequences.parquet")
    csv_store = pd.read_parquet(tmp_path / "store" / "train" / "sequences.parquet")
    pd.testing.assert_frame_equal(parquet_store, csv_store)


def test_text_model_is_never_downloaded(built, tmp_path, capsys):
    args = [*stage1_overrides(built.meds, tmp_path), "model.name=sentence-transformers/all-mpnet-base-v2"]
    assert vocab_stage.main(args) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


def test_text_model_dimension_disagreement_exit_2(built, tmp_path, capsys):
    assert vocab_stage.main([*stage1_overrides(built.meds, tmp_path), "model.embedding_dim=768"]) == 2
    assert "384" in capsys.readouterr().err


CONFIG_CLASSES = {"create_embeddings": Stage1Config, "mimic_create_embeddings": Stage1Config,
                  "mimic_create_embeddings_windows": Stage1Config,
                  "baseline": BaselineConfig, "mimic_baseline": BaselineConfig, "export_pt": ExportConfig,
                  "mimic_convert": ConvertConfig}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses(path):
    cls = CONFIG_CLASSES.get(path.stem, TrainConfig)
    cfg = load_config(cls, path)
    if cls is TrainConfig:
        expected_task = "autoregressive" if "pretrain" in path.stem else "classification"
        assert cfg.training.task == expected_task
        assert cfg.model.embedding_dim is None  # read from the table, never hard-coded
