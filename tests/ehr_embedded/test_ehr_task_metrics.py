"""Multi-class tasks: finetune trains them, evaluate scores them (accuracy, macro F1, macro one-vs-rest AUROC with
subject-bootstrap intervals, per-class support) and writes their predictions; every value is recomputed here with
sklearn from the predictions file. Runs on a tiny synthetic store written through storage.write_split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from ehr_helpers import train_config, train_overrides, write_synthetic_code_table, write_synthetic_splits
from learning_seed import seed_args
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from common.logs import read_metrics
from ehr_embedded import finetune as finetune_stage
from ehr_embedded.evaluate import binary_metrics, multiclass_metrics, task_metrics
from ehr_embedded.finetune import finetune
from ehr_embedded.prediction_files import MULTICLASS_PREDICTION_COLUMNS

SPLIT_SIZES = {"train": 120, "tuning": 45, "held_out": 45}


def synthetic_store(root, n_classes: int, dim: int = 8, seed: int = 0):
    """A store whose class `c` sequences each carry code `C{c}` among random filler codes (learnable by any model
    that tells codes apart); rows cycle through the classes, so every class is in every split. Every third subject
    holds two label rows, so subjects and rows differ."""
    rng = np.random.default_rng(seed)
    codes = ["[PAD]", "[UNK]", *[f"C{c}" for c in range(n_classes)], *[f"F{i}" for i in range(8)]]
    write_synthetic_code_table(root, codes, dim, rng)

    def draw_row(split: str, i: int) -> tuple:
        label = i % n_classes
        length = int(rng.integers(4, 12))
        seq = rng.integers(2 + n_classes, len(codes), size=length)
        seq[rng.integers(0, length)] = 2 + label
        return seq, label

    return write_synthetic_splits(root, SPLIT_SIZES, draw_row, rng)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory, learning_seed):
    root = tmp_path_factory.mktemp("three_class")
    store = synthetic_store(root / "store", n_classes=3)
    report = finetune(train_config(store, root / "run", "model.num_classes=3", "training.epochs=4",
                                   *seed_args("training.seed", learning_seed)))
    return store, root / "run", report


def random_probs(n, k, seed):
    """Unbalanced classes (class c holds about twice the rows of class c + 1), so macro and weighted averages differ."""
    rng = np.random.default_rng(seed)
    y = np.sort(np.arange(n) % (2 ** k - 1)).astype(int)
    y = k - 1 - np.floor(np.log2(y + 1)).astype(int)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def assert_equals_sklearn(report: dict, y: np.ndarray, probs: np.ndarray) -> None:
    """Accuracy, macro F1 and macro one-vs-rest AUROC in `report` are sklearn's on (y, probs). The report's accuracy
    is common.metrics.accuracy, our own code, so a float64 tolerance rather than equality."""
    assert report["accuracy"]["value"] == pytest.approx(accuracy_score(y, probs.argmax(1)), abs=1e-12)
    assert report["macro_f1"]["value"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"), abs=1e-12)
    assert report["macro_auroc_ovr"]["value"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_multiclass_metrics_equal_sklearn_and_a_hand_subject_bootstrap():
    y, probs = random_probs(60, 4, seed=1)
    subject_ids = np.repeat(np.arange(30), 2)  # two rows per subject
    report = multiclass_metrics(y, probs, n_boot=50, seed=2, subject_ids=subject_ids)
    assert_equals_sklearn(report, y, probs)
    assert report["support"] == {"0": 32, "1": 16, "2": 8, "3": 4}
    assert report["n"] == 60 and report["n_subjects"] == 30 and report["bootstrap"] == "subjects"

    # the same draws by hand: common.metrics.bootstrap_ci draws subject indices with default_rng(seed)
    rng = np.random.default_rng(2)
    accuracies = []
    for _ in range(50):
        rows = np.concatenate([np.flatnonzero(subject_ids == s) for s in rng.integers(0, 30, size=30)])
        accuracies.append(accuracy_score(y[rows], probs[rows].argmax(1)))
    assert (report["accuracy"]["low"], report["accuracy"]["high"]) == pytest.approx(
        tuple(np.quantile(accuracies, [0.025, 0.975])))

    # binary tasks still get the binary report, unchanged
    yb, pb = random_probs(40, 2, seed=3)
    # task_metrics hands binary tasks to binary_metrics: the same call on the same arrays, so equal bit for bit
    assert task_metrics(yb, pb, 0.4, 30, 0) == binary_metrics(yb, pb[:, 1], 0.4, 30, 0)
    assert "macro_auroc_ovr" not in multiclass_metrics(np.zeros(10, int), random_probs(10, 3, 0)[1], n_boot=5)


@pytest.mark.learning
def test_finetune_and_evaluate_score_a_three_class_task(three_class_run, learning_seed):
    store, run, report = three_class_run
    predictions = pq.read_table(run / "predictions" / "held_out.parquet").to_pandas()
    assert tuple(predictions.columns) == MULTICLASS_PREDICTION_COLUMNS
    stored = pd.read_parquet(store / "held_out" / "sequences.parquet")
    assert predictions["integer_value"].tolist() == stored["label"].tolist()
    assert predictions["subject_id"].tolist() == stored["subject_id"].tolist()
    probs = np.stack(predictions["predicted_class_probabilities"].to_numpy())
    y = predictions["integer_value"].to_numpy()
    assert probs.shape == (45, 3) and np.allclose(probs.sum(1), 1, rtol=1e-6, atol=1e-6)
    assert (predictions["predicted_integer_value"].to_numpy() == probs.argmax(1)).all()

    on_disk = json.loads((run / "reports" / "eval_held_out.json").read_text())
    assert on_disk == json.loads(json.dumps(report))  # the file written then read back: exact
    assert report["num_classes"] == 3 and report["support"] == {"0": 15, "1": 15, "2": 15}
    assert report["n_subjects"] == stored["subject_id"].nunique() < 45
    assert_equals_sklearn(report, y, probs)  # recomputed from the predictions file
    assert report["accuracy"]["low"] <= report["accuracy"]["value"] <= report["accuracy"]["high"]
    # the planted code decides the class; chance is 0.5. Measured held-out macro AUROC, own seed / 1 / 2 / 3
    # (OMP_NUM_THREADS=1): 1.000 / 0.987 / 1.000 / 1.000
    assert report["macro_auroc_ovr"]["value"] > 0.9
    epochs = read_metrics(run / "metrics.jsonl")
    assert all("tuning_auroc" in e for e in epochs)  # macro one-vs-rest AUROC drives model selection
    assert json.loads((run / "reports" / "threshold.json").read_text())["criterion"] == "argmax (multi-class)"


def test_multiclass_refuses_binary_only_selection(three_class_run, tmp_path, capsys):
    store, _, _ = three_class_run
    args = train_overrides(store, tmp_path / "run", "model.num_classes=3", "training.selection_metric=auprc")
    assert finetune_stage.main(args) == 2
    assert "training.selection_metric=auprc is binary; with model.num_classes=3 use auroc" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
