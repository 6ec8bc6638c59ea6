"""Real data: the MIMIC-IV demo conversion, its tasks checked against the raw MIMIC tables, and a small stage 1
with the real MiniLM whose sequences never reach past prediction_time."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
from ehr_helpers import expected_sequences, stored_codes

from common.config import load_config
from ehr_embedded.config import ConvertConfig, Stage1Config
from ehr_embedded.convert_mimic import convert
from ehr_embedded.create_embeddings import create_embeddings
from ehr_embedded.create_vocab_embeddings import create_vocab_embeddings
from ehr_embedded.storage import CodeTable

pytestmark = pytest.mark.real_data
N_SUBJECTS = 10


@pytest.fixture(scope="module")
def converted(real_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mimic") / "meds"
    cfg = load_config(ConvertConfig, None, [
        f"events_filepath={real_data_dir}/ehr_mimic4demo_meds/mimic_iv_demo_meds_events.parquet",
        f"raw_dir={real_data_dir}/ehr_mimic4demo_raw", f"output_dir={out}", f"subjects_limit={N_SUBJECTS}",
        "split_fractions=[0.6, 0.2, 0.2]"])
    report = convert(cfg)
    return out, report


def test_conversion_is_canonical_meds_with_real_descriptions(converted):
    out, report = converted
    shard = pq.read_table(out / "data" / "train" / "0.parquet")
    assert shard.column_names == ["subject_id", "time", "code", "numeric_value"]
    assert str(shard.schema.field("numeric_value").type) == "float"
    codes = pd.read_parquet(out / "metadata" / "codes.parquet").set_index("code")["description"]
    platelets = [c for c in codes.index if c.startswith("LAB//51265//")]
    assert platelets and "Platelet" in codes[platelets[0]]  # hosp/d_labitems itemid 51265
    assert report["descriptions"]["d_labitems"] > 0 and report["descriptions"]["d_icd_diagnoses"] > 0
    splits = pd.read_parquet(out / "metadata" / "subject_splits.parquet")
    assert len(splits) == N_SUBJECTS and set(splits["split"]) == {"train", "tuning", "held_out"}


def test_long_stay_labels_agree_with_raw_admissions_table(converted, real_data_dir):
    """Independent check against hosp/admissions.csv.gz: prediction_time = admittime + 24 h, label = stay > 7 days,
    and no admission discharged before its prediction_time is labelled."""
    out, _ = converted
    labels = pd.read_parquet(out / "labels" / "long_stay")
    adm = pd.read_csv(real_data_dir / "ehr_mimic4demo_raw" / "hosp" / "admissions.csv.gz",
                      parse_dates=["admittime", "dischtime"])
    adm = adm[adm["subject_id"].isin(labels["subject_id"].unique())]
    adm["prediction_time"] = adm["admittime"] + pd.Timedelta(hours=24)
    merged = labels.merge(adm, on=["subject_id", "prediction_time"], how="left", validate="one_to_one")
    assert merged["dischtime"].notna().all()
    assert (merged["dischtime"] > merged["prediction_time"]).all()
    los_days = (merged["dischtime"] - merged["admittime"]).dt.total_seconds() / 86400
    assert (merged["boolean_value"] == (los_days > 7)).all()
    eligible = adm[adm["dischtime"] > adm["prediction_time"]]
    assert len(labels) <= len(eligible) and len(labels) >= 1


def test_small_stage1_on_mimic_never_reaches_past_prediction_time(converted, tmp_path):
    out, _ = converted
    cfg = load_config(Stage1Config, None, [
        f"data.data_dir={out}", f"data.labels_filepath={out}/labels/long_stay",
        f"data.vocab_embedding_path={tmp_path}/vocab", f"data.embedding_output_dir={tmp_path}/store",
        "vocab.min_count=50", "sequences.max_length=48"])
    create_vocab_embeddings(cfg)
    report = create_embeddings(cfg)
    assert report["counts"]["sequences_written"] >= 1
    table = CodeTable.load(tmp_path / "vocab")
    assert table.dim == 384
    assert table.meta["coverage"]["by_source"]["codes"] > 0  # real MIMIC dictionary descriptions were used
    expected = expected_sequences(out, out / "labels" / "long_stay", max_length=48)
    got = stored_codes(tmp_path / "store")
    assert got == expected
