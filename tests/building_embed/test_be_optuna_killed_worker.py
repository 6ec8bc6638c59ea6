"""A worker SIGKILLed mid-trial: its trial stops sending heartbeats, the next worker marks it FAIL and runs its
parameters again, and the study ends with every trial finished (none stuck RUNNING)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
import torch
from study_workers import kill_inside_first_trial

from building_embed.train import optuna_worker

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

HEAD = ["training_model.input_dim=24", "training_model.output_dim=16", "training.identities_per_batch=8",
        "training.views_per_identity=4", "training.optuna_hidden_dims=[16, 32]", "training.optuna_study=k",
        "training.optuna_heartbeat_interval=1", "training.optuna_grace_period=3", "training.optuna_max_retries=1"]


def test_a_trial_killed_with_its_worker_is_failed_and_retried_by_the_next_worker(pipeline, stage_args, tmp_path,
                                                                                 repo_root):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = stage_args(pipeline, f"paths.runs_dir={tmp_path / 'runs'}", f"training.optuna_storage={storage}", *HEAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    # A long first trial (many epochs of many batches) so the kill lands inside it.
    slow = [*args, "training.optuna_trials=1", "training.optuna_epochs=200", "training.batches_per_epoch=10"]
    proc = subprocess.Popen([sys.executable, "-m", "building_embed.train.optuna_worker", *slow], cwd=repo_root,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_inside_first_trial(proc, tmp_path / "runs" / "optuna" / "k" / "trial_0000" / "metrics.jsonl", storage, "k")

    time.sleep(4)  # past the grace period: the trial's last heartbeat is stale
    quick = [*args, "training.optuna_trials=2", "training.optuna_epochs=2", "training.batches_per_epoch=2"]
    assert optuna_worker.main(quick) == 0

    trials = optuna.load_study(study_name="k", storage=storage).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert sorted(by_number) == [0, 1, 2]
    assert by_number[0].state == optuna.trial.TrialState.FAIL
    retry = by_number[1]
    # the retry ran the killed trial's parameters, says which trial it retries, and finished
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == by_number[0].params
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials[1:])
    assert retry.user_attrs["run_dir"].endswith("trial_0001")
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
