"""Losses shared by the packages. Each is a pure function with its formula here; thin modules wrap them.

Focal loss (Lin et al., 2017), multi-class with label smoothing::

    q = (1 - eps) * onehot(y) + eps / C                     (smoothed target, eps = label_smoothing)
    loss_i = - sum_c q_c * alpha_c * (1 - p_c)^gamma * log p_c

With eps = 0 this is the familiar  -alpha_y (1 - p_y)^gamma log p_y ; with gamma = 0 and alpha = 1 it is
cross-entropy. "mean" averages over the targets that are not `ignore_index` (a plain count, as torchvision's
sigmoid focal loss does; torch's weighted cross-entropy instead divides by the sum of the targets' weights, so with
alpha given and gamma = 0 the two differ by that normalisation).

SMAPE (Amazon ML Challenge 2025), in percent, 0 to 200::

    SMAPE = 100/n * sum_i |p_i - a_i| / ((|a_i| + |p_i|) / 2)         (a term with a_i = p_i = 0 counts 0)

For positive prices with d = log p - log a the term is exactly 2 |tanh(d / 2)|, which gives the
differentiable surrogate on log price used for training (|d| smoothed near 0 so the gradient is defined).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Tensor | Sequence[float] | None = None,
               label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Multi-class focal loss.

    Args:
        logits: `[N, C]` or `[N, C, d1, ...]` unnormalised scores.
        target: `[N]` or `[N, d1, ...]` class indices; `ignore_index` entries contribute nothing.
        gamma: focusing exponent (0 gives cross-entropy).
        alpha: per-class weights `[C]` (class weights), or None.
        label_smoothing: eps in [0, 1).
        reduction: "mean" (over non-ignored targets), "sum" or "none" (shape of `target`, 0 where ignored).
    """
    if logits.dim() > 2:
        num_classes = logits.shape[1]
        logits = logits.movedim(1, -1).reshape(-1, num_classes)
        out_shape = target.shape
        target = target.reshape(-1)
    else:
        out_shape = target.shape
    num_classes = logits.shape[-1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_p = F.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    q = F.one_hot(safe_target, num_classes).to(log_p.dtype)
    if label_smoothing > 0:
        q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
    per_class = -q * (1.0 - p).pow(gamma) * log_p
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=log_p.dtype, device=log_p.device)
        if alpha_t.shape != (num_classes,):
            raise ValueError(f"alpha must have one weight per class ({num_classes}), got shape {tuple(alpha_t.shape)}")
        per_class = per_class * alpha_t
    loss = per_class.sum(-1) * valid.to(log_p.dtype)
    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class FocalLoss(nn.Module):
    """Module form of `focal_loss`; `alpha` is kept as a buffer so it follows `.to(device)`."""

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | Tensor | None = None, label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, self.gamma, self.alpha, self.label_smoothing, self.ignore_index,
                          self.reduction)


def smape_percent(pred: Tensor, target: Tensor) -> Tensor:
    """SMAPE in percent (0 to 200) on raw values: 100 * mean(|p - a| / ((|a| + |p|) / 2)); 0/0 terms count 0."""
    denom = (pred.abs() + target.abs()) / 2
    ratio = torch.where(denom > 0, (pred - target).abs() / denom.clamp(min=torch.finfo(denom.dtype).tiny),
                        torch.zeros_like(denom))
    return 100.0 * ratio.mean()


def log_smape_terms(pred_log: Tensor, target_log: Tensor, smooth: float = 1e-3) -> Tensor:
    """Per-sample SMAPE fraction (0 to 2) of prices exp(pred_log) vs exp(target_log): 2 tanh(|d|_s / 2).

    |d|_s = sqrt(d^2 + s^2) - s is a smooth absolute value (exact for |d| >> s), so the loss has a gradient at d = 0.
    """
    diff = pred_log - target_log
    smooth_abs = torch.sqrt(diff * diff + smooth * smooth) - smooth
    return 2.0 * torch.tanh(smooth_abs / 2.0)


def log_smape_loss(pred_log: Tensor, target_log: Tensor) -> Tensor:
    """Mean differentiable SMAPE fraction (0 to 2) on log prices; x100 is SMAPE percent."""
    return log_smape_terms(pred_log, target_log).mean()


def price_tier_weights(target_log: Tensor, tier_edges: Sequence[float], tier_weights: Sequence[float]) -> Tensor:
    """Weight of each sample by the tier of its true price exp(target_log): tier k is [edge_{k-1}, edge_k)."""
    if len(tier_weights) != len(tier_edges) + 1:
        raise ValueError(f"need len(tier_weights) == len(tier_edges) + 1, got {len(tier_weights)} and {len(tier_edges)}")
    edges = torch.as_tensor(list(tier_edges), dtype=target_log.dtype, device=target_log.device)
    weights = torch.as_tensor(list(tier_weights), dtype=target_log.dtype, device=target_log.device)
    tier = torch.bucketize(target_log.exp(), edges, right=True)
    return weights[tier]


def weighted_smape_loss(pred_log: Tensor, target_log: Tensor, tier_edges: Sequence[float] = (10.0, 50.0),
                        tier_weights: Sequence[float] = (2.0, 1.0, 1.5)) -> Tensor:
    """Tier-weighted SMAPE on log prices: sum_i w_i s_i / sum_i w_i, with s_i from `log_smape_terms`.

    w_i is the weight of the price tier of the true price (defaults: < $10 weighted 2, $10-50 weighted 1,
    >= $50 weighted 1.5), so errors on cheap items cost more than the same relative error on mid-priced ones.
    """
    weights = price_tier_weights(target_log, tier_edges, tier_weights)
    return (weights * log_smape_terms(pred_log, target_log)).sum() / weights.sum()


def focal_smape_loss(pred_log: Tensor, target_log: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal SMAPE: mean(2 * (s_i / 2)^gamma), s_i in [0, 2]. gamma = 1 is SMAPE; larger gamma focuses on large errors."""
    terms = log_smape_terms(pred_log, target_log)
    return (2.0 * (terms / 2.0).pow(gamma)).mean()


def hybrid_focal_smape_loss(pred_log: Tensor, target_log: Tensor, gamma: float = 2.0, alpha: float = 0.5,
                            huber_delta: float = 1.0) -> Tensor:
    """alpha * focal_smape + (1 - alpha) * Huber(pred_log, target_log): SMAPE focus with a well-scaled log-space pull."""
    return alpha * focal_smape_loss(pred_log, target_log, gamma) + (1.0 - alpha) * F.huber_loss(
        pred_log, target_log, delta=huber_delta)
