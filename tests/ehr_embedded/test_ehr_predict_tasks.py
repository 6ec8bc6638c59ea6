"""predict on multi-class and regression runs: `python -m ehr_embedded.predict` writes the columns evaluate writes for
the run's task, with exactly evaluate's values (argmax and class probabilities; de-standardised targets), refuses a
regression run without its target scaling, and in `meds_dir` mode refuses a label file of another task before
cutting anything. The runs are finetuned on the synthetic stores of test_ehr_task_metrics.py and
test_ehr_regression.py (one epoch each: only agreement with evaluate is checked here, not learning)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ehr_helpers import train_config
from test_ehr_regression import REGRESSION, synthetic_regression_store
from test_ehr_task_metrics import synthetic_store

from common.errors import UserError
from ehr_embedded import predict as predict_stage
from ehr_embedded.finetune import finetune
from ehr_embedded.predict import check_label_task, predict_split
from ehr_embedded.prediction_files import MULTICLASS_PREDICTION_COLUMNS, REGRESSION_PREDICTION_SCHEMA, run_config


def with_cut_settings(store):
    """The report.json create_embeddings writes beside a store (meds_dir mode reads max_length and the window
    options from it); the synthetic stores are written split by split and have none."""
    (store / "report.json").write_text(json.dumps({"max_length": 64, "sequences": {"label_column": "auto"}}))
    return store


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_three_class")
    store = with_cut_settings(synthetic_store(root / "store", n_classes=3))
    finetune(train_config(store, root / "run", "model.num_classes=3", "training.epochs=1"))
    return store, root / "run"


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_regression")
    store = with_cut_settings(synthetic_regression_store(root / "store"))
    finetune(train_config(store, root / "run", *REGRESSION, "training.epochs=1"))
    return store, root / "run"


def write_labels(path, column, values):
    """A MEDS label parquet with one value column (`column`, of the MEDS label schema's type)."""
    kind = {"boolean_value": pa.bool_(), "integer_value": pa.int64(), "float_value": pa.float32()}[column]
    n = len(values)
    pq.write_table(pa.table({"subject_id": pa.array(np.arange(1, n + 1), pa.int64()),
                             "prediction_time": pa.array(pd.date_range("2020-01-01", periods=n).to_numpy("datetime64[us]")),
                             column: pa.array(values, kind)}), path)
    return path


def test_predict_three_class_run_gives_evaluates_probabilities_and_argmax(three_class, tmp_path):
    _, run = three_class
    out = tmp_path / "pred.parquet"
    assert predict_stage.main([f"run_dir={run}", "split=held_out", f"output={out}"]) == 0
    evaluated = pq.read_table(run / "predictions" / "held_out.parquet")
    got = pq.read_table(out)
    assert got.schema.equals(evaluated.schema) and tuple(got.column_names) == MULTICLASS_PREDICTION_COLUMNS
    got, evaluated = got.to_pandas(), evaluated.to_pandas()
    probs = np.stack(got["predicted_class_probabilities"].to_numpy())
    assert probs.shape == (45, 3)
    # bit for bit here and below: predict and evaluate run the same predict_probs / predict_values on the same
    # checkpoint, rows and eval_batch_size in this process, so the same forward passes
    assert np.array_equal(probs, np.stack(evaluated["predicted_class_probabilities"].to_numpy()))
    assert np.array_equal(got["predicted_integer_value"].to_numpy(), probs.argmax(1))
    pd.testing.assert_frame_equal(got.drop(columns="predicted_class_probabilities"),
                                  evaluated.drop(columns="predicted_class_probabilities"))

    frame = predict_split(run, "held_out")  # the Python API carries the file's columns and values
    assert tuple(frame.columns) == MULTICLASS_PREDICTION_COLUMNS
    assert np.array_equal(np.stack(frame["predicted_class_probabilities"].to_numpy()), probs)
    assert frame["integer_value"].tolist() == got["integer_value"].tolist()
    assert frame["predicted_integer_value"].tolist() == got["predicted_integer_value"].tolist()


def test_predict_regression_run_gives_evaluates_destandardised_values(regression, tmp_path):
    store, run = regression
    out = tmp_path / "pred.parquet"
    assert predict_stage.main([f"run_dir={run}", "split=held_out", f"output={out}"]) == 0
    got = pq.read_table(out)
    assert got.schema.equals(REGRESSION_PREDICTION_SCHEMA)
    got = got.to_pandas()
    evaluated = pd.read_parquet(run / "predictions" / "held_out.parquet")
    # exact, as for the 3-class run: the same predict_values on the same checkpoint, rows and batch size
    pd.testing.assert_frame_equal(got, evaluated, check_exact=True)
    stored = pd.read_parquet(store / "held_out" / "sequences.parquet")
    assert got["float_value"].tolist() == stored["label"].tolist() and len(got) == 60
    # on the targets' scale, not the standardised one (target mean 11, std about 3)
    assert abs(got["predicted_float_value"].mean() - got["float_value"].mean()) < 3.0

    frame = predict_split(run, "held_out")
    assert tuple(frame.columns) == tuple(REGRESSION_PREDICTION_SCHEMA.names)
    assert np.array_equal(frame["predicted_float_value"].to_numpy(), got["predicted_float_value"].to_numpy())


def test_regression_run_without_target_scaling_exits_2(regression, tmp_path, capsys):
    _, run = regression
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    scaling = copy / "reports" / "target_scaling.json"
    scaling.unlink()
    out = tmp_path / "pred.parquet"
    assert predict_stage.main([f"run_dir={copy}", "split=held_out", f"output={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{scaling}: missing; a regression run's outputs are de-standardised" in err
    assert not out.exists()


def test_store_of_another_task_exits_2(three_class, regression, tmp_path, capsys):
    """A store given with dataset_dir whose labels are of another kind than the run's task: float targets for the
    3-class run, class ids for the regression run (each a copy of the run's own store with its label column cast)."""
    for (store, run), kind, message in [
            (three_class, "float64", "the store holds float regression targets but the run"),
            (regression, "int64", "the store holds class labels but the run")]:
        copy = tmp_path / f"store_{kind}"
        shutil.copytree(store, copy)
        sequences = copy / "held_out" / "sequences.parquet"
        pd.read_parquet(sequences).astype({"label": kind}).to_parquet(sequences, index=False)
        assert predict_stage.main([f"run_dir={run}", f"dataset_dir={copy}", f"output={tmp_path / 'p.parquet'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{copy / 'held_out'}: {message} {run}" in err
    assert not (tmp_path / "p.parquet").exists()


def test_meds_dir_labels_of_another_task_exit_2_before_cutting(three_class, regression, tmp_path, capsys):
    """meds_dir mode reads the label file's value column first: float targets for a 3-class run, boolean or
    out-of-range class ids for it, class ids for a regression run are each refused naming the file and the column
    (meds_dir is an empty folder: had the check not stopped it, cutting would fail with another message)."""
    cases = [(three_class, "float_value", [0.5, 1.5], "labels in column 'float_value' but the run is a multiclass task "
              "(model.num_classes=3); pass a label file with integer_value class ids"),
             (three_class, "boolean_value", [True, False], "labels in column 'boolean_value' but the run is a "
              "multiclass task"),
             (three_class, "integer_value", [0, 3], "column 'integer_value' goes up to 3 but the run has "
              "model.num_classes=3; use class ids 0..2"),
             (regression, "integer_value", [1, 2], "labels in column 'integer_value' but the run is a regression task "
              "(model.num_classes=1); pass a label file with float_value targets")]
    for i, ((_, run), column, values, message) in enumerate(cases):
        labels = write_labels(tmp_path / f"labels_{i}.parquet", column, values)
        out = tmp_path / f"pred_{i}.parquet"
        assert predict_stage.main([f"run_dir={run}", f"meds_dir={tmp_path / 'empty'}", f"labels={labels}",
                                   f"output={out}"]) == 2, column
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{labels}: {message}" in err
        assert not out.exists()


def test_label_check_per_task(three_class, tmp_path):
    """The check itself, for each task: a binary run takes boolean_value or integer_value 0/1 and refuses float
    targets; the matching file of each task passes and names its column."""
    _, run = three_class
    binary = run_config(run)
    binary.model.num_classes = 2
    floats = write_labels(tmp_path / "floats.parquet", "float_value", [0.25, 2.0])
    with pytest.raises(UserError, match=r"floats.parquet: labels in column 'float_value' but the run is a binary task "
                                        r"\(model.num_classes=2\); pass a label file with boolean_value"):
        check_label_task(floats, binary)
    assert check_label_task(write_labels(tmp_path / "b.parquet", "boolean_value", [True, False]), binary) == \
        "boolean_value"
    assert check_label_task(write_labels(tmp_path / "i.parquet", "integer_value", [0, 1]), binary) == "integer_value"
    assert check_label_task(write_labels(tmp_path / "k.parquet", "integer_value", [0, 2]), run_config(run)) == \
        "integer_value"
    regression_cfg = run_config(run)
    regression_cfg.model.num_classes = 1
    assert check_label_task(floats, regression_cfg) == "float_value"


def test_meds_dir_mode_predicts_a_regression_store(regression, tmp_path, monkeypatch):
    """predict_meds with float_value labels: the temporary store (here the stored held_out split, standing in for
    create_embeddings' cut, which needs MEDS shards the synthetic store does not have) is predicted as a regression
    store, giving evaluate's values."""
    from ehr_embedded import create_embeddings as create_embeddings_stage

    store, run = regression

    def cut(stage1):
        shutil.copytree(store / "code_table", stage1.data.embedding_output_dir / "code_table")
        shutil.copytree(store / "held_out", stage1.data.embedding_output_dir / "held_out")
        return {"held_out": {"sequences": 60}, "counts": {}}

    monkeypatch.setattr(create_embeddings_stage, "create_embeddings", cut)
    labels = write_labels(tmp_path / "labels.parquet", "float_value", [1.0, 2.0])
    frame = predict_stage.predict_meds(run, tmp_path / "meds", labels)
    evaluated = pd.read_parquet(run / "predictions" / "held_out.parquet")
    # the temporary store is a copy of held_out: the same forward passes as evaluate's, bit for bit
    assert tuple(frame.columns) == tuple(REGRESSION_PREDICTION_SCHEMA.names)
    assert np.array_equal(frame["predicted_float_value"].to_numpy(), evaluated["predicted_float_value"].to_numpy())
