"""Grouped splits, honest K-fold (inner early stopping, refit), the baselines stage and the recommended blend."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from learning_seed import seed_args
from sklearn.neighbors import KNeighborsRegressor

from common import metrics
from common.errors import UserError
from price_fusion import baselines, ensemble, gbt, predict, train
from price_fusion.batching import load_split, predict_log_price
from price_fusion.data import grouped_folds, grouped_split, normalised_name, product_groups, read_catalog
from price_fusion.ensemble import fit_weights
from price_fusion.model import load_trained_model
from studies.price_fusion.ikea import group_bootstrap_ci

KFOLD = 3


@pytest.mark.parametrize("text, key", [
    ("Item Name: Classic Ground Coffee, 16 Ounce (Pack of 2)\nValue: 16.0", "classic ground coffee"),
    ("Item Name: Classic Ground Coffee, 32 Ounce\nValue: 32.0", "classic ground coffee"),
    ("Item Name: Syrup, 24 FL OZ (Pack of 12)", "syrup"),
    ("Item Name: BILLY Bookcase, 80x28x202 cm, white", "billy bookcase white"),
    ("Value pack 12-count AA batteries", "aa batteries"),  # no Item Name line: the first line
    ("Item Name: 250 ml", ""),
])
def test_normalised_name(text, key):
    assert normalised_name(text) == key


def test_groups_from_name_column_or_none(tmp_path, capsys):
    frame = pd.DataFrame({"sample_id": ["1", "2", "3"], "catalog_content": ["Item Name: Tea, 8 Count", "Item Name: Tea, "
                          "16 Count", "Item Name: 5 oz"], "image_link": "", "price": [1.0, 2.0, 3.0],
                          "family": ["a", "b", "b"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    catalog = read_catalog(tmp_path / "t.csv", require_price=True)
    assert product_groups(catalog, "name").tolist() == ["name:tea", "name:tea", "id:3"]  # nothing left: own group
    assert product_groups(catalog, "none").tolist() == ["id:1", "id:2", "id:3"]
    with_column = read_catalog(tmp_path / "t.csv", require_price=True, group_column="family")
    assert product_groups(with_column, "name").tolist() == ["a", "b", "b"]
    with pytest.raises(UserError, match=r"t.csv: data.group_column='colour' is not a column"):
        read_catalog(tmp_path / "t.csv", require_price=True, group_column="colour")
    frame.loc[1, "family"] = ""
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match=r"t.csv: row 3 \(sample_id 2\) has an empty 'family'"):
        read_catalog(tmp_path / "t.csv", require_price=True, group_column="family")


@pytest.mark.parametrize("n", [3, 4, 7, 12, 25, 49])
def test_small_data_splits_without_crashing_and_keeps_groups_whole(n):
    rng = np.random.default_rng(n)
    prices = np.exp(rng.normal(3, 1, n))
    groups = np.array([f"g{i // 2}" for i in range(n)])  # pairs of variants (the last one alone when n is odd)
    fit, val = grouped_split(prices, groups, 0.2, 10, seed=0)
    n_groups = len(np.unique(groups))
    assert len(val) and len(fit) and np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(n))
    assert not set(groups[fit]) & set(groups[val])
    assert len(np.unique(groups[val])) == max(1, min(n_groups - 1, int(np.ceil(0.2 * n_groups))))
    if n_groups >= 2:
        folds = grouped_folds(prices, groups, 2, 10, seed=0)
        assert np.array_equal(np.sort(np.concatenate([v for _, v in folds])), np.arange(n))
        assert all(not set(groups[a]) & set(groups[b]) for a, b in folds)
    with pytest.raises(UserError, match=f"{n_groups + 1} folds need at least {n_groups + 1} groups"):
        grouped_folds(prices, groups, n_groups + 1, 10, seed=0)


def test_one_group_cannot_be_split():
    with pytest.raises(UserError, match="needs at least 2 groups"):
        grouped_split(np.ones(5), np.array(["a"] * 5), 0.2, 10, seed=0)


def test_group_bootstrap_resamples_groups():
    rng = np.random.default_rng(0)
    truth, pred = np.exp(rng.normal(3, 1, 30)), np.exp(rng.normal(3, 1, 30))
    groups = np.repeat([f"g{i}" for i in range(10)], 3)
    low, high = group_bootstrap_ci(truth, pred, groups, n_boot=200, seed=1)
    # the same resamples drawn here: group indices, then every row of each drawn group
    draws = np.random.default_rng(1).integers(0, 10, size=(200, 10))
    stats = [metrics.smape(truth[np.concatenate([np.arange(3 * g, 3 * g + 3) for g in d])],
                           pred[np.concatenate([np.arange(3 * g, 3 * g + 3) for g in d])]) for d in draws]
    assert [low, high] == pytest.approx(list(np.quantile(stats, [0.025, 0.975])), rel=1e-9)
    # paired: SMAPE(pred) - SMAPE(reference) on the same resampled groups
    reference = truth * 1.1
    diffs = [metrics.smape(truth[rows], pred[rows]) - metrics.smape(truth[rows], reference[rows])
             for rows in (np.concatenate([np.arange(3 * g, 3 * g + 3) for g in d]) for d in draws)]
    assert group_bootstrap_ci(truth, pred, groups, n_boot=200, seed=1, reference=reference) == pytest.approx(
        list(np.quantile(diffs, [0.025, 0.975])), rel=1e-9)


def test_fitted_weights_are_never_worse_than_the_best_input():
    rng = np.random.default_rng(0)
    actual = np.exp(rng.normal(3, 1, 300))
    # an exact model among two noisy ones: only w = (1, 0, 0) reaches SMAPE 0
    prices = np.column_stack([actual, actual * np.exp(rng.normal(0, 0.5, 300)), actual * 2.0])
    w = fit_weights(prices, actual)
    assert metrics.smape(actual, prices @ w) <= 1e-9 and w[0] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def kfold_run(sample_env, tmp_path_factory, learning_seed):
    runs = tmp_path_factory.mktemp("pf_kfold_refit")
    args = sample_env["args"](runs, "run_name=k", f"train.kfold={KFOLD}", "train.epochs=20", "train.patience=6",
                              "train.refit=true", *seed_args("train.seed", learning_seed))
    assert train.main(args) == 0
    assert predict.main(args) == 0
    return {"runs": runs, "run_dir": runs / "k", "args": args}


def test_kfold_early_stops_on_an_inner_split_never_on_its_out_of_fold_rows(kfold_run, sample_env):
    run = kfold_run["run_dir"]
    split = json.loads((run / "split.json").read_text())
    catalog, data = load_split(sample_env["embeddings"], "train", sample_env["train_csv"], labelled=True)
    groups = product_groups(catalog, "name")
    oof = pd.read_csv(run / "predictions" / "oof_predictions.csv", dtype={"sample_id": str}).set_index("sample_id")
    for k in range(KFOLD):
        held_out = np.isin(catalog.sample_ids, split["val_ids"][k])
        stop = np.isin(catalog.sample_ids, split["early_stopping_ids"][k])
        fit = ~held_out & ~stop
        assert stop.sum() and not (stop & held_out).any()
        # no group on two sides: fit / early stopping / out-of-fold
        assert not set(groups[fit]) & set(groups[stop]) and not set(groups[held_out]) & set(groups[fit | stop])
        model, _ = load_trained_model(run / f"fold_{k}" / "checkpoints" / "best")
        done = json.loads((run / f"fold_{k}" / "done.json").read_text())
        # the best checkpoint was chosen on the early-stopping rows: its SMAPE there is the recorded best ...
        stop_pred = np.exp(predict_log_price(model, data.subset(np.flatnonzero(stop))))
        assert metrics.smape(catalog.prices[stop], stop_pred) == pytest.approx(done["best_val_smape"], rel=1e-4)
        # ... and the out-of-fold file holds that model's predictions of the fold's held-out rows
        held_pred = np.exp(predict_log_price(model, data.subset(np.flatnonzero(held_out))))
        np.testing.assert_allclose(oof.loc[catalog.sample_ids[held_out], "price"], held_pred, rtol=1e-5)
    assert sorted(oof.index) == sorted(catalog.sample_ids)


def test_refit_uses_every_row_for_the_median_best_epoch_and_predict_uses_it(kfold_run, sample_env):
    run = kfold_run["run_dir"]
    best = [json.loads((run / f"fold_{k}" / "done.json").read_text())["best_epoch"] for k in range(KFOLD)]
    history = json.loads((run / "refit" / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, int(np.median(best)) + 1))
    assert "val_smape" not in history[0]  # no held-out rows
    meta = json.loads((run / "refit" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["epoch"] == int(np.median(best))
    _, test_data = load_split(sample_env["embeddings"], "test", sample_env["test_csv"], labelled=False)
    refit_model, _ = load_trained_model(run / "refit" / "checkpoints" / "latest")
    test_out = pd.read_csv(run / "predictions" / "test_out.csv", dtype={"sample_id": str})
    np.testing.assert_allclose(test_out.price, np.exp(predict_log_price(refit_model, test_data)), rtol=1e-5)


@pytest.mark.learning
def test_baselines_stage_and_the_recommended_blend_beat_the_best_baseline(kfold_run, sample_env, tmp_path,
                                                                       learning_seed):
    args = sample_env["args"](tmp_path, "run_name=b", f"baselines.folds={KFOLD}", "baselines.cv_folds=3",
                              "baselines.num_threads=1")
    assert baselines.main(args) == 0
    summary = json.loads((tmp_path / "b" / "reports" / "baselines_summary.json").read_text())
    catalog, data = load_split(sample_env["embeddings"], "train", sample_env["train_csv"], labelled=True)
    folds = grouped_folds(catalog.prices, product_groups(catalog, "name"), KFOLD, 10, 42)
    split = json.loads((tmp_path / "b" / "split.json").read_text())
    assert [sorted(v) for v in split["val_ids"]] == [sorted(catalog.sample_ids[v]) for _, v in folds]
    oof = {m: pd.read_csv(tmp_path / "b" / m / "predictions" / "oof_predictions.csv", dtype={"sample_id": str})
           for m in ("median", "knn", "ridge")}
    fit_rows, held_out = folds[1]
    # median: the fold's training median; kNN: refitted here with the parameters the fold chose
    np.testing.assert_allclose(oof["median"].price[held_out], np.median(catalog.prices[fit_rows]), rtol=1e-5)
    knn = KNeighborsRegressor(metric="cosine", algorithm="brute", **summary["knn"]["fold_params"][1])
    knn.fit(data.text.numpy()[fit_rows].astype(np.float64), np.log(catalog.prices[fit_rows]))
    np.testing.assert_allclose(oof["knn"].price[held_out], np.exp(knn.predict(data.text.numpy()[held_out])), rtol=1e-5)
    for m in oof:
        assert summary[m]["oof_smape"] == pytest.approx(metrics.smape(oof[m].actual, oof[m].price), rel=1e-6)

    trees = sample_env["args"](tmp_path, "run_name=t", f"gbt.folds={KFOLD}", "gbt.max_iter=30", "gbt.pca_dims=8",
                               *seed_args("train.seed", learning_seed))
    assert gbt.main(trees) == 0
    dirs = [kfold_run["run_dir"] / "predictions", tmp_path / "t" / "predictions",
            *(tmp_path / "b" / m / "predictions" for m in ("median", "knn", "ridge"))]
    out = tmp_path / "recommended.csv"
    assert ensemble.main([*args, "ensemble.method=fitted", f"ensemble.output={out}",
                          f"ensemble.inputs=[{','.join(str(d / 'test_out.csv') for d in dirs)}]",
                          f"ensemble.oof_inputs=[{','.join(str(d / 'oof_predictions.csv') for d in dirs)}]"]) == 0
    report = json.loads(out.with_suffix(".weights.json").read_text())
    best = min(report["oof_smape_per_model"])
    assert report["oof_smape_fitted"] <= best and report["oof_smape_blend"] <= best
    # a blend gaining less than ensemble.min_gain (0.5) points out of fold gives way to the best input alone
    assert report["blend_kept"] == (report["oof_smape_blend"] <= best - 0.5)
    if not report["blend_kept"]:
        # the fallback writes exact one-hot weights (not fitted numbers): exact
        assert report["weights"] == np.eye(5)[int(np.argmin(report["oof_smape_per_model"]))].tolist()
    truth = pd.read_csv(sample_env["test_labels"], dtype={"sample_id": str}).set_index("sample_id").price

    def test_smape(path):
        pred = pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id").price
        return metrics.smape(truth.to_numpy(), pred.loc[truth.index].to_numpy())

    best_baseline = min(test_smape(tmp_path / "b" / m / "predictions" / "test_out.csv") for m in oof)
    # measured test SMAPE, own seed / 1 / 2 / 3 (OMP_NUM_THREADS=1): recommended 24.96 / 25.80 / 26.71 / 24.69; the
    # baselines do not depend on train.seed: median 71.38, kNN 57.23, ridge 27.56. Beating ridge on 60 test products
    # is within seed noise (0.85 points on seed 2), so the claim is: within 5% of the best baseline (a blend of the
    # wrong columns or rows lands near kNN / trees, 42-57)
    assert test_smape(out) <= 1.05 * best_baseline, (test_smape(out), best_baseline, report)
    # the K-fold fusion run (refit model) learned: 25.47 / 27.57 / 31.11 / 27.13 = 0.36-0.44 of the median's 71.38
    median_baseline = test_smape(tmp_path / "b" / "median" / "predictions" / "test_out.csv")
    assert test_smape(dirs[0] / "test_out.csv") < 0.6 * median_baseline, (test_smape(dirs[0] / "test_out.csv"),
                                                                          median_baseline)


def test_predict_checks_the_written_ids_against_the_test_csv(trained_run, monkeypatch, capsys):
    real = predict.load_split

    def drop_last_row(*a, **k):  # embeddings that silently lost a product
        catalog, data = real(*a, **k)
        return catalog, data.subset(np.arange(len(data) - 1))

    monkeypatch.setattr(predict, "load_split", drop_last_row)
    out = trained_run["run_dir"] / "predictions" / "dropped.csv"
    assert predict.main([*trained_run["args"], f"predict.output={out}"]) == 2
    assert "ids differ from the test CSV: 1 missing (first ['200059'])" in capsys.readouterr().err
    assert not out.exists()


def test_renamed_loss_names_its_new_name(sample_env, tmp_path, capsys):
    assert train.main(sample_env["args"](tmp_path, "train.loss=log_smape")) == 2
    assert "train.loss=log_smape is now called smape" in capsys.readouterr().err
