"""Read the best completed trial of the Optuna study and train the full model with its parameters.

    python -m price_fusion.fetch_best_and_train --config configs/price_fusion/demo.yaml run_name=demo_tuned
    python -m price_fusion.fetch_best_and_train --config configs/price_fusion/base.yaml run_name=tuned \
        optuna.storage=postgresql://user@db/optuna train.kfold=5 train.refit=true

Loads `optuna.study` from `optuna.storage`, sets each of the best trial's parameters (stored under their dotted
config keys: train.lr, train.weight_decay, model.dropout, model.branch_dim, model.name) on the config and runs
`price_fusion.train` with it into <runs_dir>/<run_name> (the config's own train.epochs, kfold, refit and resume):
its config.yaml records the parameters used. Writes reports/best_trial.json there (study, trial number, its
validation SMAPE, the parameters, and the final run's validation / out-of-fold SMAPE). Exit 2 when the study does not
exist or holds no completed trial. Then `evaluate` / `predict` with the same arguments as usual.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common import tuning
from common.cli import config_main
from common.logs import write_json

from . import train as train_stage
from .config import PriceFusionConfig
from .optuna_worker import apply_params, open_study

log = logging.getLogger(__name__)


def fetch_best_and_train(cfg: PriceFusionConfig) -> int:
    study = open_study(cfg, create=False)
    best = tuning.best_completed_trial(study, f"optuna.storage={cfg.optuna.storage}",
                                        "python -m price_fusion.optuna_worker")
    final_cfg = apply_params(cfg, best.params)
    log.info("best trial %d (val SMAPE %.3f%%): %s", best.number, best.value, best.params)
    code = train_stage.train(final_cfg)
    if code:
        return code
    run_dir = Path(final_cfg.runs_dir) / final_cfg.run_name
    summary_path = run_dir / "reports" / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    write_json(run_dir / "reports" / "best_trial.json",
               {"study": study.study_name, "number": best.number, "value": best.value, "params": best.params,
                "final_val_smape": summary.get("smape")})
    return 0


main = config_main(PriceFusionConfig, fetch_best_and_train, __doc__,
                   prog="python -m price_fusion.fetch_best_and_train")

if __name__ == "__main__":
    raise SystemExit(main())
