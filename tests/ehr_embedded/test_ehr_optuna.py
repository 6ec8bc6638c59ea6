"""Optuna on finetune: two workers on one SQLite study, fetch_best_and_train with the best parameters, and a worker
SIGKILLed mid-trial whose trial the next worker fails and retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml
from ehr_helpers import train_overrides
from sklearn.metrics import roc_auc_score
from study_workers import kill_inside_first_trial

from common.logs import read_metrics
from ehr_embedded import fetch_best_and_train, optuna_worker

pytestmark = pytest.mark.slow
DONE = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
SPACE = ["optuna.model_dims=[16, 32]", "optuna.n_layers=[1, 2]", "optuna.poolings=[max, mean]",
         "training.num_threads=1"]


def study_args(built, tmp_path: Path, study: str, *extra: str) -> list[str]:
    return train_overrides(built.store, tmp_path / "final", f"optuna.storage=sqlite:///{tmp_path / 'study.db'}",
                           f"optuna.study={study}", *SPACE, *extra)


def worker_process(args: list[str], repo_root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ehr_embedded.optuna_worker", *args], cwd=repo_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def load(tmp_path: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'study.db'}").get_trials(deepcopy=False)


def test_two_workers_share_one_study_then_the_best_params_finetune_the_final_model(built, tmp_path, repo_root):
    args = study_args(built, tmp_path, "t", "optuna.trials=2", "optuna.total_trials=3", "optuna.epochs=2")
    workers = [worker_process(args, repo_root) for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=600)  # loaded 2-core machine: 2-3x the idle time
        assert proc.returncode == 0, err.decode()[-2000:]

    trials = load(tmp_path, "t")
    assert 3 <= len(trials) <= 4  # each worker stops once the study holds 3; both may start a 3rd at once
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert {t.state for t in trials} <= DONE
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert sorted(p.name for p in (tmp_path / "optuna" / "t").iterdir()) == sorted(p.name for p in run_dirs)
    assert len(set(run_dirs)) == len(trials)
    for trial, run_dir in zip(trials, run_dirs):
        assert run_dir.name == f"trial_{trial.number:04d}"
        records = read_metrics(run_dir / "metrics.jsonl")
        # what the pruner saw is the tuning AUROC of each epoch the trial trained (the same floats, copied: exact)
        assert {r["epoch"]: r["tuning_auroc"] for r in records} == trial.intermediate_values
        assert 1 <= len(records) <= 2
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == max(r["tuning_auroc"] for r in records)
        trial_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        for dotted, value in trial.params.items():
            section, key = dotted.split(".")
            assert trial_cfg[section][key] == value, dotted
        assert trial_cfg["training"]["epochs"] == 2
        # the search never scores held_out
        assert not (run_dir / "reports" / "eval_held_out.json").exists()
        assert not (run_dir / "predictions" / "held_out.parquet").exists()
    assert set(trials[0].params) == {"training.learning_rate", "training.weight_decay", "model.dropout",
                                     "model.n_layers", "model.model_dim", "model.pooling"}

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'study.db'}")
    best = study.best_trial
    assert best.value == max(t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert fetch_best_and_train.main([*args, "training.epochs=2"]) == 0
    final = tmp_path / "final"
    config = yaml.safe_load((final / "config.yaml").read_text())
    for dotted, value in best.params.items():
        section, key = dotted.split(".")
        assert config[section][key] == value, dotted
    held_out = json.loads((final / "reports" / "eval_held_out.json").read_text())
    assert held_out["split"] == "held_out"
    # the final run was scored on the held-out predictions it wrote (sklearn on that file, not a range check)
    predictions = pq.read_table(final / "predictions" / "held_out.parquet")
    assert len(predictions) == held_out["n"]
    labels = predictions.column("boolean_value").to_numpy(zero_copy_only=False).astype(int)
    probs = predictions.column("predicted_boolean_probability").to_numpy()
    assert held_out["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    summary = json.loads((final / "reports" / "best_trial.json").read_text())
    assert summary["number"] == best.number and summary["params"] == best.params
    assert summary["final_held_out_auroc"] == held_out["auroc"]["value"]  # copied from the report
    assert len(load(tmp_path, "t")) == len(trials)  # fetching trains outside the study


def test_a_trial_killed_with_its_worker_is_failed_and_retried_by_the_next_worker(built, tmp_path, repo_root):
    base = study_args(built, tmp_path, "k", "optuna.heartbeat_interval=1", "optuna.grace_period=2",
                      "optuna.max_retries=1")
    proc = worker_process([*base, "optuna.trials=1", "optuna.epochs=200"], repo_root)  # long: the kill lands inside
    kill_inside_first_trial(proc, tmp_path / "optuna" / "k" / "trial_0000" / "metrics.jsonl",
                            f"sqlite:///{tmp_path / 'study.db'}", "k")

    # past the grace period: the trial's last heartbeat is stale. SQLite keeps heartbeats and its clock to the whole
    # second, so the gap Optuna sees can be up to 1 s shorter than the real one: wait grace + 1 s and a margin
    time.sleep(3.5)
    assert optuna_worker.main([*base, "optuna.trials=2", "optuna.epochs=1"]) == 0

    by_number = {t.number: t for t in load(tmp_path, "k")}
    assert sorted(by_number) == [0, 1, 2]
    assert by_number[0].state == optuna.trial.TrialState.FAIL
    retry = by_number[1]
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == by_number[0].params
    assert retry.user_attrs["run_dir"].endswith("trial_0001")
    assert by_number[1].state in DONE and by_number[2].state in DONE
    assert "failed_trial" not in by_number[2].system_attrs


def test_bad_study_settings_exit_2(built, tmp_path, capsys):
    args = study_args(built, tmp_path, "none")
    assert fetch_best_and_train.main(args) == 2
    assert "no study named 'none'" in capsys.readouterr().err
    assert optuna_worker.main([*args, "model.n_heads=4", "optuna.model_dims=[18]"]) == 2
    assert "not divisible by model.n_heads=4" in capsys.readouterr().err
