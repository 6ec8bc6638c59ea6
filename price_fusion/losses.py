"""Map `train.loss` names to loss functions of (pred_log [B], target_log [B]) -> scalar.

The SMAPE family lives in `common.losses` (formulas in its docstrings); huber / mse / mae act on log price.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from common import losses as common_losses

from .config import TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_loss(cfg: TrainConfig) -> LossFn:
    """The loss named by `cfg.loss`, with its hyperparameters bound."""
    table: dict[str, LossFn] = {
        "weighted_smape": partial(common_losses.weighted_smape_loss, tier_edges=tuple(cfg.tier_edges),
                                  tier_weights=tuple(cfg.tier_weights)),
        "focal_smape": partial(common_losses.focal_smape_loss, gamma=cfg.smape_gamma),
        "hybrid_focal_smape": partial(common_losses.hybrid_focal_smape_loss, gamma=cfg.smape_gamma,
                                      alpha=cfg.hybrid_alpha),
        # common names it log_smape_loss: it takes log prices, but the value is the SMAPE of the prices
        "smape": common_losses.log_smape_loss,
        "huber": partial(F.huber_loss, delta=cfg.huber_delta),
        "mse": F.mse_loss,
        "mae": F.l1_loss,
    }
    return table[cfg.loss]
