"""Optuna studies shared by several workers (processes, nodes, Slurm array tasks) on one RDB storage.

    study = open_study("sqlite:///runs/optuna.db", "my_study", direction="maximize", warmup_steps=1,
                       heartbeat=Heartbeat(interval=60, grace_period=180, max_retries=1),
                       storage_key="training.optuna_storage", worker_cmd="python -m pkg.optuna_worker")

- Creating a study is serialised: two workers creating one SQLite study at once would kill one with a UNIQUE
  constraint error, so creation holds an exclusive `flock` on `<db>.lock` (SQLite), and a worker that still loses a
  cross-node race loads the study the winner created.
- Running trials send heartbeats. A worker killed mid-trial leaves its trial RUNNING; once `grace_period` seconds
  pass without a heartbeat, the next worker to start a trial marks it FAIL and queues its parameters again
  (`max_retries` times; the retry records `failed_trial` in its system attributes).
- Trials report one value per epoch to a `MedianPruner` (2 startup trials, `warmup_steps`).

Each package keeps its own search space and objective; this module holds only the storage and study plumbing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.cli import UserError

SQLITE_PREFIX = "sqlite:///"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    interval: int = 60
    """Seconds between a running trial's heartbeats."""
    grace_period: int = 180
    """Seconds without a heartbeat after which a RUNNING trial counts as dead."""
    max_retries: int = 1
    """How often a dead trial's parameters are run again."""


def check_heartbeat(interval: int, grace_period: int, max_retries: int, key_prefix: str = "optuna.") -> None:
    """ValueError naming the config keys (`<key_prefix>heartbeat_interval` ...) when a study config's heartbeat
    settings cannot work: a dead trial must be told from a live one, so the grace period exceeds the interval."""
    if interval < 1 or grace_period <= interval:
        raise ValueError(f"{key_prefix}grace_period ({grace_period}) must exceed {key_prefix}heartbeat_interval "
                         f"({interval}), which must be >= 1")
    if max_retries < 0:
        raise ValueError(f"{key_prefix}max_retries must be >= 0, got {max_retries}")


@contextlib.contextmanager
def creation_lock(storage: str) -> Iterator[None]:
    """Exclusive file lock beside a SQLite database while a study is created; a no-op for other storages."""
    if not storage.startswith(SQLITE_PREFIX):
        yield
        return
    db = Path(storage[len(SQLITE_PREFIX):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_storage(storage: str, heartbeat: Heartbeat, storage_key: str = "storage") -> Any:
    """The RDB storage at `storage`, with heartbeats and retry of dead trials; UserError naming `storage_key` when
    it cannot be opened."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 120}} if storage.startswith("sqlite:") else {}
    try:
        with warnings.catch_warnings():  # heartbeats are flagged experimental in Optuna 5, stable since 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=heartbeat.max_retries))
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise UserError(f"{storage_key}={storage}: cannot open the Optuna storage ({type(exc).__name__}: {exc}); "
                        "give an RDB URL such as sqlite:///runs/optuna.db") from exc


def open_study(storage: str, study_name: str, *, direction: str, warmup_steps: int, heartbeat: Heartbeat,
               storage_key: str, worker_cmd: str, create: bool = True) -> Any:
    """Create or join the study (`create`), or load an existing one (UserError naming the worker command to run
    first when there is none)."""
    import optuna

    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup_steps)
    if not create:
        try:
            return optuna.load_study(study_name=study_name, storage=open_storage(storage, heartbeat, storage_key),
                                     pruner=pruner)
        except KeyError as exc:
            raise UserError(f"{storage_key}={storage}: no study named {study_name!r}; run {worker_cmd} "
                            "first") from exc
    with creation_lock(storage):
        rdb = open_storage(storage, heartbeat, storage_key)
        try:
            return optuna.create_study(study_name=study_name, storage=rdb, direction=direction, pruner=pruner,
                                       load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:  # another node created it between the check and the insert
            return optuna.load_study(study_name=study_name, storage=rdb, pruner=pruner)


def report_epoch(trial: Any, value: float, epoch: int, what: str, step_name: str = "epoch") -> None:
    """Report a trial's `value` after step `epoch` (an epoch, or a fold with step_name="fold") to the pruner; raise
    optuna.TrialPruned (naming `what` and the step) when it says stop."""
    import optuna

    trial.report(value, epoch)
    if trial.should_prune():
        raise optuna.TrialPruned(f"{what} {value:.4f} at {step_name} {epoch}")


def run_worker(study: Any, objective: Callable[[Any], float], n_trials: int, total_trials: int = 0) -> int:
    """Run `n_trials` trials of `objective` on the shared `study` (every worker stops once the study holds
    `total_trials`, 0 = no cap); a trial that raises stops the worker. Logs the study's trials by state; returns 0."""
    import optuna

    callbacks = [optuna.study.MaxTrialsCallback(total_trials, states=None)] if total_trials else []
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=())
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    log.info("study %s: %d trials (%s)", study.study_name, len(states),
             {s: states.count(s) for s in sorted(set(states))})
    return 0


def best_completed_trial(study: Any, where: str, worker_cmd: str) -> Any:
    """The study's best trial; UserError naming the study, `where` it is stored and the worker command to run when
    no trial has completed."""
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise UserError(f"study {study.study_name!r} in {where} has no completed trial; run more {worker_cmd} "
                        "trials first")
    return study.best_trial


def apply_params(cfg: Any, params: dict[str, Any], package: str,
                 attribute: Callable[[str], str] = lambda section: section) -> Any:
    """A deep copy of the dataclass config `cfg` with each dotted `section.key` of a trial's `params` set.

    Every changed section is rebuilt with `dataclasses.replace`, so its own validation (`__post_init__`) runs again,
    and so does the top level's. `attribute` maps a section's name in the params to its attribute (building_embed
    keeps [global] in `global_`). UserError for a key the config does not have or a value it refuses. The copy is
    deep because callers go on to set per-trial fields (output folders, epochs) on sections no parameter touched.
    """
    out = copy.deepcopy(cfg)
    updates: dict[str, dict[str, Any]] = {}
    for dotted, value in params.items():
        section, _, key = dotted.partition(".")
        name = attribute(section)
        target = getattr(out, name, None)
        if not dataclasses.is_dataclass(target) or key not in {f.name for f in dataclasses.fields(target)}:
            raise UserError(f"study parameter {dotted!r} is not a {package} config key; was the study made by "
                            "another version?")
        updates.setdefault(name, {})[key] = value
    try:
        return dataclasses.replace(out, **{name: dataclasses.replace(getattr(out, name), **values)
                                           for name, values in updates.items()})
    except ValueError as exc:
        raise UserError(f"study parameters {params}: {exc}") from exc
