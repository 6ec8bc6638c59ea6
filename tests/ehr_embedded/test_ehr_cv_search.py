"""Subject-grouped cross-validation for model choice (issue 12): the fold stores, an Optuna study scored on folds,
fetch_best_and_train's record of it, and the counts baseline's C chosen by grouped CV."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from ehr_helpers import train_overrides
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from common.config import load_config
from common.logs import read_metrics
from ehr_embedded import baseline, fetch_best_and_train, optuna_worker
from ehr_embedded.config import BaselineConfig
from ehr_embedded.cv_folds import ASSIGNMENT_FILE, assign_folds, materialise_folds
from ehr_embedded.storage import CODE_TABLE_DIR, SequenceStore, load_dataset_table, open_split

SPACE = ["optuna.model_dims=[16, 32]", "optuna.n_layers=[1]", "optuna.poolings=[max, mean]", "training.num_threads=1"]


def key(frame: pd.DataFrame) -> list[tuple]:
    return list(zip(frame["subject_id"].tolist(), pd.to_datetime(frame["prediction_time"]).tolist()))


def source_rows(store: Path) -> dict[tuple, tuple]:
    """(subject_id, prediction_time) -> (label, token_ids, values, time_gaps) of every train + tuning row."""
    out = {}
    for split in ("train", "tuning"):
        src = open_split(store, split)
        for i, k in enumerate(key(src.sequences)):
            out[k] = (src.labels[i], *(np.asarray(src[i][a]) for a in ("token_ids", "values", "time_gaps")))
    return out


def _materialise(args: tuple) -> list[str]:
    return [str(p) for p in materialise_folds(*args)]


def test_assign_folds_keeps_each_subject_in_one_fold_and_stratifies():
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 40, size=300)  # ~7 rows per subject (the sample store has one per subject)
    labels = (rng.random(300) < 0.3).astype(np.int64)
    folds = assign_folds(subjects, labels, 4, seed=5)
    assert sorted(np.unique(folds)) == [0, 1, 2, 3]
    for subject in np.unique(subjects):
        assert len(np.unique(folds[subjects == subject])) == 1, subject
    for fold in range(4):
        assert 0 < labels[folds == fold].mean() < 1
    np.testing.assert_array_equal(folds, assign_folds(subjects, labels, 4, seed=5))  # a pure function of the seed


def test_folds_split_subjects_cover_every_pooled_row_once_and_copy_events_unchanged(built, tmp_path):
    # three workers creating the fold stores at once: one rename wins, all use the same folds, no temp dir remains
    out = tmp_path / "study" / "folds_k3_seed0"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_materialise, [(built.store, out, 3, 0)] * 3)
    assert results[0] == results[1] == results[2] == [str(out / f"fold_{k}") for k in range(3)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["folds_k3_seed0"]

    source = source_rows(built.store)
    held_out_subjects = set(open_split(built.store, "held_out").sequences["subject_id"])
    tuning_keys, subjects_by_fold = [], []
    for k in range(3):
        fold = out / f"fold_{k}"
        assert sorted(p.name for p in fold.iterdir()) == [CODE_TABLE_DIR, "train", "tuning"]  # no held_out split
        train, tuning = SequenceStore(fold / "train"), SequenceStore(fold / "tuning")
        assert not set(key(train.sequences)) & set(key(tuning.sequences))
        assert len(train) + len(tuning) == len(source)
        assert not set(train.sequences["subject_id"]) & set(tuning.sequences["subject_id"])
        assert not (set(train.sequences["subject_id"]) | set(tuning.sequences["subject_id"])) & held_out_subjects
        for store in (train, tuning):
            for i, row_key in enumerate(key(store.sequences)):
                label, *arrays = source[row_key]
                assert store.labels[i] == label
                for name, expected in zip(("token_ids", "values", "time_gaps"), arrays):
                    np.testing.assert_array_equal(np.asarray(store[i][name]), expected, err_msg=name)
        tuning_keys += key(tuning.sequences)
        subjects_by_fold.append(set(tuning.sequences["subject_id"]))
        assert len(np.unique(tuning.labels)) == 2  # stratified: every fold has a tuning AUROC
        # the fold stores copy the code table: bit for bit
        np.testing.assert_array_equal(load_dataset_table(fold).embeddings, load_dataset_table(built.store).embeddings)
    assert sorted(tuning_keys) == sorted(source)  # every pooled row is exactly once a fold's tuning row
    for a in range(3):
        for b in range(a + 1, 3):
            assert not subjects_by_fold[a] & subjects_by_fold[b]

    # the folds are a pure function of the rows and the seed, recorded per pooled row
    recorded = pd.read_parquet(out / ASSIGNMENT_FILE)
    again = assign_folds(recorded["subject_id"].to_numpy(), recorded["label"].to_numpy(), 3, 0)
    np.testing.assert_array_equal(recorded["fold"].to_numpy(), again)
    other = assign_folds(recorded["subject_id"].to_numpy(), recorded["label"].to_numpy(), 3, 1)
    assert not np.array_equal(other, again)


@pytest.mark.slow
def test_a_cv_study_scores_the_mean_fold_best_and_never_reads_held_out(built, tmp_path, monkeypatch):
    opened: list[Path] = []
    real_init = SequenceStore.__init__

    def recording_init(self, directory):
        opened.append(Path(directory))
        real_init(self, directory)

    monkeypatch.setattr(SequenceStore, "__init__", recording_init)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = train_overrides(built.store, tmp_path / "final", f"optuna.storage={storage}", "optuna.study=cv", *SPACE,
                           "optuna.cv_folds=3", "optuna.cv_seed=0", "optuna.epochs=2")
    assert optuna_worker.main([*args, "optuna.trials=2"]) == 0
    assert opened and not [p for p in opened if p.name == "held_out"]  # the search never opens held_out

    trials = optuna.load_study(study_name="cv", storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 2 and {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    folds_dir = tmp_path / "optuna" / "cv" / "folds_k3_seed0"
    for trial in trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        best = []
        for k in range(3):
            records = read_metrics(run_dir / f"fold_{k}" / "metrics.jsonl")
            assert len(records) == 2
            best.append(max(r["tuning_auroc"] for r in records))
            fold_cfg = yaml.safe_load((run_dir / f"fold_{k}" / "config.yaml").read_text())
            assert Path(fold_cfg["data"]["embedding_output_dir"]) == folds_dir / f"fold_{k}"
            assert not (run_dir / f"fold_{k}" / "reports" / "eval_held_out.json").exists()
        assert trial.user_attrs["fold_aurocs"] == best
        assert trial.value == pytest.approx(np.mean(best), abs=1e-12)
        assert trial.user_attrs["cv_mean"] == trial.value  # the same float stored twice
        assert trial.user_attrs["cv_sd"] == pytest.approx(np.std(best, ddof=1), abs=1e-12)
        # the pruner sees the running mean over finished folds, one step per fold
        assert trial.intermediate_values == pytest.approx({k: np.mean(best[:k + 1]) for k in range(3)})

    assert fetch_best_and_train.main([*args, "training.epochs=1"]) == 0
    summary = json.loads((tmp_path / "final" / "reports" / "best_trial.json").read_text())
    best_trial = optuna.load_study(study_name="cv", storage=storage).best_trial
    assert summary["cv_mean_auroc"] == best_trial.value and summary["cv_folds"] == 3  # copied from the study
    assert summary["cv_sd_auroc"] == best_trial.user_attrs["cv_sd"]
    assert summary["cv_fold_aurocs"] == best_trial.user_attrs["fold_aurocs"] and summary["tuning_auroc"] is None
    final_cfg = yaml.safe_load((tmp_path / "final" / "config.yaml").read_text())
    assert Path(final_cfg["data"]["embedding_output_dir"]) == built.store  # the final model trains on the store


def test_baseline_grouped_cv_per_c_scores_match_sklearn_on_the_same_subject_folds(built, tmp_path, monkeypatch):
    grid = [0.01, 1.0, 100.0]
    cfg = load_config(BaselineConfig, None, [f"embedding_output_dir={built.store}", f"output_dir={tmp_path / 'b'}",
                                             "n_bootstrap=20", "max_length=64", f"c_grid={grid}",
                                             "selection=grouped_cv", "cv_folds=4", "cv_seed=3"])
    report = baseline.fit_baseline(cfg)

    n_codes = len(load_dataset_table(built.store).vocab)
    stores = {s: open_split(built.store, s) for s in ("train", "tuning")}
    x = {s: baseline.count_features(st, n_codes, 64) for s, st in stores.items()}
    pooled = sp.vstack([x["train"], x["tuning"]], format="csr")
    y = np.concatenate([stores["train"].labels, stores["tuning"].labels])
    groups = np.concatenate([st.sequences["subject_id"].to_numpy() for st in stores.values()])
    splitter = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=3)
    expected = {}
    for c in grid:
        expected[str(c)] = []
        for fit, test in splitter.split(pooled, y, groups):
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=0)
            clf.fit(pooled[fit], y[fit])
            expected[str(c)].append(roc_auc_score(y[test], clf.predict_proba(pooled[test])[:, 1]))
    assert report["selection"] == "grouped_cv" and report["cv_folds"] == 4 and report["cv_seed"] == 3
    assert report["selection_fold_aurocs"].keys() == expected.keys()
    for c, folds in expected.items():
        assert report["selection_fold_aurocs"][c] == pytest.approx(folds, abs=1e-12), c
    assert report["selection_auroc"] == pytest.approx({c: np.mean(v) for c, v in expected.items()}, abs=1e-12)
    chosen = max(grid, key=lambda c: np.mean(expected[str(c)]))
    assert report["C"] == chosen
    # the final model is still fitted on train alone, its tuning AUROC as the tuning selection reports it
    clf = LogisticRegression(C=chosen, class_weight="balanced", max_iter=5000, random_state=0)
    clf.fit(x["train"], stores["train"].labels)
    assert report["tuning_auroc"] == pytest.approx(
        roc_auc_score(stores["tuning"].labels, clf.predict_proba(x["tuning"])[:, 1]), abs=1e-12)
    # C follows the CV means, not tuning (tuning AUROC favours C=100 here): fake CV scores that favour C=0.01
    fake = {c: {"mean": 0.9 if c == 0.01 else 0.1, "sd": 0.0, "folds": [0.5]} for c in grid}
    monkeypatch.setattr(baseline, "grouped_cv_scores", lambda *_: fake)
    faked = baseline.fit_baseline(cfg)
    assert faked["C"] == 0.01 and faked["selection_auroc"]["0.01"] == 0.9
    assert faked["tuning_auroc"] < report["tuning_auroc"]
    # the same folds as the fold stores optuna_worker writes for this K and seed
    materialise_folds(built.store, tmp_path / "folds", 4, 3)
    recorded = pd.read_parquet(tmp_path / "folds" / ASSIGNMENT_FILE)
    hand = np.empty(len(y), np.int64)
    for k, (_, test) in enumerate(splitter.split(pooled, y, groups)):
        hand[test] = k
    np.testing.assert_array_equal(recorded["fold"].to_numpy(), hand)


def test_bad_cv_settings_exit_2(built, tmp_path, capsys):
    from test_ehr_regression import synthetic_regression_store

    base = [f"embedding_output_dir={built.store}", f"output_dir={tmp_path / 'b'}", "n_bootstrap=10"]
    assert baseline.main([*base, "selection=grouped_cv", "cv_folds=1"]) == 2
    assert "cv_folds must be >= 2" in capsys.readouterr().err
    assert baseline.main([*base, "selection=grouped_cv", "cv_folds=100000"]) == 2
    assert "cv_folds=100000: needs 2 <= folds <= subjects" in capsys.readouterr().err
    store = synthetic_regression_store(tmp_path / "regression")
    assert baseline.main([f"embedding_output_dir={store}", f"output_dir={tmp_path / 'r'}", "selection=grouped_cv"]) == 2
    assert "selection=grouped_cv is for classification stores" in capsys.readouterr().err
    args = train_overrides(built.store, tmp_path / "final", f"optuna.storage=sqlite:///{tmp_path / 's.db'}", *SPACE)
    assert optuna_worker.main([*args, "optuna.cv_folds=1"]) == 2
    assert "optuna.cv_folds=1: use 0" in capsys.readouterr().err
    assert optuna_worker.main([*args, "optuna.cv_folds=100000"]) == 2
    assert "optuna.cv_folds=100000: needs 2 <= folds <= subjects" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "optuna").exists()
