"""Multi-label tasks (issue 12 section 2): several binary label files become one store with a [K] label per row
(-1 where a task has no row at that time), finetune trains K sigmoid outputs on the labelled pairs only, evaluate
scores each task and the macro / micro AUROC, and every value is recomputed here with sklearn from the predictions
file. The training runs use a tiny synthetic store written through storage.write_split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ehr_helpers import (
    stage1_overrides,
    train_config,
    train_overrides,
    write_synthetic_code_table,
    write_synthetic_splits,
)
from learning_seed import seed_args
from sklearn.metrics import average_precision_score, roc_auc_score

from common.logs import read_metrics
from ehr_embedded import create_embeddings as create_embeddings_stage
from ehr_embedded import finetune as finetune_stage
from ehr_embedded import meds_io
from ehr_embedded.engine import masked_bce
from ehr_embedded.evaluate import choose_threshold, evaluate, multilabel_metrics
from ehr_embedded.finetune import finetune
from ehr_embedded.prediction_files import MULTILABEL_PREDICTION_SCHEMA
from ehr_embedded.storage import TASKS_FILE, SequenceStore

TASKS = ["alpha", "beta", "gamma"]
SPLIT_SIZES = {"train": 150, "tuning": 60, "held_out": 60}


def multilabel_store(root, dim: int = 8, seed: int = 0):
    """Task k is positive exactly when code `T{k}` is in the sequence (each drawn independently, p = 0.4), among
    random filler codes; a fifth of the (row, task) labels are missing (-1). Every third subject holds two rows."""
    rng = np.random.default_rng(seed)
    codes = ["[PAD]", "[UNK]", *[f"T{k}" for k in range(len(TASKS))], *[f"F{i}" for i in range(8)]]
    write_synthetic_code_table(root, codes, dim, rng)
    (root / TASKS_FILE).write_text(json.dumps({"tasks": TASKS}))

    def draw_row(split: str, i: int) -> tuple:
        has = rng.random(len(TASKS)) < 0.4
        has[i % len(TASKS)] = i % 2 == 0  # both classes of every task in every split
        length = int(rng.integers(4, 12))
        seq = rng.integers(2 + len(TASKS), len(codes), size=length)
        spots = rng.choice(length, size=len(TASKS), replace=False)
        seq[spots[has]] = 2 + np.flatnonzero(has)
        label = has.astype(int)
        missing = rng.random(len(TASKS)) < 0.2
        missing[i % len(TASKS)] = False
        label[missing] = -1
        return seq, label.tolist()

    return write_synthetic_splits(root, SPLIT_SIZES, draw_row, rng)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory, learning_seed):
    root = tmp_path_factory.mktemp("multilabel")
    store = multilabel_store(root / "store")
    report = finetune(train_config(store, root / "run", "model.num_classes=3", "training.epochs=15",
                                   *seed_args("training.seed", learning_seed)))
    return store, root / "run", report


def test_masked_bce_ignores_missing_labels_and_weighs_positives():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]], requires_grad=True)
    labels = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    loss = masked_bce(logits, labels)
    present = labels >= 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[present], labels[present])
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    # unlabelled entries never enter the loss, so autograd leaves exact zeros there
    assert torch.all(logits.grad[~present] == 0) and torch.all(logits.grad[present] != 0)
    weight = torch.tensor([3.0, 1.0, 0.5])
    weighted = masked_bce(logits.detach(), labels, pos_weight=weight, reduction="sum")
    by_hand = sum(-(weight[k] * labels[i, k] * torch.log(torch.sigmoid(logits[i, k]))
                    + (1 - labels[i, k]) * torch.log(1 - torch.sigmoid(logits[i, k])))
                  for i in range(2) for k in range(3) if labels[i, k] >= 0)
    assert torch.allclose(weighted, by_hand.detach(), rtol=1e-5, atol=1e-6)


def test_multilabel_metrics_equal_sklearn_on_labelled_rows():
    rng = np.random.default_rng(3)
    y = (rng.random((80, 3)) < [0.3, 0.5, 0.2]).astype(int)
    probs = np.clip(0.35 * y + rng.random((80, 3)) * 0.7, 0, 1)
    y[rng.random((80, 3)) < 0.25] = -1
    subjects = np.arange(80) // 2
    out = multilabel_metrics(y, probs, [0.5, 0.4, 0.6], TASKS, n_boot=200, seed=0, subject_ids=subjects)
    per_task = []
    for k, task in enumerate(TASKS):
        rows = y[:, k] >= 0
        per_task.append(roc_auc_score(y[rows, k], probs[rows, k]))
        assert out["tasks"][task]["n"] == rows.sum()
        assert out["tasks"][task]["auroc"]["value"] == pytest.approx(per_task[-1])
        assert out["tasks"][task]["auprc"]["value"] == pytest.approx(average_precision_score(y[rows, k],
                                                                                            probs[rows, k]))
        assert out["tasks"][task]["threshold"] == [0.5, 0.4, 0.6][k]
    assert out["macro_auroc"]["value"] == pytest.approx(np.mean(per_task))
    labelled = y >= 0
    assert out["micro_auroc"]["value"] == pytest.approx(roc_auc_score(y[labelled], probs[labelled]))
    assert out["macro_auroc"]["low"] <= out["macro_auroc"]["value"] <= out["macro_auroc"]["high"]
    assert out["n_subjects"] == 40 and out["bootstrap"] == "subjects"


@pytest.mark.learning
def test_finetune_and_evaluate_a_three_task_store(multilabel_run, learning_seed):
    store, run, report = multilabel_run
    held_out = SequenceStore(store / "held_out")
    assert held_out.is_multilabel and held_out.task_names == TASKS and held_out.labels.shape == (60, 3)

    predictions = pq.read_table(run / "predictions" / "held_out.parquet")
    assert predictions.schema == MULTILABEL_PREDICTION_SCHEMA
    frame = predictions.to_pandas()
    assert len(frame) == 60 * 3 and frame["task"].tolist() == TASKS * 60
    truth = held_out.labels.reshape(-1)
    assert np.array_equal(frame["boolean_value"].isna().to_numpy(), truth < 0)  # null exactly where no label
    assert np.array_equal(frame["boolean_value"].dropna().astype(int).to_numpy(), truth[truth >= 0])

    thresholds = json.loads((run / "reports" / "threshold.json").read_text())["thresholds"]
    per_task = []
    for task in TASKS:
        rows = frame[(frame["task"] == task) & frame["boolean_value"].notna()]
        auroc = roc_auc_score(rows["boolean_value"].astype(int), rows["predicted_boolean_probability"])
        per_task.append(auroc)
        assert report["tasks"][task]["auroc"]["value"] == pytest.approx(auroc)
        assert report["tasks"][task]["threshold"] == pytest.approx(thresholds[task])
        assert np.array_equal(rows["predicted_boolean_value"],
                              rows["predicted_boolean_probability"] >= thresholds[task])
    assert report["macro_auroc"]["value"] == pytest.approx(np.mean(per_task))
    labelled = frame[frame["boolean_value"].notna()]
    assert report["micro_auroc"]["value"] == pytest.approx(
        roc_auc_score(labelled["boolean_value"].astype(int), labelled["predicted_boolean_probability"]))
    # each task is one planted code: learnable; chance is 0.5. Measured held-out macro AUROC, own seed / 1 / 2 / 3
    # (OMP_NUM_THREADS=1): 1.000 / 0.980 / 0.967 / 1.000
    assert report["macro_auroc"]["value"] > 0.9

    # the thresholds are each task's F1-best on its labelled tuning rows, and `best` follows tuning macro AUROC
    evaluate(train_config(store, run, "model.num_classes=3"), "tuning")
    tuning = pd.read_parquet(run / "predictions" / "tuning.parquet")
    for task in TASKS:
        rows = tuning[(tuning["task"] == task) & tuning["boolean_value"].notna()]
        assert thresholds[task] == pytest.approx(choose_threshold(rows["boolean_value"].astype(int).to_numpy(),
                                                                  rows["predicted_boolean_probability"].to_numpy()))
    records = read_metrics(run / "metrics.jsonl")
    best_so_far = -1.0
    for record in records:
        assert record["best"] == (record["tuning_auroc"] > best_so_far)
        best_so_far = max(best_so_far, record["tuning_auroc"])


def test_multilabel_settings_that_do_not_fit_exit_2(multilabel_run, tmp_path, capsys):
    store, _, _ = multilabel_run
    cases = {"model.num_classes=2": "the store is multi-label with 3 tasks ['alpha', 'beta', 'gamma'] but "
                                    "model.num_classes=2; set model.num_classes=3",
             "training.focal_gamma=2.0": "training.focal_gamma is set but the store is multi-label"}
    for override, message in cases.items():
        extra = [override] if override.startswith("model") else ["model.num_classes=3", override]
        assert finetune_stage.main(train_overrides(store, tmp_path / override, *extra)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / override / "checkpoints").exists()


def write_task(path, table: pa.Table, keep: np.ndarray, values: np.ndarray, column: str = "boolean_value"):
    typed = pa.array(values, pa.bool_() if column == "boolean_value" else pa.int64())
    pq.write_table(pa.table({"subject_id": table.column("subject_id").filter(pa.array(keep)),
                             "prediction_time": table.column("prediction_time").filter(pa.array(keep)),
                             column: typed}), path)
    return path


def test_create_embeddings_merges_task_files_with_missing_labels(built, tmp_path, capsys):
    table = pq.read_table(built.meds / "labels" / "infection")
    n = len(table)
    infection = table.column("boolean_value").to_numpy(zero_copy_only=False).astype(int)
    rng = np.random.default_rng(0)
    keep_a, keep_b = rng.random(n) < 0.8, rng.random(n) < 0.6
    keep_a[~keep_b] = True  # every row has at least one task
    flipped = 1 - infection  # a second task whose value differs from the first, so columns cannot be swapped
    a = write_task(tmp_path / "a.parquet", table, keep_a, infection[keep_a].astype(bool))
    b = write_task(tmp_path / "b.parquet", table, keep_b, flipped[keep_b].astype(bool))
    args = [*stage1_overrides(built.meds, tmp_path / "out"), f"data.vocab_embedding_path={built.vocab}",
            "data.labels_filepath=null", f"data.task_labels={{infection: {a}, not_infection: {b}}}"]
    assert create_embeddings_stage.main(args) == 0

    expected = {}
    for i in range(n):
        key = (int(table.column("subject_id")[i].as_py()), pd.Timestamp(table.column("prediction_time")[i].as_py()))
        expected[key] = [int(infection[i]) if keep_a[i] else -1, int(flipped[i]) if keep_b[i] else -1]
    out = tmp_path / "out" / "store"
    assert json.loads((out / TASKS_FILE).read_text())["tasks"] == ["infection", "not_infection"]
    report = json.loads((out / "report.json").read_text())
    seen = 0
    for split in meds_io.SPLITS:
        store = SequenceStore(out / split)
        assert store.is_multilabel and store.task_names == ["infection", "not_infection"]
        keys = zip(store.sequences["subject_id"], store.sequences["prediction_time"])
        assert [expected[(int(s), pd.Timestamp(t))] for s, t in keys] == store.labels.tolist()
        assert report[split]["labelled"] == {"infection": int((store.labels[:, 0] >= 0).sum()),
                                             "not_infection": int((store.labels[:, 1] >= 0).sum())}
        assert store[0]["label"] == store.labels[0].tolist()
        seen += len(store)
    assert seen > 0.9 * n

    three = write_task(tmp_path / "three.parquet", table, np.ones(n, bool), np.arange(n) % 3, "integer_value")
    args = [*stage1_overrides(built.meds, tmp_path / "bad"), f"data.vocab_embedding_path={built.vocab}",
            "data.labels_filepath=null", f"data.task_labels={{infection: {a}, kind: {three}}}"]
    assert create_embeddings_stage.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"{three}: task 'kind' of data.task_labels is not binary (column 'integer_value'); multi-label "
                        f"tasks are boolean_value (or integer_value 0/1): give a multi-class or regression task its "
                        f"own store via data.labels_filepath")
    assert not (tmp_path / "bad" / "store").exists()

    both = [*stage1_overrides(built.meds, tmp_path / "both"), f"data.vocab_embedding_path={built.vocab}",
            f"data.task_labels={{infection: {a}, not_infection: {b}}}"]
    assert create_embeddings_stage.main(both) == 2
    assert "data.labels_filepath and data.task_labels are both set" in capsys.readouterr().err


def test_represent_keeps_the_label_lists_and_the_probe_refuses_them(multilabel_run, capsys):
    from ehr_embedded import linear_probe
    from ehr_embedded.represent import export_split

    store, run, _ = multilabel_run
    for split in meds_io.SPLITS:
        path = export_split(run, split)
        stored = np.stack(pd.read_parquet(path)["label"].to_numpy())
        assert np.array_equal(stored, SequenceStore(store / split).labels)
    assert linear_probe.main([f"run_dir={run}"]) == 2
    assert "multi-label rows (one label list per row); the linear probe fits one task" in capsys.readouterr().err


def test_predict_gives_evaluates_long_predictions_and_refuses_meds_dir(multilabel_run, tmp_path, capsys):
    from ehr_embedded import predict

    store, run, _ = multilabel_run
    out = tmp_path / "predict.parquet"
    assert predict.main([f"run_dir={run}", "split=held_out", f"output={out}"]) == 0
    # predict and evaluate run the same predict_multilabel on the same checkpoint, rows and eval_batch_size: the same
    # forward passes, so the same bytes
    assert pq.read_table(out).equals(pq.read_table(run / "predictions" / "held_out.parquet"))
    assert predict.main([f"run_dir={run}", f"meds_dir={tmp_path}", f"labels={tmp_path / 'x.parquet'}"]) == 2
    assert "a multi-label run; meds_dir mode reads one label file" in capsys.readouterr().err


def test_summarize_takes_one_task_of_a_multilabel_report(multilabel_run, tmp_path, capsys):
    from ehr_embedded import summarize

    _, run, report = multilabel_run
    path = run / "reports" / "eval_held_out.json"
    assert summarize.main([str(tmp_path / "s"), f"beta={path}#beta", f"gamma={path}#gamma"]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    # values copied from the report through JSON: exact
    assert [r["auroc"] for r in rows] == [report["tasks"]["beta"]["auroc"]["value"],
                                          report["tasks"]["gamma"]["auroc"]["value"]]
    assert [r["n"] for r in rows] == [report["tasks"]["beta"]["n"], report["tasks"]["gamma"]["n"]]
    assert summarize.main([str(tmp_path / "t"), f"x={path}#delta"]) == 2
    assert "no task 'delta' in this report (tasks: ['alpha', 'beta', 'gamma'])" in capsys.readouterr().err


def test_counts_baseline_fits_one_logistic_regression_per_task(multilabel_run, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from ehr_embedded import baseline

    store, _, _ = multilabel_run
    report = baseline.fit_baseline(baseline.BaselineConfig(embedding_output_dir=store, output_dir=tmp_path,
                                                           n_bootstrap=50))
    splits = {s: SequenceStore(store / s) for s in meds_io.SPLITS}
    n_codes = len(pd.read_parquet(store / "code_table" / "vocab.parquet"))
    x = {s: baseline.count_features(st, n_codes) for s, st in splits.items()}
    predictions = pd.read_parquet(tmp_path / "predictions" / "held_out.parquet")
    for k, task in enumerate(TASKS):
        rows = {s: st.labels[:, k] >= 0 for s, st in splits.items()}
        y = {s: splits[s].labels[rows[s], k] for s in splits}
        fits = {c: LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
                .fit(x["train"][rows["train"]], y["train"]) for c in (0.001, 0.01, 0.1, 1.0, 10.0)}
        tuning = {c: roc_auc_score(y["tuning"], f.predict_proba(x["tuning"][rows["tuning"]])[:, 1])
                  for c, f in fits.items()}
        c = max(tuning, key=tuning.get)  # ties: the first in grid order, as the baseline keeps
        assert report["tasks"][task]["C"] == c and report["tasks"][task]["tuning_auroc"] == pytest.approx(tuning[c])
        held = fits[c].predict_proba(x["held_out"][rows["held_out"]])[:, 1]
        assert report["tasks"][task]["auroc"]["value"] == pytest.approx(roc_auc_score(y["held_out"], held))
        mine = predictions[(predictions["task"] == task) & predictions["boolean_value"].notna()]
        # the stage's fit and this one: the same sklearn call on the same counts, written to parquet and read back
        np.testing.assert_allclose(mine["predicted_boolean_probability"], held, rtol=1e-6, atol=1e-9)
    assert report["macro_auroc"]["value"] == pytest.approx(np.mean([report["tasks"][t]["auroc"]["value"]
                                                                    for t in TASKS]))
