"""Read the best completed trial of the Optuna study and train the final model with its parameters.

    python -m building_embed.train.fetch_best_and_train --config configs/building_embed/sample.toml
    python -m building_embed.train.fetch_best_and_train --config configs/building_embed/config.toml \
        global.run_name=final training.epochs=40

Loads `training.optuna_study` from `training.optuna_storage`, sets each of the best trial's parameters (stored under
their dotted config keys) on the config, and runs train.train into paths.runs_dir/<global.run_name>: its
config.yaml records the parameters used, and reports/retrieval.{json,md} the head against the frozen embeddings on
val and test. Writes reports/best_trial.json (number, value, params) beside them. Exit 2 when the study does not
exist or holds no completed trial.
"""

from __future__ import annotations

import logging

from building_embed.config import BuildingEmbedConfig
from building_embed.train.optuna_worker import apply_params, open_study
from building_embed.train.train import run_dir_of, run_training
from common import tuning
from common.cli import config_main
from common.io import write_json

log = logging.getLogger(__name__)


def fetch_best_and_train(cfg: BuildingEmbedConfig) -> int:
    study = open_study(cfg, create=False)
    best = tuning.best_completed_trial(study, cfg.training.optuna_storage,
                                        "python -m building_embed.train.optuna_worker")
    final_cfg = apply_params(cfg, best.params)
    log.info("best trial %d (val mAP@R %.4f): %s", best.number, best.value, best.params)
    summary = run_training(final_cfg)
    write_json(run_dir_of(final_cfg) / "reports" / "best_trial.json",
               {"study": study.study_name, "number": best.number, "value": best.value, "params": best.params,
                "final_best_val_map@r": summary["best_val_map@r"]})
    return 0


main = config_main(BuildingEmbedConfig, fetch_best_and_train, __doc__,
                   prog="python -m building_embed.train.fetch_best_and_train")

if __name__ == "__main__":
    raise SystemExit(main())
