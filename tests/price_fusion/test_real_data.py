"""Real data: the IKEA SA 2020 catalogue (../shared/data/products_ikea, via REAL_DATA_DIR), text only.

The full benchmark (2,962 products; the table in studies/price_fusion/RESULTS.md) takes several minutes; this runs the same
stage on a 400-product subset with 2 folds and fewer epochs, where the fusion model is not expected to beat the tuned baselines.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from learning_seed import seed_args

from common import metrics
from studies.price_fusion import ikea

pytestmark = pytest.mark.real_data


def test_ikea_catalog_conversion(real_data_dir):
    frame = ikea.ikea_catalog(real_data_dir / "products_ikea" / "ikea_sa_2020.csv")
    assert frame.sample_id.is_unique and len(frame) == 2962 and frame.attrs["rows_in_file"] == 3694  # one per item_id
    assert list(frame.columns) == ["sample_id", "catalog_content", "image_link", "price", "name"]
    assert frame.name.nunique() == 607  # the product families the test split keeps whole
    assert (frame.price > 0).all() and frame.price.max() == 9585
    first = frame.catalog_content.iloc[0]
    assert first.startswith("Item Name: FREKVENS, Bar table, in/outdoor, 51x51 cm") and "Value: 51\nUnit: cm" in first
    assert not frame.catalog_content.str.contains("old price", case=False).any()  # no price leak in the text


@pytest.mark.learning
def test_ikea_benchmark_small(real_data_dir, tmp_path, monkeypatch, repo_root, learning_seed):
    monkeypatch.setenv("REAL_DATA_DIR", str(real_data_dir))
    argv = ["--config", str(repo_root / "configs" / "price_fusion" / "ikea.yaml"), f"runs_dir={tmp_path}",
            "ikea.max_products=400", "ikea.kfold=2", "train.epochs=20", "train.patience=8", "gbt.max_iter=40",
            "baselines.cv_folds=3", "baselines.knn_ks=[1,5,20]", *seed_args("train.seed", learning_seed)]
    assert ikea.main(argv) == 0
    report = json.loads((tmp_path / "ikea" / "reports" / "ikea_results.json").read_text())
    train_csv = pd.read_csv(tmp_path / "ikea" / "data" / "train.csv", dtype={"sample_id": str, "group": str})
    truth = pd.read_csv(tmp_path / "ikea" / "data" / "test_labels.csv", dtype={"sample_id": str, "group": str})
    # the test split keeps IKEA names whole: no test product shares its name with a training product
    assert not set(truth.group) & set(train_csv.group) and report["test_share_with_name_in_train"] == 0.0
    assert report["n_train"] + report["n_test"] == 400 and report["n_test"] == len(truth)
    results = {r["key"]: r for r in report["results"]}
    assert list(results) == ["median", "knn", "ridge", "gbt", "fusion", "fusion_kfold", "recommended"]
    for r in results.values():  # every row scored here again, with its interval over test names
        pred = pd.read_csv(r["file"], dtype={"sample_id": str}).set_index("sample_id").price.loc[truth.sample_id]
        assert r["smape"] == pytest.approx(metrics.smape(truth.price.to_numpy(), pred.to_numpy()), rel=1e-6)
        assert r["smape_ci95"] == pytest.approx(ikea.group_bootstrap_ci(truth.price.to_numpy(), pred.to_numpy(),
                                                                        truth.group.to_numpy(str)), rel=1e-9)
    # A network that failed to learn would sit near the median baseline (~90%). measured fusion_kfold test SMAPE, own
    # seed / 1 / 2 / 3 (OMP_NUM_THREADS=1): 65.8 / 68.9 / 68.3 / 68.7 = 0.70 / 0.73 / 0.72 / 0.73 of the median's 94.3
    assert results["fusion_kfold"]["smape"] < 0.85 * results["median"]["smape"], results
    # the blend is fitted on honest out-of-fold predictions: there it is never worse than any single method
    oof = {k: r["oof_smape"] for k, r in results.items() if r["oof_smape"] is not None}
    assert oof["recommended"] <= min(v for k, v in oof.items() if k != "recommended")
    assert report["recommended_at_or_below_best_baseline"] == (
        results["recommended"]["smape"] <= min(results[k]["smape"] for k in ("median", "knn", "ridge")))
    # the Markdown table RESULTS.md quotes: one row per method, labels filled from what this run chose
    rows = (tmp_path / "ikea" / "reports" / "ikea_results.md").read_text().splitlines()
    done = json.loads((tmp_path / "ikea" / "done.json").read_text())
    assert len(rows) == 2 + 7 + 1 + 2 + 7 and rows[6].startswith(f"| **fusion two_branch** (weighted_smape, {done['epochs']} epochs")
    assert f"| **{results['fusion']['smape']:.2f}** |" in rows[6]
    assert f"k={results['knn']['method'].split('k=')[1].split()[0]}" in rows[3]
    diff = report["paired_smape_difference_ci95"]["fusion_kfold_minus_knn"]
    assert diff[0] == pytest.approx(results["fusion_kfold"]["smape"] - results["knn"]["smape"], rel=1e-9)
    assert f"| fusion_kfold - knn | {diff[0]:+.2f} | {diff[1]:+.1f} to {diff[2]:+.1f} |" in rows

    # the variants table (studies/price_fusion/ikea_extras.sh) on this run's split, each row scored here again
    assert ikea.main([*argv, "ikea.extras=true", "train.epochs=4"]) == 0
    extras = json.loads((tmp_path / "ikea" / "reports" / "ikea_extras.json").read_text())
    assert [r["key"] for r in extras["results"]] == ["advanced_moe", "mean3"]
    for row in extras["results"]:
        pred = pd.read_csv(row["file"], dtype={"sample_id": str}).set_index("sample_id").price.loc[truth.sample_id]
        assert row["smape"] == pytest.approx(metrics.smape(truth.price.to_numpy(), pred.to_numpy()), rel=1e-6)
    assert (tmp_path / "ikea" / "reports" / "ikea_extras.md").read_text().count("\n") == 2 + 2
