"""implant_dims.regression's feature cache: head-only epochs on cached features give the numbers (up to float32
rounding) of the same epochs recomputing the frozen ViTs (regression.cache_features=false), and the cache is off
whenever a feature extractor's output can change (augmentation, a visual backbone that trains in stage 0).
benchmarks/implant_frozen_cache.py times the two ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.logs import read_metrics
from implant_dims import train_dual

# every epoch in stage 0 (head only), the visual backbone frozen with the embedders: the cache applies throughout.
# The cache computes the features in unshuffled batches of 128, the plain run in each training batch: the same
# float32 math on other batch compositions, so equal up to rounding (GEMM kernels may block by batch size).
STAGE0 = ("run.device=cpu", "visual.frozen_in_stage0=true", "regression.epochs=2", "regression.unfreeze_half_epoch=2",
          "regression.unfreeze_all_epoch=2", "regression.mc_samples=2", "data.unseen_json=")


def dual_args(stage_args, implant_data: Path, trained_run: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """A new run dir on trained_run's two classifiers (only the regressor trains)."""
    return stage_args(implant_data, runs, name,
                      f"regression.company_checkpoint={trained_run / 'classifier_company' / 'checkpoints' / 'best'}",
                      f"regression.model_checkpoint={trained_run / 'classifier_model_type' / 'checkpoints' / 'best'}",
                      *extra)


def test_cached_head_only_epochs_equal_recomputed_ones(trained_run, implant_data, stage_args, tmp_path):
    runs = tmp_path / "runs"
    for name, cache in (("cached", "true"), ("plain", "false")):
        assert train_dual.main(dual_args(stage_args, implant_data, trained_run, runs, name, *STAGE0,
                                         f"regression.cache_features={cache}")) == 0
    cached = read_metrics(runs / "cached" / "dual" / "metrics.jsonl")
    plain = read_metrics(runs / "plain" / "dual" / "metrics.jsonl")
    assert [(m["stage"], m["cached_features"]) for m in cached] == [(0, True), (0, True)]
    assert [(m["stage"], m["cached_features"]) for m in plain] == [(0, False), (0, False)]
    assert "features cached" in (runs / "cached" / "dual" / "train.log").read_text()
    # lr is the same schedule function of the step, best the same comparison: exact; losses and MAEs: rounding
    assert [(m["lr"], m["best"]) for m in cached] == [(m["lr"], m["best"]) for m in plain]
    for a, b in zip(cached, plain, strict=True):
        for key in ("train_loss", "val_length_mae", "val_diameter_mae", "val_mean_mae"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for ckpt in ("latest", "best"):
        wa = load_file(str(runs / "cached" / "dual" / "checkpoints" / ckpt / "model.safetensors"))
        wb = load_file(str(runs / "plain" / "dual" / "checkpoints" / ckpt / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:  # two head-only epochs from the same start: float32 rounding of the features only
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=f"{ckpt}: {key} differs")
    # the held-out reports (no cache there) therefore agree too
    for split in ("val", "test"):
        ra = json.loads((runs / "cached" / "dual" / "reports" / f"results_{split}.json").read_text())
        rb = json.loads((runs / "plain" / "dual" / "reports" / f"results_{split}.json").read_text())
        assert ra["length_mae"] == pytest.approx(rb["length_mae"], rel=1e-5, abs=1e-5)
        assert ra["diameter_mae"] == pytest.approx(rb["diameter_mae"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("change", ["regression.augment=true", "visual.frozen_in_stage0=false"])
def test_no_cache_when_features_can_change(trained_run, implant_data, stage_args, tmp_path, change):
    """Augmented images (new pixels every epoch) or a visual backbone training in stage 0: features recomputed."""
    runs = tmp_path / "runs"
    args = dual_args(stage_args, implant_data, trained_run, runs, "r", *STAGE0, "regression.epochs=1",
                     "regression.cache_features=true", "data.test_json=", change)
    assert train_dual.main(args) == 0
    metrics = read_metrics(runs / "r" / "dual" / "metrics.jsonl")
    assert [(m["stage"], m["cached_features"]) for m in metrics] == [(0, False)]
    assert "features cached" not in (runs / "r" / "dual" / "train.log").read_text()
