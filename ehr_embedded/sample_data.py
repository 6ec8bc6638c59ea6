"""Write a small MEDS dataset whose label depends, in a known way, on what happened before prediction_time.

    python -m ehr_embedded.sample_data OUT_DIR [--subjects 240] [--seed 0]

The label is "infection in the 5 days before prediction_time": positives carry one diagnosis whose *description*
means infection (sepsis, pneumonia, urinary tract infection, cellulitis, ...) plus raised CRP / white-cell values;
negatives carry only other diagnoses. 5% of labels are flipped. Osteomyelitis (an infection) and low back pain
occur only in tuning / held_out subjects, so a model can score them only through their description embeddings.
Traps for a leaky pipeline: positives get an ICU transfer exactly at prediction_time and a discharge diagnosis
after it. Also included: codes described only by the lookup CSVs, a code described through its parent, a code with
no description at all, static events (null time), three labels with no event before prediction_time and two labels
for subjects that do not exist.

Layout: OUT/data/{train,tuning,held_out}/0.parquet, OUT/metadata/{codes,subject_splits}.parquet,
OUT/labels/infection/0.parquet (MEDS labels), OUT/labels.csv (the original's labels CSV),
OUT/lookups/{medical,lab}_lookup.csv (the original's lookup tables).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import guarded_main

INFECTION_DX = {
    "DIAGNOSIS//ICD10//A41.9": "Sepsis, unspecified organism",
    "DIAGNOSIS//ICD10//J18.9": "Pneumonia, unspecified organism",
    "DIAGNOSIS//ICD10//N39.0": "Urinary tract infection, site not specified",
    "DIAGNOSIS//ICD10//L03.90": "Cellulitis, unspecified",
    "DIAGNOSIS//ICD10//A49.9": "Bacterial infection, unspecified",
}
OTHER_DX = {
    "DIAGNOSIS//ICD10//I10": "Essential (primary) hypertension",
    "DIAGNOSIS//ICD10//E11.9": "Type 2 diabetes mellitus without complications",
    "DIAGNOSIS//ICD10//E78.5": "Hyperlipidemia, unspecified",
    "DIAGNOSIS//ICD10//M17.9": "Osteoarthritis of knee, unspecified",
    "DIAGNOSIS//ICD10//S52.50": "Fracture of lower end of radius",
    "DIAGNOSIS//ICD10//K21.9": "Gastro-esophageal reflux disease without esophagitis",
    "DIAGNOSIS//ICD10//J45.909": "Asthma, uncomplicated",
}
UNSEEN_INFECTION = ("DIAGNOSIS//ICD10//M86.9", "Osteomyelitis, unspecified")
UNSEEN_OTHER = ("DIAGNOSIS//ICD10//M54.5", "Low back pain")
# lab code -> (description, normal mean, sd, infected mean); descriptions live in the lab lookup CSV only
LABS = {
    "LAB//CRP//mg/L": ("C-reactive protein in serum", 4.0, 2.0, 60.0),
    "LAB//WBC//K/uL": ("White blood cell count in blood", 7.0, 1.5, 15.0),
    "LAB//NA//mEq/L": ("Sodium in serum", 140.0, 3.0, 138.0),
    "LAB//HGB//g/dL": ("Hemoglobin in blood", 13.5, 1.2, 13.0),
}
MEDS_LOOKUP = {
    "MEDICATION//metformin": "Metformin 500 mg oral tablet",
    "MEDICATION//lisinopril": "Lisinopril 10 mg oral tablet",
    "MEDICATION//atorvastatin": "Atorvastatin 20 mg oral tablet",
    "MEDICATION//acetaminophen": "Acetaminophen 500 mg oral tablet",
}
PARENT = ("PROCEDURE//CPT//99213", "Office or outpatient visit, established patient")
CHILD_OF_PARENT = "PROCEDURE//CPT//99213//modifier25"
NO_DESCRIPTION = "ADMIN//BED_MOVE"
LEAK_AT_PREDICTION = ("TRANSFER//ICU", "Transfer to the intensive care unit")
LEAK_AFTER = ("DIAGNOSIS//DISCHARGE//INFECTION", "Discharge diagnosis: infectious disease")
LABEL_FLIP = 0.05
HOUR = np.timedelta64(3600, "s").astype("timedelta64[us]")


def _subject_events(rng: np.random.Generator, subject_id: int, split: str, positive: bool,
                    start: np.datetime64) -> tuple[list[tuple], np.datetime64]:
    """Events (subject_id, time, code, value) of one subject and its prediction_time."""
    events: list[tuple] = [(subject_id, None, "GENDER//F" if rng.random() < 0.5 else "GENDER//M", np.nan),
                           (subject_id, start - rng.integers(20, 90) * 24 * 365 * HOUR, meds.birth_code, np.nan)]
    prediction = start + int(rng.integers(10 * 24, 20 * 24)) * HOUR
    visit_hours = np.sort(rng.integers(0, int((prediction - start) / HOUR) - 1, size=rng.integers(2, 5)))
    unseen_ok = split != "train"
    for h in visit_hours:
        t = start + int(h) * HOUR
        events.append((subject_id, t, PARENT[0] if rng.random() < 0.7 else CHILD_OF_PARENT, np.nan))
        dx_pool = list(OTHER_DX) + ([UNSEEN_OTHER[0]] if unseen_ok else [])
        for code in rng.choice(dx_pool, size=rng.integers(1, 3), replace=False):
            events.append((subject_id, t, str(code), np.nan))
        for med in rng.choice(list(MEDS_LOOKUP), size=rng.integers(0, 3), replace=False):
            events.append((subject_id, t + HOUR, str(med), np.nan))
        if rng.random() < 0.3:
            events.append((subject_id, t + 2 * HOUR, NO_DESCRIPTION, np.nan))
    infection_time = prediction - int(rng.integers(6, 5 * 24)) * HOUR
    if positive:
        if unseen_ok and rng.random() < 0.4:
            code = UNSEEN_INFECTION[0]
        else:
            code = str(rng.choice(list(INFECTION_DX)))
        events.append((subject_id, infection_time, code, np.nan))
    for k in range(int(rng.integers(1, 3))):
        t = infection_time + (k + 1) * 2 * HOUR
        for lab, (_, mean, sd, infected) in LABS.items():
            centre = infected if positive else mean
            events.append((subject_id, t, lab, float(max(0.1, rng.normal(centre, sd * (3 if positive else 1))))))
    if positive:
        events.append((subject_id, prediction, LEAK_AT_PREDICTION[0], np.nan))
        events.append((subject_id, prediction + 48 * HOUR, LEAK_AFTER[0], np.nan))
    events.append((subject_id, prediction + 24 * HOUR, str(rng.choice(list(OTHER_DX))), np.nan))
    return events, prediction


def write_sample(out: Path, n_subjects: int = 240, seed: int = 0) -> dict:
    """Write the dataset under `out`; returns counts."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    ids = np.arange(1000, 1000 + n_subjects)
    n_train, n_tuning = int(0.6 * n_subjects), int(0.2 * n_subjects)
    split_of = {int(s): ("train" if i < n_train else "tuning" if i < n_train + n_tuning else "held_out")
                for i, s in enumerate(ids)}
    rows: dict[str, list[tuple]] = {s: [] for s in meds_splits()}
    labels = []
    base = np.datetime64("2020-01-01T00:00:00", "us")
    for i, sid in enumerate(ids):
        sid = int(sid)
        positive = bool(rng.random() < 0.4)
        start = base + int(rng.integers(0, 365 * 24)) * HOUR
        events, prediction = _subject_events(rng, sid, split_of[sid], positive, start)
        rows[split_of[sid]].extend(events)
        label = positive ^ bool(rng.random() < LABEL_FLIP)
        labels.append((sid, prediction, label))
        if i < 3:  # a second label before any event of this subject: must be skipped and counted
            labels.append((sid, start - 24 * 365 * 200 * HOUR, False))
    labels += [(99_999_001, base, True), (99_999_002, base, False)]  # subjects that do not exist

    for split, evs in rows.items():
        df = pd.DataFrame(evs, columns=["subject_id", "time", "code", "numeric_value"])
        df["time"] = pd.to_datetime(df["time"]).astype("datetime64[us]")
        df = df.sort_values(["subject_id", "time"], kind="stable", na_position="first")
        table = pa.Table.from_pandas(df, preserve_index=False).cast(meds.DataSchema.schema().remove(
            meds.DataSchema.schema().get_field_index("text_value")))
        (out / "data" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "data" / split / "0.parquet")
    described = {**INFECTION_DX, **OTHER_DX, UNSEEN_INFECTION[0]: UNSEEN_INFECTION[1], UNSEEN_OTHER[0]: UNSEEN_OTHER[1],
                 PARENT[0]: PARENT[1], LEAK_AT_PREDICTION[0]: LEAK_AT_PREDICTION[1], LEAK_AFTER[0]: LEAK_AFTER[1],
                 meds.birth_code: "Birth", "GENDER//F": "Sex: female", "GENDER//M": "Sex: male"}
    codes = pd.DataFrame({"code": [*described, CHILD_OF_PARENT], "description": [*described.values(), None],
                          "parent_codes": [[] for _ in described] + [[PARENT[0]]]})
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(codes, preserve_index=False).cast(meds.CodeMetadataSchema.schema()),
                   out / "metadata" / "codes.parquet")
    splits = pd.DataFrame({"subject_id": list(split_of), "split": list(split_of.values())})
    pq.write_table(pa.Table.from_pandas(splits, preserve_index=False).cast(meds.SubjectSplitSchema.schema()),
                   out / "metadata" / "subject_splits.parquet")
    lab_df = pd.DataFrame(labels, columns=["subject_id", "prediction_time", "boolean_value"])
    lab_df["prediction_time"] = lab_df["prediction_time"].astype("datetime64[us]")
    (out / "labels" / "infection").mkdir(parents=True, exist_ok=True)
    label_schema = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                              ("boolean_value", pa.bool_())])
    pq.write_table(pa.Table.from_pandas(lab_df, preserve_index=False).cast(label_schema),
                   out / "labels" / "infection" / "0.parquet")
    lab_df.rename(columns={"boolean_value": "label"}).assign(label=lambda d: d["label"].astype(int)).to_csv(
        out / "labels.csv", index=False)
    (out / "lookups").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"code": list(MEDS_LOOKUP), "description": list(MEDS_LOOKUP.values())}).to_csv(
        out / "lookups" / "medical_lookup.csv", index=False)
    pd.DataFrame({"code": list(LABS), "description": [v[0] for v in LABS.values()]}).to_csv(
        out / "lookups" / "lab_lookup.csv", index=False)
    return {"subjects": n_subjects, "events": sum(len(v) for v in rows.values()), "labels": len(labels),
            "positives": int(lab_df["boolean_value"].sum())}


def meds_splits() -> tuple[str, str, str]:
    return (meds.train_split, meds.tuning_split, meds.held_out_split)


def _body(args: argparse.Namespace) -> int:
    counts = write_sample(Path(args.out_dir), args.subjects, args.seed)
    print(f"wrote {args.out_dir}: {counts}")
    return 0


parser = argparse.ArgumentParser(prog="python -m ehr_embedded.sample_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out_dir")
parser.add_argument("--subjects", type=int, default=240)
parser.add_argument("--seed", type=int, default=0)
main = guarded_main(_body, parser)

if __name__ == "__main__":
    raise SystemExit(main())
