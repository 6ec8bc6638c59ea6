"""Hyperparameter search with Optuna (in place of the original's SageMaker tuning jobs).

    python -m implant_dims.hpo --config configs/implant_dims/sample.yaml hpo.kind=classifier classifier.target=company
    python -m implant_dims.hpo --config configs/implant_dims/sample.yaml hpo.kind=dual hpo.n_trials=20 hpo.n_workers=4
    python -m implant_dims.analyze_tuning_results --config configs/implant_dims/sample.yaml hpo.kind=dual

Studies:
  classifier  maximise the validation accuracy of the classifier.target classifier over classifier.vit.model_size
              (hpo.classifier_model_sizes), classifier.lr (log-uniform in hpo.classifier_lr) and classifier.batch_size
              (hpo.classifier_batch_sizes). The original: 20 trials, 4 in parallel. Pretrained sizes read
              classifier.vit.weights with "{model_size}" replaced by the sampled size (one local file per size).
  dual        minimise the validation mean MAE ((length + diameter) / 2) of the dual-embedding regressor over
              regression.fusion_dim (hpo.fusion_dims; the original's "embedding dimension" 128 / 256 / 512: here the
              width each embedding is projected to before the fusion, since the classifiers' own embedding layers are
              fixed once they are trained), regression.attention_type (hpo.attention_types), the unfreezing schedule
              (hpo.unfreeze_schedules, [unfreeze_half_epoch, unfreeze_all_epoch] pairs), regression.lr (log-uniform
              in hpo.regression_lr) and regression.embedder_lr_mult (log-uniform in hpo.embedder_lr_mult). Every trial
              starts from this run's trained classifiers (<run_dir>/classifier_company and classifier_model_type, or
              regression.company_checkpoint / model_checkpoint): train them first.

Each trial trains the stage in-process into <run_dir>/hpo/<study>/trial_<number>/ (classifier_<target>/ or
<regression.out_subdir>/ inside), for hpo.trial_epochs epochs when that is > 0, on the train split, scored on val
only: held-out test / unseen splits are never evaluated during the search. After every epoch the validation score is
reported to the pruner (hpo.pruner: median, hyperband, none), which may stop the trial (PRUNED). A trial whose
training raises is recorded FAIL and the search goes on; configuration errors (missing data or classifiers, bad
search space) stop the command (exit 2) before any trial starts. Parameters are stored under their dotted config keys
(the schedule as "regression.unfreeze_schedule" = "half/all"); user attrs hold the trial's folder and its validation
report.

The study (hpo.study_name, default implant_classifier_<target> or implant_dual) lives in hpo.storage (default
sqlite:///<run_dir>/hpo/optuna.db). Re-running the command continues it until it holds hpo.n_trials finished
(complete + pruned) trials in total, so raising hpo.n_trials adds trials. hpo.n_workers > 1 starts that many worker
processes of this command on the same storage (hpo.n_workers=1, hpo.worker_index=i, run.num_threads=1 unless set;
logs in <run_dir>/hpo/<study>/workers/) and exits 1 if any of them failed. Workers take trials one at a time under a
lock file beside the study folder, so the study never overshoots hpo.n_trials. Each worker's TPE sampler is seeded
from hpo.sampler_seed, its index and the number of trials the study holds, so a continued study does not repeat
earlier draws.

A killed worker leaves its trial RUNNING. Trials send a heartbeat every hpo.heartbeat_interval seconds; a running
trial without one for hpo.grace_period seconds is marked FAIL by the next worker (or re-run, which waits for it) and
re-queued with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback, up to hpo.max_retries times).

Writes <run_dir>/hpo/<study>/best.json: the best trial's number, value, parameters, the matching command-line
overrides and its folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common.cli import UserError, config_main
from common.config import from_dict, to_dict
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_PARAM = "regression.unfreeze_schedule"
DIRECTIONS = {"classifier": "maximize", "dual": "minimize"}
OBJECTIVES = {"classifier": "accuracy", "dual": "mean_mae"}
POLL_SECONDS = 2.0


# ---------------------------------------------------------------------------------------------------------------
# where a study lives


def study_name(cfg: ImplantConfig) -> str:
    """hpo.study_name, else implant_classifier_<target> / implant_dual."""
    if cfg.hpo.study_name:
        return cfg.hpo.study_name
    return f"implant_classifier_{cfg.classifier.target}" if cfg.hpo.kind == "classifier" else "implant_dual"


def storage_url(cfg: ImplantConfig) -> str:
    """hpo.storage, else sqlite:///<run_dir>/hpo/optuna.db."""
    return cfg.hpo.storage or f"sqlite:///{cfg.run.run_dir / 'hpo' / 'optuna.db'}"


def study_dir(cfg: ImplantConfig) -> Path:
    """<run_dir>/hpo/<study name>/: trial folders, best.json, the analysis reports."""
    return cfg.run.run_dir / "hpo" / study_name(cfg)


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (None for other storages)."""
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) else None


def _quiet_optuna() -> None:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def make_storage(cfg: ImplantConfig, heartbeat: bool = True) -> Any:
    """The RDB storage of the study; with `heartbeat`, running trials send heartbeats and stale ones are re-queued."""
    import optuna

    _quiet_optuna()
    url = storage_url(cfg)
    db = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {}
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}  # workers and heartbeats write the same file
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": cfg.hpo.heartbeat_interval, "grace_period": cfg.hpo.grace_period,
                  "heartbeat_stale_trial_callback":
                      optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.hpo.max_retries)}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise UserError(f"hpo.storage={url}: cannot open the Optuna storage ({type(exc).__name__}: {exc}); "
                        f"give an RDB URL such as sqlite:///path/optuna.db") from exc


def make_pruner(cfg: ImplantConfig) -> Any:
    """hpo.pruner: median (after hpo.pruner_warmup_epochs, once 2 trials finished), hyperband, or none."""
    import optuna

    if cfg.hpo.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.hpo.pruner_warmup_epochs + 1)
    if cfg.hpo.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(trial_epochs(cfg), 1),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(cfg: ImplantConfig, n_existing: int) -> Any:
    """A TPE sampler seeded from hpo.sampler_seed, the worker index and the study's trial count (a re-run of the
    same worker would otherwise repeat the first run's random start-up draws)."""
    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([cfg.hpo.sampler_seed, cfg.hpo.worker_index, n_existing]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


class StudyLock:
    """Exclusive lock on a file beside the study folder, held while a worker counts the trials and takes one.
    `release` may be called more than once (the objective releases it as soon as its trial exists)."""

    def __init__(self, cfg: ImplantConfig) -> None:
        self.path = cfg.run.run_dir / "hpo" / f"{study_name(cfg)}.lock"
        self._fh: Any = None

    def acquire(self) -> StudyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")  # noqa: SIM115 - closed by release()
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_study(cfg: ImplantConfig, heartbeat: bool = True) -> Any:
    """Create the study or load the existing one (same name and storage); refuses one of the other direction."""
    import optuna

    direction = DIRECTIONS[cfg.hpo.kind]
    storage = make_storage(cfg, heartbeat)
    with StudyLock(cfg):
        study = optuna.create_study(study_name=study_name(cfg), storage=storage, direction=direction,
                                    pruner=make_pruner(cfg), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UserError(f"hpo.storage={storage_url(cfg)}: study {study.study_name!r} exists with direction "
                        f"{study.direction.name.lower()}, but hpo.kind={cfg.hpo.kind} needs {direction}; "
                        f"set another hpo.study_name")
    return study


# ---------------------------------------------------------------------------------------------------------------
# one trial


def trial_epochs(cfg: ImplantConfig) -> int:
    """Epochs of each trial: hpo.trial_epochs, else the stage's own."""
    if cfg.hpo.trial_epochs > 0:
        return cfg.hpo.trial_epochs
    return cfg.classifier.epochs if cfg.hpo.kind == "classifier" else cfg.regression.epochs


def suggest(trial: Any, cfg: ImplantConfig) -> dict[str, Any]:
    """Sample this trial's parameters (keyed by dotted config key) from the hpo.* search space."""
    h = cfg.hpo
    if h.kind == "classifier":
        return {
            "classifier.vit.model_size": trial.suggest_categorical("classifier.vit.model_size",
                                                                   list(h.classifier_model_sizes)),
            "classifier.lr": trial.suggest_float("classifier.lr", h.classifier_lr[0], h.classifier_lr[1], log=True),
            "classifier.batch_size": trial.suggest_categorical("classifier.batch_size",
                                                              list(h.classifier_batch_sizes)),
        }
    schedules = [f"{half}/{full}" for half, full in h.unfreeze_schedules]
    return {
        "regression.fusion_dim": trial.suggest_categorical("regression.fusion_dim", list(h.fusion_dims)),
        "regression.attention_type": trial.suggest_categorical("regression.attention_type", list(h.attention_types)),
        SCHEDULE_PARAM: trial.suggest_categorical(SCHEDULE_PARAM, schedules),
        "regression.lr": trial.suggest_float("regression.lr", h.regression_lr[0], h.regression_lr[1], log=True),
        "regression.embedder_lr_mult": trial.suggest_float("regression.embedder_lr_mult", h.embedder_lr_mult[0],
                                                           h.embedder_lr_mult[1], log=True),
    }


def param_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters as dotted config keys (the schedule "half/all" becomes its two epochs)."""
    out = {}
    for key, value in params.items():
        if key == SCHEDULE_PARAM:
            half, full = (int(v) for v in str(value).split("/"))
            out["regression.unfreeze_half_epoch"] = half
            out["regression.unfreeze_all_epoch"] = full
        else:
            out[key] = value
    return out


def override_args(params: dict[str, Any]) -> list[str]:
    """The command-line overrides that reproduce a trial's parameters (e.g. for a final train_dual run)."""
    return [f"{key}={value}" for key, value in param_overrides(params).items()]


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    for part in sections:
        data = data[part]
    data[leaf] = value


def trial_config(cfg: ImplantConfig, params: dict[str, Any], number: int) -> ImplantConfig:
    """A copy of the base config with the trial's parameters, its own folder, the trial's epoch count, a fresh
    start (resume=false) and no held-out splits (the search looks at val only)."""
    data = to_dict(cfg)
    for key, value in param_overrides(params).items():
        _set_dotted(data, key, value)
    if cfg.hpo.kind == "classifier":
        vit = data["classifier"]["vit"]
        vit["weights"] = size_weights(cfg.classifier.vit.weights, vit["model_size"])
    data["run"]["out_dir"] = str(study_dir(cfg))
    data["run"]["name"] = f"trial_{number}"
    data["data"]["test_json"] = ""
    data["data"]["unseen_json"] = ""
    section = "classifier" if cfg.hpo.kind == "classifier" else "regression"
    data[section]["epochs"] = trial_epochs(cfg)
    data[section]["resume"] = "false"
    return from_dict(ImplantConfig, data)


def size_weights(weights: str, model_size: str) -> str:
    """classifier.vit.weights for one sampled ViT size: "{model_size}" in the path becomes the size (one local file
    per size); tiny is trained from scratch and takes none."""
    return "" if model_size == "tiny" else weights.replace("{model_size}", model_size)


def stage_dir(cfg: ImplantConfig) -> Path:
    """Where the trial's stage writes inside its run folder."""
    if cfg.hpo.kind == "classifier":
        return cfg.run.run_dir / f"classifier_{cfg.classifier.target}"
    return cfg.run.run_dir / cfg.regression.out_subdir


def report_numbers(report: dict) -> dict[str, Any]:
    """The numeric entries of a validation report (scalars, flat number lists, nested dicts of them)."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value) if isinstance(value, float) else value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in value):
            out[key] = list(value)
        elif isinstance(value, dict):
            nested = report_numbers(value)
            if nested:
                out[key] = nested
    return out


def pruning_callback(trial: Any, metric: str) -> Callable[[int, dict], None]:
    """The epoch_callback of a trial: report the epoch's validation `metric`, raise TrialPruned when the pruner
    says so."""
    import optuna

    def callback(epoch: int, report: dict) -> None:
        value = float(report[metric])
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation {metric} {value:.4f} at epoch {epoch}")

    return callback


def run_stage(tcfg: ImplantConfig, callback: Callable[[int, dict], None]) -> dict:
    """Train the trial's stage in-process; returns its validation report."""
    if tcfg.hpo.kind == "classifier":
        from implant_dims.train_classifier import train_classifier

        return train_classifier(tcfg, epoch_callback=callback)
    from implant_dims.regression import train_regressor

    return train_regressor(tcfg, ("company", "model_type"), tcfg.regression.attention_type, stage_dir(tcfg),
                           epoch_callback=callback)


def make_objective(cfg: ImplantConfig, on_start: Callable[[Any], None] | None = None) -> Callable[[Any], float]:
    """The Optuna objective of `cfg`'s study. `on_start(trial)` runs first, once the trial exists (the worker notes
    its number and releases the study lock)."""
    import optuna

    metric = OBJECTIVES[cfg.hpo.kind]

    def objective(trial: Any) -> float:
        if on_start is not None:
            on_start(trial)
        trial.set_user_attr("worker", cfg.hpo.worker_index)
        try:
            params = suggest(trial, cfg)
            tcfg = trial_config(cfg, params, trial.number)
            trial.set_user_attr("out_dir", str(tcfg.run.run_dir))
            trial.set_user_attr("stage_dir", str(stage_dir(tcfg)))
            trial.set_user_attr("overrides", override_args(params))
            log.info("trial %d (worker %d): %s -> %s", trial.number, cfg.hpo.worker_index, params, tcfg.run.run_dir)
            report = run_stage(tcfg, pruning_callback(trial, metric))
            if metric not in report:
                raise RuntimeError(f"the validation report has no {metric!r}: {sorted(report)}")
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            setup_logging(None)  # detach the trial's train.log from the root logger
        trial.set_user_attr("val_report", report_numbers(report))
        return float(report[metric])

    return objective


# ---------------------------------------------------------------------------------------------------------------
# checks before any trial


def check_base(cfg: ImplantConfig) -> ImplantConfig:
    """Refuse (UserError, exit 2) a base config no trial could run with, before any trial starts. For kind=dual the
    run's classifier checkpoints are resolved here and pinned into the returned config, since trials run elsewhere."""
    from implant_dims.data import class_list
    from implant_dims.runtime import classifier_checkpoint, load_split

    train_records, _ = load_split(cfg, "train")
    load_split(cfg, "val")
    if cfg.hpo.kind == "classifier":
        target = cfg.classifier.target
        classes = class_list(train_records, target)
        if len(classes) < 2:
            raise UserError(f"{cfg.data.train_json}: only {len(classes)} distinct {target} value(s); "
                            f"a classifier needs 2+")
        weights = cfg.classifier.vit.weights
        pretrained = [size for size in cfg.hpo.classifier_model_sizes if size != "tiny"]
        if weights and len(pretrained) > 1 and "{model_size}" not in weights:
            raise UserError(f"classifier.vit.weights={weights} is one file but hpo.classifier_model_sizes lists "
                            f"{pretrained}; write {{model_size}} in the path (e.g. /models/vit_{{model_size}}"
                            f"_patch16_224.safetensors) so each size loads its own weights")
        missing = [w for w in {size_weights(weights, size) for size in pretrained} if w and not Path(w).is_file()]
        if missing:
            raise UserError(f"classifier.vit.weights: no file at {', '.join(sorted(missing))}; give local weights "
                            f"for every size in hpo.classifier_model_sizes")
        return cfg
    data = to_dict(cfg)
    data["regression"]["company_checkpoint"] = str(classifier_checkpoint(cfg, "company"))
    data["regression"]["model_checkpoint"] = str(classifier_checkpoint(cfg, "model_type"))
    epochs = trial_epochs(cfg)
    late = [pair for pair in cfg.hpo.unfreeze_schedules if pair[1] >= epochs]
    if late:
        log.warning("hpo.unfreeze_schedules %s unfreeze everything at or after the trials' last epoch (%d): those "
                    "trials never train the whole model", late, epochs)
    return from_dict(ImplantConfig, data)


# ---------------------------------------------------------------------------------------------------------------
# the worker loop


def count_states(study: Any) -> dict[str, int]:
    """Trials of the study per state name."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def finished(counts: dict[str, int]) -> int:
    return counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)


def run_worker(cfg: ImplantConfig, study: Any) -> int:
    """Take trials one at a time until the study holds hpo.n_trials finished trials. Counting the trials and
    creating the next one happen under the study lock, so parallel workers never overshoot; while the remaining
    slots are taken by running trials the worker waits, since a trial of a dead worker turns FAIL (and is re-queued)
    once its heartbeat is hpo.grace_period old. Returns 0, or 1 after hpo.max_failures failed trials in a row."""
    import optuna

    target = cfg.hpo.n_trials
    failures_in_a_row = 0
    waiting_logged = False
    while True:
        lock = StudyLock(cfg).acquire()
        try:
            optuna.storages.fail_stale_trials(study)
            counts = count_states(study)
            done, running = finished(counts), counts.get("RUNNING", 0)
            if done >= target:
                log.info("study %s holds %d finished trials (hpo.n_trials=%d): worker %d stops", study.study_name,
                         done, target, cfg.hpo.worker_index)
                return 0
            if done + running >= target:
                lock.release()
                if not waiting_logged:
                    log.info("worker %d: the remaining %d trial(s) are running elsewhere; waiting for them",
                             cfg.hpo.worker_index, target - done)
                    waiting_logged = True
                time.sleep(POLL_SECONDS)
                continue
            waiting_logged = False
            study.sampler = make_sampler(cfg, sum(counts.values()))
            number = run_one_trial(cfg, study, lock)
        finally:
            lock.release()
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is None or trial.state == optuna.trial.TrialState.FAIL:
            failures_in_a_row += 1
            if cfg.hpo.max_failures and failures_in_a_row >= cfg.hpo.max_failures:
                error = trial.user_attrs.get("error", "see the log above") if trial else "no trial started"
                print(f"error: hpo worker {cfg.hpo.worker_index}: {failures_in_a_row} trials failed in a row "
                      f"(hpo.max_failures={cfg.hpo.max_failures}); last error: {error}", file=sys.stderr)
                return 1
        else:
            failures_in_a_row = 0


def run_one_trial(cfg: ImplantConfig, study: Any, lock: StudyLock) -> int | None:
    """Run one trial of `study` (a re-queued one first); the lock is released as soon as the trial exists. A trial
    whose training raises is recorded FAIL. Returns the trial's number (None if none was created)."""
    started: list[int] = []

    def on_start(trial: Any) -> None:
        started.append(trial.number)
        lock.release()

    study.optimize(make_objective(cfg, on_start=on_start), n_trials=1, catch=(Exception,), gc_after_trial=True)
    return started[0] if started else None


# ---------------------------------------------------------------------------------------------------------------
# the parent: workers, best.json


def spawn_workers(cfg: ImplantConfig) -> int:
    """Start hpo.n_workers worker processes on the study and wait for them; 1 (with a message) if any failed."""
    folder = study_dir(cfg) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    procs = []
    for index in range(cfg.hpo.n_workers):
        args = [sys.executable, "-m", "implant_dims.hpo", "--config", str(config_path), "hpo.n_workers=1",
                f"hpo.worker_index={index}"]
        if not cfg.run.num_threads:
            args.append("run.num_threads=1")
        log_path = folder / f"worker_{index}.log"
        with open(log_path, "ab") as fh:
            procs.append((index, log_path, subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env)))
    log.info("started %d workers on study %s (logs in %s)", len(procs), study_name(cfg), folder)
    try:
        codes = {index: proc.wait() for index, _, proc in procs}
    except BaseException:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, _, proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        raise
    failed = [(index, path, codes[index]) for index, path, _ in procs if codes[index] != 0]
    for index, path, code in failed:
        tail = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        print(f"error: hpo worker {index} exited with code {code}; log {path}; last lines:\n  " + "\n  ".join(tail),
              file=sys.stderr)
    return 1 if failed else 0


def write_best(cfg: ImplantConfig, study: Any) -> dict | None:
    """<study dir>/best.json from the study's best completed trial (None when none completed)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    payload = {"study_name": study.study_name, "storage": storage_url(cfg), "kind": cfg.hpo.kind,
               "direction": study.direction.name.lower(), "objective": f"val_{OBJECTIVES[cfg.hpo.kind]}",
               "number": best.number, "value": best.value, "params": best.params,
               "overrides": override_args(best.params), "out_dir": best.user_attrs.get("out_dir"),
               "stage_dir": best.user_attrs.get("stage_dir"), "val_report": best.user_attrs.get("val_report"),
               "counts": count_states(study)}
    write_json(study_dir(cfg) / "best.json", payload)
    return payload


def run_hpo(cfg: ImplantConfig) -> int:
    """Check the base config, open (or continue) the study, run the workers, write best.json."""
    setup_logging(None)
    _quiet_optuna()
    cfg = check_base(cfg)
    study = open_study(cfg)
    if cfg.hpo.n_workers > 1:
        code = spawn_workers(cfg)
    else:
        code = run_worker(cfg, study)
    best = write_best(cfg, study)
    counts = count_states(study)
    if best is None:
        print(f"error: study {study.study_name!r} has no completed trial ({counts}); see the worker logs",
              file=sys.stderr)
        return 1
    log.info("study %s: %s; best trial %d: val %s %.4f with %s (%s)", study.study_name, counts, best["number"],
             OBJECTIVES[cfg.hpo.kind], best["value"], " ".join(best["overrides"]), best["out_dir"])
    if finished(counts) < cfg.hpo.n_trials:
        log.warning("study %s holds %d of hpo.n_trials=%d finished trials; run the command again to continue it",
                    study.study_name, finished(counts), cfg.hpo.n_trials)
    return code


main = config_main(ImplantConfig, run_hpo, __doc__, prog="python -m implant_dims.hpo")

if __name__ == "__main__":
    raise SystemExit(main())
