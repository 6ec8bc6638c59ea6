"""Prediction files: ``sample_id,price`` CSVs (plus ``actual`` for labelled splits), validated and written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.io import atomic_write, require_finite

# Predictions are clipped into this dollar range before writing: the challenge rejects non-positive prices,
# and exp() of an extreme log-price would otherwise overflow to inf.
MIN_PRICE, MAX_PRICE = 0.01, 1e7


def log_to_price(pred_log: np.ndarray) -> np.ndarray:
    """[N] log dollars -> [N] dollars in [MIN_PRICE, MAX_PRICE]; NaN stays NaN so `validate_predictions` catches it."""
    return np.clip(np.exp(np.clip(pred_log, np.log(MIN_PRICE), np.log(MAX_PRICE))), MIN_PRICE, MAX_PRICE)


def validate_predictions(sample_ids: np.ndarray, prices: np.ndarray, expected_ids: np.ndarray | None,
                         where: str) -> None:
    """Every expected id exactly once, every price positive and finite; `UserError` naming the first offender."""
    sample_ids = np.asarray(sample_ids).astype(str)
    dup = pd.Series(sample_ids).duplicated().to_numpy()
    if dup.any():
        raise UserError(f"{where}: sample_id {sample_ids[dup][0]!r} is predicted more than once")
    bad = ~np.isfinite(prices) | (prices <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise UserError(f"{where}: price {prices[first]!r} for sample_id {sample_ids[first]!r} is not a positive "
                        f"finite number ({int(bad.sum())} such rows)")
    if expected_ids is not None:
        expected = set(np.asarray(expected_ids).astype(str).tolist())
        got = set(sample_ids.tolist())
        missing, extra = sorted(expected - got), sorted(got - expected)
        if missing or extra:
            raise UserError(f"{where}: ids differ from the test CSV: {len(missing)} missing (first {missing[:5]}), "
                            f"{len(extra)} unexpected (first {extra[:5]})")


def write_predictions(path: str | Path, sample_ids: np.ndarray, prices: np.ndarray,
                      actual: np.ndarray | None = None, expected_ids: np.ndarray | None = None) -> Path:
    """Validate, then atomically write ``sample_id,price[,actual]``."""
    validate_predictions(sample_ids, prices, expected_ids, str(path))
    frame = pd.DataFrame({"sample_id": np.asarray(sample_ids).astype(str), "price": prices})
    if actual is not None:
        frame["actual"] = actual
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A prediction CSV with columns sample_id (str) and price (float); `UserError` if malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prediction file not found; expected a CSV with columns sample_id,price")
    frame = pd.read_csv(path, dtype={"sample_id": str})
    if not {"sample_id", "price"} <= set(frame.columns):
        raise UserError(f"{path}: expected columns sample_id,price; found {list(frame.columns)}")
    prices = pd.to_numeric(frame["price"], errors="coerce").to_numpy(dtype=float)
    require_finite(prices, path, row_ids=frame["sample_id"].astype(str).tolist(),
                   fix="every price must be a finite number; regenerate the prediction file")
    validate_predictions(frame["sample_id"].to_numpy(), prices, None, str(path))
    frame["price"] = prices
    return frame
