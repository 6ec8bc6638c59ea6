"""implant_dims.compare on a run directory of tiny hand-written reports and per-image predictions: the markdown it
writes (the tables the README quotes) equals a table computed by hand, including the paired difference and its
interval from resampling whole implants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from implant_dims import compare

# Four images of two implants (groups g1, g2): true and predicted (length, diameter) in mm.
TRUE = {"a": (10.0, 4.0), "b": (12.0, 4.5), "c": (8.0, 3.5), "d": (11.0, 5.0)}
GROUPS = {"a": "g1", "b": "g1", "c": "g2", "d": "g2"}
DUAL = {"a": (10.2, 4.1), "b": (11.6, 4.5), "c": (8.1, 3.3), "d": (11.3, 5.1)}  # mean |error|: .15 .20 .15 .20
SINGLE = {"a": (10.5, 4.0), "b": (12.0, 4.9), "c": (8.6, 3.52), "d": (11.0, 5.64)}  # .25 .20 .31 .32
# single minus dual per image: +.10, 0, +.16, +.12 -> mean +0.095; implant means g1 +0.05, g2 +0.14. Resampling two
# implants gives only g1's mean, g2's mean or the pooled mean, so the 95 % interval is [g1, g2] = [+0.050, +0.140]
# (resampling images instead would reach b's 0 and c's +0.16).

EXPECTED = """### test

| classifier | n | accuracy | top-3 | macro F1 | majority | chance |
|---|---|---|---|---|---|---|
| company | 4 | 0.750 | 1.000 | 0.600 | 0.500 | 0.250 |

| model | length MAE | diameter MAE | mean MAE | / mean-predictor | exact size | interval coverage (length, diameter) |
|---|---|---|---|---|---|---|
| baseline: mean | 1.250 | 0.500 | 0.875 | - | - | - |
| baseline: caliper | 0.300 | 0.200 | 0.250 | - | - | - |
| dual (triple) | 0.250 | 0.100 | 0.175 | 0.20 | 0.500 | 0.75, 1.00 |
| single_company (concat) | 0.275 | 0.265 | 0.270 | 0.31 | - | - |

Mean MAE minus `dual`'s on the same test images (95% interval over implants; an interval above 0 means that model is worse):

| model | difference (mm) | 95% interval |
|---|---|---|
| single_company | +0.095 | [+0.050, +0.140] |
"""


def write(path: Path, content: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def predictions_csv(pred: dict[str, tuple[float, float]], order: list[str]) -> str:
    lines = ["image_path,group,length_true,diameter_true,length_pred,diameter_pred"]
    lines += [f"/data/{k}.png,{GROUPS[k]},{TRUE[k][0]},{TRUE[k][1]},{pred[k][0]},{pred[k][1]}" for k in order]
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
           "exact_size_accuracy": 0.5, "interval_coverage_calibrated": [0.75, 1.0]})
    write(run / "dual" / "reports" / "results.json", {"attention_type": "triple"})
    write(run / "dual" / "reports" / "predictions_test.csv", predictions_csv(DUAL, ["a", "b", "c", "d"]))
    write(run / "single_company" / "reports" / "results_test.json",
          {"n": 4, "length_mae": 0.275, "diameter_mae": 0.265, "mean_mae": 0.27,
           "mae_ratio_to_mean_baseline": 0.27 / 0.875})
    write(run / "single_company" / "reports" / "results.json", {"attention_type": "concat"})
    # another row order: compare must pair images by path, not by position
    write(run / "single_company" / "reports" / "predictions_test.csv", predictions_csv(SINGLE, ["b", "d", "a", "c"]))
    write(run / "baselines" / "results_test.json",
          {"split": "test", "n": 4, "details": {"caliper_missing": 0},
           "baselines": {"mean": {"length_mae": 1.25, "diameter_mae": 0.5, "mean_mae": 0.875},
                         "caliper": {"length_mae": 0.3, "diameter_mae": 0.2, "mean_mae": 0.25}}})
    return run


def test_compare_writes_the_hand_computed_tables(run_dir: Path, capsys) -> None:
    assert compare.main([f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}"]) == 0
    assert (run_dir / "comparison.md").read_text() == EXPECTED
    assert EXPECTED.strip() in capsys.readouterr().out
    paired = json.loads((run_dir / "comparison.json").read_text())["paired"]
    assert set(paired) == {"test"} and set(paired["test"]) == {"single_company"}
    diff = paired["test"]["single_company"]
    assert diff["minus"] == "dual"
    assert diff["mean_mae_difference"] == pytest.approx(0.095, abs=1e-9)
    assert diff["ci95"] == pytest.approx([0.05, 0.14], abs=1e-9)


def test_compare_without_reports_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert compare.main([f"run.out_dir={tmp_path / 'runs'}", "run.name=empty"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no reports to compare" in err[0], err
    assert not (tmp_path / "runs" / "empty" / "comparison.md").exists()
