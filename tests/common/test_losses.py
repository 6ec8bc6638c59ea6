"""Losses against hand-computed values and reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from common.losses import (
    FocalLoss,
    focal_loss,
    focal_smape_loss,
    hybrid_focal_smape_loss,
    log_smape_loss,
    log_smape_terms,
    price_tier_weights,
    smape_percent,
    weighted_smape_loss,
)


def test_focal_hand_computed() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> p = [0.75, 0.25]
    target = torch.tensor([0])
    expected = -(0.25 ** 2) * math.log(0.75)
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    alpha = torch.tensor([0.3, 0.7])
    assert focal_loss(logits, target, gamma=2.0, alpha=alpha).item() == pytest.approx(0.3 * expected, rel=1e-6)


def test_focal_gamma0_is_cross_entropy_with_smoothing() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5, generator=gen)
    target = torch.randint(0, 5, (32,), generator=gen)
    for eps in (0.0, 0.1):
        ours = focal_loss(logits, target, gamma=0.0, label_smoothing=eps)
        ref = F.cross_entropy(logits, target, label_smoothing=eps)
        assert torch.allclose(ours, ref, atol=1e-6)


def test_focal_binary_matches_torchvision_sigmoid_focal() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, generator=gen) * 3
    y = torch.randint(0, 2, (64,), generator=gen)
    # Two-class softmax over [0, z] gives p(1) = sigmoid(z); alpha per class = [1 - a, a].
    logits = torch.stack([torch.zeros_like(z), z], dim=1)
    for gamma, a in ((2.0, 0.25), (1.0, 0.6), (0.0, 0.5)):
        ours = focal_loss(logits, y, gamma=gamma, alpha=torch.tensor([1 - a, a]), reduction="none")
        ref = sigmoid_focal_loss(z, y.float(), alpha=a, gamma=gamma, reduction="none")
        assert torch.allclose(ours, ref, atol=1e-5)


def test_focal_down_weights_easy_examples() -> None:
    easy = torch.tensor([[4.0, 0.0]])
    hard = torch.tensor([[0.2, 0.0]])
    t = torch.tensor([0])
    ratio_focal = focal_loss(easy, t, gamma=2.0) / focal_loss(hard, t, gamma=2.0)
    ratio_ce = F.cross_entropy(easy, t) / F.cross_entropy(hard, t)
    assert ratio_focal < ratio_ce / 10


def test_focal_ignore_index_and_sequence_shape() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 6, generator=gen)  # [N, C, T]
    target = torch.randint(0, 4, (3, 6), generator=gen)
    target[0, :3] = -100
    per = focal_loss(logits, target, gamma=1.5, reduction="none")
    assert per.shape == (3, 6) and torch.all(per[0, :3] == 0)
    mean = focal_loss(logits, target, gamma=1.5)
    assert torch.allclose(mean, per.sum() / 15)
    ref = F.cross_entropy(logits, target, ignore_index=-100)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), ref, atol=1e-6)
    module = FocalLoss(gamma=1.5)
    assert torch.allclose(module(logits, target), mean)


def test_focal_rejects_wrong_alpha() -> None:
    with pytest.raises(ValueError, match="one weight per class"):
        focal_loss(torch.zeros(2, 3), torch.tensor([0, 1]), alpha=[1.0, 2.0])


def test_smape_percent_hand_values() -> None:
    assert smape_percent(torch.tensor([100.0]), torch.tensor([100.0])).item() == 0.0
    assert smape_percent(torch.tensor([0.0]), torch.tensor([50.0])).item() == pytest.approx(200.0)
    # |110 - 100| / 105 = 0.0952..., |50 - 100| / 75 = 0.666...
    value = smape_percent(torch.tensor([110.0, 50.0]), torch.tensor([100.0, 100.0])).item()
    assert value == pytest.approx(100 * (10 / 105 + 50 / 75) / 2, rel=1e-6)
    assert smape_percent(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 2.0])).item() == 0.0  # 0/0 counts 0


def test_log_smape_matches_exact_smape_and_has_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(100, generator=gen) * 100 + 1
    pred = target * torch.exp(torch.randn(100, generator=gen))
    exact = smape_percent(pred, target) / 100
    surrogate = log_smape_loss(pred.log(), target.log())
    assert surrogate.item() == pytest.approx(exact.item(), abs=2e-3)
    x = torch.zeros(1, requires_grad=True)
    log_smape_loss(x, torch.zeros(1)).backward()
    assert torch.isfinite(x.grad).all()


def test_tiered_weighting_really_weights() -> None:
    cheap, mid = math.log(5.0), math.log(20.0)
    target = torch.tensor([cheap, mid])
    weights = price_tier_weights(target, (10.0, 50.0), (2.0, 1.0, 1.5))
    assert weights.tolist() == [2.0, 1.0]
    # The same 20 % relative error on the cheap item costs more than on the mid-priced one.
    err_on_cheap = weighted_smape_loss(target + torch.tensor([0.2, 0.0]), target)
    err_on_mid = weighted_smape_loss(target + torch.tensor([0.0, 0.2]), target)
    assert err_on_cheap.item() == pytest.approx(2 * err_on_mid.item(), rel=1e-6)
    # With equal weights it is plain SMAPE.
    flat = weighted_smape_loss(target + 0.2, target, tier_weights=(1.0, 1.0, 1.0))
    assert flat.item() == pytest.approx(log_smape_loss(target + 0.2, target).item())
    with pytest.raises(ValueError, match="tier_weights"):
        price_tier_weights(target, (10.0,), (1.0,))


def test_focal_smape_and_hybrid() -> None:
    target = torch.zeros(4)
    pred = torch.tensor([0.1, 0.1, 0.1, 2.0])
    terms = log_smape_terms(pred, target)
    assert focal_smape_loss(pred, target, gamma=1.0).item() == pytest.approx(terms.mean().item())
    focal2 = focal_smape_loss(pred, target, gamma=2.0).item()
    assert focal2 == pytest.approx((2 * (terms / 2) ** 2).mean().item())
    assert focal2 < terms.mean().item()  # small errors shrink more than large ones
    hybrid = hybrid_focal_smape_loss(pred, target, gamma=2.0, alpha=0.5).item()
    assert hybrid == pytest.approx(0.5 * focal2 + 0.5 * F.huber_loss(pred, target).item())
