"""Training: the projection head trained with triplet loss and bandit-chosen difficulty bands, its evaluation, and
the Optuna search (`train.train`, `train.multisplit`, `train.optuna_worker`, `train.fetch_best_and_train`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

STAGES = {
    "train": "projection head: triplet loss on P x K batches, negatives from a UCB1-chosen difficulty band",
    "multisplit": "frozen vs trained head vs PCA + LDA over repeated identity folds: paired intervals, win/tie/loss",
    "optuna_worker": "one Optuna worker on a shared RDB study (several may run at once), pruned on val mAP@R",
    "fetch_best_and_train": "the study's best params -> the final training run",
}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m building_embed.train` lists its stages."""
    from common.cli import list_stages

    argparse.ArgumentParser(prog="python -m building_embed.train", description=__doc__).parse_args(argv)
    return list_stages("building_embed.train", STAGES)
