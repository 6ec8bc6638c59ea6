"""Triplet loss on cosine distance, through pytorch-metric-learning.

    loss = mean over mined triplets (a, p, n) of max(0, cos(a, n) - cos(a, p) + margin)

(pml's `TripletMarginLoss` with `CosineSimilarity`, which compares similarities the inverted way; the default reducer
averages over triplets with a non-zero loss.) The miner (`TripletMarginMiner`, `training.miner`) keeps the triplets
that violate the margin (`all`), only those whose negative is closer than the positive (`hard`), or the semihard ones;
`none` uses every triplet of the batch. `progress_loss` is the same triplet loss averaged over *every* triplet of the
batch, unmined: the bandit's learning-progress reward compares it before and after one optimizer step, so a step that
satisfies more triplets always counts as progress.

"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning import losses, miners, reducers
from pytorch_metric_learning.distances import CosineSimilarity

from building_embed.config import TrainingConfig


@dataclass
class TripletObjective:
    loss: losses.TripletMarginLoss
    miner: miners.TripletMarginMiner | None
    progress_loss: losses.TripletMarginLoss

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(loss, number of triplets used) of unit embeddings [B, D] with identity labels [B]."""
        triplets = self.miner(embeddings, labels) if self.miner is not None else None
        n_triplets = len(triplets[0]) if triplets is not None else -1
        return self.loss(embeddings, labels, triplets), n_triplets


def build_objective(tc: TrainingConfig) -> TripletObjective:
    distance = CosineSimilarity()
    miner = None if tc.miner == "none" else miners.TripletMarginMiner(margin=tc.margin, distance=distance,
                                                                         type_of_triplets=tc.miner)
    return TripletObjective(losses.TripletMarginLoss(margin=tc.margin, distance=distance), miner,
                            losses.TripletMarginLoss(margin=tc.margin, distance=distance,
                                                     reducer=reducers.MeanReducer()))
