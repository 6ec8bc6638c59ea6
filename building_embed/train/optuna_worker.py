"""One Optuna worker; start several (processes, nodes, SLURM array tasks) on the same storage.

    python -m building_embed.train.optuna_worker --config configs/building_embed/sample.toml &
    python -m building_embed.train.optuna_worker --config configs/building_embed/sample.toml &
    python -m building_embed.train.optuna_worker --config configs/building_embed/config.toml \
        training.optuna_storage=postgresql://user@db/optuna training.optuna_trials=20

The study `training.optuna_study` lives in the RDB storage `training.optuna_storage` (SQLite by default; PostgreSQL
when several nodes share it); each worker runs `training.optuna_trials` trials and all stop once the study holds
`training.optuna_total_trials` (0 = no cap). Creating the study is serialised: two workers creating one SQLite
study at once would kill one with a UNIQUE constraint error, so creation holds an exclusive lock on `<db>.lock`
(SQLite) and any worker that still loses the race loads the study the winner created.

A trial is a short training run (`training.optuna_epochs`) in its own run directory
`paths.runs_dir/optuna/<study>/trial_<number>` (resume=false; no test-split report: the search never looks at test). It
reports val mAP@R after every epoch; the median pruner (after `training.optuna_warmup_epochs`) stops trials below
the median of earlier trials at the same epoch. The objective is the best val mAP@R. Parameters are stored under
their dotted config keys (`training.lr`, `training_model.hidden_dim`, ...), which is how fetch_best_and_train
applies them.

A worker killed mid-trial (SIGKILL, node failure, a cancelled array task) leaves its trial RUNNING; it stops sending
heartbeats (`training.optuna_heartbeat_interval`), and once `training.optuna_grace_period` has passed the next worker
to start a trial marks it FAIL and queues its parameters again (`training.optuna_max_retries`); the retry runs in a
fresh trial directory and records `failed_trial` (the killed trial's number) in its system attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from building_embed.config import BuildingEmbedConfig
from building_embed.train.train import run_training
from common import tuning
from common.cli import config_main


def search_space(trial: Any, cfg: BuildingEmbedConfig) -> dict[str, Any]:
    """The sampled parameters, keyed by dotted config key."""
    return {
        "training.lr": trial.suggest_float("training.lr", 1e-4, 1e-2, log=True),
        "training.margin": trial.suggest_float("training.margin", 0.05, 0.5),
        "training.weight_decay": trial.suggest_float("training.weight_decay", 1e-6, 1e-2, log=True),
        "training_model.dropout": trial.suggest_float("training_model.dropout", 0.0, 0.3),
        "training_model.hidden_dim": trial.suggest_categorical("training_model.hidden_dim",
                                                               list(cfg.training.optuna_hidden_dims)),
    }


def apply_params(cfg: BuildingEmbedConfig, params: dict[str, Any]) -> BuildingEmbedConfig:
    """`cfg` with a trial's dotted `section.key` parameters set and re-validated (common.tuning.apply_params);
    the study names [global] keys `global.*`, kept in `cfg.global_`."""
    return tuning.apply_params(cfg, params, "building_embed", attribute=lambda s: "global_" if s == "global" else s)


def open_study(cfg: BuildingEmbedConfig, create: bool = True):
    """Create (or join) the study, maximising val mAP@R; `create=False` loads an existing one (UserError when there
    is none). Heartbeats let the next worker fail and retry a killed worker's trial (common.tuning)."""
    tc = cfg.training
    return tuning.open_study(
        tc.optuna_storage, tc.optuna_study, direction="maximize", warmup_steps=tc.optuna_warmup_epochs,
        heartbeat=tuning.Heartbeat(tc.optuna_heartbeat_interval, tc.optuna_grace_period, tc.optuna_max_retries),
        storage_key="training.optuna_storage", worker_cmd="python -m building_embed.train.optuna_worker",
        create=create)


def trial_config(cfg: BuildingEmbedConfig, params: dict[str, Any], number: int) -> BuildingEmbedConfig:
    out = apply_params(cfg, params)
    out.global_.run_name = f"optuna/{cfg.training.optuna_study}/trial_{number:04d}"
    out.global_.resume = "false"
    out.training.epochs = cfg.training.optuna_epochs
    return out


def worker(cfg: BuildingEmbedConfig) -> int:
    study = open_study(cfg)

    def objective(trial: Any) -> float:
        trial_cfg = trial_config(cfg, search_space(trial, cfg), trial.number)
        trial.set_user_attr("run_dir", str(Path(trial_cfg.paths.runs_dir) / trial_cfg.global_.run_name))

        def report(epoch: int, record: dict[str, Any]) -> None:
            tuning.report_epoch(trial, record["val_map@r"], epoch, "val mAP@R")

        return float(run_training(trial_cfg, on_epoch=report, final_report=False)["best_val_map@r"])

    return tuning.run_worker(study, objective, cfg.training.optuna_trials, cfg.training.optuna_total_trials)


main = config_main(BuildingEmbedConfig, worker, __doc__, prog="python -m building_embed.train.optuna_worker")

if __name__ == "__main__":
    raise SystemExit(main())
