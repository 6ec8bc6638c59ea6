"""Optuna worker tests: kill a worker inside its first trial, as a preempted job or a crashed node would."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna


def kill_inside_first_trial(proc: subprocess.Popen, metrics: Path, storage: str, study: str) -> None:
    """Wait until the worker `proc` (stderr piped) has written an epoch of its first trial to `metrics`, SIGKILL it,
    and check that the study now holds exactly that trial, left RUNNING by the dead worker."""
    # import torch + one epoch: ~15 s on 2 idle cores; allow for a loaded machine
    deadline = time.monotonic() + 360
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the first trial wrote no epoch in 360 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.RUNNING]
