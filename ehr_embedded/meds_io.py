"""Reading MEDS (and the original pipeline's CSV inputs) with validation at the boundary.

MEDS layout (https://github.com/Medical-Event-Data-Standard/meds)::

    <root>/data/**/*.parquet                 subject_id int64, time timestamp[us] (null = static), code str,
                                             numeric_value float32 (null = no value)
    <root>/metadata/codes.parquet            code, description, parent_codes list<str>
    <root>/metadata/subject_splits.parquet   subject_id, split in {train, tuning, held_out}
    labels                                   subject_id int64, prediction_time timestamp[us], boolean_value bool |
                                             integer_value int64 | float_value float32 (regression target;
                                             checked against meds.LabelSchema)

Every error names the file, the column and the fix (exit code 2 through common.cli).
"""

from __future__ import annotations

import logging
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.errors import UserError
from common.io import require_finite

SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)  # ("train", "tuning", "held_out")
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")
log = logging.getLogger(__name__)


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


# The value columns of meds.LabelSchema and what these models do with each (one task at a time).
LABEL_VALUE_COLUMNS = tuple(c for c in meds.LabelSchema.optional_columns())
CLASS_LABEL_COLUMNS = ("boolean_value", "integer_value")
REGRESSION_LABEL_COLUMN = "float_value"  # stored as float64 labels; finetune with model.num_classes=1
UNSUPPORTED_LABEL_COLUMNS = {
    "categorical_value": "string classes; map them to integer_value 0..K-1 (and keep the mapping) and set "
                         "model.num_classes=K",
}


def _label_schema_text() -> str:
    return ", ".join(f"{f.name} {f.type}" for f in meds.LabelSchema.schema())


def _losslessly_castable(got: pa.DataType, want: pa.DataType) -> bool:
    """Same kind, other width or unit: int32 -> int64, timestamp[ns] -> timestamp[us] (checked on cast),
    float64 -> float32, large_string -> string. Anything else (a string subject_id, an int boolean_value) is refused."""
    same_kind = (pa.types.is_integer, pa.types.is_timestamp, pa.types.is_floating)
    if any(kind(got) and kind(want) for kind in same_kind):
        return True
    return pa.types.is_string(want) and (pa.types.is_large_string(got) or pa.types.is_dictionary(got))


def conform_label_table(table: pa.Table, path: Path) -> pa.Table:
    """`table` checked against the installed `meds.LabelSchema` and cast to its exact types.

    Raises UserError naming the file, the column and the fix for a missing required column (subject_id,
    prediction_time), a column the schema does not allow (MEDS label files are closed), or a type of another kind
    (e.g. a string subject_id). Width and unit differences of the same kind are cast (a timestamp[ns] that would lose
    sub-microsecond digits is refused).
    """
    from flexible_schema.exceptions import SchemaValidationError

    try:
        meds.LabelSchema.validate(table.schema)
        return table
    except SchemaValidationError as exc:
        missing, extra = exc.missing_req_cols or [], exc.disallowed_extra_cols or []
        mistyped = exc.mistyped_cols or []
    if missing:
        why = " (every label needs the time the prediction is made; nothing at or after it enters the input)" \
            if missing[0] == "prediction_time" else ""
        raise UserError(f"{path}: missing column '{missing[0]}'{why}; the MEDS label schema (meds "
                        f"{meds.__version__}) requires subject_id and prediction_time: {_label_schema_text()}")
    if extra:
        hint = " (rename 'label' to boolean_value or integer_value)" if "label" in extra else ""
        raise UserError(f"{path}: column(s) {extra} are not in the MEDS label schema{hint}; a label file holds only "
                        f"{list(meds.LabelSchema.schema().names)}: drop the others (one task per file)")
    for column, want, got in mistyped:
        if not _losslessly_castable(got, want):
            raise UserError(f"{path}: column '{column}' has type {got}, the MEDS label schema wants {want}; write it "
                            f"as {want} (e.g. pyarrow .cast(pa.{want}()) or pandas .astype) and re-write the file")
        try:
            table = table.set_column(table.schema.get_field_index(column), column, table.column(column).cast(want))
        except pa.ArrowInvalid as exc:
            raise UserError(f"{path}: column '{column}' ({got}) does not convert to {want} without loss ({exc}); "
                            f"write it as {want}") from exc
    return table


def _check_no_nulls(values: pd.Series, path: Path, column: str, fix: str) -> None:
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise UserError(f"{path}: row {row} has no value in '{column}'; {fix}")


def pick_label_column(columns_with_values: list[str], path: Path, label_column: str = "auto") -> str:
    """The value column a label file is read from (one task at a time; see read_labels). Raises UserError."""
    if label_column != "auto":
        if label_column not in columns_with_values:
            raise UserError(f"{path}: sequences.label_column={label_column} but the file has no values in that column "
                            f"(value columns with values: {columns_with_values}); pick one of those")
        return label_column
    usable = [c for c in (*CLASS_LABEL_COLUMNS, REGRESSION_LABEL_COLUMN, "label") if c in columns_with_values]
    if len(usable) > 1:
        raise UserError(f"{path}: several label columns hold values {usable}; these models learn one task at a time: "
                        f"set sequences.label_column to one of them (or write one label file per task)")
    if usable:
        return usable[0]
    other = [c for c in columns_with_values if c in UNSUPPORTED_LABEL_COLUMNS]
    if other:
        raise UserError(f"{path}: the only label column is '{other[0]}', which holds "
                        f"{UNSUPPORTED_LABEL_COLUMNS[other[0]]}")
    raise UserError(f"{path}: no label column with values; write boolean_value (binary) or integer_value "
                    f"(classes 0..K-1), or float_value (regression), beside subject_id and prediction_time (MEDS label schema: "
                    f"{_label_schema_text()})")


def _read_label_frame(path: Path) -> tuple[pd.DataFrame, bool]:
    """(raw label rows, whether they came from the original's CSV). Parquet files are checked against
    meds.LabelSchema one by one, so an error names the exact file."""
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise UserError(f"{path}: no label parquet files inside; write MEDS labels there")
    elif path.suffix == ".csv" and path.is_file():
        return pd.read_csv(path), True
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{path}: labels file not found; fix data.labels_filepath")
    frames = []
    for f in files:
        try:
            table = pq.read_table(f)
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{f}: cannot read label parquet ({exc}); re-write it") from exc
        frames.append(conform_label_table(table, f).to_pandas())
    return pd.concat(frames, ignore_index=True), False


def read_labels(path: Path | None, label_column: str = "auto") -> pd.DataFrame:
    """Labels as `subject_id` int64, `prediction_time` datetime64[us], `label` int64 (class id) or, for a float_value
    (regression) task, float64 (the target).

    A MEDS label parquet (or a folder of them) is checked against the installed `meds.LabelSchema`
    (`conform_label_table`). The original's labels CSV (`subject_id, prediction_time, label` or MEDS column names) is
    parsed by pandas. One task at a time: `label_column="auto"` takes the one value column that holds values
    (boolean_value, integer_value, float_value, or the CSV's `label`) and refuses a file where several do; a file whose
    only values are categorical_value is refused with the fix. A float_value row that is null, NaN or infinite is
    refused with the row named. The column used is logged and kept in
    `frame.attrs["label_column"]`. Raises UserError naming the file, the column or row, and the fix.
    """
    if path is None:
        raise UserError("data.labels_filepath is not set; pass a MEDS label parquet (subject_id, prediction_time, "
                        "boolean_value) or a labels CSV")
    path = Path(path)
    df, from_csv = _read_label_frame(path)
    for required in ("subject_id", "prediction_time"):  # the CSV path; parquet was checked by conform_label_table
        if required not in df.columns:
            raise UserError(f"{path}: missing column '{required}'; every label needs subject_id and prediction_time "
                            f"(the time the prediction is made: nothing at or after it enters the input)")
    value_columns = [c for c in (*LABEL_VALUE_COLUMNS, "label") if c in df.columns and df[c].notna().any()]
    col = pick_label_column(value_columns, path, label_column)
    _check_no_nulls(df[col], path, col, "drop the row or fill it")
    values = df[col]
    regression = col == REGRESSION_LABEL_COLUMN
    if regression:
        try:
            values = values.astype("float64")
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}: column '{col}' is not numeric ({exc}); write float targets") from exc
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"{path}: row {row} column '{col}' = {float(values.iloc[row])}; a regression target must be "
                            f"finite: drop the row or fix the value")
    elif values.dtype == object or pd.api.types.is_string_dtype(values):  # CSV: true / false / 0 / 1
        mapping = {"true": 1, "false": 0, "1": 1, "0": 0}
        lowered = values.astype(str).str.lower()
        if not lowered.isin(list(mapping)).all():
            row = int(np.flatnonzero(~lowered.isin(list(mapping)).to_numpy())[0])
            raise UserError(f"{path}: row {row} column '{col}' = {values.iloc[row]!r}; expected a boolean or integer")
        values = lowered.map(mapping)
    elif pd.api.types.is_float_dtype(values):  # CSV integers read as floats
        if not np.all(np.mod(values.to_numpy(), 1) == 0):
            raise UserError(f"{path}: column '{col}' holds non-integer floats; classification needs class ids")
    _check_no_nulls(df["prediction_time"], path, "prediction_time", "every label needs one")
    try:
        times = pd.to_datetime(df["prediction_time"]).astype("datetime64[us]")
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: column 'prediction_time' is not a timestamp ({exc}); write ISO times") from exc
    _check_no_nulls(df["subject_id"], path, "subject_id", "every label needs the subject it belongs to")
    try:
        subject_ids = df["subject_id"].astype("int64")
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: column 'subject_id' must be integers ({exc})") from exc
    out = pd.DataFrame({"subject_id": subject_ids, "prediction_time": times,
                        "label": values.astype("float64" if regression else "int64")})
    if not regression and (out["label"] < 0).any():
        raise UserError(f"{path}: column '{col}' has negative class ids; use 0..num_classes-1")
    out = out.sort_values(["subject_id", "prediction_time"], kind="stable").reset_index(drop=True)
    out.attrs["label_column"] = col
    summary = (f"regression targets in [{out['label'].min():.4g}, {out['label'].max():.4g}]" if regression
               else f"classes {sorted(out['label'].unique().tolist())}")
    log.info("%s: labels from column '%s' (%s; %d rows, %s)", path, col,
             "original labels CSV" if from_csv else f"MEDS label schema, meds {meds.__version__}", len(out), summary)
    return out


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


MISSING_TASK_LABEL = -1  # a multi-label row without a value for one task (left out of its loss and metrics)


def read_task_labels(task_labels: dict[str, Path]) -> tuple[pd.DataFrame, list[str], int]:
    """Several binary tasks as one multi-label frame: (`subject_id`, `prediction_time` and one int8 column per task
    (1, 0, or MISSING_TASK_LABEL where that task has no row at that time), the task names in config order, the
    repeated rows collapsed over all tasks).

    Each file is read with read_labels (MEDS label schema) and must hold binary labels (boolean_value, or
    integer_value 0/1); repeated rows are collapsed per task as for one task. Rows are the union of the tasks'
    (subject_id, prediction_time), sorted. Raises UserError naming the task, the file and the fix.
    """
    merged: pd.DataFrame | None = None
    n_duplicates = 0
    key = ["subject_id", "prediction_time"]
    for task, path in task_labels.items():
        if not task.isidentifier():
            raise UserError(f"data.task_labels: task name {task!r} must be a plain identifier (letters, digits, _)")
        labels = read_labels(Path(path))
        if labels.attrs["label_column"] == REGRESSION_LABEL_COLUMN or not labels["label"].isin([0, 1]).all():
            raise UserError(f"{path}: task '{task}' of data.task_labels is not binary (column "
                            f"'{labels.attrs['label_column']}'); multi-label tasks are boolean_value (or integer_value "
                            f"0/1): give a multi-class or regression task its own store via data.labels_filepath")
        labels, dropped = collapse_duplicate_labels(labels, Path(path))
        n_duplicates += dropped
        labels = labels.rename(columns={"label": task})
        merged = labels if merged is None else merged.merge(labels, on=key, how="outer")
    tasks = list(task_labels)
    merged = merged.sort_values(key, kind="stable").reset_index(drop=True)
    merged[tasks] = merged[tasks].fillna(MISSING_TASK_LABEL).astype(np.int8)
    log.info("multi-label: %d rows over tasks %s (rows per task %s)", len(merged), tasks,
             {t: int((merged[t] != MISSING_TASK_LABEL).sum()) for t in tasks})
    return merged, tasks, n_duplicates


def time_to_int64_us(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """timestamp[us] -> int64 microseconds, with null (static events) mapped to int64 min so they sort first."""
    filled = pc.fill_null(column.cast(pa.int64()), np.iinfo(np.int64).min)
    return filled.to_numpy()
