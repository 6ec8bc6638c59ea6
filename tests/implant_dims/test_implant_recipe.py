"""The regressor recipe's loss and the one snapping rule: the loss in millimetres weighs each dimension as
regression.dim_weights say; snapping goes to the whole catalogue, or to a predicted class only above a probability
threshold chosen on validation; bad values exit 2 naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_implant_train import CPU, check_regressor_reports

from common.errors import UserError
from implant_dims import predict, train_dual, train_regression
from implant_dims.config import ImplantConfig, RegressionConfig
from implant_dims.data import load_records
from implant_dims.regression import (
    choose_snap_threshold,
    class_probabilities,
    load_catalogue,
    loss_inputs,
    make_dataset,
    predict_dataset,
    predicted_keys,
    regression_loss,
    regressor_from_checkpoint,
    snap,
    snap_keys,
)

# --------------------------------------------------------------------------------------------------------- loss

# two images; errors in mm: length +2.0 and -2.0, diameter +0.5 and -0.5 (training std 4 mm and 1 mm)
MEAN = torch.tensor([10.0, 4.0])
STD = torch.tensor([4.0, 1.0])
TARGET_MM = torch.tensor([[10.0, 4.0], [12.0, 5.0]])
PRED_MM = torch.tensor([[12.0, 4.5], [10.0, 4.5]])
OUT = {"pred_std": (PRED_MM - MEAN) / STD}


@pytest.mark.parametrize("weights, expected", [([1.0, 1.0], (2.0 + 0.5) / 2), ([1.0, 0.0], 2.0), ([0.0, 1.0], 0.5),
                                               ([3.0, 1.0], (3 * 2.0 + 0.5) / 4)])
def test_mm_loss_weighs_each_dimension_as_configured(weights, expected) -> None:
    pred, target = loss_inputs(OUT, TARGET_MM, MEAN, STD, "mm")
    assert torch.allclose(pred, PRED_MM, atol=1e-6) and torch.equal(target, TARGET_MM)
    assert regression_loss(pred, target, "l1", weights).item() == pytest.approx(expected, abs=1e-6)


def test_standardised_loss_counts_each_mm_by_one_over_its_std() -> None:
    """The old behaviour, still reachable: 2 mm of length over a 4 mm std weighs as much as 0.5 mm of diameter over
    1 mm, so a mm of diameter counts 4x a mm of length; in mm the same errors differ 4x."""
    std_loss = regression_loss(*loss_inputs(OUT, TARGET_MM, MEAN, STD, "standardised"), "l1", [1.0, 0.0])
    assert std_loss.item() == pytest.approx(0.5, abs=1e-6)
    assert regression_loss(*loss_inputs(OUT, TARGET_MM, MEAN, STD, "standardised"), "l1", [0.0, 1.0]).item() \
        == pytest.approx(0.5, abs=1e-6)
    # mse and smooth L1 (beta 0.5 in mm: |e| - 0.25 above it) in mm, equal weights
    pred, target = loss_inputs(OUT, TARGET_MM, MEAN, STD, "mm")
    assert regression_loss(pred, target, "mse").item() == pytest.approx((4.0 + 0.25) / 2, abs=1e-6)
    assert regression_loss(pred, target, "smooth_l1").item() == pytest.approx((1.75 + 0.25) / 2, abs=1e-6)


def test_mm_loss_gradient_follows_the_weights() -> None:
    """With [1, 0] the diameter output gets no gradient at all; the length output does."""
    pred_std = OUT["pred_std"].clone().requires_grad_(True)
    pred, target = loss_inputs({"pred_std": pred_std}, TARGET_MM, MEAN, STD, "mm")
    regression_loss(pred, target, "l1", [1.0, 0.0]).backward()
    assert torch.all(pred_std.grad[:, 1] == 0) and torch.all(pred_std.grad[:, 0].abs() > 0)


# ------------------------------------------------------------------------------------------------------ snapping

# company A sells (10, 4) and (12, 4); company B sells (11, 4.6). Unit distance: 1 mm length, 0.5 mm diameter.
CATALOGUE = {("A", "x"): np.array([[10.0, 4.0], [12.0, 4.0]]), ("B", "y"): np.array([[11.0, 4.6]])}
SCALE = np.array([1.0, 0.5])


def test_catalogue_rule_snaps_to_the_nearest_size_of_any_class() -> None:
    pred = np.array([[10.9, 4.5], [11.8, 4.1]])
    keys = [("A", "x"), ("B", "y")]  # the heads read A for the first (B's size is the nearest) and B for the second
    probs = {"company": np.array([0.99, 0.99]), "model_type": np.array([0.99, 0.99])}
    whole = snap(pred, snap_keys(keys, probs, "catalogue", -1.0), CATALOGUE, SCALE)
    np.testing.assert_allclose(whole, [[11.0, 4.6], [12.0, 4.0]])
    # the predicted-class rule with sure heads narrows to the class: A's nearest size, B's only size
    narrowed = snap(pred, snap_keys(keys, probs, "predicted_class", 0.5), CATALOGUE, SCALE)
    np.testing.assert_allclose(narrowed, [[10.0, 4.0], [11.0, 4.6]])


def test_predicted_class_rule_falls_back_to_the_whole_catalogue_below_the_threshold() -> None:
    pred = np.array([[10.9, 4.5], [10.9, 4.5], [10.9, 4.5]])
    keys = [("A", "x"), ("A", "x"), ("A", "x")]
    probs = {"company": np.array([0.9, 0.4, 0.5]), "model_type": np.array([0.9, 0.4, 0.3])}
    narrowed = snap_keys(keys, probs, "predicted_class", 0.5)
    # strictly above: 0.5 itself does not narrow; each head is judged on its own probability
    assert narrowed == [("A", "x"), (None, None), (None, None)]
    assert snap_keys(keys, {"company": np.array([0.9] * 3), "model_type": np.array([0.3] * 3)}, "predicted_class",
                     0.5) == [("A", None)] * 3
    np.testing.assert_allclose(snap(pred, narrowed, CATALOGUE, SCALE), [[10.0, 4.0], [11.0, 4.6], [11.0, 4.6]])


def test_threshold_chosen_on_validation() -> None:
    """Hand-made val rows: the sure head (0.95) is right, the unsure one (0.55) wrong, a 0.7 one harmless. Snapped
    mean |error| by threshold t (a class narrows where p > t): t = 1 or 0.95 -> row 1 goes to B's 11 (1 mm off):
    1/6 mm; t = 0.7 or 0.55 -> 0 mm; t = 0 -> row 2 narrows to A's 10: 1/6 mm. The tie 0.7 / 0.55 goes to the higher
    one (fewest rows narrowed)."""
    catalogue = {("A", "x"): np.array([[10.0, 4.0]]), ("B", "y"): np.array([[11.0, 4.0]])}
    true = np.array([[10.0, 4.0], [11.0, 4.0], [10.0, 4.0]])
    pred = np.array([[10.6, 4.0], [10.9, 4.0], [10.2, 4.0]])
    keys = [("A", None), ("A", None), ("A", None)]  # a company-only regressor
    probs = {"company": np.array([0.95, 0.55, 0.7])}
    assert choose_snap_threshold(true, pred, keys, probs, catalogue, np.ones(2)) == pytest.approx(0.7)
    # a head that is always right and every row nearer B's size: only t = 0 narrows all three (the 0.55 one too)
    nearer_b = np.array([[10.6, 4.0], [10.6, 4.0], [10.6, 4.0]])
    truth = np.array([[10.0, 4.0], [10.0, 4.0], [10.0, 4.0]])
    assert choose_snap_threshold(truth, nearer_b, keys, probs, catalogue, np.ones(2)) == 0.0


def test_class_probabilities_are_the_softmax_of_the_read_class() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    probs = class_probabilities({"logits_company": logits}, {"embedders": {"company": {}}})
    np.testing.assert_allclose(probs["company"], [np.exp(2) / (np.exp(2) + 2), 1 / 3], atol=1e-12)


def test_predict_reads_the_threshold_chosen_on_validation(tmp_path: Path) -> None:
    best = tmp_path / "dual" / "checkpoints" / "best"
    best.mkdir(parents=True)
    report = tmp_path / "dual" / "reports" / "results_val.json"
    cfg = ImplantConfig(regression=RegressionConfig(snap="predicted_class"))
    with pytest.raises(UserError, match="regression.snap_min_prob"):
        predict.snap_min_prob(cfg, best)  # nothing chosen yet: refused, naming the key
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"snap_rule": {"mode": "predicted_class", "min_prob": 0.83,
                                                "min_prob_from": "chosen on val"}}))
    assert predict.snap_min_prob(cfg, best) == pytest.approx(0.83)
    fixed = ImplantConfig(regression=RegressionConfig(snap="predicted_class", snap_min_prob=0.4))
    assert predict.snap_min_prob(fixed, best) == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------- bad input

BAD = [
    (["regression.dim_weights=[1.0, -1.0]"], "regression.dim_weights"),
    (["regression.dim_weights=[0, 0]"], "regression.dim_weights"),
    (["regression.dim_weights=[1.0]"], "regression.dim_weights"),
    (["regression.loss_space=log"], "regression.loss_space"),
    (["regression.snap=nearest"], "regression.snap"),
    (["regression.snap_min_prob=1.5"], "regression.snap_min_prob"),
    (["regression.snap_min_prob=-0.5"], "regression.snap_min_prob"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o) for o, _ in BAD])
@pytest.mark.parametrize("stage", [train_dual, train_regression, predict])
def test_bad_recipe_values_exit_2_naming_the_key(stage, overrides, key, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert stage.main([f"run.out_dir={runs}", "run.name=bad", *overrides]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], lines
    assert not runs.exists()


# ------------------------------------------------------------------------------------------- through training


def test_training_in_mm_with_the_predicted_class_rule_records_the_val_choice(trained_run, implant_data,
                                                                             stage_args, tmp_path) -> None:
    """A tiny single-embedding run with the mm loss and regression.snap=predicted_class: the threshold it records is
    the best on val (recomputed here over every candidate), every split snaps under it (check_regressor_reports
    recomputes the sizes), and the predictions CSV carries the snapped sizes compare pairs."""
    runs = tmp_path / "runs"
    args = stage_args(implant_data, runs, "m", "regression.embedding=company", "regression.epochs=2",
                      "regression.mc_samples=0", "regression.loss_space=mm", "regression.dim_weights=[1.0, 2.0]",
                      "regression.snap=predicted_class",
                      f"regression.company_checkpoint={trained_run / 'classifier_company' / 'checkpoints' / 'best'}")
    assert train_regression.main(args) == 0
    out = runs / "m" / "single_company"
    reports = check_regressor_reports(out, implant_data, ["company"])
    rule = reports["val"]["snap_rule"]
    assert rule["mode"] == "predicted_class" and rule["min_prob_from"] == "chosen on val"
    assert all(reports[s]["snap_rule"] == rule for s in reports)
    # the recorded threshold reaches the lowest snapped val error of any threshold
    model, meta = regressor_from_checkpoint(out / "checkpoints" / "best")
    records, _ = load_records(implant_data / "augmented_val.json")
    det = predict_dataset(model, make_dataset(records, meta, 32), CPU)
    true = np.array([[r.length, r.diameter] for r in records])
    train, _ = load_records(implant_data / "augmented_train.json")
    scale = np.array([[r.length, r.diameter] for r in train]).std(0)
    catalogue = load_catalogue(implant_data / "catalogue.csv")
    keys, probs = predicted_keys(det, meta, records), class_probabilities(det, meta)
    errors = {t: np.abs(snap(det["pred_mm"], snap_keys(keys, probs, "predicted_class", t), catalogue, scale)
                        - true).mean() for t in np.linspace(0, 1, 41).tolist() + probs["company"].tolist()}
    assert reports["val"]["snapped"]["mean_mae"] == pytest.approx(min(errors.values()), abs=1e-4)
    header = (out / "reports" / "predictions_test.csv").read_text().splitlines()[0]
    assert header.endswith(",length_snapped,diameter_snapped")
    # the rule decides reports only: switching it on the finished run re-reports without training again
    metrics = (out / "metrics.jsonl").read_text()
    assert train_regression.main([*args, "regression.snap=catalogue"]) == 0
    assert (out / "metrics.jsonl").read_text() == metrics
    rule = json.loads((out / "reports" / "results_test.json").read_text())["snap_rule"]
    assert rule == {"mode": "catalogue", "min_prob": None, "min_prob_from": None}


# -------------------------------------------------------------------------------------- the table over seeds

def recipe_table():
    """The study studies/implant_dims/recipe_table.py."""
    from studies.implant_dims import recipe_table

    return recipe_table


def test_seed_table_intervals_resample_implants_and_seeds() -> None:
    """Two seeds x two implants of two images. Seed-averaged differences .2 .4 -.1 .1 -> implant means .3 and 0, so
    resampling implants spans [0, .3]; per seed the implant means are .2 / -.1 (seed 0) and .4 / .1 (seed 1), and a
    draw of one seed twice and one implant twice (1/16 of draws) reaches each, so with seeds resampled too the
    interval is [-.1, .4]."""
    diff = np.array([[0.1, 0.3, -0.2, 0.0], [0.3, 0.5, 0.0, 0.2]])
    got = recipe_table().intervals(diff, np.array(["g1", "g1", "g2", "g2"]))
    assert got["mean"] == pytest.approx(0.15, abs=1e-12)
    assert got["per_seed"] == pytest.approx([0.05, 0.25], abs=1e-12)
    assert got["ci95_implants"] == pytest.approx([0.0, 0.3], abs=1e-12)
    assert got["ci95_seeds_and_implants"] == pytest.approx([-0.1, 0.4], abs=1e-12)


def test_seed_table_pairs_dual_with_the_caliper_by_image(tmp_path: Path) -> None:
    """dual is 0.1 mm off in length in seed 0 and 0.3 in seed 1 (rows in another order), the caliper 0.4 in both:
    dual minus caliper -0.3 and -0.1 per seed, mean -0.2; dual's length MAE 0.2 +- 0.141 (sample sd)."""
    images = ["a", "b", "c", "d"]
    runs = []
    for seed, (off, order) in enumerate([(0.1, images), (0.3, images[::-1])]):
        run = tmp_path / f"seed{seed}"
        rows = ["image_path,group,length_true,diameter_true,length_pred,diameter_pred"]
        rows += [f"/d/{k}.png,g{i // 2},10.0,4.0,{10.0 + off},4.0" for i, k in enumerate(images)]
        (run / "dual" / "reports").mkdir(parents=True)
        (run / "dual" / "reports" / "predictions_test.csv").write_text(
            "\n".join([rows[0], *[rows[1 + images.index(k)] for k in order]]) + "\n")
        (run / "baselines").mkdir()
        (run / "baselines" / "predictions_test.csv").write_text("\n".join(
            ["image_path,group,length_true,diameter_true,caliper_length,caliper_diameter"]
            + [f"/d/{k}.png,g{i // 2},10.0,4.0,9.6,4.0" for i, k in enumerate(images)]) + "\n")
        runs.append(run)
    table = recipe_table().split_table(runs, "test")
    assert table["mae"]["dual"]["length"]["mean"] == pytest.approx(0.2, abs=1e-9)
    assert table["mae"]["dual"]["length"]["sd"] == pytest.approx(np.std([0.1, 0.3], ddof=1), abs=1e-9)
    caliper = table["paired"]["baseline: caliper"]["length"]
    assert caliper["per_seed"] == pytest.approx([-0.3, -0.1], abs=1e-9)
    assert caliper["mean"] == pytest.approx(-0.2, abs=1e-9)
    assert caliper["ci95_implants"] == pytest.approx([-0.2, -0.2], abs=1e-9)
    assert caliper["ci95_seeds_and_implants"] == pytest.approx([-0.3, -0.1], abs=1e-9)


def test_seed_table_implant_interval_is_compares_bootstrap_of_the_seed_average() -> None:
    """The table over seeds reuses compare's group bootstrap: its interval over implants is compare's interval of
    the seed-averaged per-image differences under the same draws (uneven groups: the draws weigh images)."""
    from studies.implant_dims.compare import group_draws, group_interval

    diff = np.random.default_rng(3).normal(size=(3, 12))
    groups = np.array([f"g{i % 5}" for i in range(12)])
    module = recipe_table()
    got = module.intervals(diff, groups, seed=7)
    inverse, draws = group_draws(groups, module.N_BOOT, np.random.default_rng(7))
    assert got["ci95_implants"] == pytest.approx(group_interval(diff.mean(0), inverse, draws), abs=1e-12)
    assert got["ci95_implants"][0] < diff.mean() < got["ci95_implants"][1]


def test_seed_table_refuses_a_seed_that_lacks_an_image(tmp_path: Path, capsys) -> None:
    """Seed 1 reports on three of seed 0's four images: exit 2, one line naming the study and the missing image."""
    runs = []
    for seed, images in enumerate([["a", "b", "c", "d"], ["a", "b", "c"]]):
        run = tmp_path / f"seed{seed}"
        (run / "dual" / "reports").mkdir(parents=True)
        (run / "dual" / "reports" / "predictions_test.csv").write_text("\n".join(
            ["image_path,group,length_true,diameter_true,length_pred,diameter_pred"]
            + [f"/d/{k}.png,g{i // 2},10.0,4.0,10.1,4.0" for i, k in enumerate(images)]) + "\n")
        runs.append(str(run))
    assert recipe_table().main(["--out", str(tmp_path / "table"), *runs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe_table" in err[0] and "/d/d.png" in err[0], err
    assert not (tmp_path / "table").exists()
