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
- Trials report one value per epoch to a `MedianPruner` (2 startup trials, `warmup_steps`) unless the caller
  passes its own pruner.
- `run_worker` runs a fixed number of trials per worker (the cap, `total_trials`, counts trials in every state and
  is checked after each trial). `fill_study` instead fills the study to exactly `n_finished` COMPLETE + PRUNED trials
  over all workers: counting and taking a trial happen under an exclusive file lock, so parallel workers never
  overshoot, failed trials are replaced, and a worker waits while the last slots run elsewhere.

Each package keeps its own search space and objective; this module holds only the storage and study plumbing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError

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


def sqlite_file(storage: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for other storages."""
    return Path(storage[len(SQLITE_PREFIX):]) if storage.startswith(SQLITE_PREFIX) else None


def lock_path(storage: str) -> Path | None:
    """`<db>.lock` beside a SQLite database; None (no lock) for other storages."""
    db = sqlite_file(storage)
    return None if db is None else db.with_name(db.name + ".lock")


class FileLock:
    """An exclusive `flock` on `path` (a no-op for None). `release` may be called early and more than once: a worker
    holds it while it counts trials and takes one, and lets go as soon as its trial exists."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fh: Any = None

    def acquire(self) -> FileLock:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+")  # noqa: SIM115 - closed by release()
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def creation_lock(storage: str) -> Iterator[None]:
    """Exclusive file lock beside a SQLite database while a study is created; a no-op for other storages."""
    with FileLock(lock_path(storage)):
        yield


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
               storage_key: str, worker_cmd: str, create: bool = True, pruner: Any = None) -> Any:
    """Create or join the study (`create`), or load an existing one (UserError naming the worker command to run
    first when there is none; a missing SQLite file is not created by looking). `pruner` replaces the default
    median pruner. Joining a study made with the other direction is refused (UserError)."""
    import optuna

    if pruner is None:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup_steps)
    if not create:
        missing = f"{storage_key}={storage}: no study named {study_name!r}; run {worker_cmd} first"
        db = sqlite_file(storage)
        if db is not None and not db.is_file():
            raise UserError(missing)
        try:
            with creation_lock(storage):  # opening a storage may create its tables: not while a worker does
                rdb = open_storage(storage, heartbeat, storage_key)
            return optuna.load_study(study_name=study_name, storage=rdb, pruner=pruner)
        except KeyError as exc:
            raise UserError(missing) from exc
    with creation_lock(storage):
        rdb = open_storage(storage, heartbeat, storage_key)
        try:
            study = optuna.create_study(study_name=study_name, storage=rdb, direction=direction, pruner=pruner,
                                        load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:  # another node created it between the check and the insert
            study = optuna.load_study(study_name=study_name, storage=rdb, pruner=pruner)
    if study.direction.name.lower() != direction.lower():
        raise UserError(f"{storage_key}={storage}: study {study_name!r} exists with direction "
                        f"{study.direction.name.lower()}, but this search needs {direction.lower()}; give another "
                        "study name")
    return study


def report_epoch(trial: Any, value: float, epoch: int, what: str, step_name: str = "epoch") -> None:
    """Report a trial's `value` after step `epoch` (an epoch, or a fold with step_name="fold") to the pruner; raise
    optuna.TrialPruned (naming `what` and the step) when it says stop."""
    import optuna

    trial.report(value, epoch)
    if trial.should_prune():
        raise optuna.TrialPruned(f"{what} {value:.4f} at {step_name} {epoch}")


def count_states(study: Any) -> dict[str, int]:
    """The study's trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def finished(counts: dict[str, int]) -> int:
    """COMPLETE + PRUNED trials of `count_states`: the ones a search counts towards its size."""
    return counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)


def run_worker(study: Any, objective: Callable[[Any], float], n_trials: int, total_trials: int = 0) -> int:
    """Run `n_trials` trials of `objective` on the shared `study` (every worker stops once the study holds
    `total_trials`, 0 = no cap); a trial that raises stops the worker. Logs the study's trials by state; returns 0."""
    import optuna

    callbacks = [optuna.study.MaxTrialsCallback(total_trials, states=None)] if total_trials else []
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=())
    counts = count_states(study)
    log.info("study %s: %d trials (%s)", study.study_name, sum(counts.values()), dict(sorted(counts.items())))
    return 0


def seeded_sampler(*seed_parts: int) -> Any:
    """A TPE sampler (constant liar, for parallel workers) seeded from several integers, e.g. a config seed, the
    worker's index and the number of trials the study already holds: a worker started again on a continued study
    then draws afresh instead of repeating its first run's start-up draws."""
    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([int(p) for p in seed_parts]).generate_state(1)[0])
    with warnings.catch_warnings():  # constant_liar is flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _run_one_trial(study: Any, objective: Callable[[Any], float], held: FileLock) -> int | None:
    """Run one trial (a queued retry first); `held` is released once the trial exists. A trial that raises is
    recorded FAIL with its error. Returns the trial's number (None when none was created)."""
    import optuna

    started: list[int] = []

    def run(trial: Any) -> float:
        started.append(trial.number)
        held.release()
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise

    study.optimize(run, n_trials=1, catch=(Exception,), gc_after_trial=True)
    return started[0] if started else None


def fill_study(study: Any, objective: Callable[[Any], float], n_finished: int, *, lock: Path | None,
               sampler: Callable[[int], Any] | None = None, max_failures: int = 0, failures_key: str = "max_failures",
               label: str = "worker", poll_seconds: float = 2.0) -> int:
    """Run trials of `objective` one at a time until the study holds `n_finished` finished (COMPLETE + PRUNED)
    trials over all workers and re-runs; returns 0, or 1 after `max_failures` (0 = never) failed trials in a row.

    Under the file `lock` (every worker of the study must use the same one; `lock_path(storage)` for SQLite, a file
    on a shared disk across nodes) a worker fails stale trials (their parameters are queued again by the storage's
    heartbeat callback), counts, and takes its trial; it lets go as soon as the trial exists, so the study never
    overshoots. While the remaining slots are RUNNING elsewhere it waits (`poll_seconds`): a dead worker's trial
    turns FAIL once its heartbeat is older than the grace period, and its slot opens again. A trial that raises is
    recorded FAIL with its error in the user attribute `error`, and the search goes on; a failed trial does not
    count. `sampler(n_trials_in_study)`, when given, sets a fresh sampler before each trial.
    """
    import optuna

    failures_in_a_row = 0
    waiting_logged = False
    while True:
        held = FileLock(lock).acquire()
        try:
            with warnings.catch_warnings():  # flagged experimental, stable since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            counts = count_states(study)
            done, running = finished(counts), counts.get("RUNNING", 0)
            if done >= n_finished:
                log.info("study %s holds %d finished trials (of %d): %s stops", study.study_name, done, n_finished,
                         label)
                return 0
            if done + running >= n_finished:
                held.release()
                if not waiting_logged:
                    log.info("%s: the remaining %d trial(s) are running elsewhere; waiting for them", label,
                             n_finished - done)
                    waiting_logged = True
                time.sleep(poll_seconds)
                continue
            waiting_logged = False
            if sampler is not None:
                study.sampler = sampler(sum(counts.values()))
            number = _run_one_trial(study, objective, held)
        finally:
            held.release()
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is not None and trial.state != optuna.trial.TrialState.FAIL:
            failures_in_a_row = 0
            continue
        failures_in_a_row += 1
        if max_failures and failures_in_a_row >= max_failures:
            error = trial.user_attrs.get("error", "see the log above") if trial else "no trial started"
            print(f"error: {label}: {failures_in_a_row} trials failed in a row ({failures_key}={max_failures}); "
                  f"last error: {error}", file=sys.stderr)
            return 1


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
