"""One Optuna worker tuning finetune on the tuning split's AUROC; start several on the same storage.

    python -m ehr_embedded.optuna_worker --config configs/ehr_embedded/finetune_encoder_embedded.yaml &
    python -m ehr_embedded.optuna_worker --config configs/ehr_embedded/finetune_encoder_embedded.yaml &
    python -m ehr_embedded.optuna_worker --config configs/ehr_embedded/mimic_finetune_encoder.yaml \
        optuna.storage=postgresql://user@db/optuna optuna.trials=20 optuna.epochs=10

Every worker joins the study `optuna.study` in the RDB storage `optuna.storage` (SQLite by default, PostgreSQL when
several nodes share one study) and runs `optuna.trials` trials; all of them stop once the study holds
`optuna.total_trials` (0 = no cap). Creating the study is serialised with an exclusive lock on `<db>.lock` for
SQLite (two workers creating one SQLite study at once would otherwise die on a UNIQUE constraint), and a worker that
still loses the race loads the study the winner created.

A trial is a short finetune run (`optuna.epochs`, no periodic epoch_N checkpoints) in its own run directory
`<parent of training.output_dir>/optuna/<study>/trial_<number>` with resume off. After each epoch it reports the
tuning split's AUROC; the median pruner (after `optuna.warmup_epochs`) stops a trial below the median of earlier
trials at the same epoch. The objective (maximised) is the best tuning AUROC of the trial. The held_out split is never
scored inside a trial: the search must not see it. The sampled parameters are stored under their dotted config keys
(`training.learning_rate`, `training.weight_decay`, `model.dropout`, `model.n_layers`, `model.model_dim`,
`model.pooling`), which is how fetch_best_and_train applies them.

A worker killed mid-trial (SIGKILL, node failure, a cancelled or requeued array task) leaves its trial RUNNING; its
heartbeats (`optuna.heartbeat_interval`) stop, and once `optuna.grace_period` has passed, the next worker to start a
trial marks it FAIL and queues its parameters again (`optuna.max_retries` times); the retry runs in a fresh trial
directory and records the killed trial's number as its `failed_trial` system attribute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import studies
from common.cli import UserError, config_main
from ehr_embedded.config import TrainConfig
from ehr_embedded.finetune import finetune


def search_space(trial: Any, cfg: TrainConfig) -> dict[str, Any]:
    """The sampled parameters, keyed by their dotted config keys."""
    oc = cfg.optuna
    return {
        "training.learning_rate": trial.suggest_float("training.learning_rate", 1e-4, 1e-2, log=True),
        "training.weight_decay": trial.suggest_float("training.weight_decay", 1e-5, 1e-1, log=True),
        "model.dropout": trial.suggest_float("model.dropout", 0.0, 0.3),
        "model.n_layers": trial.suggest_categorical("model.n_layers", list(oc.n_layers)),
        "model.model_dim": trial.suggest_categorical("model.model_dim", list(oc.model_dims)),
        "model.pooling": trial.suggest_categorical("model.pooling", list(oc.poolings)),
    }


def apply_params(cfg: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """`cfg` with a trial's dotted `section.key` parameters set and re-validated (common.studies.apply_params), e.g.
    a model_dim that n_heads does not divide is refused."""
    return studies.apply_params(cfg, params, "ehr_embedded")


def open_study(cfg: TrainConfig, create: bool = True):
    """Create (or join) the study, maximising tuning AUROC; `create=False` loads an existing one (UserError when
    there is none). Heartbeats let the next worker fail and retry a killed worker's trial (common.studies)."""
    oc = cfg.optuna
    return studies.open_study(oc.storage, oc.study, direction="maximize", warmup_steps=oc.warmup_epochs,
                              heartbeat=studies.Heartbeat(oc.heartbeat_interval, oc.grace_period, oc.max_retries),
                              storage_key="optuna.storage", worker_cmd="python -m ehr_embedded.optuna_worker",
                              create=create)


def trial_dir(cfg: TrainConfig, number: int) -> Path:
    return Path(cfg.training.output_dir).parent / "optuna" / cfg.optuna.study / f"trial_{number:04d}"


def trial_config(cfg: TrainConfig, params: dict[str, Any], number: int) -> TrainConfig:
    out = apply_params(cfg, params)
    out.training.output_dir = trial_dir(cfg, number)
    out.training.resume = False
    out.training.epochs = cfg.optuna.epochs
    out.training.save_every = 0
    return out


def worker(cfg: TrainConfig) -> int:
    if cfg.training.task != "classification":
        raise UserError("optuna_worker tunes finetune: it needs training.task=classification")
    bad = [d for d in cfg.optuna.model_dims if d % cfg.model.n_heads]
    if bad:
        raise UserError(f"optuna.model_dims {bad} are not divisible by model.n_heads={cfg.model.n_heads}")
    study = open_study(cfg)

    def objective(trial: Any) -> float:
        trial_cfg = trial_config(cfg, search_space(trial, cfg), trial.number)
        trial.set_user_attr("run_dir", str(trial_cfg.training.output_dir))
        seen: list[float] = []

        def report(epoch: int, auroc: float | None) -> None:
            if auroc is None:
                raise UserError(f"{cfg.data.embedding_output_dir}: the tuning split has one class only, so it has "
                                "no AUROC to tune on; use a larger tuning split")
            seen.append(auroc)
            studies.report_epoch(trial, auroc, epoch, "tuning AUROC")

        finetune(trial_cfg, on_epoch=report, held_out=False)
        return max(seen)

    return studies.run_worker(study, objective, cfg.optuna.trials, cfg.optuna.total_trials)


main = config_main(TrainConfig, worker, __doc__, prog="python -m ehr_embedded.optuna_worker")

if __name__ == "__main__":
    raise SystemExit(main())
