"""Hyperparameter search with Optuna (in place of the original's SageMaker tuning jobs).

    python -m implant_dims.hpo --config configs/implant_dims/sample.yaml hpo.kind=classifier classifier.target=company
    python -m implant_dims.hpo --config configs/implant_dims/sample.yaml hpo.kind=dual hpo.n_trials=20 hpo.n_workers=4
    python -m implant_dims.analyze_tuning_results --config configs/implant_dims/sample.yaml hpo.kind=dual

Studies:
  classifier  maximise the validation accuracy of the classifier.target classifier over classifier.vit.model_size
              (hpo.classifier_model_sizes), classifier.lr (log-uniform in hpo.classifier_lr) and classifier.batch_size
              (hpo.classifier_batch_sizes). Pretrained sizes read classifier.vit.weights with "{model_size}" replaced
              by the sampled size (one local file per size).
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
reported to the pruner (hpo.pruner: median, hyperband, none), which may stop the trial (PRUNED). Parameters are stored
under their dotted config keys (the schedule as "regression.unfreeze_schedule" = "half/all"); user attrs hold the
trial's folder, its validation report and, for a failed trial, its error.

Before any trial starts, the command refuses (exit 2, naming the key) what no trial could run with: missing data or
classifiers, and a search space with a value the config would refuse: every categorical choice and both ends of every
range are applied to the trial config and validated (e.g. hpo.trial_epochs not above the warm-up, an unfreezing
schedule that reaches the trials' last epoch, a fusion width the attention cannot split into heads).

The study (hpo.study_name, default implant_classifier_<target> or implant_dual) lives in hpo.storage (default
sqlite:///<run_dir>/hpo/optuna.db); the plumbing is common.tuning. Re-running the command continues it until it
holds hpo.n_trials finished (complete + pruned) trials in total, never more (workers count and take trials under a
file lock), so raising hpo.n_trials adds trials; a failed trial does not count, and a worker stops (exit 1) after
hpo.max_failures failures in a row. hpo.n_workers > 1 starts that many worker processes of this command on the same
storage (hpo.n_workers=1, hpo.worker_index=i, run.num_threads=1 unless set; logs in <run_dir>/hpo/<study>/workers/)
and exits 1 if any of them failed. Before each trial a worker's TPE sampler is seeded from hpo.sampler_seed, its index
and the number of trials the study holds, so a continued study does not repeat earlier draws.

A killed worker leaves its trial RUNNING. Trials send a heartbeat every hpo.heartbeat_interval seconds; a running
trial without one for hpo.grace_period seconds is marked FAIL by the next worker and re-queued with the same
parameters (up to hpo.max_retries times; the retry's system attribute failed_trial names it).

Writes <run_dir>/hpo/<study>/best.json: the best trial's number, value, parameters, the matching command-line
overrides and its folder.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common import tuning
from common.cli import config_main
from common.config import from_dict, to_dict
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig

log = logging.getLogger(__name__)

PROG = "python -m implant_dims.hpo"
REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_PARAM = "regression.unfreeze_schedule"
DIRECTIONS = {"classifier": "maximize", "dual": "minimize"}
OBJECTIVES = {"classifier": "accuracy", "dual": "mean_mae"}


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


def lock_file(cfg: ImplantConfig) -> Path:
    """The lock workers take trials under: beside a SQLite database, else in the run folder (a shared disk)."""
    return tuning.lock_path(storage_url(cfg)) or cfg.run.run_dir / "hpo" / f"{study_name(cfg)}.lock"


def make_pruner(cfg: ImplantConfig) -> Any:
    """hpo.pruner: median (after hpo.pruner_warmup_epochs, once 2 trials finished), hyperband, or none."""
    import optuna

    if cfg.hpo.pruner == "median":  # epochs are reported from 1
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.hpo.pruner_warmup_epochs + 1)
    if cfg.hpo.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(trial_epochs(cfg), 1),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: ImplantConfig, create: bool = True) -> Any:
    """Create or join the study (`create=False`: load it, UserError naming the command that creates it when there is
    none); one of the other direction is refused."""
    h = cfg.hpo
    create_cmd = (f"`{PROG} --config <your config> hpo.kind={h.kind}"
                  + (f" classifier.target={cfg.classifier.target}" if h.kind == "classifier" else "")
                  + "` (same run.out_dir / run.name / hpo.storage / hpo.study_name)")
    return tuning.open_study(storage_url(cfg), study_name(cfg), direction=DIRECTIONS[h.kind],
                              warmup_steps=h.pruner_warmup_epochs + 1,
                              heartbeat=tuning.Heartbeat(h.heartbeat_interval, h.grace_period, h.max_retries),
                              storage_key="hpo.storage", worker_cmd=create_cmd, create=create,
                              pruner=make_pruner(cfg))


# ---------------------------------------------------------------------------------------------------------------
# the search space and one trial


def trial_epochs(cfg: ImplantConfig) -> int:
    """Epochs of each trial: hpo.trial_epochs, else the stage's own."""
    if cfg.hpo.trial_epochs > 0:
        return cfg.hpo.trial_epochs
    return cfg.classifier.epochs if cfg.hpo.kind == "classifier" else cfg.regression.epochs


def search_space(cfg: ImplantConfig) -> dict[str, tuple[str, str, list]]:
    """Each sampled parameter (dotted config key) -> (the hpo key that sets its range, "categorical" | "log",
    the choices or the [low, high] of a log-uniform float). `suggest` samples it and `check_search_space` validates its
    edges, so the two cannot drift apart."""
    h = cfg.hpo
    if h.kind == "classifier":
        return {"classifier.vit.model_size": ("hpo.classifier_model_sizes", "categorical",
                                              list(h.classifier_model_sizes)),
                "classifier.lr": ("hpo.classifier_lr", "log", list(h.classifier_lr)),
                "classifier.batch_size": ("hpo.classifier_batch_sizes", "categorical", list(h.classifier_batch_sizes))}
    return {"regression.fusion_dim": ("hpo.fusion_dims", "categorical", list(h.fusion_dims)),
            "regression.attention_type": ("hpo.attention_types", "categorical", list(h.attention_types)),
            SCHEDULE_PARAM: ("hpo.unfreeze_schedules", "categorical",
                             [f"{half}/{full}" for half, full in h.unfreeze_schedules]),
            "regression.lr": ("hpo.regression_lr", "log", list(h.regression_lr)),
            "regression.embedder_lr_mult": ("hpo.embedder_lr_mult", "log", list(h.embedder_lr_mult))}


def suggest(trial: Any, cfg: ImplantConfig) -> dict[str, Any]:
    """Sample this trial's parameters (keyed by dotted config key) from the hpo.* search space."""
    return {name: (trial.suggest_float(name, values[0], values[1], log=True) if kind == "log"
                   else trial.suggest_categorical(name, values))
            for name, (_, kind, values) in search_space(cfg).items()}


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


def trial_config(cfg: ImplantConfig, params: dict[str, Any], number: int) -> ImplantConfig:
    """A copy of the base config with the trial's parameters, its own folder, the trial's epoch count, a fresh
    start (resume=false) and no held-out splits (the search looks at val only); validated like any config."""
    data = to_dict(cfg)
    for key, value in param_overrides(params).items():
        *sections, leaf = key.split(".")
        node = data
        for part in sections:
            node = node[part]
        node[leaf] = value
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
            out[key] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                for v in value):
            out[key] = list(value)
        elif isinstance(value, dict) and (nested := report_numbers(value)):
            out[key] = nested
    return out


def pruning_callback(trial: Any, metric: str) -> Callable[[int, dict], None]:
    """The epoch_callback of a trial: report the epoch's validation `metric`; TrialPruned when the pruner says so."""
    return lambda epoch, report: tuning.report_epoch(trial, float(report[metric]), epoch, f"validation {metric}")


def run_stage(tcfg: ImplantConfig, callback: Callable[[int, dict], None]) -> dict:
    """Train the trial's stage in-process; returns its validation report."""
    if tcfg.hpo.kind == "classifier":
        from implant_dims.train_classifier import train_classifier

        return train_classifier(tcfg, epoch_callback=callback)
    from implant_dims.regression import train_regressor

    return train_regressor(tcfg, ("company", "model_type"), tcfg.regression.attention_type, stage_dir(tcfg),
                           epoch_callback=callback)


def make_objective(cfg: ImplantConfig) -> Callable[[Any], float]:
    """The Optuna objective of `cfg`'s study (a trial that raises is recorded with its error by common.tuning)."""
    metric = OBJECTIVES[cfg.hpo.kind]

    def objective(trial: Any) -> float:
        trial.set_user_attr("worker", cfg.hpo.worker_index)
        params = suggest(trial, cfg)
        tcfg = trial_config(cfg, params, trial.number)
        trial.set_user_attr("out_dir", str(tcfg.run.run_dir))
        trial.set_user_attr("stage_dir", str(stage_dir(tcfg)))
        trial.set_user_attr("overrides", override_args(params))
        log.info("trial %d (worker %d): %s -> %s", trial.number, cfg.hpo.worker_index, params, tcfg.run.run_dir)
        try:
            report = run_stage(tcfg, pruning_callback(trial, metric))
        finally:
            setup_logging(None)  # detach the trial's train.log from the root logger
        if metric not in report:
            raise RuntimeError(f"the validation report has no {metric!r}: {sorted(report)}")
        trial.set_user_attr("val_report", report_numbers(report))
        return float(report[metric])

    return objective


# ---------------------------------------------------------------------------------------------------------------
# checks before any trial


def check_search_space(cfg: ImplantConfig) -> None:
    """Refuse (UserError naming the hpo key) a search space with a value no trial could run with: the trial config
    at the trial epoch count, at every choice and both ends of every range alone, and at every combination of them,
    is validated; an unfreezing schedule must unfreeze everything before the trials' last epoch; each fusion width
    must suit each attention type."""
    from implant_dims.models import Fusion

    epochs = trial_epochs(cfg)
    try:
        trial_config(cfg, {}, 0)
    except UserError as exc:
        raise UserError(f"hpo.trial_epochs={cfg.hpo.trial_epochs}: trials of {epochs} epoch(s) get a config that is "
                        f"refused: {exc}") from exc
    space = search_space(cfg)
    for name, (key, _, values) in space.items():
        for value in values:
            try:
                trial_config(cfg, {name: value}, 0)
            except UserError as exc:
                raise UserError(f"{key}: {name}={value} gives trials a config that is refused: {exc}") from exc
    if cfg.hpo.kind == "dual":
        late = [pair for pair in cfg.hpo.unfreeze_schedules if pair[1] >= epochs]
        if late:
            raise UserError(f"hpo.unfreeze_schedules {late} unfreeze the whole embedding models at or after epoch "
                            f"{epochs} (0-based), but trials run {epochs} epochs (hpo.trial_epochs, else "
                            "regression.epochs): those trials would never train the whole model; drop the pairs or "
                            "give the trials more epochs")
        for attention, width in itertools.product(cfg.hpo.attention_types, cfg.hpo.fusion_dims):
            try:
                Fusion(attention, 8, 8, width)
            except ValueError as exc:
                raise UserError(f"hpo.fusion_dims / hpo.attention_types: {attention} attention cannot use fusion "
                                f"width {width}: {exc}") from exc
    names = list(space)
    for combo in itertools.product(*(values for _, _, values in space.values())):
        params = dict(zip(names, combo, strict=True))
        try:
            trial_config(cfg, params, 0)
        except UserError as exc:
            raise UserError(f"{' / '.join(key for key, _, _ in space.values())}: the trial {params} is refused: "
                            f"{exc}") from exc


def check_base(cfg: ImplantConfig) -> ImplantConfig:
    """Refuse (UserError, exit 2) a base config no trial could run with, before any trial starts. For kind=dual the
    run's classifier checkpoints are resolved here and pinned into the returned config, since trials run elsewhere."""
    from implant_dims.data import class_list
    from implant_dims.stage_setup import classifier_checkpoint, load_split

    check_search_space(cfg)
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
    return from_dict(ImplantConfig, data)


# ---------------------------------------------------------------------------------------------------------------
# workers, best.json


def run_worker(cfg: ImplantConfig, study: Any) -> int:
    """Fill the study to hpo.n_trials finished trials (common.tuning.fill_study: no overshoot, a dead worker's
    trial retried, a fresh seeded sampler per trial). Returns 0, or 1 after hpo.max_failures failures in a row."""
    h = cfg.hpo
    return tuning.fill_study(study, make_objective(cfg), h.n_trials, lock=lock_file(cfg),
                              sampler=lambda n_trials: tuning.seeded_sampler(h.sampler_seed, h.worker_index, n_trials),
                              max_failures=h.max_failures, failures_key="hpo.max_failures",
                              label=f"hpo worker {h.worker_index}")


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
    counts = tuning.count_states(study)
    if not counts.get("COMPLETE"):
        return None
    best = study.best_trial
    payload = {"study_name": study.study_name, "storage": storage_url(cfg), "kind": cfg.hpo.kind,
               "direction": study.direction.name.lower(), "objective": f"val_{OBJECTIVES[cfg.hpo.kind]}",
               "number": best.number, "value": best.value, "params": best.params,
               "overrides": override_args(best.params), "out_dir": best.user_attrs.get("out_dir"),
               "stage_dir": best.user_attrs.get("stage_dir"), "val_report": best.user_attrs.get("val_report"),
               "counts": counts}
    write_json(study_dir(cfg) / "best.json", payload)
    return payload


def run_hpo(cfg: ImplantConfig) -> int:
    """Check the base config and search space, open (or continue) the study, run the workers, write best.json."""
    setup_logging(None)
    cfg = check_base(cfg)
    study = open_study(cfg)
    code = spawn_workers(cfg) if cfg.hpo.n_workers > 1 else run_worker(cfg, study)
    best = write_best(cfg, study)
    counts = tuning.count_states(study)
    if best is None:
        print(f"error: study {study.study_name!r} has no completed trial ({counts}); see the worker logs",
              file=sys.stderr)
        return 1
    log.info("study %s: %s; best trial %d: val %s %.4f with %s (%s)", study.study_name, counts, best["number"],
             OBJECTIVES[cfg.hpo.kind], best["value"], " ".join(best["overrides"]), best["out_dir"])
    if tuning.finished(counts) < cfg.hpo.n_trials:
        log.warning("study %s holds %d of hpo.n_trials=%d finished trials; run the command again to continue it",
                    study.study_name, tuning.finished(counts), cfg.hpo.n_trials)
    return code


main = config_main(ImplantConfig, run_hpo, __doc__, prog=PROG)

if __name__ == "__main__":
    raise SystemExit(main())
