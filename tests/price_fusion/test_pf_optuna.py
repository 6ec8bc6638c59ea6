"""Optuna for price_fusion: two worker processes on one SQLite study, fetch_best_and_train with the best trial's
parameters, and a worker SIGKILLed mid-trial whose trial the next worker marks FAIL and retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from study_workers import kill_inside_first_trial

from common.logs import read_metrics
from price_fusion import fetch_best_and_train, optuna_worker

pytestmark = pytest.mark.slow
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Choices that suit the tiny test network (model.num_heads=4 in conftest.MODEL_OVERRIDES).
SPACE = ["optuna.branch_dims=[16,32]", "optuna.warmup_epochs=1"]


def _env(repo_root: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}


def _metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def test_two_workers_share_one_study_then_fetch_best_trains_with_its_params(sample_env, tmp_path, repo_root):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = sample_env["args"](tmp_path / "runs", f"optuna.storage={storage}", "optuna.study=s", "optuna.trials=2",
                              "optuna.total_trials=3", "optuna.epochs=3", "train.kfold=3", "train.epochs=500", *SPACE)
    workers = [subprocess.Popen([sys.executable, "-m", "price_fusion.optuna_worker", *args], cwd=repo_root,
                                env=_env(repo_root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=900)  # room for a loaded 2-core machine
        assert proc.returncode == 0, err.decode()[-3000:]

    study = optuna.load_study(study_name="s", storage=storage)
    trials = study.get_trials(deepcopy=False)
    # each worker stops once the study holds 3 trials; both may start a 3rd at the same moment
    assert 3 <= len(trials) <= 4
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state in DONE for t in trials), [t.state for t in trials]
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == len(trials)
    assert sorted(p.name for p in (tmp_path / "runs" / "optuna" / "s").iterdir()) == sorted(p.name for p in run_dirs)
    test_ids = set(pd_ids(sample_env["test_csv"]))
    for trial, run_dir in zip(trials, run_dirs):
        assert run_dir.name == f"trial_{trial.number:04d}"
        metrics = _metrics(run_dir)
        # one report per epoch, the validation SMAPE of that epoch; a short single-split run despite kfold/epochs
        assert [m["epoch"] for m in metrics] == sorted(trial.intermediate_values) and len(metrics) <= 3
        # the number reported to optuna is copied (a float64 in SQLite, repr in JSON): exact
        assert [m["val_smape"] for m in metrics] == [trial.intermediate_values[m["epoch"]] for m in metrics]
        assert not list(run_dir.glob("fold_*"))
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert len(metrics) == 3 and trial.value == min(  # the value reported is one of these, copied: exact
                m["val_smape"] for m in metrics)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["epochs"] == 3 and config["train"]["kfold"] == 0
        for dotted, value in trial.params.items():
            section, key = dotted.split(".")
            assert config[section][key] == value, dotted
        # the search never looks at the test split: no test predictions or evaluation, validation ids from train only
        assert not list(run_dir.rglob("test_out.csv")) and not list(run_dir.rglob("evaluation_*"))
        assert not test_ids & set(json.loads((run_dir / "split.json").read_text())["val_ids"][0])
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and study.best_value == min(t.value for t in complete)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE

    best = study.best_trial
    assert fetch_best_and_train.main([*args, "run_name=final", "train.epochs=3", "train.kfold=0"]) == 0
    final = tmp_path / "runs" / "final"
    config = yaml.safe_load((final / "config.yaml").read_text())
    for dotted, value in best.params.items():
        section, key = dotted.split(".")
        assert config[section][key] == value, dotted
    report = json.loads((final / "reports" / "best_trial.json").read_text())
    assert report["number"] == best.number and report["params"] == best.params
    assert len(_metrics(final)) == 3
    # a study that does not exist: exit 2, nothing trained
    assert fetch_best_and_train.main([*args, "run_name=none", "optuna.study=missing"]) == 2
    assert not (tmp_path / "runs" / "none").exists()


def pd_ids(csv_path) -> list[str]:
    import pandas as pd

    return pd.read_csv(csv_path, dtype={"sample_id": str})["sample_id"].tolist()


def test_a_trial_killed_with_its_worker_is_failed_and_retried_by_the_next_worker(sample_env, tmp_path, repo_root):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = sample_env["args"](tmp_path / "runs", f"optuna.storage={storage}", "optuna.study=k",
                              "optuna.heartbeat_interval=1", "optuna.grace_period=2", "optuna.max_retries=1", *SPACE)
    # a long first trial (no early stop) so that the kill lands inside it
    slow = [*args, "optuna.trials=1", "optuna.epochs=5000", "train.patience=10000"]
    proc = subprocess.Popen([sys.executable, "-m", "price_fusion.optuna_worker", *slow], cwd=repo_root,
                            env=_env(repo_root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_inside_first_trial(proc, tmp_path / "runs" / "optuna" / "k" / "trial_0000" / "metrics.jsonl", storage, "k")

    # past the grace period: the trial's last heartbeat is stale. SQLite keeps heartbeats and its clock to the whole
    # second, so the gap Optuna sees can be up to 1 s shorter than the real one: wait grace + 1 s and a margin
    time.sleep(3.5)
    assert optuna_worker.main([*args, "optuna.trials=2", "optuna.epochs=2"]) == 0

    trials = optuna.load_study(study_name="k", storage=storage).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert sorted(by_number) == [0, 1, 2]
    assert by_number[0].state == optuna.trial.TrialState.FAIL
    retry = by_number[1]
    # the retry ran the killed trial's parameters, names the trial it retries, and finished in a directory of its own
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == by_number[0].params
    assert retry.user_attrs["run_dir"].endswith("trial_0001")
    retry_config = yaml.safe_load((Path(retry.user_attrs["run_dir"]) / "config.yaml").read_text())
    assert retry_config["train"]["lr"] == by_number[0].params["train.lr"]  # copied through YAML (repr): exact
    assert all(t.state in DONE for t in trials[1:])
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def test_study_parameters_must_be_config_keys_and_choices_must_suit_the_model(sample_env, tmp_path):
    from common.config import load_config
    from common.errors import UserError
    from price_fusion.config import PriceFusionConfig

    cfg = load_config(PriceFusionConfig, None, ["model.num_heads=4", "model.branch_dim=32"])
    applied = optuna_worker.apply_params(cfg, {"train.lr": 0.005, "model.name": "advanced_moe", "model.branch_dim": 16})
    assert (applied.train.lr, applied.model.name, applied.model.branch_dim) == (0.005, "advanced_moe", 16)
    assert cfg.train.lr != 0.005  # the original is untouched
    with pytest.raises(UserError, match="train.nope"):
        optuna_worker.apply_params(cfg, {"train.nope": 1})
    with pytest.raises(UserError, match="num_heads"):
        optuna_worker.apply_params(cfg, {"model.branch_dim": 18})
    # branch_dims not divisible by model.num_heads: exit 2 before any study is created
    args = sample_env["args"](tmp_path / "runs", f"optuna.storage=sqlite:///{tmp_path / 'x.db'}",
                              "optuna.branch_dims=[30]")
    assert optuna_worker.main(args) == 2
    assert not (tmp_path / "x.db").exists()
