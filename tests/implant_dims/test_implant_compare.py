"""studies.implant_dims.compare on a run directory of tiny hand-written reports and per-image predictions: the
markdown it writes (the tables studies/implant_dims/RESULTS.md quotes) equals a table computed by hand, including
the paired difference and its interval from resampling whole implants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies.implant_dims import compare

# Four images of two implants (groups g1, g2): true and predicted (length, diameter) in mm.
TRUE = {"a": (10.0, 4.0), "b": (12.0, 4.5), "c": (8.0, 3.5), "d": (11.0, 5.0)}
GROUPS = {"a": "g1", "b": "g1", "c": "g2", "d": "g2"}
DUAL = {"a": (10.2, 4.1), "b": (11.6, 4.5), "c": (8.1, 3.3), "d": (11.3, 5.1)}  # mean |error|: .15 .20 .15 .20
SINGLE = {"a": (10.5, 4.0), "b": (12.0, 4.9), "c": (8.6, 3.52), "d": (11.0, 5.64)}  # .25 .20 .31 .32
# single minus dual per image: +.10, 0, +.16, +.12 -> mean +0.095; implant means g1 +0.05, g2 +0.14. Resampling two
# implants gives only g1's mean, g2's mean or the pooled mean (equal image counts), so the 95 % interval is
# [g1, g2] = [+0.050, +0.140] (resampling images instead would reach b's 0 and c's +0.16). Per dimension: length
# +.3 -.4 +.5 -.3 -> +0.025 [g1 -0.05, g2 +0.10]; diameter -.1 +.4 -.18 +.54 -> +0.165 [+0.15, +0.18].
CALIPER = {"a": (10.3, 4.2), "b": (12.3, 4.3), "c": (8.3, 3.7), "d": (11.3, 5.2)}  # |error| .3 and .2 everywhere
# caliper minus dual: length +.1 -.1 +.2 0 -> +0.05 [0, +0.10]; diameter +.1 +.2 0 +.1 -> +0.10 [+0.05, +0.15];
# mean +.10 +.05 +.10 +.05 -> +0.075 [+0.075, +0.075]
MEAN = {k: (10.5, 4.25) for k in TRUE}  # length |error| .5 1.5 2.5 .5, diameter .25 .25 .75 .75
# mean minus dual: length +.3 +1.1 +2.4 +.2 -> +1.0 [+0.7, +1.3]; diameter +.15 +.25 +.55 +.65 -> +0.4 [+0.2, +0.6];
# mean .375-.15 .875-.2 1.625-.15 .625-.2 -> +0.7 [+0.45, +0.95]
# Snapped under the whole-catalogue rule: dual to a, (11.5, 4.5), c, d (mean |error| 0 .25 0 0); the caliper
# (caliper_catalogue) to a, b, (8.5, 3.5), (11.5, 5.0) (0 0 .25 .25): caliper minus dual 0 -.25 +.25 +.25 -> +0.0625,
# g1 -0.125, g2 +0.25. single_company was snapped under the predicted-class rule, so it stays out of both.
DUAL_SNAPPED = {"a": (10.0, 4.0), "b": (11.5, 4.5), "c": (8.0, 3.5), "d": (11.0, 5.0)}
CALIPER_SNAPPED = {"a": (10.0, 4.0), "b": (12.0, 4.5), "c": (8.5, 3.5), "d": (11.5, 5.0)}
SINGLE_SNAPPED = {"a": (10.0, 4.0), "b": (12.0, 5.0), "c": (8.5, 3.5), "d": (11.0, 5.5)}
CATALOGUE_RULE = {"mode": "catalogue", "min_prob": None, "min_prob_from": None}
CLASS_RULE = {"mode": "predicted_class", "min_prob": 0.6, "min_prob_from": "chosen on val"}

EXPECTED = """### test

| classifier | n | accuracy | top-3 | macro F1 | majority | chance |
|---|---|---|---|---|---|---|
| company | 4 | 0.750 | 1.000 | 0.600 | 0.500 | 0.250 |

| model | length MAE | diameter MAE | mean MAE | / mean-predictor | exact size | interval coverage (length, diameter) |
|---|---|---|---|---|---|---|
| baseline: mean | 1.250 | 0.500 | 0.875 | - | - | - |
| baseline: caliper | 0.300 | 0.200 | 0.250 | - | - | - |
| baseline: caliper_catalogue | 0.250 | 0.000 | 0.125 | - | - | - |
| dual (triple) | 0.250 | 0.100 | 0.175 | 0.20 | 0.750 | 0.75, 1.00 |
| single_company (concat) | 0.275 | 0.265 | 0.270 | 0.31 | 0.250 | - |

Snapped to the nearest catalogue size (test), one rule for every row: regression.snap=catalogue (the caliper reads no \
class, so under either rule it snaps to the whole catalogue):

| model | snapped length MAE | snapped diameter MAE | snapped mean MAE | exact size | rule |
|---|---|---|---|---|---|
| baseline: caliper | 0.250 | 0.000 | 0.125 | - | whole catalogue |
| dual | 0.125 | 0.000 | 0.062 | 0.750 | whole catalogue |

Left out, snapped under another rule (re-run their reports with regression.snap=catalogue): single_company \
(predicted class where its probability is above 0.6 (chosen on val), else whole catalogue)

MAE minus `dual`'s on the same test images (95% interval over implants; an interval above 0 means that model is \
worse; snapped: both under the rule above):

| model | length (mm) | 95% interval | diameter (mm) | 95% interval | mean (mm) | 95% interval | snapped mean (mm) \
| 95% interval |
|---|---|---|---|---|---|---|---|---|
| single_company | +0.025 | [-0.050, +0.100] | +0.165 | [+0.150, +0.180] | +0.095 | [+0.050, +0.140] | - | - |
| baseline: caliper | +0.050 | [+0.000, +0.100] | +0.100 | [+0.050, +0.150] | +0.075 | [+0.075, +0.075] | +0.062 \
| [-0.125, +0.250] |
| baseline: mean | +1.000 | [+0.700, +1.300] | +0.400 | [+0.200, +0.600] | +0.700 | [+0.450, +0.950] | - | - |
"""


def write(path: Path, content: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def predictions_csv(pred: dict[str, tuple[float, float]], order: list[str],
                    snapped: dict[str, tuple[float, float]]) -> str:
    lines = ["image_path,group,length_true,diameter_true,length_pred,diameter_pred,length_snapped,diameter_snapped"]
    lines += [f"/data/{k}.png,{GROUPS[k]},{TRUE[k][0]},{TRUE[k][1]},{pred[k][0]},{pred[k][1]},{snapped[k][0]},"
              f"{snapped[k][1]}" for k in order]
    return "\n".join(lines) + "\n"


def baseline_predictions_csv(order: list[str]) -> str:
    lines = ["image_path,group,length_true,diameter_true,mean_length,mean_diameter,caliper_length,caliper_diameter,"
             "caliper_catalogue_length,caliper_catalogue_diameter"]
    lines += [f"/data/{k}.png,{GROUPS[k]},{TRUE[k][0]},{TRUE[k][1]},{MEAN[k][0]},{MEAN[k][1]},{CALIPER[k][0]},"
              f"{CALIPER[k][1]},{CALIPER_SNAPPED[k][0]},{CALIPER_SNAPPED[k][1]}" for k in order]
    return "\n".join(lines) + "\n"


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r"
    write(run / "classifier_company" / "reports" / "results_test.json",
          {"n": 4, "accuracy": 0.75, "top3_accuracy": 1.0, "macro_f1": 0.6, "majority_accuracy": 0.5,
           "chance_accuracy": 0.25})
    # MAE as report_regressor computes them from the predictions above; / mean-predictor = mean MAE / 0.875
    write(run / "dual" / "reports" / "results_test.json",
          {"n": 4, "length_mae": 0.25, "diameter_mae": 0.1, "mean_mae": 0.175, "mae_ratio_to_mean_baseline": 0.2,
           "exact_size_accuracy": 0.75, "interval_coverage_calibrated": [0.75, 1.0],
           "snapped": {"length_mae": 0.125, "diameter_mae": 0.0, "mean_mae": 0.0625}, "snap_rule": CATALOGUE_RULE})
    write(run / "dual" / "reports" / "results.json", {"attention_type": "triple"})
    write(run / "dual" / "reports" / "predictions_test.csv",
          predictions_csv(DUAL, ["a", "b", "c", "d"], DUAL_SNAPPED))
    write(run / "single_company" / "reports" / "results_test.json",
          {"n": 4, "length_mae": 0.275, "diameter_mae": 0.265, "mean_mae": 0.27,
           "mae_ratio_to_mean_baseline": 0.27 / 0.875, "exact_size_accuracy": 0.25,
           "snapped": {"length_mae": 0.125, "diameter_mae": 0.25, "mean_mae": 0.1875}, "snap_rule": CLASS_RULE})
    write(run / "single_company" / "reports" / "results.json", {"attention_type": "concat"})
    # another row order: compare must pair images by path, not by position
    write(run / "single_company" / "reports" / "predictions_test.csv",
          predictions_csv(SINGLE, ["b", "d", "a", "c"], SINGLE_SNAPPED))
    write(run / "baselines" / "results_test.json",
          {"split": "test", "n": 4, "details": {"caliper_missing": 0},
           "baselines": {"mean": {"length_mae": 1.25, "diameter_mae": 0.5, "mean_mae": 0.875},
                         "caliper": {"length_mae": 0.3, "diameter_mae": 0.2, "mean_mae": 0.25},
                         "caliper_catalogue": {"length_mae": 0.25, "diameter_mae": 0.0, "mean_mae": 0.125}}})
    write(run / "baselines" / "predictions_test.csv", baseline_predictions_csv(["c", "a", "d", "b"]))
    return run


def test_compare_writes_the_hand_computed_tables(run_dir: Path, capsys) -> None:
    assert compare.main([f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}"]) == 0
    assert (run_dir / "comparison.md").read_text() == EXPECTED
    assert EXPECTED.strip() in capsys.readouterr().out
    paired = json.loads((run_dir / "comparison.json").read_text())["paired"]
    assert set(paired) == {"test"} and set(paired["test"]) == {"single_company", "baseline: caliper", "baseline: mean"}
    diff = paired["test"]["single_company"]
    assert diff["minus"] == "dual"
    assert diff["mean_mae_difference"] == pytest.approx(0.095, abs=1e-9)
    assert diff["ci95"] == pytest.approx([0.05, 0.14], abs=1e-9)
    assert diff["length_ci95"] == pytest.approx([-0.05, 0.10], abs=1e-9)
    assert "snapped_mean_mae_difference" not in diff  # snapped under the other rule: never paired with dual's
    caliper = paired["test"]["baseline: caliper"]
    assert caliper["length_mae_difference"] == pytest.approx(0.05, abs=1e-9)
    assert caliper["length_ci95"] == pytest.approx([0.0, 0.1], abs=1e-9)
    assert caliper["snapped_mean_mae_difference"] == pytest.approx(0.0625, abs=1e-9)
    assert caliper["snapped_ci95"] == pytest.approx([-0.125, 0.25], abs=1e-9)


def test_compare_snapped_rows_follow_the_configured_rule(run_dir: Path) -> None:
    """Under regression.snap=predicted_class the regressor snapped that way is the one shown beside the caliper
    (which reads no class, so its snap is the whole catalogue's either way) and dual, snapped to the whole
    catalogue, is named as left out; nor is dual's snapped error paired with the caliper's."""
    assert compare.main([f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}",
                         "regression.snap=predicted_class"]) == 0
    text = (run_dir / "comparison.md").read_text()
    assert ("| single_company | 0.125 | 0.250 | 0.188 | 0.250 | predicted class where its probability is above 0.6 "
            "(chosen on val), else whole catalogue |") in text
    assert "| baseline: caliper | 0.250 | 0.000 | 0.125 | - | whole catalogue |" in text
    assert "| dual | 0.125 |" not in text
    assert "regression.snap=predicted_class): dual (whole catalogue)" in text
    paired = json.loads((run_dir / "comparison.json").read_text())["paired"]["test"]
    assert "snapped_mean_mae_difference" not in paired["baseline: caliper"]


def test_compare_without_reports_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert compare.main([f"run.out_dir={tmp_path / 'runs'}", "run.name=empty"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no reports to compare" in err[0], err
    assert not (tmp_path / "runs" / "empty" / "comparison.md").exists()
