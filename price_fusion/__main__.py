"""`python -m price_fusion`: list the stages."""

import sys

from common.cli import list_stages

STAGES = {
    "sample_data": "write a synthetic catalogue (CSV + drawn PNGs, optional tiny CLIP) in the challenge format",
    "embed": "CLIP image + sentence text embeddings + structural features (or import the original's files)",
    "train": "train the two-branch / MoE fusion model (grouped 80/20 split or grouped K-fold with honest OOF predictions)",
    "evaluate": "SMAPE/MAE/RMSE/R2 overall, by price bin and range, worst/best 20, plots",
    "predict": "validated test_out.csv (sample_id,price) from the trained run",
    "baselines": "median / kNN / ridge with grouped out-of-fold and test predictions, like the network's",
    "gbt": "HistGradientBoosting + out-of-fold faiss kNN price features, OOF + test predictions",
    "ensemble": "combine prediction files: mean, or weights fitted on out-of-fold predictions (never worse there than the best input)",
    "optuna_worker": "one Optuna worker minimising validation SMAPE on a shared RDB study (start several)",
    "fetch_best_and_train": "train the full model with the best Optuna trial's parameters",
}

if __name__ == "__main__":
    sys.exit(list_stages("price_fusion", STAGES))
