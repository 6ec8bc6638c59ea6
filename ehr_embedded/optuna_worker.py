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

With `optuna.cv_folds=K` (K >= 2) a trial is scored by cross-validation over subjects instead: the rows of train and
tuning are pooled and cut into K subject-grouped folds (ehr_embedded.cv_folds, seeded by `optuna.cv_seed`; held_out
is never read). The K fold stores (train = the other folds, tuning = fold k) are written once per study under
`<parent of training.output_dir>/optuna/<study>/folds_k<K>_seed<seed>/` (atomically: concurrent workers reuse the
first one renamed into place). A trial runs one short finetune per fold into `trial_<number>/fold_<k>`; its objective
is the mean over folds of each fold's best tuning AUROC, and its user attributes keep `fold_aurocs`, `cv_mean` and
`cv_sd` (sd with ddof=1) beside `cv_folds` and `cv_seed`. Pruning then works on folds, not epochs: after fold k
(k = 0, 1, ...) the trial reports the running mean over its finished folds at step k, and the median pruner compares
it with other trials' running means at the same fold; fold 0 is never pruned (one fold is too noisy to judge on).

A worker killed mid-trial (SIGKILL, node failure, a cancelled or requeued array task) leaves its trial RUNNING; its
heartbeats (`optuna.heartbeat_interval`) stop, and once `optuna.grace_period` has passed, the next worker to start a
trial marks it FAIL and queues its parameters again (`optuna.max_retries` times); the retry runs in a fresh trial
directory and records the killed trial's number as its `failed_trial` system attribute.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from common import tuning
from common.cli import config_main
from common.errors import UserError
from ehr_embedded.config import TrainConfig
from ehr_embedded.cv_folds import fold_dir_name, materialise_folds
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
    """`cfg` with a trial's dotted `section.key` parameters set and re-validated (common.tuning.apply_params), e.g.
    a model_dim that n_heads does not divide is refused."""
    return tuning.apply_params(cfg, params, "ehr_embedded")


def open_study(cfg: TrainConfig, create: bool = True):
    """Create (or join) the study, maximising tuning AUROC; `create=False` loads an existing one (UserError when
    there is none). Heartbeats let the next worker fail and retry a killed worker's trial (common.tuning). With
    optuna.cv_folds the pruner's steps are folds (0-based), the first of which is never pruned."""
    oc = cfg.optuna
    warmup = 1 if oc.cv_folds else oc.warmup_epochs
    return tuning.open_study(oc.storage, oc.study, direction="maximize", warmup_steps=warmup,
                              heartbeat=tuning.Heartbeat(oc.heartbeat_interval, oc.grace_period, oc.max_retries),
                              storage_key="optuna.storage", worker_cmd="python -m ehr_embedded.optuna_worker",
                              create=create)


def study_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.training.output_dir).parent / "optuna" / cfg.optuna.study


def trial_dir(cfg: TrainConfig, number: int) -> Path:
    return study_dir(cfg) / f"trial_{number:04d}"


def fold_stores(cfg: TrainConfig) -> list[Path]:
    """The study's K fold stores of data.embedding_output_dir (written by the first worker that needs them)."""
    oc = cfg.optuna
    out = study_dir(cfg) / fold_dir_name(oc.cv_folds, oc.cv_seed)
    return materialise_folds(Path(cfg.data.embedding_output_dir), out, oc.cv_folds, oc.cv_seed)


def trial_config(cfg: TrainConfig, params: dict[str, Any], number: int) -> TrainConfig:
    out = apply_params(cfg, params)
    out.training.output_dir = trial_dir(cfg, number)
    out.training.resume = False
    out.training.epochs = cfg.optuna.epochs
    out.training.save_every = 0
    return out


def require_auroc(auroc: float | None, store: Path) -> float:
    if auroc is None:
        raise UserError(f"{store}: the tuning split has one class only, so it has no AUROC to tune on; use a larger "
                        "tuning split")
    return auroc


def best_tuning_auroc(cfg: TrainConfig) -> float:
    """Best tuning AUROC over the epochs of a finetune run without held_out scoring (no pruning inside)."""
    seen: list[float] = []
    finetune(cfg, on_epoch=lambda _epoch, auroc: seen.append(require_auroc(auroc, cfg.data.embedding_output_dir)),
             held_out=False)
    return max(seen)


def cv_objective(trial: Any, trial_cfg: TrainConfig, folds: list[Path]) -> float:
    """Mean over the fold stores of each fold's best tuning AUROC: one short finetune per fold into
    `<trial dir>/fold_<k>`, the running mean reported to the pruner after each fold (step k)."""
    oc = trial_cfg.optuna
    trial.set_user_attr("cv_folds", oc.cv_folds)
    trial.set_user_attr("cv_seed", oc.cv_seed)
    trial.set_user_attr("fold_stores", str(folds[0].parent))
    best: list[float] = []
    for k, store in enumerate(folds):
        fold_cfg = copy.deepcopy(trial_cfg)
        fold_cfg.data.embedding_output_dir = store
        fold_cfg.training.output_dir = Path(trial_cfg.training.output_dir) / f"fold_{k}"
        best.append(best_tuning_auroc(fold_cfg))
        mean = float(np.mean(best))
        trial.set_user_attr("fold_aurocs", best)
        trial.set_user_attr("cv_mean", mean)
        trial.set_user_attr("cv_sd", float(np.std(best, ddof=1)) if len(best) > 1 else None)
        tuning.report_epoch(trial, mean, k, f"mean best tuning AUROC of folds 0..{k}", step_name="fold")
    return float(np.mean(best))


def worker(cfg: TrainConfig) -> int:
    if cfg.training.task != "classification":
        raise UserError("optuna_worker tunes finetune: it needs training.task=classification")
    bad = [d for d in cfg.optuna.model_dims if d % cfg.model.n_heads]
    if bad:
        raise UserError(f"optuna.model_dims {bad} are not divisible by model.n_heads={cfg.model.n_heads}")
    folds = fold_stores(cfg) if cfg.optuna.cv_folds else None
    study = open_study(cfg)

    def objective(trial: Any) -> float:
        trial_cfg = trial_config(cfg, search_space(trial, cfg), trial.number)
        trial.set_user_attr("run_dir", str(trial_cfg.training.output_dir))
        if folds is not None:
            return cv_objective(trial, trial_cfg, folds)
        seen: list[float] = []

        def report(epoch: int, auroc: float | None) -> None:
            seen.append(require_auroc(auroc, cfg.data.embedding_output_dir))
            tuning.report_epoch(trial, auroc, epoch, "tuning AUROC")

        finetune(trial_cfg, on_epoch=report, held_out=False)
        return max(seen)

    return tuning.run_worker(study, objective, cfg.optuna.trials, cfg.optuna.total_trials)


main = config_main(TrainConfig, worker, __doc__, prog="python -m ehr_embedded.optuna_worker")

if __name__ == "__main__":
    raise SystemExit(main())
