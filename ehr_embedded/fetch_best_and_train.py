"""Read the best completed trial of the Optuna study and finetune the final model with its parameters.

    python -m ehr_embedded.fetch_best_and_train --config configs/ehr_embedded/finetune_encoder_embedded.yaml
    python -m ehr_embedded.fetch_best_and_train --config configs/ehr_embedded/mimic_finetune_encoder.yaml \
        optuna.storage=postgresql://user@db/optuna training.output_dir=runs/ehr_embedded/mimic/tuned training.epochs=50

Loads `optuna.study` from `optuna.storage`, sets each of the best trial's parameters (stored under their dotted
config keys) on the config and runs a full finetune into `training.output_dir` (`training.epochs`, the configured
resume, then the threshold on tuning and the held_out report, reports/eval_held_out.json, as a plain finetune does).
Its config.yaml records the parameters used; reports/best_trial.json holds the trial's number, tuning AUROC and
parameters beside the final held_out AUROC. When the study scored its trials by cross-validation
(`optuna.cv_folds`), `tuning_auroc` there is null (the final model is still selected on the store's tuning split as
always) and best_trial.json holds the trial's CV mean (`cv_mean_auroc`, the objective), its sd over folds
(`cv_sd_auroc`), the per-fold values (`cv_fold_aurocs`), `cv_folds` and `cv_seed`. Exit 2 when the study does not
exist or has no completed trial.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common import tuning
from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from ehr_embedded.config import TrainConfig
from ehr_embedded.finetune import finetune
from ehr_embedded.optuna_worker import apply_params, open_study

log = logging.getLogger(__name__)


def fetch_best_and_train(cfg: TrainConfig) -> int:
    if cfg.training.task != "classification":
        raise UserError("fetch_best_and_train finetunes: it needs training.task=classification")
    study = open_study(cfg, create=False)
    best = tuning.best_completed_trial(study, cfg.optuna.storage, "python -m ehr_embedded.optuna_worker")
    final_cfg = apply_params(cfg, best.params)
    cv = cv_summary(best.user_attrs)
    what = f"CV mean AUROC over {cv['cv_folds']} folds" if cv else "tuning AUROC"
    log.info("best trial %d (%s %.4f): %s", best.number, what, best.value, best.params)
    report = finetune(final_cfg)
    write_json(Path(final_cfg.training.output_dir) / "reports" / "best_trial.json",
               {"study": study.study_name, "number": best.number, "tuning_auroc": None if cv else best.value,
                **cv, "params": best.params, "final_held_out_auroc": (report.get("auroc") or {}).get("value")})
    return 0


def cv_summary(user_attrs: dict) -> dict:
    """The cross-validation figures of a trial scored on folds (optuna_worker.cv_objective); {} for a trial scored
    on the tuning split."""
    if not user_attrs.get("cv_folds"):
        return {}
    return {"cv_folds": user_attrs["cv_folds"], "cv_seed": user_attrs["cv_seed"],
            "cv_mean_auroc": user_attrs["cv_mean"], "cv_sd_auroc": user_attrs["cv_sd"],
            "cv_fold_aurocs": user_attrs["fold_aurocs"]}


main = config_main(TrainConfig, fetch_best_and_train, __doc__, prog="python -m ehr_embedded.fetch_best_and_train")

if __name__ == "__main__":
    raise SystemExit(main())
