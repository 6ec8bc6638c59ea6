"""Representations and the linear probe: represent exports exactly the vector each model's classification head reads
(encoder and decoder), linear_probe's report equals an independent sklearn fit on the same arrays, bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ehr_helpers import train_config
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from test_ehr_task_metrics import synthetic_store

from ehr_embedded import linear_probe as probe_stage
from ehr_embedded import represent as represent_stage
from ehr_embedded.data import EventSequenceDataset, make_loader
from ehr_embedded.finetune import finetune
from ehr_embedded.predict import load_run
from ehr_embedded.storage import open_split

C_GRID = [0.01, 0.1, 1.0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    store = synthetic_store(root / "store", n_classes=2, seed=4)
    out = {}
    for name, model_type in (("encoder", "transformer_encoder_embedded"), ("decoder", "transformer_decoder_embedded")):
        cfg = train_config(store, root / name, "training.epochs=2", "model.pooling=attention", model_type=model_type)
        finetune(cfg)
        assert represent_stage.main([f"run_dir={root / name}"]) == 0
        out[name] = root / name
    return store, out


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_representations_are_what_the_head_reads(runs, name):
    store, run_dirs = runs
    run = run_dirs[name]
    model, cfg, table, _ = load_run(run)
    for split in ("train", "tuning", "held_out"):
        frame = pq.read_table(run / "representations" / f"{split}.parquet")
        meta = json.loads(frame.schema.metadata[b"ehr_embedded.represent"])
        assert meta["split"] == split and meta["dim"] == cfg.model.model_dim == 32 and meta["model_type"] == cfg.model.type
        assert frame.schema.field("representation").type == pa.list_(pa.float32(), 32)
        sequences = pd.read_parquet(store / split / "sequences.parquet")
        assert frame.column("subject_id").to_pylist() == sequences["subject_id"].tolist()
        assert frame.column("label").to_pylist() == sequences["label"].tolist()
    reps = np.stack(pq.read_table(run / "representations" / "held_out.parquet").column("representation").to_numpy(
        zero_copy_only=False))
    dataset = EventSequenceDataset(open_split(store, "held_out"), table, cfg.model.max_length)
    with torch.no_grad():
        for batch in make_loader(dataset, 16, shuffle=False):
            rows = batch["index"].numpy()
            if name == "encoder":  # the pooled states the classifier reads
                own = model.encode(batch)
            else:  # the decoder's last real event state, taken by hand from its hidden states
                h, pad = model.hidden_states(batch)
                own = h[torch.arange(len(rows)), (~pad).sum(1) - 1]
            # represent batches held_out by eval_batch_size, this loop by 16: other batch shapes and padding, so
            # float32 sums in another order (measured differences ~1e-7); a wrong vector differs by far more
            torch.testing.assert_close(torch.from_numpy(reps[rows]), own, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.classifier(torch.from_numpy(reps[rows])), model(batch), rtol=1e-5,
                                       atol=1e-6)


def independent_probe(train, tuning, held_out):
    """The probe by hand: scaler on train, LR per C, best tuning AUROC, F1-best tuning threshold."""
    scaler = StandardScaler().fit(train[0])
    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
        clf.fit(scaler.transform(train[0]), train[1])
        auroc = roc_auc_score(tuning[1], clf.predict_proba(scaler.transform(tuning[0]))[:, 1])
        if best is None or auroc > best[0]:
            best = (auroc, c, clf)
    return best, scaler


def arrays(path):
    table = pq.read_table(path)
    return (np.stack(table.column("representation").to_numpy(zero_copy_only=False)),
            table.column("label").to_numpy(), table.column("subject_id").to_numpy())


def test_probe_report_equals_an_independent_sklearn_fit(runs, tmp_path):
    _, run_dirs = runs
    run = run_dirs["encoder"]
    grid = "[" + ", ".join(map(str, C_GRID)) + "]"
    assert probe_stage.main([f"run_dir={run}", f"c_grid={grid}", "n_bootstrap=50"]) == 0
    report = json.loads((run / "representations" / "linear_probe.json").read_text())
    train, tuning, held = (arrays(run / "representations" / f"{s}.parquet") for s in ("train", "tuning", "held_out"))
    (tuning_auroc, c, clf), scaler = independent_probe(train, tuning, held)
    score = clf.predict_proba(scaler.transform(held[0]))[:, 1]
    assert report["C"] == c and report["selection_auroc"][str(c)] == pytest.approx(tuning_auroc, abs=1e-12)
    assert report["auroc"]["value"] == pytest.approx(roc_auc_score(held[1], score), abs=1e-12)
    threshold = report["threshold"]
    assert report["f1"]["value"] == pytest.approx(f1_score(held[1], score >= threshold), abs=1e-12)
    assert report["n"] == len(held[1]) and report["n_subjects"] == len(np.unique(held[2]))
    predictions = pd.read_parquet(run / "representations" / "linear_probe_held_out.parquet")
    np.testing.assert_allclose(predictions["predicted_boolean_probability"], score, rtol=1e-7, atol=1e-9)
    assert (run / "representations" / "linear_probe.md").read_text().count("| auroc |") == 1

    # C by subject-grouped folds of train: the same choice as GroupKFold by hand
    out = tmp_path / "cv"
    assert probe_stage.main([f"run_dir={run}", f"c_grid={grid}", "n_bootstrap=20", "selection=grouped_cv",
                             "cv_folds=3", f"output_dir={out}"]) == 0
    cv_report = json.loads((out / "linear_probe.json").read_text())
    by_hand = {}
    for c in C_GRID:
        folds = []
        for fit_rows, test_rows in GroupKFold(n_splits=3).split(train[0], train[1], groups=train[2]):
            fold_scaler = StandardScaler().fit(train[0][fit_rows])
            fold_clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
            fold_clf.fit(fold_scaler.transform(train[0][fit_rows]), train[1][fit_rows])
            folds.append(roc_auc_score(train[1][test_rows],
                                       fold_clf.predict_proba(fold_scaler.transform(train[0][test_rows]))[:, 1]))
        by_hand[str(c)] = float(np.mean(folds))
    assert cv_report["selection_auroc"] == pytest.approx(by_hand, abs=1e-12)
    assert cv_report["C"] == max(C_GRID, key=lambda c: by_hand[str(c)])


def write_reps(path, x, y, subjects=None):
    subjects = np.arange(len(y)) if subjects is None else subjects
    flat = pa.array(x.astype(np.float32).reshape(-1))
    pq.write_table(pa.table({"subject_id": subjects.astype(np.int64),
                             "prediction_time": pa.array(np.full(len(y), np.datetime64("2020-01-01", "us"))),
                             "label": y.astype(np.int64),
                             "representation": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])}), path)
    return path


def test_multiclass_probe_is_multinomial_and_matches_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 90), ("tuning", 45), ("held_out", 45)):
        y = np.arange(n) % 3
        files[split] = (rng.normal(size=(n, 5)) + 1.2 * np.eye(5)[y], y)
        write_reps(tmp_path / f"{split}.parquet", *files[split])
    args = [f"{s}={tmp_path / f'{s}.parquet'}" for s in files] + ["c_grid=[0.1, 1.0]", "n_bootstrap=20"]
    assert probe_stage.main(args) == 0
    report = json.loads((tmp_path / "linear_probe.json").read_text())
    scaler = StandardScaler().fit(files["train"][0])
    scores = {}
    for c in (0.1, 1.0):
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
        clf.fit(scaler.transform(files["train"][0]), files["train"][1])
        scores[c] = (roc_auc_score(files["tuning"][1], clf.predict_proba(scaler.transform(files["tuning"][0])),
                                   multi_class="ovr"), clf)
    c = max(scores, key=lambda k: scores[k][0])
    probs = scores[c][1].predict_proba(scaler.transform(files["held_out"][0]))
    assert report["C"] == c and report["num_classes"] == 3 and report["support"] == {"0": 15, "1": 15, "2": 15}
    assert report["macro_auroc_ovr"]["value"] == pytest.approx(
        roc_auc_score(files["held_out"][1], probs, multi_class="ovr"), abs=1e-12)
    assert report["accuracy"]["value"] == pytest.approx(np.mean(probs.argmax(1) == files["held_out"][1]), abs=1e-12)


def test_bad_representation_files_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(20) % 2
    for split in ("train", "tuning"):
        write_reps(tmp_path / f"{split}.parquet", rng.normal(size=(20, 4)), y)
    args = [f"{s}={tmp_path / f'{s}.parquet'}" for s in ("train", "tuning", "held_out")]
    assert probe_stage.main(args) == 2
    assert f"{tmp_path / 'held_out.parquet'}: representations file not found" in capsys.readouterr().err

    write_reps(tmp_path / "held_out.parquet", rng.normal(size=(20, 6)), y)
    assert probe_stage.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'held_out.parquet'}: representations are 6-d but {tmp_path / 'train.parquet'} is 4-d" in err

    write_reps(tmp_path / "held_out.parquet", rng.normal(size=(20, 4)), y)
    write_reps(tmp_path / "train.parquet", rng.normal(size=(20, 4)), np.zeros(20, int))
    assert probe_stage.main(args) == 2
    assert f"{tmp_path / 'train.parquet'}: one class only ([0])" in capsys.readouterr().err

    assert represent_stage.main([f"run_dir={tmp_path / 'nowhere'}"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "linear_probe.json").exists()
