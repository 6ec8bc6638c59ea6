"""Label files are checked against the installed meds.LabelSchema: wrong types, missing columns, columns the schema
does not allow, no usable value column and several value columns are refused with one line naming the file and the
column; same-kind width and unit differences are cast exactly."""

from __future__ import annotations

import datetime as dt

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ehr_helpers import stage1_overrides

from common.errors import UserError
from ehr_embedded import create_embeddings as create_embeddings_stage
from ehr_embedded.meds_io import read_labels

T0 = dt.datetime(2020, 1, 1, 12)
TIMES = [T0, T0 + dt.timedelta(hours=5), T0 + dt.timedelta(days=2)]


def write(tmp_path, name="labels.parquet", **columns):
    """A label parquet with the given `name: pa.array` columns (default: a valid MEDS boolean task)."""
    columns = columns or {}
    base = {"subject_id": pa.array([3, 1, 2], pa.int64()), "prediction_time": pa.array(TIMES, pa.timestamp("us")),
            "boolean_value": pa.array([True, False, True])}
    for key, value in columns.items():
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    path = tmp_path / name
    pq.write_table(pa.table(base), path)
    return path


def test_the_installed_schema_is_the_one_checked():
    schema = meds.LabelSchema.schema()
    assert {f.name: str(f.type) for f in schema} == {
        "subject_id": "int64", "prediction_time": "timestamp[us]", "boolean_value": "bool",
        "integer_value": "int64", "float_value": "float", "categorical_value": "string"}


def test_a_conforming_file_is_read_exactly_and_names_its_column(tmp_path, caplog):
    path = write(tmp_path)
    with caplog.at_level("INFO", logger="ehr_embedded.meds_io"):
        labels = read_labels(path)
    assert labels.attrs["label_column"] == "boolean_value"
    assert labels.to_dict("list") == {"subject_id": [1, 2, 3], "prediction_time": [pd.Timestamp(TIMES[1]),
                                                                                  pd.Timestamp(TIMES[2]),
                                                                                  pd.Timestamp(TIMES[0])],
                                      "label": [0, 1, 1]}
    assert str(labels["prediction_time"].dtype) == "datetime64[us]"
    assert f"{path}: labels from column 'boolean_value'" in caplog.text


def test_same_kind_widths_and_units_are_cast(tmp_path):
    """int32 ids, timestamp[ns] times and int32 classes are MEDS values in another width: cast losslessly."""
    path = write(tmp_path, subject_id=pa.array([3, 1, 2], pa.int32()),
                 prediction_time=pa.array(TIMES, pa.timestamp("ns")), boolean_value=None,
                 integer_value=pa.array([2, 0, 1], pa.int32()))
    labels = read_labels(path)
    assert labels.attrs["label_column"] == "integer_value"
    assert labels["label"].tolist() == [0, 1, 2] and labels["subject_id"].tolist() == [1, 2, 3]
    assert labels["prediction_time"].tolist() == [pd.Timestamp(TIMES[i]) for i in (1, 2, 0)]

    ns = pa.array([np.datetime64("2020-01-01T12:00:00.000000001", "ns")] * 3, pa.timestamp("ns"))
    with pytest.raises(UserError, match=r"column 'prediction_time' \(timestamp\[ns\]\) does not convert to "
                                        r"timestamp\[us\] without loss"):
        read_labels(write(tmp_path, "ns.parquet", prediction_time=ns))


@pytest.mark.parametrize("columns, needle", [
    ({"subject_id": pa.array(["3", "1", "2"])},
     r"column 'subject_id' has type string, the MEDS label schema wants int64; write it as int64"),
    ({"prediction_time": pa.array(["2020-01-01", "2020-01-02", "2020-01-03"])},
     r"column 'prediction_time' has type string, the MEDS label schema wants timestamp\[us\]"),
    ({"boolean_value": pa.array([1, 0, 1], pa.int64())},
     r"column 'boolean_value' has type int64, the MEDS label schema wants bool"),
    ({"subject_id": None}, r"missing column 'subject_id'; the MEDS label schema \(meds 0.4.1\) requires subject_id "
                           r"and prediction_time"),
    ({"label": pa.array([1, 0, 1])}, r"column\(s\) \['label'\] are not in the MEDS label schema \(rename 'label' "
                                     r"to boolean_value or integer_value\)"),
])
def test_non_conforming_files_are_refused_naming_file_and_column(tmp_path, columns, needle):
    path = write(tmp_path, **columns)
    with pytest.raises(UserError, match=needle) as info:
        read_labels(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_value_columns_no_task_regression_and_several_tasks(tmp_path):
    with pytest.raises(UserError, match=r"no label column with values; write boolean_value \(binary\) or "
                                        r"integer_value"):
        read_labels(write(tmp_path, "none.parquet", boolean_value=None))
    with pytest.raises(UserError, match=r"no label column with values"):  # a value column that is all null
        read_labels(write(tmp_path, "nulls.parquet", boolean_value=pa.array([None, None, None], pa.bool_())))
    regression = read_labels(write(tmp_path, "float.parquet", boolean_value=None,
                                   float_value=pa.array([0.5, 1.5, 2.5], pa.float32())))  # see test_ehr_regression
    assert regression.attrs["label_column"] == "float_value" and regression["label"].dtype == np.float64
    with pytest.raises(UserError, match=r"'categorical_value', which holds string classes; map them to "
                                        r"integer_value"):
        read_labels(write(tmp_path, "cat.parquet", boolean_value=None, categorical_value=pa.array(["a", "b", "a"])))

    two = write(tmp_path, "two.parquet", integer_value=pa.array([4, 0, 2], pa.int64()))
    with pytest.raises(UserError, match=r"several label columns hold values \['boolean_value', 'integer_value'\]; "
                                        r"these models learn one task at a time: set sequences.label_column"):
        read_labels(two)
    assert read_labels(two, "integer_value")["label"].tolist() == [0, 2, 4]
    assert read_labels(two, "boolean_value")["label"].tolist() == [0, 1, 1]
    with pytest.raises(UserError, match=r"row 1 has no value in 'boolean_value'"):
        read_labels(write(tmp_path, "gap.parquet", boolean_value=pa.array([True, None, False])))


def test_a_bad_file_in_a_label_folder_is_named(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    write(folder, "0.parquet")
    bad = write(folder, "1.parquet", subject_id=pa.array([1.0, 2.0, 3.0]))
    with pytest.raises(UserError, match=rf"^{bad}: column 'subject_id' has type double"):
        read_labels(folder)


def test_create_embeddings_exits_2_with_one_line(built, tmp_path, capsys):
    table = pq.read_table(built.meds / "labels" / "infection")
    bad = tmp_path / "labels.parquet"
    pq.write_table(table.set_column(0, "subject_id", table.column("subject_id").cast(pa.string())), bad)
    args = [*stage1_overrides(built.meds, tmp_path / "out"), f"data.vocab_embedding_path={built.vocab}",
            f"data.labels_filepath={bad}"]
    assert create_embeddings_stage.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].endswith(f"{bad}: column 'subject_id' has type string, the MEDS label schema wants "
                                         f"int64; write it as int64 (e.g. pyarrow .cast(pa.int64()) or pandas "
                                         f".astype) and re-write the file")
    assert not (tmp_path / "out" / "store").exists()
