"""Quantities in catalogue text: amount x unit x pack, normalised to canonical units (``data.structural=quantities``).

    >>> parse_quantity("Item Name: Olive oil, 2 x 500 ml")
    Quantity(amount=500.0, unit='milliliter', dimension='volume', pack=2, total=1000.0)

Canonical units: mass in grams, volume in millilitres, length in centimetres, count in items. The catalogue's unit
words ("Fl Oz", "lbs", "Count", "cm") map to pint unit names through `UNIT_ALIASES`; pint (a units library) gives the
conversion factor and the dimension, so no conversion constant is typed in here. Where the quantity comes from:

1. the structured lines ``Value: 12.0`` / ``Unit: Fl Oz`` of the challenge format, else
2. the first "<number> <unit>" in the ``Item Name:`` line, else anywhere in the text ("2 x 500 g" is 2 packs of 500 g).

The pack (number of packages): "Pack of 6", "6-Pack", "Case of 6", "IPQ: 6", "Item Package Quantity: 6", the "2 x" of
"2 x 500 g", and "12 Count" when the quantity itself is a mass, volume or length (12 K-cups of 0.4 oz). In the
challenge data ``Value`` is often already the total of the pack ("12 Fl Oz (Pack of 6)" with ``Value: 72.0``): when the
title's own size times the pack equals ``Value`` (within 1 %; in canonical units or as written, since titles say
"12 Ounce" where the ``Unit:`` line says "Fl Oz"), one item's amount is ``Value`` / pack.

An object's sizes (`parse_extents`: "width 51 cm, depth 30 cm, height 99 cm", "140x80 cm") are read beside the
quantity, in centimetres: furniture is priced by its extent more than by one length.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

DIMENSIONS = ("mass", "volume", "length", "count")
NO_DIMENSION = "none"
CANONICAL_UNITS = {"mass": "gram", "volume": "milliliter", "length": "centimeter"}
COUNT = "count"
# Catalogue unit word (lower case, dots removed, single spaces) -> pint unit name, or "count" for item counts.
UNIT_ALIASES = {
    **dict.fromkeys(("fl oz", "floz", "fluid ounce", "fluid ounces", "fl ounce", "fl ounces"), "fluid_ounce"),
    **dict.fromkeys(("oz", "ounce", "ounces"), "ounce"),
    **dict.fromkeys(("lb", "lbs", "pound", "pounds"), "pound"),
    **dict.fromkeys(("g", "gr", "gram", "grams", "gramm"), "gram"),
    **dict.fromkeys(("kg", "kilo", "kilogram", "kilograms"), "kilogram"),
    **dict.fromkeys(("mg", "milligram", "milligrams"), "milligram"),
    **dict.fromkeys(("ml", "milliliter", "milliliters", "millilitre", "millilitres"), "milliliter"),
    **dict.fromkeys(("cl", "centiliter", "centilitre"), "centiliter"),
    **dict.fromkeys(("l", "liter", "liters", "litre", "litres", "ltr"), "liter"),
    **dict.fromkeys(("gal", "gallon", "gallons"), "gallon"),
    **dict.fromkeys(("qt", "quart", "quarts"), "quart"),
    **dict.fromkeys(("pint", "pints"), "pint"),
    **dict.fromkeys(("cup", "cups"), "cup"),
    **dict.fromkeys(("mm", "millimeter", "millimeters", "millimetre", "millimetres"), "millimeter"),
    **dict.fromkeys(("cm", "centimeter", "centimeters", "centimetre", "centimetres"), "centimeter"),
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), "meter"),
    **dict.fromkeys(("inch", "inches"), "inch"),
    **dict.fromkeys(("ft", "foot", "feet"), "foot"),
    **dict.fromkeys(("yd", "yard", "yards"), "yard"),
    **dict.fromkeys(("count", "counts", "ct", "each", "piece", "pieces", "pc", "pcs", "sheet", "sheets", "capsule",
                     "capsules", "tablet", "tablets", "bags"), COUNT),
}
# Words that are units only on a ``Unit:`` line: in free text "2 in 1" and "4 ea" are not quantities.
UNIT_LINE_ALIASES = {**UNIT_ALIASES, "in": "inch", "ea": COUNT, "unit": COUNT, "units": COUNT}
UNKNOWN_UNIT = "<unk>"
# The category of a unit: spellings of one unit share it ("Fl. Oz", "fluid ounces" -> "fl oz"; "lbs" -> "pound";
# "ct", "pieces" -> "count").
UNIT_CATEGORY = {u: {"fluid_ounce": "fl oz"}.get(n, n) for u, n in UNIT_LINE_ALIASES.items()}
# Longest first, so "fl oz" wins over "oz" and "fluid ounces" over "fluid ounce".
_UNIT_WORDS = "|".join(re.escape(u).replace(r"\ ", r"\.?\s*") for u in sorted(UNIT_ALIASES, key=len, reverse=True))
_NUMBER = r"(\d+(?:[.,]\d+)*|\.\d+)"
_AMOUNT_RE = re.compile(rf"(?<![\w.]){_NUMBER}\s*-?\s*({_UNIT_WORDS})\b", re.IGNORECASE)
_TIMES_RE = re.compile(rf"(?<![\w.])(\d+)\s*[x×]\s*{_NUMBER}\s*-?\s*({_UNIT_WORDS})\b", re.IGNORECASE)
_LABELLED_SIZE_RE = re.compile(rf"\b(width|depth|height|length|diameter|thickness)\s*:?\s*{_NUMBER}\s*({_UNIT_WORDS})\b",
                               re.IGNORECASE)
_SIZE_RE = re.compile(rf"(?<![\w.]){_NUMBER}\s*[x×]\s*{_NUMBER}(?:\s*[x×]\s*{_NUMBER})?\s*({_UNIT_WORDS})\b",
                      re.IGNORECASE)
_PACK_RES = (
    re.compile(r"\b(?:pack|case|set|box|bundle)\s+of\s+(\d+)", re.IGNORECASE),
    re.compile(r"\b(\d+)\s*-?\s*(?:pack|pk)\b", re.IGNORECASE),
    re.compile(r"\b(?:IPQ|item package quantity)\s*:?\s*(\d+)", re.IGNORECASE),
)
_VALUE_RE = re.compile(rf"^\s*Value:\s*([-+]?{_NUMBER})", re.IGNORECASE | re.MULTILINE)
_UNIT_RE = re.compile(r"^\s*Unit:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_NAME_RE = re.compile(r"^\s*Item Name:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
MAX_PACK = 1000
MAX_AMOUNT = 1e7  # canonical units; caps one absurd parse ("Value: 1e12")
TOTAL_TOLERANCE = 0.01


@dataclass(frozen=True)
class Quantity:
    """One product's quantity. `amount`: one item's size in the canonical unit of `dimension` (g, ml, cm, items; 0
    when unknown); `unit`: the catalogue's unit word, normalised ("fl oz"; "<unk>" when none); `pack`: packages;
    `total`: amount x pack."""

    amount: float
    unit: str
    dimension: str
    pack: int
    total: float


@functools.cache
def _registry():
    import pint  # ~0.7 s to build the registry: once per process, only when a unit is converted

    return pint.UnitRegistry(cache_folder=None)


@functools.cache
def unit_factor(unit: str) -> tuple[str, float]:
    """(dimension, factor into its canonical unit) of a catalogue unit word; (NO_DIMENSION, 0.0) when unknown."""
    name = UNIT_LINE_ALIASES.get(normalise_unit(unit))
    if name is None:
        return NO_DIMENSION, 0.0
    if name == COUNT:
        return COUNT, 1.0
    quantity = _registry().Quantity(1.0, name)
    for dimension, canonical in CANONICAL_UNITS.items():
        if quantity.check(_registry().Quantity(1.0, canonical).dimensionality):
            return dimension, float(quantity.to(canonical).magnitude)
    return NO_DIMENSION, 0.0


def normalise_unit(unit: str) -> str:
    """Lower case, parentheses, dots and punctuation removed, single spaces: "Fl. Oz (Pack of 2)" -> "fl oz"."""
    unit = re.sub(r"\(.*?\)", " ", unit.lower()).replace(".", " ")
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", unit).split())


def _number(text: str) -> float:
    """"1,200" -> 1200.0, "1,5" -> 1.5 (a comma followed by other than 3 digits is a decimal comma)."""
    text = re.sub(r",(?=\d{3}\b)", "", text).replace(",", ".")
    try:
        return float(text)
    except ValueError:
        return 0.0


def _canonical(value: float, unit: str) -> tuple[str, float]:
    dimension, factor = unit_factor(unit)
    amount = value * factor
    if dimension == NO_DIMENSION or not math.isfinite(amount) or amount <= 0:
        return NO_DIMENSION, 0.0
    return dimension, min(amount, MAX_AMOUNT)


def _amount_in(text: str) -> tuple[str, float, float, str, int]:
    """(dimension, canonical amount, number as written, unit word, multiplier of "N x ...") of the first quantity in
    `text`; free text only knows `UNIT_ALIASES` (not "in", "ea")."""
    if match := _TIMES_RE.search(text):
        written = _number(match.group(2))
        dimension, amount = _canonical(written, match.group(3))
        if dimension not in (NO_DIMENSION, "length"):  # "51x51 cm" is a size, not 51 packs
            return dimension, amount, written, normalise_unit(match.group(3)), max(1, min(int(match.group(1)), MAX_PACK))
    for match in _AMOUNT_RE.finditer(text):
        written = _number(match.group(1))
        dimension, amount = _canonical(written, match.group(2))
        if dimension != NO_DIMENSION:
            return dimension, amount, written, normalise_unit(match.group(2)), 1
    return NO_DIMENSION, 0.0, 0.0, "", 1


def parse_quantity(text: str) -> Quantity:
    """The quantity of one ``catalog_content`` (see the module docstring for the rules)."""
    name_match = _NAME_RE.search(text)
    name = name_match.group(1) if name_match else ""
    found = _amount_in(name) if name else (NO_DIMENSION, 0.0, 0.0, "", 1)
    if found[0] == NO_DIMENSION:
        found = _amount_in(text)
    title_dim, title_amount, title_written, title_unit, times = found
    dimension, amount, written, unit = title_dim, title_amount, title_written, title_unit
    from_value_line = False

    value_match, unit_match = _VALUE_RE.search(text), _UNIT_RE.search(text)
    if value_match and unit_match:
        value_written = _number(value_match.group(1).lstrip("+"))
        value_dim, value = _canonical(value_written, unit_match.group(1))
        if value_dim != NO_DIMENSION:  # the structured lines win over the title
            dimension, amount, written, unit = value_dim, value, value_written, normalise_unit(unit_match.group(1))
            from_value_line = True

    pack = times
    for pattern in _PACK_RES:
        if match := pattern.search(text):
            pack = max(1, min(int(match.group(1)), MAX_PACK))
            break
    if dimension not in (NO_DIMENSION, COUNT) and pack == 1:
        count_match = next((m for m in _AMOUNT_RE.finditer(text) if unit_factor(m.group(2))[0] == COUNT), None)
        if count_match:  # "0.4 oz K-cups, 12 Count": the count is the pack
            pack = max(1, min(int(_number(count_match.group(1))), MAX_PACK))
    if dimension == NO_DIMENSION:
        return Quantity(0.0, UNKNOWN_UNIT, NO_DIMENSION, pack, 0.0)

    total = amount * pack
    if (from_value_line and pack > 1 and title_dim != NO_DIMENSION
            and ((dimension == title_dim and abs(title_amount * pack - amount) <= TOTAL_TOLERANCE * amount)
                 or abs(title_written * pack - written) <= TOTAL_TOLERANCE * written)):
        # Value is the pack's total: the title's size x pack gives it, in canonical units or as written (titles
        # say "12 Ounce" where the Unit line says "Fl Oz")
        amount, total = amount / pack, amount
    return Quantity(amount, UNIT_CATEGORY.get(unit, unit), dimension, pack, total)


def parse_extents(text: str) -> tuple[float, ...]:
    """The sizes of an object in centimetres: the labelled ones ("width 51 cm, depth 30 cm, height 99 cm", first of
    each label), else the first "A x B [x C] <length unit>" ("140x80 cm"); () when the text states none."""
    labelled: dict[str, float] = {}
    for match in _LABELLED_SIZE_RE.finditer(text):
        dimension, amount = _canonical(_number(match.group(2)), match.group(3))
        if dimension == "length" and match.group(1).lower() not in labelled:
            labelled[match.group(1).lower()] = amount
    if labelled:
        return tuple(labelled.values())
    for match in _SIZE_RE.finditer(text):
        dimension, factor = unit_factor(match.group(4))
        if dimension == "length":
            return tuple(_number(g) * factor for g in match.groups()[:3] if g is not None)
    return ()


QUANTITY_FEATURES = (*(f"is_{d}" for d in (*DIMENSIONS, NO_DIMENSION)), "log1p_amount", "log1p_pack",
                     *(f"log1p_total_{d}" for d in DIMENSIONS), "n_extents", "log1p_extent_product")


def quantity_feature_names(vocab: list[str]) -> list[str]:
    """Column names of `quantity_features`: the fixed quantity columns, then one unit=<word> column per vocab entry."""
    return [*QUANTITY_FEATURES, *(f"unit={u}" for u in vocab)]


def quantity_features(texts: list[str], vocab: list[str]) -> np.ndarray:
    """[N, 13 + len(vocab)] float32, columns `quantity_feature_names(vocab)`:

    - one-hot of the dimension (mass, volume, length, count, none);
    - log1p(one item's amount in its canonical unit), log1p(pack);
    - log1p(total amount = amount x pack) in the column of its dimension (0 in the others), so a linear layer can give
      each dimension its own price elasticity;
    - the number of an object's sizes (`parse_extents`: width, depth, height, "140x80 cm") and log1p of their product
      in cm^n (furniture's analogue of a pack's total);
    - one-hot of the unit word over `vocab` (index 0, unknown, takes units not in the vocabulary): a category, not an
      ordinal, so "gram" is no nearer to "kilogram" than to "count".
    """
    index = {u: i for i, u in enumerate(vocab)}
    n_fixed = len(QUANTITY_FEATURES)
    out = np.zeros((len(texts), n_fixed + len(vocab)), dtype=np.float32)
    dims = (*DIMENSIONS, NO_DIMENSION)
    for row, text in enumerate(texts):
        q = parse_quantity(text)
        out[row, dims.index(q.dimension)] = 1.0
        out[row, 5], out[row, 6] = math.log1p(q.amount), math.log1p(q.pack)
        if q.dimension in DIMENSIONS:
            out[row, 7 + DIMENSIONS.index(q.dimension)] = math.log1p(q.total)
        extents = parse_extents(text)
        out[row, 11] = len(extents)
        out[row, 12] = math.log1p(math.prod(extents)) if extents else 0.0
        out[row, n_fixed + index.get(q.unit, 0)] = 1.0
    return out
