"""One Optuna worker minimising validation SMAPE; start several (processes, nodes, SLURM array tasks) on one storage.

    python -m price_fusion.optuna_worker --config configs/price_fusion/demo.yaml &
    python -m price_fusion.optuna_worker --config configs/price_fusion/demo.yaml &
    python -m price_fusion.optuna_worker --config configs/price_fusion/base.yaml \
        optuna.storage=postgresql://user@db/optuna optuna.trials=20 optuna.total_trials=100

The study `optuna.study` lives in the RDB storage `optuna.storage` (SQLite by default; PostgreSQL when several
nodes share it). Each worker runs `optuna.trials` trials, and every worker stops once the study holds
`optuna.total_trials` (0 = no cap). Creating the study is serialised: for SQLite an exclusive lock on `<db>.lock`
is held while it is created, and a worker that still loses the race loads the study the winner made.

A trial is a short single-split training run (`optuna.epochs` epochs; train.kfold, train.refit and
train.max_epochs_this_run are switched off, train.resume=false) in its own run directory
`<runs_dir>/optuna/<study>/trial_<NNNN>`. It reports the validation SMAPE (the grouped early-stopping split; the
test CSV is never read) after every epoch to a median pruner (minimize; after `optuna.warmup_epochs`), and its
objective is the best validation SMAPE. Parameters are stored under their dotted config keys (`train.lr`,
`train.weight_decay`, `model.dropout`, `model.branch_dim`, `model.name`), which is how fetch_best_and_train applies
them.

A worker killed mid-trial (SIGKILL, node failure, a cancelled or requeued array task) leaves its trial RUNNING; it
stops sending heartbeats (`optuna.heartbeat_interval`), and once `optuna.grace_period` has passed the next worker to
start a trial marks it FAIL and runs its parameters again (`optuna.max_retries` times) in a fresh trial directory,
recording the killed trial's number as the system attribute `failed_trial`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from common import tuning
from common.cli import config_main
from common.errors import UserError

from . import train as train_stage
from .config import PriceFusionConfig

PROG = "python -m price_fusion.optuna_worker"


def search_space(trial: Any, cfg: PriceFusionConfig) -> dict[str, Any]:
    """Sample one trial's parameters, keyed by their dotted config keys."""
    oc = cfg.optuna
    return {
        "train.lr": trial.suggest_float("train.lr", *oc.lr_range, log=True),
        "train.weight_decay": trial.suggest_float("train.weight_decay", *oc.weight_decay_range, log=True),
        "model.dropout": trial.suggest_float("model.dropout", *oc.dropout_range),
        "model.branch_dim": trial.suggest_categorical("model.branch_dim", list(oc.branch_dims)),
        "model.name": trial.suggest_categorical("model.name", list(oc.model_names)),
    }


def apply_params(cfg: PriceFusionConfig, params: dict[str, Any]) -> PriceFusionConfig:
    """`cfg` with a trial's dotted `section.key` parameters set and re-validated (common.tuning.apply_params)."""
    return tuning.apply_params(cfg, params, "price_fusion")


def check_search_space(cfg: PriceFusionConfig) -> None:
    """Refuse (exit 2) choices the model builder would reject, before any trial starts."""
    bad = [d for d in cfg.optuna.branch_dims if d % cfg.model.num_heads]
    if bad:
        raise UserError(f"optuna.branch_dims {bad} are not divisible by model.num_heads={cfg.model.num_heads}; "
                        "choose multiples of it")


def open_study(cfg: PriceFusionConfig, create: bool = True):
    """The study (created when missing if `create`; else UserError when missing), minimising validation SMAPE, on
    a storage whose heartbeats let the next worker fail and retry a killed worker's trial (common.tuning)."""
    oc = cfg.optuna
    return tuning.open_study(oc.storage, oc.study, direction="minimize", warmup_steps=oc.warmup_epochs,
                              heartbeat=tuning.Heartbeat(oc.heartbeat_interval, oc.grace_period, oc.max_retries),
                              storage_key="optuna.storage", worker_cmd=PROG, create=create)


def trial_config(cfg: PriceFusionConfig, params: dict[str, Any], number: int) -> PriceFusionConfig:
    """The config of trial `number`: the sampled parameters on a short, fresh, single-split run of its own."""
    out = apply_params(cfg, params)
    return dataclasses.replace(
        out, run_name=f"optuna/{cfg.optuna.study}/trial_{number:04d}",
        train=dataclasses.replace(out.train, epochs=cfg.optuna.epochs, resume=False, kfold=0, refit=False,
                                  max_epochs_this_run=0))


def worker(cfg: PriceFusionConfig) -> int:
    check_search_space(cfg)
    study = open_study(cfg)

    def objective(trial: Any) -> float:
        trial_cfg = trial_config(cfg, search_space(trial, cfg), trial.number)
        trial.set_user_attr("run_dir", str(Path(trial_cfg.runs_dir) / trial_cfg.run_name))
        best = math.inf

        def report(epoch: int, val_smape: float) -> None:
            nonlocal best
            best = min(best, val_smape)
            tuning.report_epoch(trial, val_smape, epoch, "val SMAPE %")

        train_stage.train(trial_cfg, on_epoch=report)
        if not math.isfinite(best):
            raise RuntimeError(f"trial {trial.number} reported no validation SMAPE")
        return best

    return tuning.run_worker(study, objective, cfg.optuna.trials, cfg.optuna.total_trials)


main = config_main(PriceFusionConfig, worker, __doc__, prog=PROG)

if __name__ == "__main__":
    raise SystemExit(main())
