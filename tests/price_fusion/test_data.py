"""Catalogue reading, price validation, structural parsing and the stratified split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from price_fusion.data import (
    UNKNOWN_UNIT,
    fit_unit_vocab,
    grouped_folds,
    grouped_split,
    parse_structure,
    price_bins,
    read_catalog,
    structural_features,
)


@pytest.mark.parametrize("text, expected", [
    ("Item Name: Syrup, 24 FL OZ (Pack of 12)\nValue: 288.0\nUnit: Fl Oz\n", (288.0, "fl oz", 12)),
    ("Item Name: Batteries 8-count\nValue: 1,200\nUnit: Count", (1200.0, "count", 8)),
    ("Item Name: Tea IPQ: 3\nValue: .5\nUnit: Pound", (0.5, "pound", 3)),
    ("Item Name: no structure at all", (0.0, UNKNOWN_UNIT, 1)),
    ("Value: nan\nUnit: ???", (0.0, UNKNOWN_UNIT, 1)),
])
def test_parse_structure(text, expected):
    assert parse_structure(text) == expected


def test_unit_vocab_is_fitted_on_train_and_unknown_units_map_to_zero():
    train_texts = ["Value: 1\nUnit: Ounce", "Value: 2\nUnit: ounce", "Value: 3\nUnit: Count", "Value: 4\nUnit: Count",
                   "Value: 5\nUnit: Gram"]
    vocab = fit_unit_vocab(train_texts, min_count=2)
    assert vocab[0] == UNKNOWN_UNIT and set(vocab[1:]) == {"ounce", "count"}  # gram seen once: not in the vocabulary
    feats = structural_features(["Value: 7\nUnit: Count (Pack of 2)", "Value: 7\nUnit: Litre"], vocab)
    assert feats.shape == (2, 3) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:, 0], np.log1p(7.0), rtol=1e-6)
    assert feats[0, 1] == pytest.approx(vocab.index("count") / len(vocab)) and feats[1, 1] == 0.0
    np.testing.assert_allclose(feats[:, 2], np.log1p([2.0, 1.0]), rtol=1e-6)  # no pack given: 1


def _csv(tmp_path, prices, ids=None):
    n = len(prices)
    frame = pd.DataFrame({"sample_id": ids or [str(i) for i in range(n)], "catalog_content": ["x"] * n,
                          "image_link": [""] * n, "price": prices})
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    return path


def test_bad_prices_are_skipped_with_a_count(tmp_path, caplog):
    path = _csv(tmp_path, ["1.5", "", "abc", "0", "-3", "nan", "inf", "7"])
    catalog = read_catalog(path, require_price=True, bad_price="skip")
    assert catalog.sample_ids.tolist() == ["0", "7"]
    assert catalog.prices.tolist() == [1.5, 7.0]  # parsed from the CSV text, not computed: exact
    assert catalog.n_bad_prices == 6
    assert "skipped 6 row(s)" in caplog.text


def test_bad_price_error_names_the_row(tmp_path):
    path = _csv(tmp_path, ["1.5", "2", "-3"])
    with pytest.raises(UserError, match=r"row 4 \(sample_id 2\) has price '-3'.*data.bad_price=skip"):
        read_catalog(path, require_price=True, bad_price="error")


def test_duplicate_and_missing_columns_are_rejected(tmp_path):
    with pytest.raises(UserError, match="'1' appears more than once"):
        read_catalog(_csv(tmp_path, ["1", "2"], ids=["1", "1"]), require_price=True)
    pd.DataFrame({"sample_id": ["1"], "catalog_content": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match=r"missing column\(s\) \['price'\]"):
        read_catalog(tmp_path / "t.csv", require_price=True)
    with pytest.raises(UserError, match="not found"):
        read_catalog(tmp_path / "absent.csv", require_price=False)


def test_split_is_stratified_by_price_and_reproducible():
    prices = np.exp(np.random.default_rng(0).normal(3, 1, size=1000))
    train_idx, val_idx = grouped_split(prices, None, 0.2, 10, seed=1)  # no groups: every product its own
    assert len(val_idx) == 200 and len(np.intersect1d(train_idx, val_idx)) == 0
    bins = price_bins(prices, 10)
    # each price decile is 20% of the validation set (+-1 for rounding): that is what stratification buys
    assert np.all(np.abs(np.bincount(bins[val_idx]) - 20) <= 1)
    again = grouped_split(prices, None, 0.2, 10, seed=1)
    assert np.array_equal(again[1], val_idx)


def test_folds_partition_the_rows():
    prices = np.exp(np.random.default_rng(1).normal(3, 1, size=103))
    folds = grouped_folds(prices, None, 5, 10, seed=0)
    val = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(val), np.arange(103))
    for train_idx, val_idx in folds:
        assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == 103
