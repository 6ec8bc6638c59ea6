"""Bad input (MEDS shards, splits, labels, non-finite arrays) gives exit code 2 and one line naming the file and the
column or row; every shipped config parses; every stage has a main and every config key a docstring."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ehr_helpers import stage1_overrides, train_overrides

from common.config import load_config
from ehr_embedded import create_embeddings as create_embeddings_stage
from ehr_embedded import create_vocab_embeddings as vocab_stage
from ehr_embedded import finetune as finetune_stage
from ehr_embedded import pretrain as pretrain_stage
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
    # the same cut of the same events; its float columns (hours to prediction) compared with a float64 tolerance
    pd.testing.assert_frame_equal(parquet_store, csv_store, check_exact=False, rtol=1e-12, atol=0.0)


def test_text_model_is_never_downloaded(built, tmp_path, capsys):
    args = [*stage1_overrides(built.meds, tmp_path), "model.name=sentence-transformers/all-mpnet-base-v2"]
    assert vocab_stage.main(args) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


def test_text_model_dimension_disagreement_exit_2(built, tmp_path, capsys):
    assert vocab_stage.main([*stage1_overrides(built.meds, tmp_path), "model.embedding_dim=768"]) == 2
    assert "384" in capsys.readouterr().err


# config file name part -> its class (every other shipped config drives pretrain / finetune / evaluate)
CONFIG_CLASSES = {"create_embeddings": Stage1Config, "baseline": BaselineConfig, "export_pt": ExportConfig,
                  "mimic_convert": ConvertConfig}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses(path):
    cls = next((c for part, c in CONFIG_CLASSES.items() if part in path.stem), TrainConfig)
    cfg = load_config(cls, path)
    if cls is TrainConfig:
        expected_task = "autoregressive" if "pretrain" in path.stem else "classification"
        assert cfg.training.task == expected_task
        assert cfg.model.embedding_dim is None  # read from the table, never hard-coded


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_non_finite_code_embedding_exit_2_names_file_and_row(built, tmp_path, capsys):
    store = copy_store(built.store, tmp_path / "store")
    path = store / "code_table" / "embeddings.npy"
    table = np.load(path)
    table[5, 7] = np.nan
    table[9, 0] = np.inf
    np.save(path, table)
    code = pd.read_parquet(store / "code_table" / "vocab.parquet")["code"].iloc[5]
    assert finetune_stage.main(train_overrides(store, tmp_path / "run", "training.epochs=1")) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"row 5 (id '{code}')" in err and "2 bad rows" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_infinite_stored_value_exit_2_names_file_and_sequence(built, tmp_path, capsys):
    store = copy_store(built.store, tmp_path / "store")
    offsets = np.load(store / "train" / "offsets.npy")
    values = np.load(store / "train" / "values.npy")
    values[offsets[3] + 1] = -np.inf  # second event of sequence 3; NaN elsewhere stays legal ("no value")
    np.save(store / "train" / "values.npy", values)
    args = train_overrides(store, tmp_path / "run", "training.epochs=1", model_type="transformer_decoder_embedded",
                           task="autoregressive")
    assert pretrain_stage.main(args) == 2
    err = capsys.readouterr().err
    assert str(store / "train" / "values.npy") in err and "sequence 3 (id" in err


def test_infinite_meds_numeric_value_exit_2_names_shard_and_row(built, tmp_path, capsys):
    meds = copy_meds(built.meds, tmp_path / "meds")

    def poison(table: pa.Table) -> pa.Table:
        values = table.column("numeric_value").to_pylist()
        values[11] = float("inf")
        return table.set_column(3, "numeric_value", pa.array(values, table.column("numeric_value").type))

    shard = rewrite_shard(meds, poison)
    assert vocab_stage.main(stage1_overrides(meds, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "row 11 " in err
    assert not (tmp_path / "out" / "vocab").exists()


def test_readme_stage_table_lists_only_real_stages():
    """The README's stage table names only stages `python -m ehr_embedded` lists (tests/test_repo.py checks every
    listed stage has a `main` and a docstring for every config key)."""
    import re

    from ehr_embedded.__main__ import STAGES

    readme = (Path(__file__).resolve().parents[2] / "ehr_embedded" / "README.md").read_text()
    in_readme = set(re.findall(r"^\| `(\w+)` \|", readme, flags=re.M))
    assert in_readme and in_readme <= set(STAGES), in_readme - set(STAGES)


def test_summarize_table_quotes_the_reports(tmp_path, capsys):
    """The README tables come from `python -m ehr_embedded.summarize`: values copied from the reports, tuning AUROC
    from the run's last best epoch, and a mean +- sd row for a label given more than once."""
    import json

    from ehr_embedded import summarize

    def report(path, auroc, extra=None):
        path.parent.mkdir(parents=True)
        body = {"n": 40, "positives": 15, "auroc": {"value": auroc, "low": auroc - 0.1, "high": auroc + 0.1},
                "auprc": {"value": 0.5}, "brier": {"value": 0.2}, **(extra or {})}
        path.write_text(json.dumps(body))
        return path

    base = report(tmp_path / "base" / "reports" / "baseline_held_out.json", 0.7, {"tuning_auroc": 0.66})
    runs = [report(tmp_path / f"enc{i}" / "reports" / "eval_held_out.json", a) for i, a in enumerate((0.6, 0.8))]
    (tmp_path / "enc0" / "metrics.jsonl").write_text('{"epoch": 1, "tuning_auroc": 0.7, "best": true}\n'
                                                     '{"epoch": 2, "tuning_auroc": 0.9, "best": true}\n'
                                                     '{"epoch": 3, "tuning_auroc": 0.95, "best": false}\n')
    args = [str(tmp_path / "out"), f"counts={base}", f"enc={runs[0]}", f"enc={runs[1]}"]
    assert summarize.main(args) == 0
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [(r["label"], r["auroc"], r["tuning_auroc"]) for r in rows] == [
        ("counts", 0.7, 0.66), ("enc", 0.6, 0.9), ("enc", 0.8, None)]
    assert "| enc: mean +- sd of 2 | | 0.700 +- 0.141 |" in (tmp_path / "out.md").read_text()
    assert summarize.main([str(tmp_path / "o2"), f"x={tmp_path / 'missing.json'}"]) == 2
    assert "missing.json" in capsys.readouterr().err
