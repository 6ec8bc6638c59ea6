"""evaluate, predict, ensemble, gbt, sample_data, the stage list and the shipped configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import metrics
from common.config import load_config
from price_fusion import ensemble, evaluate, gbt, predict, sample_data
from price_fusion.config import PriceFusionConfig
from price_fusion.ensemble import fit_weights
from price_fusion.predictions import write_predictions

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "price_fusion").glob("*.yaml"))


def test_evaluate_writes_groups_extremes_and_plots(trained_run):
    assert evaluate.main(trained_run["args"]) == 0
    reports, run = trained_run["run_dir"] / "reports", trained_run["run_dir"]
    results = pd.read_csv(reports / "evaluation_results.csv", dtype={"sample_id": str})
    val = pd.read_csv(run / "predictions" / "val_predictions.csv", dtype={"sample_id": str})
    assert sorted(results.sample_id) == sorted(val.sample_id)
    summary = json.loads((reports / "evaluation_summary.json").read_text())
    # re-predicting the held-out split from checkpoints/best reproduces the training run's number
    assert summary["smape"] == pytest.approx(metrics.smape(val.actual, val.price), rel=1e-3)
    by_bin = pd.read_csv(reports / "evaluation_by_bin.csv")
    assert by_bin["count"].sum() == len(results) and by_bin.price_bin.iloc[0].startswith("$")
    assert set(pd.read_csv(reports / "evaluation_by_range.csv").price_range) <= {"Low", "Medium", "High"}
    worst, best = pd.read_csv(reports / "worst_predictions.csv"), pd.read_csv(reports / "best_predictions.csv")
    assert len(worst) == len(best) == 20
    assert worst.smape.min() >= best.smape.max() and worst.smape.max() == pytest.approx(results.smape.max())
    for plot in ("pred_vs_actual.png", "smape_by_bin.png"):
        assert (run / "plots" / plot).stat().st_size > 1000


def test_predict_writes_one_positive_price_per_test_id(trained_run, sample_env):
    assert predict.main(trained_run["args"]) == 0
    out = pd.read_csv(trained_run["run_dir"] / "predictions" / "test_out.csv", dtype={"sample_id": str})
    test_ids = pd.read_csv(sample_env["test_csv"], dtype={"sample_id": str}).sample_id
    assert list(out.columns) == ["sample_id", "price"]
    assert out.sample_id.tolist() == test_ids.tolist() and np.isfinite(out.price).all() and (out.price > 0).all()
    truth = pd.read_csv(sample_env["test_labels"], dtype={"sample_id": str}).price
    assert metrics.smape(truth, out.price) < 0.6 * metrics.smape(truth, np.full(len(truth), truth.median()))
    # scoring the test predictions once labels exist, without touching the run's own held-out reports
    test_out = trained_run["run_dir"] / "predictions" / "test_out.csv"
    assert evaluate.main([*trained_run["args"], f"evaluate.predictions={test_out}",
                          f"evaluate.labels={sample_env['test_labels']}"]) == 0
    summary = json.loads((test_out.parent / "eval_test_out" / "reports" / "evaluation_summary.json").read_text())
    assert summary["n"] == 60 and summary["smape"] == pytest.approx(metrics.smape(truth, out.price), rel=1e-4)


def test_prediction_validation_rejects_bad_files(tmp_path):
    from common.cli import UserError

    with pytest.raises(UserError, match="not a positive finite number"):
        write_predictions(tmp_path / "p.csv", np.array(["a", "b"]), np.array([1.0, np.nan]))
    with pytest.raises(UserError, match=r"1 missing \(first \['c'\]\)"):
        write_predictions(tmp_path / "p.csv", np.array(["a", "b"]), np.array([1.0, 2.0]),
                          expected_ids=np.array(["a", "b", "c"]))
    with pytest.raises(UserError, match="more than once"):
        write_predictions(tmp_path / "p.csv", np.array(["a", "a"]), np.array([1.0, 2.0]))
    assert not (tmp_path / "p.csv").exists()


def test_fitted_weights_prefer_the_better_model():
    rng = np.random.default_rng(0)
    actual = np.exp(rng.normal(3, 1, 400))
    good, bad = actual * np.exp(rng.normal(0, 0.05, 400)), actual * np.exp(rng.normal(0, 0.8, 400))
    weights = fit_weights(np.column_stack([bad, good]), actual)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all() and weights[1] > 0.85


def test_gbt_and_ensembles(sample_env, trained_run, tmp_path):
    args = sample_env["args"](tmp_path, "run_name=trees", "gbt.folds=3", "gbt.max_iter=30", "gbt.pca_dims=8")
    assert gbt.main(args) == 0
    trees = tmp_path / "trees"
    oof = pd.read_csv(trees / "predictions" / "oof_predictions.csv", dtype={"sample_id": str})
    assert len(oof) == 240 and (oof.price > 0).all()
    summary = json.loads((trees / "reports" / "gbt_summary.json").read_text())
    median_smape = metrics.smape(oof.actual, np.full(len(oof), oof.actual.median()))
    assert summary["oof_smape"] < median_smape and summary["oof_smape_knn_only"] < median_smape
    assert evaluate.main([*args, "run_name=trees"]) == 0  # K-fold runs are scored from their OOF file

    fusion_test = trained_run["run_dir"] / "predictions" / "test_out.csv"
    if not fusion_test.exists():
        assert predict.main(trained_run["args"]) == 0
    inputs = f"ensemble.inputs=[{fusion_test},{trees / 'predictions' / 'test_out.csv'}]"
    assert ensemble.main([*args, inputs, f"ensemble.output={tmp_path / 'mean.csv'}"]) == 0
    mean = pd.read_csv(tmp_path / "mean.csv", dtype={"sample_id": str}).set_index("sample_id").price
    a = pd.read_csv(fusion_test, dtype={"sample_id": str}).set_index("sample_id").price
    b = pd.read_csv(trees / "predictions" / "test_out.csv", dtype={"sample_id": str}).set_index("sample_id").price
    np.testing.assert_allclose(mean.loc[a.index], (a + b.loc[a.index]) / 2, rtol=1e-5)

    # fitted weights on out-of-fold predictions of the same two models (trees OOF twice stands in for a 2nd model)
    oof_file = trees / "predictions" / "oof_predictions.csv"
    fitted = [*args, inputs, "ensemble.method=fitted", f"ensemble.oof_inputs=[{oof_file},{oof_file}]",
              f"ensemble.output={tmp_path / 'fitted.csv'}"]
    assert ensemble.main(fitted) == 0
    report = json.loads((tmp_path / "fitted.weights.json").read_text())
    assert sum(report["weights"]) == pytest.approx(1.0)
    assert report["oof_smape_fitted"] <= report["oof_smape_mean"] + 1e-6
    assert ensemble.main([*args, inputs, "ensemble.method=fitted", f"ensemble.oof_inputs=[{oof_file}]"]) == 2


def test_sample_data_cli_and_stage_list(tmp_path):
    assert sample_data.main([str(tmp_path / "s"), "--n-train", "20", "--n-test", "5"]) == 0
    train = pd.read_csv(tmp_path / "s" / "train.csv")
    assert list(train.columns) == ["sample_id", "catalog_content", "image_link", "price"] and len(train) == 20
    assert "price" not in pd.read_csv(tmp_path / "s" / "test.csv").columns
    out = subprocess.run([sys.executable, "-m", "price_fusion"], capture_output=True, text=True, check=True).stdout
    for stage in ("embed", "train", "evaluate", "predict", "ensemble", "gbt", "sample_data", "ikea"):
        assert f"python -m price_fusion.{stage}" in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(PriceFusionConfig, path)
    assert isinstance(cfg, PriceFusionConfig) and cfg.run_name
    assert len(cfg.train.tier_weights) == len(cfg.train.tier_edges) + 1


def test_shipped_config_list_is_complete():
    assert {p.name for p in CONFIGS} >= {"base.yaml", "demo.yaml", "moe.yaml", "ikea.yaml"}
