"""predict on new MEDS data: `python -m ehr_embedded.predict run_dir=RUN meds_dir=DIR labels=PATH` cuts any labelled
subjects with the run's own code table and settings and gives exactly the predictions of the stored split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from ehr_helpers import train_config

from ehr_embedded import predict as predict_stage
from ehr_embedded.finetune import finetune
from ehr_embedded.predict import predict_split


@pytest.fixture(scope="module")
def run(built, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("predict_meds") / "run"
    finetune(train_config(built.store, run_dir, "training.epochs=1"))
    return run_dir


def test_predict_on_meds_dir_equals_the_stored_split(built, run, tmp_path):
    """The held_out subjects' labels, given as new data with no splits file: same rows, same probabilities (bit for
    bit) as predicting the stored held_out split."""
    meds = tmp_path / "new_meds"
    shutil.copytree(built.meds / "data", meds / "data")
    shutil.copytree(built.meds / "metadata", meds / "metadata")
    (meds / "metadata" / "subject_splits.parquet").unlink()  # not needed for new data
    splits = pd.read_parquet(built.meds / "metadata" / "subject_splits.parquet")
    held = set(splits.loc[splits["split"] == "held_out", "subject_id"])
    labels = pq.read_table(built.meds / "labels" / "infection").to_pandas()
    labels = labels[labels["subject_id"].isin(held)]
    labels.to_parquet(tmp_path / "labels.parquet", index=False)
    out = tmp_path / "pred.parquet"
    assert predict_stage.main([f"run_dir={run}", f"meds_dir={meds}", f"labels={tmp_path / 'labels.parquet'}",
                               f"output={out}"]) == 0
    got = pd.read_parquet(out)
    expected = predict_split(run, "held_out")
    assert len(got) == len(expected) > 10
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)
    # bit for bit: the new store holds the held_out rows in the same order with the same code rows, so predict_split
    # runs the same batches through the same checkpoint
    assert np.array_equal(got["predicted_boolean_probability"].to_numpy(),
                          expected["predicted_boolean_probability"].to_numpy())


def test_predict_on_meds_dir_any_subjects_and_unseen_codes(built, run, tmp_path, caplog):
    """Subjects of every split at once (no split decides anything), one with a code the run never saw: it gets a
    description row appended after the run's table, and every label with history gets a prediction."""
    meds = tmp_path / "new_meds"
    shutil.copytree(built.meds / "data", meds / "data")
    shard = meds / "data" / "train" / "0.parquet"
    events = pq.read_table(shard).to_pandas()
    first = events["subject_id"].iloc[0]
    extra = events[(events["subject_id"] == first) & events["time"].notna()].iloc[[0]].assign(code="LAB//NEVER//SEEN")
    pd.concat([events, extra], ignore_index=True).to_parquet(shard, index=False)
    labels = pq.read_table(built.meds / "labels" / "infection").to_pandas()
    labels.to_parquet(tmp_path / "labels.parquet", index=False)
    with caplog.at_level("INFO"):
        frame = predict_stage.predict_meds(run, meds, tmp_path / "labels.parquet")
    assert "1 codes outside the training vocabulary embedded from descriptions" in caplog.text
    stored = pd.concat([predict_split(run, s) for s in ("train", "tuning", "held_out")])
    assert len(frame) == len(stored)  # the same labels have history; unknown subjects (2) and early labels (3) skip
    merged = frame.merge(stored, on=["subject_id", "prediction_time"], suffixes=("", "_stored"))
    assert len(merged) == len(frame)
    same = merged["subject_id"] != first
    # every split's rows in one store: other batches (composition, padded length), so float32 sums in another
    # order; a row scored from the wrong sequence would be off by far more than this
    np.testing.assert_allclose(merged.loc[same, "predicted_boolean_probability"],
                               merged.loc[same, "predicted_boolean_probability_stored"], rtol=1e-5, atol=1e-6)


def test_new_data_is_cut_with_the_run_store_settings(built, run, tmp_path):
    """The temporary store takes the run's store table and its report's settings (a store cut with max_length=9 and a
    time window gives those), every labelled subject in held_out."""
    cfg = predict_stage.meds_stage1_config(run, built.meds, built.meds / "labels.csv", tmp_path)
    assert cfg.data.vocab_embedding_path == built.store / "code_table"
    assert (cfg.sequences.max_length, cfg.sequences.all_to_split, cfg.sequences.max_history_hours) == (64, "held_out", None)
    report = json.loads((built.store / "report.json").read_text())
    report["max_length"], report["sequences"]["max_history_hours"] = 9, 48.0
    store = tmp_path / "other_store"
    shutil.copytree(built.store, store)
    (store / "report.json").write_text(json.dumps(report))
    config = (run / "config.yaml").read_text().replace(str(built.store), str(store))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config)
    cfg = predict_stage.meds_stage1_config(tmp_path / "run", built.meds, built.meds / "labels.csv", tmp_path)
    assert (cfg.sequences.max_length, cfg.sequences.max_history_hours) == (9, 48.0)
    assert cfg.data.vocab_embedding_path == store / "code_table"


def test_predict_meds_dir_needs_labels(run, tmp_path, capsys):
    assert predict_stage.main([f"run_dir={run}", f"meds_dir={tmp_path}"]) == 2
    assert "labels=PATH" in capsys.readouterr().err
