"""Stage 1: vocabulary, descriptions, sequences cut at prediction_time, compact store, .pt export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ehr_helpers import expected_sequences, stage1_config, stored_codes

from ehr_embedded import meds_io
from ehr_embedded.create_embeddings import STATIC_TIME, create_embeddings
from ehr_embedded.descriptions import DescriptionResolver, readable_code
from ehr_embedded.sample_data import LEAK_AFTER, LEAK_AT_PREDICTION, UNSEEN_INFECTION
from ehr_embedded.storage import UNK_ID, CodeTable, SequenceStore, export_pt, load_dataset_table, open_split
from studies.ehr_embedded.create_embeddings_loop import cut_indices, time_gaps_hours

H = 3_600_000_000  # microseconds per hour


def test_nothing_at_or_after_prediction_time_enters(built):
    """The leakage test: every stored sequence equals an independent cut strictly before prediction_time, and the
    sample's trap codes (planted exactly at and after prediction_time for positives) never appear."""
    expected = expected_sequences(built.meds, built.meds / "labels" / "infection", max_length=64)
    got = stored_codes(built.store)
    assert got.keys() == expected.keys()
    for key, codes in got.items():
        assert codes == expected[key], key
    flat = {c for codes in got.values() for c in codes}
    assert LEAK_AT_PREDICTION[0] not in flat and LEAK_AFTER[0] not in flat


def test_cut_indices_strict_static_and_recent():
    times = np.array([STATIC_TIME, STATIC_TIME, 0, H, 2 * H, 3 * H, 3 * H], dtype=np.int64)
    # an event exactly at prediction_time is not known yet
    assert cut_indices(times, 3 * H, 100).tolist() == [0, 1, 2, 3, 4]
    # truncation keeps static events and the most recent timed ones
    assert cut_indices(times, 3 * H, 4).tolist() == [0, 1, 3, 4]
    assert cut_indices(times, 10 * H, 3).tolist() == [0, 1, 6]
    assert cut_indices(times, -5, 10).tolist() == [0, 1]
    gaps = time_gaps_hours(times[[0, 1, 2, 3, 5]])
    np.testing.assert_allclose(gaps, [0, 0, 0, 1, 2], rtol=1e-6, atol=1e-9)


def test_report_counts_skips(built):
    report = json.loads((built.store / "report.json").read_text())
    counts = report["counts"]
    assert counts["labels_unknown_subject"] == 2  # two labels for subjects that do not exist
    assert counts["skipped_no_events_before_prediction"] == 3  # three labels before any event
    assert counts["sequences_written"] == sum(report[s]["sequences"] for s in meds_io.SPLITS)


def test_time_features_match_raw_times(built):
    store = open_split(built.store, "train")
    events = meds_io.read_all_events(built.meds).to_pandas()
    row = store.sequences.iloc[0]
    ev = events[(events["subject_id"] == row["subject_id"]) & (events["time"] < row["prediction_time"])]
    last = ev["time"].max()
    expected_hours = (row["prediction_time"] - last).total_seconds() / 3600
    assert row["hours_last_event_to_prediction"] == pytest.approx(expected_hours, rel=1e-6)
    item = store[0]
    span = (last - ev["time"].min()).total_seconds() / 3600
    assert float(np.sum(item["time_gaps"])) == pytest.approx(span, rel=1e-5)


def test_vocab_coverage_and_description_sources(built):
    coverage = json.loads((built.vocab / "coverage.json").read_text())
    by_source = coverage["by_source"]
    assert by_source["lookup"] >= 8  # 4 labs + 4 medications are described only by the lookup CSVs
    assert by_source["parent"] == 1 and by_source["readable"] == 1
    assert coverage["with_real_description"] == coverage["n_codes"] - 1
    table = CodeTable.load(built.vocab)
    assert table.dim == 384 and table.meta["model_name"] == "all-MiniLM-L6-v2"
    assert np.allclose(np.linalg.norm(table.embeddings[2:], axis=1), 1.0, rtol=1e-5, atol=1e-4)  # normalised descriptions
    assert not np.any(table.embeddings[0])  # [PAD]


def test_description_fallback_chain():
    codes = pd.DataFrame({"code": ["A//1", "P", "C//9"], "description": ["alpha", "parent desc", None],
                          "parent_codes": [[], [], ["P"]]})
    resolver = DescriptionResolver(codes, [{"L//2": "from lookup"}])
    assert resolver.resolve("A//1") == ("alpha", "codes")
    assert resolver.resolve("L//2") == ("from lookup", "lookup")
    assert resolver.resolve("C//9") == ("parent desc", "parent")
    assert resolver.resolve("A//1//mg") == ("alpha (mg)", "parent")
    assert resolver.resolve("ZZ_TOP//X") == (readable_code("ZZ_TOP//X"), "readable")
    assert readable_code("LAB//51265//K/uL") == "lab 51265 K/uL"


def test_unseen_codes_embedded_from_descriptions(built):
    """Osteomyelitis occurs only outside train: it gets a description-only row whose MiniLM embedding sits nearer
    the infection codes than the other diagnoses."""
    table = load_dataset_table(built.store)
    vocab = table.vocab.set_index("code")
    row = vocab.loc[UNSEEN_INFECTION[0]]
    assert not row["in_lm_vocab"] and row["description"] == UNSEEN_INFECTION[1]
    assert int(row["token_id"]) >= table.lm_vocab_size
    emb = table.embeddings
    target = emb[int(row["token_id"])]
    sepsis = emb[int(vocab.loc["DIAGNOSIS//ICD10//A41.9", "token_id"])]
    cellulitis = emb[int(vocab.loc["DIAGNOSIS//ICD10//L03.90", "token_id"])]
    hypertension = emb[int(vocab.loc["DIAGNOSIS//ICD10//I10", "token_id"])]
    assert max(target @ sepsis, target @ cellulitis) > target @ hypertension


def test_unseen_codes_to_unk_when_disabled(built, tmp_path):
    cfg = stage1_config(built.meds, tmp_path, "sequences.embed_unseen_codes=false",
                        f"data.vocab_embedding_path={built.vocab}")
    report = create_embeddings(cfg)
    assert report["counts"]["events_mapped_to_unk"] > 0
    table = load_dataset_table(tmp_path / "store")
    assert len(table.vocab) == table.lm_vocab_size
    held = open_split(tmp_path / "store", "held_out")
    assert (np.asarray(held.token_ids) == UNK_ID).any()


def test_compact_store_and_pt_export_round_trip(built, tmp_path):
    table = load_dataset_table(built.store)
    store = SequenceStore(built.store / "tuning")
    n = export_pt(store, table, tmp_path / "pt")
    assert n == len(store) and len(list((tmp_path / "pt").glob("patient_*.pt"))) == n
    item = torch.load(tmp_path / "pt" / "patient_3.pt", weights_only=True)
    ids = np.asarray(store[3]["token_ids"], np.int64)
    assert item["embeddings"].shape == (len(ids), 384)
    assert torch.equal(item["token_ids"], torch.from_numpy(ids))
    assert torch.equal(item["embeddings"], torch.from_numpy(table.embeddings[ids]))  # copied rows: bit for bit
    assert int(item["label"]) == store[3]["label"]
    pt_bytes = sum(f.stat().st_size for f in (tmp_path / "pt").iterdir())
    assert pt_bytes > 50 * store.nbytes_on_disk()


def test_pretrain_windows_cover_each_training_timeline_once(built, tmp_path):
    from ehr_helpers import train_config

    from ehr_embedded.pretrain import pretrain
    from ehr_embedded.storage import PRETRAIN_SPLIT

    cfg = stage1_config(built.meds, tmp_path, "sequences.pretrain_windows=true", "sequences.max_length=16",
                        f"data.vocab_embedding_path={built.vocab}")
    report = create_embeddings(cfg)
    windows = open_split(tmp_path / "store", PRETRAIN_SPLIT)
    assert report["counts"]["pretrain_windows"] == len(windows) > 0
    codes = load_dataset_table(tmp_path / "store").vocab["code"].to_numpy()
    splits = pd.read_parquet(built.meds / "metadata" / "subject_splits.parquet")
    train = set(splits.loc[splits["split"] == "train", "subject_id"])
    assert set(windows.sequences["subject_id"]) == train  # every training subject, no other split
    events = meds_io.read_all_events(built.meds).to_pandas()
    for subject_id in sorted(train)[:5]:
        ev = events[events["subject_id"] == subject_id]
        rows = np.flatnonzero(windows.sequences["subject_id"].to_numpy() == subject_id)
        timed = []
        for i in rows:
            item = codes[np.asarray(windows[i]["token_ids"])]
            assert len(item) <= 16 and list(item[:windows[i]["n_static"]]) == list(ev.loc[ev["time"].isna(), "code"])
            timed += list(item[windows[i]["n_static"]:])
        assert timed == list(ev.loc[ev["time"].notna()].sort_values("time", kind="stable")["code"])
    run = train_config(tmp_path / "store", tmp_path / "pre", "training.epochs=1", "data.pretrain_split=pretrain",
                       "model.max_length=16", model_type="transformer_decoder_embedded", task="autoregressive")
    assert np.isfinite(pretrain(run)["loss"])
    # data.pretrain_split=pretrain really trains on the windows, not on the label cuts of `train`
    assert f"on {len(windows)} sequences" in (tmp_path / "pre" / "train.log").read_text()
    assert len(windows) != len(open_split(tmp_path / "store", "train"))
