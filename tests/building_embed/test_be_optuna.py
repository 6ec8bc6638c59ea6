"""Optuna: two workers at once on one SQLite study, then fetch_best_and_train with the best trial's parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from building_embed.train import fetch_best_and_train
from common.logs import read_metrics

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

HEAD = ["training_model.input_dim=24", "training_model.output_dim=16", "training.identities_per_batch=8",
        "training.views_per_identity=4", "training.batches_per_epoch=2", "training.optuna_hidden_dims=[16, 32]",
        "training.optuna_epochs=2", "training.optuna_trials=2", "training.optuna_total_trials=3",
        "training.optuna_study=t"]


def test_two_workers_share_one_study_then_the_best_params_train_the_final_model(pipeline, stage_args, tmp_path,
                                                                                repo_root):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = stage_args(pipeline, f"paths.runs_dir={tmp_path / 'runs'}", f"training.optuna_storage={storage}", *HEAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    workers = [subprocess.Popen([sys.executable, "-m", "building_embed.train.optuna_worker", *args], cwd=repo_root,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=600)  # ~40 s idle; two workers share 2 cores
        assert proc.returncode == 0, err.decode()[-2000:]

    study = optuna.load_study(study_name="t", storage=storage)
    trials = study.get_trials(deepcopy=False)
    # Each worker stops once the study holds 3 trials; both may start a 3rd at the same moment.
    assert 3 <= len(trials) <= 4
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    states = {t.state for t in trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == len(trials)
    assert sorted(p.name for p in (tmp_path / "runs" / "optuna" / "t").iterdir()) == sorted(p.name for p in run_dirs)
    for trial, run_dir in zip(trials, run_dirs):
        epochs = len(read_metrics(run_dir / "metrics.jsonl"))
        assert epochs == len(trial.intermediate_values) and epochs <= 2
        assert not (run_dir / "reports").exists()  # the search never evaluates on test
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and study.best_value == max(t.value for t in complete)

    best = study.best_trial
    assert fetch_best_and_train.main([*args, "global.run_name=final", "training.epochs=2"]) == 0
    final = tmp_path / "runs" / "final"
    config = yaml.safe_load((final / "config.yaml").read_text())
    for dotted, value in best.params.items():
        section, key = dotted.split(".")
        assert config[section][key] == value, dotted
    assert (final / "reports" / "retrieval.json").is_file() and (final / "reports" / "best_trial.json").is_file()
