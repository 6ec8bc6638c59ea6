"""implant_dims.baselines: the blob measurement on drawn shapes, and the whole stage on the generated data set (the
pixel ridge and the caliper must beat the mean predictor on length, which a broken feature extraction would not)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from implant_dims import baselines
from implant_dims.baselines import measure_blob, otsu_threshold

SPLITS = ("val", "test", "unseen")
NAMES = ("mean", "median", "ridge_pixels", "knn_pixels", "caliper", "caliper_native", "caliper_catalogue")


def test_otsu_threshold_separates_two_levels() -> None:
    values = np.concatenate([np.full(700, 40.0), np.full(300, 200.0)])
    assert 40 <= otsu_threshold(values) < 200


def test_measure_blob_on_a_rotated_bar_over_a_two_level_background() -> None:
    """A bright 40 x 12 px bar rotated 30 degrees over soft tissue (dark) and bone (mid grey), with noise: the
    extents along and across its axis, not the background split that Otsu over all pixels would find."""
    size = 96
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.where(yy < 35, 40.0, 120.0)
    angle = math.radians(30)
    u = (xx - 48) * math.cos(angle) + (yy - 50) * math.sin(angle)
    v = -(xx - 48) * math.sin(angle) + (yy - 50) * math.cos(angle)
    image[(np.abs(u) < 20) & (np.abs(v) < 6)] = 235.0
    image += np.random.default_rng(0).normal(0, 6, image.shape)
    length, width = measure_blob(np.clip(image, 0, 255).astype(np.uint8))
    assert length == pytest.approx(40, abs=2.5)
    assert width == pytest.approx(12, abs=2.5)


def test_measure_blob_without_a_bright_component() -> None:
    assert all(math.isnan(v) for v in measure_blob(np.zeros((16, 16), dtype=np.uint8)))


def test_baselines_stage_on_the_sample_data(implant_data, stage_args, tmp_path) -> None:
    runs = tmp_path / "runs"
    assert baselines.main(stage_args(implant_data, runs, "b")) == 0
    out = runs / "b" / "baselines"
    reports = {}
    for split in SPLITS:
        rep = json.loads((out / f"results_{split}.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert rep["split"] == split and rep["n"] > 0
        assert set(rep["baselines"]) == set(NAMES)
        for name, r in rep["baselines"].items():
            assert set(r) == {"length_mae", "diameter_mae", "mean_mae"}
            assert all(np.isfinite(v) and v >= 0 for v in r.values()), (split, name, r)
        assert rep["details"]["caliper_missing"] == 0
        reports[split] = rep["baselines"]
    # Closed-form / deterministic fits (RidgeCV, kNN, least-squares caliper): no training seed, so not a `learning`
    # test. Length MAE mm measured (OMP_NUM_THREADS=1), val / test / unseen: mean 3.02 / 2.45 / 2.10, ridge_pixels
    # 0.82 / 0.81 / 0.80, caliper 0.44 / 0.36 / 0.56, caliper_native 0.26 / 0.26 / 0.33, caliper_catalogue
    # 0.16 / 0.28 / 0.35.
    for split in ("val", "test"):
        mean_length = reports[split]["mean"]["length_mae"]
        for name in ("ridge_pixels", "caliper", "caliper_native"):
            assert reports[split][name]["length_mae"] < 0.8 * mean_length, (split, name, reports[split])
    # the caliper measures, it does not remember combinations: it holds up on the unseen ones too
    assert reports["unseen"]["caliper"]["length_mae"] < 0.5 * reports["unseen"]["mean"]["length_mae"]
    # catalogue lengths are >= 1.5 mm apart, so snapping a fair measurement to the nearest one removes most of its
    # error (a snap that ignored the measurement, or a wrong catalogue, would not)
    for split in SPLITS:
        assert reports[split]["caliper_catalogue"]["length_mae"] < reports[split]["caliper"]["length_mae"]
    fit = json.loads((out / "fit.json").read_text())
    assert fit["caliper_mm_per_px"]["length"][0] > 0 and fit["ridge_alpha"] > 0
    table = (out / "results.md").read_text()
    assert all(f"### {split}" in table for split in SPLITS) and "| caliper |" in table
