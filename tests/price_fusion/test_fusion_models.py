"""Fusion models and the loss table."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import UserError
from price_fusion.config import LOSS_NAMES, ModelConfig, TrainConfig
from price_fusion.losses import build_loss
from price_fusion.model import AdvancedMoEFusionModel, TwoBranchFusionModel, build_model, init_output_bias

DIMS = dict(image_dim=12, text_dim=20, struct_dim=3, branch_dim=16, head_dims=(16, 8, 4), dropout=0.0)


def _inputs(batch: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 12, generator=g), torch.ones(batch, dtype=torch.bool),
            torch.randn(batch, 20, generator=g), torch.randn(batch, 3, generator=g))


@pytest.mark.parametrize("cls", [TwoBranchFusionModel, AdvancedMoEFusionModel])
def test_output_shape_and_normalisation_only_on_embeddings(cls):
    torch.manual_seed(0)
    model = cls(**DIMS) if cls is TwoBranchFusionModel else cls(**DIMS, num_experts=3, num_heads=4)
    model.eval()
    image, mask, text, struct = _inputs()
    out = model(image, mask, text, struct)
    assert out.shape == (5,)
    # L2 normalisation: scaling an embedding by a positive constant does not change the prediction (up to float32
    # rounding of the scaled inputs' norms: a few ulp) ...
    torch.testing.assert_close(model(image * 7.0, mask, text * 0.1, struct), out, rtol=1e-5, atol=1e-6)
    # ... but the structural features are not normalised: scaling them does.
    assert not torch.allclose(model(image, mask, text, struct * 3.0), out)


@pytest.mark.parametrize("cls", [TwoBranchFusionModel, AdvancedMoEFusionModel])
def test_missing_image_ignores_the_image_values(cls):
    torch.manual_seed(0)
    model = cls(**DIMS).eval()
    image, mask, text, struct = _inputs()
    mask[:] = False
    out = model(image, mask, text, struct)
    # float32 tolerance: the masked image values must not reach the output at all; a leak moves it by far more
    torch.testing.assert_close(model(torch.randn_like(image), mask, text, struct), out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(image, torch.ones_like(mask), text, struct), out)


def test_moe_prediction_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = AdvancedMoEFusionModel(**DIMS, num_experts=3, num_heads=4).eval()
    batch = _inputs(batch=8)
    together = model(*batch)
    alone = torch.stack([model(*(x[i:i + 1] for x in batch))[0] for i in range(8)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    other = _inputs(batch=8, seed=1)
    mixed = model(*(torch.cat([a[:3], b[3:]]) for a, b in zip(batch, other)))
    torch.testing.assert_close(mixed[:3], together[:3], rtol=1e-5, atol=1e-6)


def test_moe_load_balance_term():
    model = AdvancedMoEFusionModel(**DIMS, num_experts=3, num_heads=4)
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.zero_()
    model(*_inputs())
    assert model.aux_loss().item() == pytest.approx(0.0, abs=1e-6)  # uniform gate: balanced
    with torch.no_grad():
        model.gate.bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
    model(*_inputs())
    assert model.aux_loss().item() == pytest.approx(2.0, abs=1e-3)  # one expert takes everything: E - 1


def test_original_sizes_and_dimension_mismatch_names_both_numbers():
    model = build_model(ModelConfig(), image_dim=768, text_dim=1024, struct_dim=3)
    assert isinstance(model, TwoBranchFusionModel)
    assert model.branches.image_branch[0].weight.shape == (512, 768)
    assert model.branches.text_branch[0].weight.shape == (512, 1027)
    assert [m.out_features for m in model.head.modules() if isinstance(m, torch.nn.Linear)] == [512, 256, 128, 1]
    with pytest.raises(UserError, match=r"model.text_dim=1024 but the embeddings are 384-d"):
        build_model(ModelConfig(), image_dim=768, text_dim=384, struct_dim=3)
    inferred = build_model(ModelConfig(image_dim=None, text_dim=None), image_dim=16, text_dim=384, struct_dim=3)
    assert inferred.branches.text_branch[0].weight.shape == (512, 387)


def test_output_bias_starts_at_the_mean_log_price():
    model = TwoBranchFusionModel(**DIMS)
    init_output_bias(model, math.log(25.0))
    assert model.head[-1].bias.item() == pytest.approx(math.log(25.0))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_name_is_zero_at_the_target_and_positive_elsewhere(name):
    loss_fn = build_loss(TrainConfig(loss=name))
    target = torch.log(torch.tensor([3.0, 30.0, 300.0]))
    assert loss_fn(target, target).item() == pytest.approx(0.0, abs=1e-3)
    worse = loss_fn(target + 0.5, target)
    assert worse.item() > 0.01


def test_weighted_smape_tiers_really_weigh_differently():
    cfg = TrainConfig(loss="weighted_smape", tier_edges=[10.0, 50.0], tier_weights=[2.0, 1.0, 1.5])
    loss_fn = build_loss(cfg)
    target = torch.log(torch.tensor([5.0, 20.0]))  # one cheap, one mid-priced product
    miss_cheap = loss_fn(target + torch.tensor([0.5, 0.0]), target)
    miss_mid = loss_fn(target + torch.tensor([0.0, 0.5]), target)
    assert miss_cheap.item() == pytest.approx(2.0 * miss_mid.item(), rel=1e-4)  # weights 2 vs 1
    flat = build_loss(TrainConfig(loss="weighted_smape", tier_weights=[1.0, 1.0, 1.0]))
    # with equal weights the same two misses cost the same: the difference above is the tier weighting
    assert flat(target + torch.tensor([0.5, 0.0]), target).item() == pytest.approx(
        flat(target + torch.tensor([0.0, 0.5]), target).item(), rel=1e-4)
