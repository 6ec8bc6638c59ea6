"""Catalogue CSV reading, price validation, structural features, product groups and the grouped, stratified split.

The challenge format: ``sample_id, catalog_content, image_link[, price]``. ``catalog_content`` holds the title,
bullet points and lines such as ``Value: 12.0`` / ``Unit: Fl Oz``; the pack size appears as ``(Pack of 6)`` or
``IPQ: 6`` in the text.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from common.errors import UserError

from .quantities import UNKNOWN_UNIT, parse_quantity, quantity_feature_names, quantity_features

log = logging.getLogger(__name__)

ID_COL, TEXT_COL, IMAGE_COL, PRICE_COL = "sample_id", "catalog_content", "image_link", "price"
STRUCT_NAMES = ("log1p_value", "unit_index", "log1p_pack_qty")

_VALUE_RE = re.compile(r"^\s*Value:\s*([-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+)", re.IGNORECASE | re.MULTILINE)
_UNIT_RE = re.compile(r"^\s*Unit:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_PACK_RES = (
    re.compile(r"\bpack\s+of\s+(\d+)", re.IGNORECASE),
    re.compile(r"\bIPQ:?\s*(\d+)", re.IGNORECASE),
    re.compile(r"\b(\d+)\s*[- ]?(?:pack|count|ct|pk)\b", re.IGNORECASE),
)
# Caps that keep one absurd parse ("Value: 1e12") from dominating the feature scale.
MAX_VALUE = 1e6
MAX_PACK = 1000


@dataclass
class Catalog:
    """A validated catalogue: ids, texts, image links, and prices in dollars (None for test data)."""

    sample_ids: np.ndarray  # [N] str
    texts: list[str]
    image_links: list[str]
    prices: np.ndarray | None  # [N] float64, > 0 and finite
    path: Path
    n_bad_prices: int = 0
    group_values: np.ndarray | None = None  # [N] str: the `group_column` of each row, when one was read


def _normalise_ids(values: pd.Series) -> np.ndarray:
    return values.astype(str).str.strip().to_numpy(dtype=str)


def read_catalog(path: str | Path, require_price: bool, bad_price: str = "skip", require_text: bool = True,
                 group_column: str = "") -> Catalog:
    """Read a challenge-format CSV.

    Prices that are empty, non-numeric, zero, negative, NaN or infinite are skipped with a logged count
    (``bad_price="skip"``) or raise `UserError` naming the first such row (``"error"``). Duplicate or empty
    sample ids always raise. `group_column` (``data.group_column``), when given, must exist and be non-empty in
    every row; its values become `Catalog.group_values`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: catalogue CSV not found; expected columns {ID_COL},{TEXT_COL},{IMAGE_COL}"
                        f"{',' + PRICE_COL if require_price else ''} (create one with python -m price_fusion.sample_data)")
    try:
        frame = pd.read_csv(path, dtype={ID_COL: str, PRICE_COL: str}, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc}); fix the file") from exc
    needed = [ID_COL] + ([TEXT_COL] if require_text else []) + ([PRICE_COL] if require_price else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}; "
                        f"expected {ID_COL},{TEXT_COL},{IMAGE_COL}{',' + PRICE_COL if require_price else ''}")
    ids = _normalise_ids(frame[ID_COL])
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise UserError(f"{path}: row {int(empty[0]) + 2} has an empty {ID_COL}; every row needs a unique id")
    dup = pd.Series(ids).duplicated()
    if dup.any():
        first = int(np.flatnonzero(dup.to_numpy())[0])
        raise UserError(f"{path}: row {first + 2}: {ID_COL} {str(ids[first])!r} appears more than once; ids must be unique")
    groups = None
    if group_column:
        if group_column not in frame.columns:
            raise UserError(f"{path}: data.group_column={group_column!r} is not a column (found {list(frame.columns)});"
                            " add the column or set data.group_column='' to group by the normalised product name")
        groups = frame[group_column].astype(str).str.strip().to_numpy(dtype=str)
        no_group = np.flatnonzero(groups == "")
        if len(no_group):
            raise UserError(f"{path}: row {int(no_group[0]) + 2} ({ID_COL} {ids[no_group[0]]}) has an empty "
                            f"{group_column!r} (data.group_column); give every row a group")
    texts = frame[TEXT_COL].astype(str).tolist() if TEXT_COL in frame.columns else [""] * len(frame)
    links = frame[IMAGE_COL].astype(str).tolist() if IMAGE_COL in frame.columns else [""] * len(frame)
    prices = None
    n_bad = 0
    if require_price:
        raw = frame[PRICE_COL].astype(str).str.strip()
        prices = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(prices) | (prices <= 0)
        n_bad = int(bad.sum())
        if n_bad:
            first = int(np.flatnonzero(bad)[0])
            where = f"{path}: row {first + 2} ({ID_COL} {ids[first]}) has price {raw.iloc[first]!r}"
            if bad_price == "error":
                raise UserError(f"{where}; expected a positive finite number; fix the row or set data.bad_price=skip")
            log.warning("%s: skipped %d row(s) with empty/non-numeric/zero/negative/NaN price (first: %s)",
                        path, n_bad, where)
            keep = ~bad
            ids, prices = ids[keep], prices[keep]
            texts = [t for t, k in zip(texts, keep) if k]
            links = [t for t, k in zip(links, keep) if k]
            groups = None if groups is None else groups[keep]
        if len(ids) == 0:
            raise UserError(f"{path}: no row has a valid price; expected positive numbers in column {PRICE_COL}")
    return Catalog(ids, texts, links, prices, path, n_bad, groups)


# ----------------------------------------------------------------------------------------------- structural features
def _normalise_unit(unit: str) -> str:
    unit = re.sub(r"\(.*?\)", " ", unit.lower())  # "Count (Pack of 2)" -> "count"
    return " ".join(re.sub(r"[^a-z0-9 ]+", "", unit).split()) or UNKNOWN_UNIT


def parse_structure(text: str) -> tuple[float, str, int]:
    """Return (value, unit, item pack quantity) parsed from ``catalog_content``; (0.0, "<unk>", 1) when absent."""
    value = 0.0
    if match := _VALUE_RE.search(text):
        try:
            value = float(match.group(1).replace(",", ""))
        except ValueError:
            value = 0.0
    if not math.isfinite(value) or value < 0:
        value = 0.0
    unit = _normalise_unit(match.group(1)) if (match := _UNIT_RE.search(text)) else UNKNOWN_UNIT
    pack = 1
    for pattern in _PACK_RES:
        if match := pattern.search(text):
            pack = max(1, min(int(match.group(1)), MAX_PACK))
            break
    return min(value, MAX_VALUE), unit, pack


def fit_unit_vocab(texts: list[str], min_count: int = 2, structural: str = "legacy") -> list[str]:
    """Units seen at least `min_count` times in the training texts, most frequent first; index 0 is unknown.
    `structural` (data.structural) says whose unit words: legacy (the ``Unit:`` line as written) or quantities
    (`parse_quantity`'s unit category, e.g. "fl oz" for "Fl. Oz" and "fluid ounces")."""
    units = ((parse_quantity(t).unit for t in texts) if structural == "quantities"
             else (parse_structure(t)[1] for t in texts))
    counts = Counter(units)
    counts.pop(UNKNOWN_UNIT, None)
    kept = sorted((u for u, c in counts.items() if c >= min_count), key=lambda u: (-counts[u], u))
    return [UNKNOWN_UNIT, *kept]


def save_unit_vocab(vocab: list[str], path: Path, structural: str = "legacy") -> None:
    from common.logs import write_json

    write_json(path, {"units": vocab, "structural": structural})


def load_unit_vocab(path: Path, structural: str = "legacy") -> list[str]:
    """The vocabulary `embed` fitted on train; raises `UserError` when it is absent or was fitted under another
    data.structural (a file without the key is legacy)."""
    if not path.is_file():
        raise UserError(f"{path}: unit vocabulary not found; run `python -m price_fusion.embed` with the train split "
                        "first (the vocabulary is fitted on train only)")
    saved = json.loads(path.read_text())
    if saved.get("structural", "legacy") != structural:
        raise UserError(f"{path}: fitted with data.structural={saved.get('structural', 'legacy')} but the config says "
                        f"data.structural={structural}; embed the train split again (embed.splits=[train,test]) or "
                        f"set data.structural={saved.get('structural', 'legacy')}")
    return list(saved["units"])


def struct_feature_names(vocab: list[str], structural: str) -> list[str]:
    """Column names of `structural_features`."""
    return quantity_feature_names(vocab) if structural == "quantities" else list(STRUCT_NAMES)


def structural_features(texts: list[str], vocab: list[str], structural: str = "legacy") -> np.ndarray:
    """The structural features of `texts` under data.structural: quantities -> `quantities.quantity_features`
    ([N, 13 + len(vocab)], the unit one-hot); legacy -> [N, 3] float32: log1p(value) whatever its unit, unit index /
    len(vocab) (0 = unknown unit; an ordinal of frequency rank, kept to reproduce the original), log1p(pack quantity).
    """
    if structural == "quantities":
        return quantity_features(texts, vocab)
    index = {u: i for i, u in enumerate(vocab)}
    out = np.zeros((len(texts), len(STRUCT_NAMES)), dtype=np.float32)
    for row, text in enumerate(texts):
        value, unit, pack = parse_structure(text)
        out[row] = (math.log1p(value), index.get(unit, 0) / len(vocab), math.log1p(pack))
    return out


# ------------------------------------------------------------------------------------------------------------ groups
_NAME_RE = re.compile(r"^\s*Item Name:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_SIZE_WORDS = (r"fl\.? oz|fluid ounces?|ounces?|oz|pounds?|lbs?|grams?|kg|g|mg|ml|millilit(?:er|re)s?|lit(?:er|re)s?|l|"
               r"gallons?|gal|quarts?|qt|cm|mm|m|inch(?:es)?|in|feet|ft|counts?|ct|packs?|pk|pieces?|pcs|sheets?")
_SIZE_RE = re.compile(rf"\d[\d.,/x×-]*\s*(?:(?:{_SIZE_WORDS})\b)?", re.IGNORECASE)
_PACKAGING_RE = re.compile(r"\b(?:pack|set|case|box|bundle)\s+of\b|\bvalue pack\b", re.IGNORECASE)


def normalised_name(text: str) -> str:
    """The product-family key of a catalogue text: its ``Item Name:`` line (else the first line), lower-cased, with
    parenthesised parts, numbers with their size / count units ("16 Ounce", "51x51 cm", "Pack of 6") and punctuation
    removed. Variants that differ only in size or pack share the key; "" when nothing is left."""
    match = _NAME_RE.search(text)
    name = match.group(1) if match else (text.strip().splitlines() or [""])[0]
    name = re.sub(r"\(.*?\)", " ", name.lower())
    name = _PACKAGING_RE.sub(" ", _SIZE_RE.sub(" ", name))
    return " ".join(re.sub(r"[^a-z]+", " ", name).split())


def product_groups(catalog: Catalog, group_key: str) -> np.ndarray:
    """[N] str group of each product: `catalog.group_values` when a group column was read, else by `group_key`:
    "name" (`normalised_name`; a text with no name left is its own group) or "none" (every product its own group)."""
    if catalog.group_values is not None:
        return catalog.group_values
    if group_key == "none":
        return np.asarray([f"id:{s}" for s in catalog.sample_ids], dtype=str)
    keys = [normalised_name(t) for t in catalog.texts]
    return np.asarray([f"name:{k}" if k else f"id:{s}" for k, s in zip(keys, catalog.sample_ids)], dtype=str)


# ------------------------------------------------------------------------------------------------------------ splits
def price_bins(prices: np.ndarray, n_bins: int) -> np.ndarray:
    """[N] int: quantile bin of log price, merged so every bin has at least 2 members (StratifiedKFold needs it)."""
    n_bins = max(1, min(n_bins, len(prices) // 2))
    edges = np.quantile(np.log(prices), np.linspace(0, 1, n_bins + 1)[1:-1])
    bins = np.searchsorted(np.unique(edges), np.log(prices), side="right")
    counts = np.bincount(bins)
    while (counts[counts > 0] < 2).any() and len(np.unique(bins)) > 1:
        small = int(np.flatnonzero((counts > 0) & (counts < 2))[0])
        others = np.flatnonzero(counts > 0)
        target = others[others != small][np.argmin(np.abs(others[others != small] - small))]
        bins[bins == small] = target
        counts = np.bincount(bins)
    return bins


def _group_table(prices: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(group index of each row [N], median log price of each group [G]); no groups = every row its own group."""
    if groups is None:
        return np.arange(len(prices)), np.log(prices)
    _, row_group = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    group_log_price = pd.Series(np.log(prices)).groupby(row_group).median().to_numpy()
    return row_group, group_log_price


def grouped_split(prices: np.ndarray, groups: np.ndarray | None, val_fraction: float, n_bins: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_index, val_index), sorted: whole groups go to one side, `val_fraction` of the groups to val, stratified
    by the groups' median-price bins (sklearn train_test_split over groups).

    The number of bins shrinks with the data so every bin has 2 groups and both sides can hold one of each (a fixed
    10 bins made sklearn fail under about 50 rows). Raises `UserError` when there are fewer than 2 groups."""
    row_group, group_log_price = _group_table(prices, groups)
    n_groups = len(group_log_price)
    if n_groups < 2:
        raise UserError(f"{len(prices)} products in {n_groups} group(s): a validation split needs at least 2 groups; "
                        "add products, or split finer with data.group_key=none or another data.group_column")
    n_val = max(1, min(n_groups - 1, math.ceil(val_fraction * n_groups)))
    bins = price_bins(np.exp(group_log_price), max(1, min(n_bins, n_val, n_groups - n_val)))
    train_groups, val_groups = train_test_split(np.arange(n_groups), test_size=n_val, random_state=seed,
                                                stratify=bins if len(np.unique(bins)) > 1 else None)
    is_val = np.isin(row_group, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def grouped_folds(prices: np.ndarray, groups: np.ndarray | None, k: int, n_bins: int,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train_index, val_index) pairs whose val parts partition the rows and never split a group, stratified by the
    groups' median-price bins (sklearn StratifiedKFold over groups; StratifiedGroupKFold took 68 s on 75k one-row
    groups, this takes milliseconds and is the same thing there). Raises `UserError` when there are fewer than K
    groups."""
    row_group, group_log_price = _group_table(prices, groups)
    n_groups = len(group_log_price)
    if n_groups < k:
        raise UserError(f"{len(prices)} products in {n_groups} group(s): {k} folds need at least {k} groups; lower the "
                        "number of folds (train.kfold / gbt.folds / baselines.folds) or split finer (data.group_key)")
    bins = price_bins(np.exp(group_log_price), n_bins)
    if np.bincount(bins)[np.bincount(bins) > 0].min() < k:
        bins = price_bins(np.exp(group_log_price), max(1, n_groups // (2 * k)))
    if np.bincount(bins).max() < k:  # too few groups to stratify at all
        bins = np.zeros(n_groups, dtype=int)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for _, val_groups in folds.split(np.zeros(n_groups), bins):
        is_val = np.isin(row_group, val_groups)
        out.append((np.flatnonzero(~is_val), np.flatnonzero(is_val)))
    return out
