"""Convert the shared MIMIC-IV demo (one MEDS-like parquet) to canonical MEDS, with real code descriptions and
two prediction tasks derived from the events.

    python -m ehr_embedded.convert_mimic --config configs/ehr_embedded/mimic_convert.yaml
    python -m ehr_embedded.convert_mimic output_dir=/tmp/mimic_meds subjects_limit=20

Events: `value` -> `numeric_value`, `table` dropped, sorted by subject and time, one shard per split under
`data/<split>/0.parquet`. Splits: seeded by subject (default 60/20/20; the demo has only 100 subjects).
Descriptions (`metadata/codes.parquet`) come only from the real MIMIC dictionaries: `LAB//<itemid>//<unit>` from
hosp/d_labitems, `DIAGNOSIS//ICD//<version>//<code>` from hosp/d_icd_diagnoses, ICU item codes (INFUSION_START/END,
PROCEDURE//START/END, SUBJECT_FLUID_OUTPUT) from icu/d_items. Other codes keep no description here; stage 1's
fallback chain then reads the code string.

Tasks (`labels/<task>/0.parquet`, MEDS label schema), one row per hospital admission, predicted at
`admission + prediction_hours_after_admission` (24 h) from what is known then:

- `long_stay`: length of stay > `long_stay_days` (7 days). Admissions discharged (or dead) before prediction_time
  are left out: their outcome is already known.
- `icu_after_24h`: an ICU admission after prediction_time and before discharge. Admissions with an ICU admission
  before prediction_time, or discharged before it, are left out.

Diagnoses and DRG codes of an admission carry its discharge time in this data, so they never leak into its own
prediction window.
"""

from __future__ import annotations

import logging
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import setup_logging
from ehr_embedded.config import ConvertConfig
from ehr_embedded.meds_io import SPLITS
from ehr_embedded.storage import atomic_dir

log = logging.getLogger(__name__)
EVENT_SCHEMA = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                          ("numeric_value", pa.float32())])
LABEL_SCHEMA = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                          ("boolean_value", pa.bool_())])
ICU_ITEM_PREFIXES = {"INFUSION_START": "Start of infusion", "INFUSION_END": "End of infusion",
                     "PROCEDURE//START": "Start of ICU procedure", "PROCEDURE//END": "End of ICU procedure",
                     "SUBJECT_FLUID_OUTPUT": "Fluid output"}


def _read_dictionary(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: MIMIC dictionary not found; point raw_dir at the MIMIC-IV demo (hosp/, icu/)")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def describe_codes(codes: list[str], raw_dir: Path) -> tuple[list[str | None], dict[str, int]]:
    """A description per code from the real dictionaries (None where no dictionary covers it), and counts."""
    labs = _read_dictionary(raw_dir / "hosp" / "d_labitems.csv.gz").set_index("itemid")
    icd = _read_dictionary(raw_dir / "hosp" / "d_icd_diagnoses.csv.gz")
    icd_titles = {(v, c): t for c, v, t in zip(icd["icd_code"], icd["icd_version"], icd["long_title"])}
    items = _read_dictionary(raw_dir / "icu" / "d_items.csv.gz").set_index("itemid")
    out: list[str | None] = []
    counts = {"d_labitems": 0, "d_icd_diagnoses": 0, "d_items": 0, "none": 0}
    for code in codes:
        parts = code.split("//")
        desc, source = None, "none"
        if parts[0] == "LAB" and len(parts) >= 2 and parts[1] in labs.index:
            row = labs.loc[parts[1]]
            unit = f" [{parts[2]}]" if len(parts) > 2 and parts[2] != "UNK" else ""
            desc, source = f"{row['label']} ({row['fluid']}, {row['category']}){unit}", "d_labitems"
        elif parts[0] == "LAB" and len(parts) >= 2 and parts[1] in items.index:  # ICU charted measurements
            row = items.loc[parts[1]]
            unit = f" [{parts[2]}]" if len(parts) > 2 and parts[2] != "UNK" else ""
            desc, source = f"{row['label']} ({row['category']}){unit}", "d_items"
        elif parts[0] == "DIAGNOSIS" and len(parts) == 4 and (parts[2], parts[3]) in icd_titles:
            desc, source = icd_titles[(parts[2], parts[3])], "d_icd_diagnoses"
        else:
            for prefix, verb in ICU_ITEM_PREFIXES.items():
                n = prefix.count("//") + 1
                if "//".join(parts[:n]) == prefix and len(parts) > n and parts[n] in items.index:
                    row = items.loc[parts[n]]
                    unit = f" [{parts[n + 1]}]" if len(parts) > n + 1 else ""
                    desc, source = f"{verb}: {row['label']} ({row['category']}){unit}", "d_items"
                    break
        out.append(desc)
        counts[source] += 1
    return out, counts


def admissions(events: pd.DataFrame) -> pd.DataFrame:
    """One row per hospital admission: subject_id, admit, discharge (the k-th admission pairs with the k-th discharge)."""
    adm = events[events["code"].str.startswith("HOSPITAL_ADMISSION")][["subject_id", "time"]]
    dis = events[events["code"].str.startswith("HOSPITAL_DISCHARGE")][["subject_id", "time"]]
    adm = adm.sort_values(["subject_id", "time"], kind="stable").assign(k=lambda d: d.groupby("subject_id").cumcount())
    dis = dis.sort_values(["subject_id", "time"], kind="stable").assign(k=lambda d: d.groupby("subject_id").cumcount())
    out = adm.merge(dis, on=["subject_id", "k"], suffixes=("_admit", "_discharge"))
    out = out.rename(columns={"time_admit": "admit", "time_discharge": "discharge"})
    bad = out["discharge"] < out["admit"]
    if bad.any():
        log.warning("%d admissions pair with an earlier discharge; left out", int(bad.sum()))
    return out[~bad][["subject_id", "admit", "discharge"]].reset_index(drop=True)


def make_tasks(events: pd.DataFrame, hours_after: float, long_stay_days: float) -> dict[str, pd.DataFrame]:
    """The two admission-level tasks (see the module docstring) as MEDS label frames."""
    adm = admissions(events)
    adm["prediction_time"] = adm["admit"] + pd.Timedelta(hours=hours_after)
    icu = events[events["code"].str.startswith("ICU_ADMISSION")][["subject_id", "time"]]
    death_time = events[events["code"] == meds.death_code].groupby("subject_id")["time"].min()
    still_in = adm["discharge"] > adm["prediction_time"]
    died_before = (adm["subject_id"].map(death_time) <= adm["prediction_time"]).fillna(False).to_numpy(bool)
    eligible = adm[still_in & ~died_before].copy()
    los_hours = (eligible["discharge"] - eligible["admit"]).dt.total_seconds() / 3600
    long_stay = eligible.assign(boolean_value=los_hours > 24 * long_stay_days)

    pairs = eligible.reset_index().merge(icu, on="subject_id", how="left")
    in_stay = (pairs["time"] >= pairs["admit"]) & (pairs["time"] <= pairs["discharge"])
    before = (in_stay & (pairs["time"] < pairs["prediction_time"])).groupby(pairs["index"]).any()
    after = (in_stay & (pairs["time"] >= pairs["prediction_time"])).groupby(pairs["index"]).any()
    icu_task = eligible.assign(icu_before=before.reindex(eligible.index).fillna(False).to_numpy(bool),
                               boolean_value=after.reindex(eligible.index).fillna(False).to_numpy(bool))
    icu_task = icu_task[~icu_task["icu_before"]]
    cols = ["subject_id", "prediction_time", "boolean_value"]
    return {"long_stay": long_stay[cols].reset_index(drop=True), "icu_after_24h": icu_task[cols].reset_index(drop=True)}


def convert(cfg: ConvertConfig) -> dict:
    if not Path(cfg.events_filepath).is_file():
        raise UserError(f"{cfg.events_filepath}: events parquet not found; set events_filepath (REAL_DATA_DIR)")
    if len(cfg.split_fractions) != 3 or abs(sum(cfg.split_fractions) - 1.0) > 1e-6:
        raise UserError(f"split_fractions={cfg.split_fractions}: give three fractions (train, tuning, held_out) "
                        f"summing to 1")
    raw = pq.read_table(cfg.events_filepath)
    if "value" not in raw.column_names and "numeric_value" not in raw.column_names:
        raise UserError(f"{cfg.events_filepath}: expected a 'value' (or 'numeric_value') column")
    events = raw.to_pandas().rename(columns={"value": "numeric_value"}).drop(columns=["table"], errors="ignore")
    events["time"] = pd.to_datetime(events["time"]).astype("datetime64[us]")
    subjects = np.sort(events["subject_id"].unique())
    if cfg.subjects_limit:
        subjects = subjects[:cfg.subjects_limit]
        events = events[events["subject_id"].isin(subjects)]
    events = events.sort_values(["subject_id", "time"], kind="stable", na_position="first").reset_index(drop=True)
    order = np.random.default_rng(cfg.seed).permutation(subjects)
    cut1 = int(round(cfg.split_fractions[0] * len(order)))
    cut2 = cut1 + int(round(cfg.split_fractions[1] * len(order)))
    split_of = {int(s): SPLITS[0] if i < cut1 else SPLITS[1] if i < cut2 else SPLITS[2] for i, s in enumerate(order)}
    codes = sorted(events["code"].unique())
    descriptions, desc_counts = describe_codes(codes, Path(cfg.raw_dir))
    tasks = make_tasks(events, cfg.prediction_hours_after_admission, cfg.long_stay_days)

    report = {"source": str(cfg.events_filepath), "dictionaries": str(cfg.raw_dir), "subjects": len(subjects),
              "events": len(events), "codes": len(codes), "descriptions": desc_counts,
              "splits": {s: sum(v == s for v in split_of.values()) for s in SPLITS}, "tasks": {}}
    with atomic_dir(Path(cfg.output_dir)) as tmp:
        for split in SPLITS:
            part = events[events["subject_id"].map(split_of) == split][["subject_id", "time", "code", "numeric_value"]]
            (tmp / "data" / split).mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False).cast(EVENT_SCHEMA),
                           tmp / "data" / split / "0.parquet")
        (tmp / "metadata").mkdir()
        code_table = pa.table({"code": codes, "description": descriptions,
                               "parent_codes": [[] for _ in codes]}).cast(meds.CodeMetadataSchema.schema())
        pq.write_table(code_table, tmp / "metadata" / "codes.parquet")
        splits = pa.table({"subject_id": list(split_of), "split": list(split_of.values())})
        pq.write_table(splits.cast(meds.SubjectSplitSchema.schema()), tmp / "metadata" / "subject_splits.parquet")
        for name, frame in tasks.items():
            (tmp / "labels" / name).mkdir(parents=True)
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).cast(LABEL_SCHEMA),
                           tmp / "labels" / name / "0.parquet")
            report["tasks"][name] = {
                s: {"labels": int((frame["subject_id"].map(split_of) == s).sum()),
                    "positives": int(frame.loc[frame["subject_id"].map(split_of) == s, "boolean_value"].sum())}
                for s in SPLITS}
        write_json(tmp / "metadata" / "dataset.json", {"dataset_name": "MIMIC-IV demo (MEDS)",
                                                       "etl_name": "ehr_embedded.convert_mimic", **report})
    log.info("MEDS -> %s: %d subjects, %d events, %d codes, descriptions %s, tasks %s", cfg.output_dir,
             len(subjects), len(events), len(codes), desc_counts, report["tasks"])
    return report


def run(cfg: ConvertConfig) -> int:
    setup_logging()
    convert(cfg)
    return 0


main = config_main(ConvertConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
