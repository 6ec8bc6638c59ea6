"""Reading MEDS (and the original pipeline's CSV inputs) with validation at the boundary.

MEDS layout (https://github.com/Medical-Event-Data-Standard/meds)::

    <root>/data/**/*.parquet                 subject_id int64, time timestamp[us] (null = static), code str,
                                             numeric_value float32 (null = no value)
    <root>/metadata/codes.parquet            code, description, parent_codes list<str>
    <root>/metadata/subject_splits.parquet   subject_id, split in {train, tuning, held_out}
    labels                                   subject_id, prediction_time, boolean_value | integer_value

Every error names the file, the column and the fix (exit code 2 through common.cli).
"""

from __future__ import annotations

from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.cli import UserError
from common.io import require_finite

SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)  # ("train", "tuning", "held_out")
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")


def data_files(root: Path) -> list[Path]:
    """All event shards under `<root>/data/`, sorted (raises UserError when there are none)."""
    data_dir = Path(root) / meds.data_subdirectory
    files = sorted(data_dir.rglob("*.parquet")) if data_dir.is_dir() else []
    if not files:
        raise UserError(f"{data_dir}: no MEDS event shards (*.parquet) found; point data.data_dir at a MEDS root "
                        f"holding data/**/*.parquet and metadata/")
    return files


def _check_type(path: Path, column: str, dtype: pa.DataType, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"{path}: column '{column}' has type {dtype}, expected {expected}; "
                        f"cast it when writing the MEDS shard")


def read_events(path: Path) -> pa.Table:
    """One MEDS shard as an Arrow table with exactly `EVENT_COLUMNS`, typed int64/timestamp[us]/string/float32.

    Raises UserError on a missing column, a wrong dtype or an unreadable file. Integer `numeric_value` is
    accepted and cast (lossless for the sizes seen in practice); other casts are refused.
    """
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read parquet ({exc}); re-write the shard") from exc
    missing = [c for c in EVENT_COLUMNS if c not in table.column_names]
    if missing:
        hint = " (rename 'value' to 'numeric_value')" if "value" in table.column_names else ""
        raise UserError(f"{path}: missing MEDS column(s) {missing}{hint}; required: {list(EVENT_COLUMNS)}")
    sid, time, code, value = (table.column(c).type for c in EVENT_COLUMNS)
    _check_type(path, "subject_id", sid, pa.types.is_integer(sid), "int64")
    _check_type(path, "time", time, pa.types.is_timestamp(time), "timestamp[us]")
    _check_type(path, "code", code, pa.types.is_string(code) or pa.types.is_large_string(code)
                or pa.types.is_dictionary(code), "string")
    _check_type(path, "numeric_value", value, pa.types.is_floating(value) or pa.types.is_integer(value)
                or pa.types.is_null(value), "float32")
    table = table.select(list(EVENT_COLUMNS))
    if table.column("code").null_count:
        row = int(np.flatnonzero(table.column("code").is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{path}: row {row} has a null 'code'; every MEDS event needs a code")
    out = pa.table({
        "subject_id": table.column("subject_id").cast(pa.int64()),
        "time": table.column("time").cast(pa.timestamp("us")),
        "code": table.column("code").cast(pa.string()),
        "numeric_value": table.column("numeric_value").cast(pa.float32()),
    })
    # null (NaN here) means "no value"; an infinite value would poison the per-code statistics and the z-scores
    values = out.column("numeric_value").to_numpy(zero_copy_only=False)
    require_finite(np.where(np.isinf(values), values, 0.0), path, what="row",
                   fix="replace the infinite numeric_value by a finite number or null and re-write the shard")
    return out


def read_all_events(root: Path) -> pa.Table:
    """Every shard under `<root>/data/` concatenated."""
    return pa.concat_tables([read_events(p) for p in data_files(root)])


def read_splits(path: Path) -> pd.DataFrame:
    """subject_id -> split; raises UserError on missing columns, unknown split names or duplicate subjects."""
    if not Path(path).is_file():
        raise UserError(f"{path}: subject splits file not found; write metadata/subject_splits.parquet "
                        f"(subject_id, split) or set data.splits_filepath")
    df = pq.read_table(path).to_pandas()
    missing = [c for c in ("subject_id", "split") if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected subject_id, split")
    bad = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad:
        raise UserError(f"{path}: unknown split name(s) {bad}; use {list(SPLITS)}")
    dup = df["subject_id"][df["subject_id"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: subject {int(dup.iloc[0])} is listed in more than one split row; list each once")
    return df[["subject_id", "split"]].astype({"subject_id": "int64", "split": str})


def read_codes(path: Path | None) -> pd.DataFrame:
    """codes.parquet as a frame with `code`, `description` (may be empty) and `parent_codes` (list, may be empty)."""
    if path is None or not Path(path).is_file():
        return pd.DataFrame({"code": pd.Series([], dtype=str), "description": pd.Series([], dtype=str),
                             "parent_codes": pd.Series([], dtype=object)})
    df = pq.read_table(path).to_pandas()
    if "code" not in df.columns:
        raise UserError(f"{path}: missing column 'code'; MEDS codes.parquet holds code, description, parent_codes")
    if "description" not in df.columns:
        df["description"] = None
    if "parent_codes" not in df.columns:
        df["parent_codes"] = [[] for _ in range(len(df))]
    df["parent_codes"] = [list(p) if p is not None and not isinstance(p, float) else [] for p in df["parent_codes"]]
    return df[["code", "description", "parent_codes"]].drop_duplicates("code", keep="first")


def read_lookup_csv(path: Path | None, what: str) -> dict[str, str]:
    """The original's medical / lab lookup CSV: code -> description (columns `code`, `description`)."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise UserError(f"{path}: {what} lookup CSV not found; fix the path or set it to null")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    code_col = next((c for c in ("code", "token", "concept_code") if c in df.columns), None)
    desc_col = next((c for c in ("description", "name", "label", "concept_name") if c in df.columns), None)
    if code_col is None or desc_col is None:
        raise UserError(f"{path}: {what} lookup CSV needs columns 'code' and 'description', found {list(df.columns)}")
    return {c: d for c, d in zip(df[code_col], df[desc_col]) if c and d.strip()}


def read_vocab_csv(path: Path | None) -> tuple[list[str] | None, dict[str, str]]:
    """The original's vocabulary CSV: the codes it lists (`code` or `token`) and any descriptions it carries."""
    if path is None:
        return None, {}
    if not Path(path).is_file():
        raise UserError(f"{path}: vocabulary CSV not found; fix data.vocab_filepath or set it to null")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    code_col = next((c for c in ("code", "token") if c in df.columns), None)
    if code_col is None:
        raise UserError(f"{path}: vocabulary CSV needs a 'code' (or 'token') column, found {list(df.columns)}")
    descriptions = {}
    if "description" in df.columns:
        descriptions = {c: d for c, d in zip(df[code_col], df["description"]) if d.strip()}
    return [c for c in df[code_col] if c], descriptions


def read_labels(path: Path | None, label_column: str = "auto") -> pd.DataFrame:
    """Labels as `subject_id` int64, `prediction_time` datetime64[us], `label` int64.

    Accepts a MEDS label parquet (or a folder of them) or a CSV with the same columns (`label` is also accepted
    for the original's labels CSV). Float labels are refused: these models classify.
    """
    if path is None:
        raise UserError("data.labels_filepath is not set; pass a MEDS label parquet (subject_id, prediction_time, "
                        "boolean_value) or a labels CSV")
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise UserError(f"{path}: no label parquet files inside; write MEDS labels there")
        df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    elif path.suffix == ".csv" and path.is_file():
        df = pd.read_csv(path)
    elif path.is_file():
        df = pq.read_table(path).to_pandas()
    else:
        raise UserError(f"{path}: labels file not found; fix data.labels_filepath")
    if "prediction_time" not in df.columns:
        raise UserError(f"{path}: missing column 'prediction_time'; every label needs the time the prediction is "
                        f"made (nothing at or after it enters the input)")
    if "subject_id" not in df.columns:
        raise UserError(f"{path}: missing column 'subject_id'")
    candidates = ["boolean_value", "integer_value", "label"] if label_column == "auto" else [label_column]
    col = next((c for c in candidates if c in df.columns and df[c].notna().any()), None)
    if col is None:
        raise UserError(f"{path}: no label column among {candidates} with values; write boolean_value or "
                        f"integer_value (float_value is regression, which these classifiers do not do)")
    if df[col].isna().any():
        row = int(np.flatnonzero(df[col].isna().to_numpy())[0])
        raise UserError(f"{path}: row {row} has no value in '{col}'; drop the row or fill it")
    values = df[col]
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        mapping = {"true": 1, "false": 0, "1": 1, "0": 0}
        lowered = values.astype(str).str.lower()
        if not lowered.isin(list(mapping)).all():
            row = int(np.flatnonzero(~lowered.isin(list(mapping)).to_numpy())[0])
            raise UserError(f"{path}: row {row} column '{col}' = {values.iloc[row]!r}; expected a boolean or integer")
        values = lowered.map(mapping)
    elif pd.api.types.is_float_dtype(values):
        if not np.all(np.mod(values.to_numpy(), 1) == 0):
            raise UserError(f"{path}: column '{col}' holds non-integer floats; classification needs class ids")
    try:
        times = pd.to_datetime(df["prediction_time"]).astype("datetime64[us]")
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: column 'prediction_time' is not a timestamp ({exc}); write ISO times") from exc
    if times.isna().any():
        row = int(np.flatnonzero(times.isna().to_numpy())[0])
        raise UserError(f"{path}: row {row} has no prediction_time; every label needs one")
    try:
        subject_ids = df["subject_id"].astype("int64")
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: column 'subject_id' must be integers ({exc})") from exc
    out = pd.DataFrame({"subject_id": subject_ids, "prediction_time": times, "label": values.astype("int64")})
    if (out["label"] < 0).any():
        raise UserError(f"{path}: column '{col}' has negative class ids; use 0..num_classes-1")
    return out.sort_values(["subject_id", "prediction_time"], kind="stable").reset_index(drop=True)


def collapse_duplicate_labels(labels: pd.DataFrame, path: Path | None = None) -> tuple[pd.DataFrame, int]:
    """(labels with one row per (subject_id, prediction_time), how many repeated rows were dropped).

    A repeated row with the same label is collapsed (it would otherwise become a second, identical training sequence
    and count twice in every metric). Rows that disagree are refused: raises UserError naming the subject, the time
    and the labels.
    """
    key = ["subject_id", "prediction_time"]
    repeated = labels.duplicated(key, keep=False)
    if not repeated.any():
        return labels, 0
    distinct = labels[repeated].groupby(key)["label"].nunique()
    conflicts = distinct[distinct > 1]
    if len(conflicts):
        subject_id, time = conflicts.index[0]
        found = sorted(labels.loc[(labels["subject_id"] == subject_id) & (labels["prediction_time"] == time),
                                  "label"].unique().tolist())
        raise UserError(f"{path}: subject_id {subject_id} at prediction_time {time} has conflicting labels {found} "
                        f"({len(conflicts)} such (subject, prediction_time) pairs); keep one row per pair")
    collapsed = labels.drop_duplicates(key, keep="first").reset_index(drop=True)
    return collapsed, int(len(labels) - len(collapsed))


def time_to_int64_us(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """timestamp[us] -> int64 microseconds, with null (static events) mapped to int64 min so they sort first."""
    filled = pc.fill_null(column.cast(pa.int64()), np.iinfo(np.int64).min)
    return filled.to_numpy()
