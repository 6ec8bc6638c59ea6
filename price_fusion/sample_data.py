"""A small synthetic catalogue in the challenge's CSV format, with drawn PNG images and a known price rule.

    python -m price_fusion.sample_data data/sample --n-train 800 --n-test 200 --tiny-clip

Writes OUT/train.csv (sample_id, catalog_content, image_link, price), OUT/test.csv (no price),
OUT/test_labels.csv (the hidden test prices, for scoring), OUT/images/<id>.png and, with --tiny-clip,
OUT/tiny_clip/ (a randomly initialised CLIP vision model saved with save_pretrained, for offline runs).

The price rule, in dollars:
    price = BASE[category] * (value_in_base_unit / 16) ** 0.5 * pack ** 0.9 * (1.8 if premium else 1) * noise
where the category is named in the title (text), value/unit/pack are in the structural lines, premium products
are drawn as a gold square instead of a grey circle (image only), and noise ~ lognormal(0, 0.08).
A model that ignores the image cannot learn the premium factor; one that ignores the text cannot learn the category.

With --quantities (`catalog="quantities"`) the products are Amazon-style quantities instead, and the rule is
    price = BASE[category] * (total / REFERENCE[dimension]) ** 0.8 * (1.8 if premium else 1) * noise
with total = amount x unit x pack in canonical units (grams, millilitres, items): each category is sold by mass,
volume or count, in mixed units (g, kg, oz, lb; ml, l, fl oz; Count), with the pack written as "(Pack of 6)", as
"2 x 500 g" or as "12 Count" beside a weight; the ``Value:`` / ``Unit:`` lines are missing for 30 % of products and
hold the pack's total instead of one item's amount for half of the packs (as in the challenge data). So the raw
``Value`` and a unit rank (data.structural=legacy) say little, and canonical quantities (quantities) say most.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import guarded_main
from common.io import atomic_write

log = logging.getLogger(__name__)

BASE_PRICE = {"ground coffee": 9.0, "herbal shampoo": 6.0, "AA batteries": 12.0, "extra virgin olive oil": 15.0,
              "dry dog food": 25.0, "green tea bags": 4.0}
UNITS = {"Ounce": 1.0, "Fl Oz": 1.0, "Count": 0.5}  # unit -> multiplier into the rule's base unit
PREMIUM_FACTOR = 1.8
NOISE_SIGMA = 0.08
MISSING_IMAGE_RATE = 0.05
IMAGE_SIZE = 32
ADJECTIVES = ("classic", "organic", "family size", "value", "daily", "fresh", "natural", "original")
IMAGE_URL = "https://m.media-amazon.com/images/I/{}.png"
CATALOGS = ("default", "quantities")


def draw_product(path: Path, premium: bool, rng: np.random.Generator) -> None:
    """A 32x32 PNG: a gold square for premium products, a grey circle otherwise, at a random offset."""
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(2, 10, size=2))
    box = (x, y, x + 20, y + 20)
    if premium:
        draw.rectangle(box, fill=(212, 175, 55))
    else:
        draw.ellipse(box, fill=(120, 120, 120))
    img.save(path, format="PNG")


def make_catalog(n: int, rng: np.random.Generator, image_dir: Path, id_offset: int,
                 catalog: str = "default") -> pd.DataFrame:
    rows = []
    categories = list(BASE_PRICE)
    for i in range(n):
        sample_id = str(id_offset + i)
        category = categories[rng.integers(len(categories))]
        if catalog == "quantities":
            suffix, lines, total = quantity_product(category, rng)
            base, dimension = QUANTITY_CATEGORIES[category]
            factor = (total / REFERENCE[dimension]) ** QUANTITY_ELASTICITY
        else:
            unit = list(UNITS)[rng.integers(len(UNITS))]
            value = float(rng.choice([4, 8, 12, 16, 24, 32, 48, 64]))
            pack = int(rng.choice([1, 1, 1, 2, 3, 4, 6, 12]))
            suffix = f"{value:g} {unit}" + (f" (Pack of {pack})" if pack > 1 else "")
            lines = f"Value: {value:.1f}\nUnit: {unit}\n"
            base, factor = BASE_PRICE[category], (value * UNITS[unit] / 16) ** 0.5 * pack ** 0.9
        premium = bool(rng.random() < 0.35)
        adjective = ADJECTIVES[rng.integers(len(ADJECTIVES))]
        text = (f"Item Name: {adjective.title()} {category}, {suffix}\n"
                f"Bullet Point 1: {adjective} {category} for everyday use\n{lines}")
        price = (base * factor * (PREMIUM_FACTOR if premium else 1.0) * float(np.exp(rng.normal(0, NOISE_SIGMA))))
        if rng.random() >= MISSING_IMAGE_RATE:
            draw_product(image_dir / f"{sample_id}.png", premium, rng)
        rows.append({"sample_id": sample_id, "catalog_content": text, "image_link": IMAGE_URL.format(sample_id),
                     "price": round(price, 2)})
    return pd.DataFrame(rows)


# --quantities: category -> (base price at the reference quantity, dimension); units -> factor into grams /
# millilitres / items (the conversions the parser must find: 1 oz = 28.349523125 g, 1 lb = 453.59237 g,
# 1 fl oz = 29.5735295625 ml); amounts offered per unit.
QUANTITY_CATEGORIES = {"ground coffee": (9.0, "mass"), "dry dog food": (25.0, "mass"), "herbal shampoo": (6.0, "volume"),
                       "extra virgin olive oil": (15.0, "volume"), "AA batteries": (12.0, "count"),
                       "green tea bags": (4.0, "count")}
QUANTITY_UNITS = {"mass": {"g": 1.0, "kg": 1000.0, "Ounce": 28.349523125, "Pound": 453.59237},
                  "volume": {"ml": 1.0, "Liter": 1000.0, "Fl Oz": 29.5735295625},
                  "count": {"Count": 1.0}}
QUANTITY_AMOUNTS = {"g": (100, 250, 500, 750), "kg": (1, 2, 5), "Ounce": (4, 8, 12, 16, 32), "Pound": (1, 2, 5, 10),
                    "ml": (100, 250, 500, 750), "Liter": (1, 2, 3), "Fl Oz": (4, 8, 12, 16, 32),
                    "Count": (4, 8, 12, 24, 48, 100)}
REFERENCE = {"mass": 450.0, "volume": 450.0, "count": 24.0}  # canonical total that costs BASE
QUANTITY_ELASTICITY = 0.8
NO_VALUE_LINES_RATE = 0.3


def quantity_product(category: str, rng: np.random.Generator) -> tuple[str, str, float]:
    """(title suffix, structural lines, canonical total) of one product of a --quantities catalogue."""
    dimension = QUANTITY_CATEGORIES[category][1]
    unit = list(QUANTITY_UNITS[dimension])[rng.integers(len(QUANTITY_UNITS[dimension]))]
    amount = float(rng.choice(QUANTITY_AMOUNTS[unit]))
    pack = int(rng.choice([1, 1, 1, 2, 3, 4, 6, 12]))
    style = rng.integers(3)
    if pack == 1:
        suffix = f"{amount:g} {unit}"
    elif dimension == "count" or style == 0:
        suffix = f"{amount:g} {unit} (Pack of {pack})"
    elif style == 1:
        suffix = f"{pack} x {amount:g} {unit}"
    else:
        suffix = f"{amount:g} {unit}, {pack} Count"
    lines = ""
    if rng.random() >= NO_VALUE_LINES_RATE:
        value = amount * pack if pack > 1 and rng.random() < 0.5 else amount
        lines = f"Value: {value:.1f}\nUnit: {unit}\n"
    return suffix, lines, amount * QUANTITY_UNITS[dimension][unit] * pack


def write_tiny_clip(out_dir: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A randomly initialised CLIP vision tower (+ processor config) saved like a real local CLIP directory."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(config).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out_dir)
    return out_dir


def write_sample_data(out: Path, n_train: int = 800, n_test: int = 200, seed: int = 0,
                      tiny_clip: bool = False, catalog: str = "default") -> dict[str, Path]:
    """Write the synthetic catalogue (and optionally a tiny CLIP) under `out`; returns the paths written.
    `catalog`: "default" (the first rule) or "quantities" (the amount x unit x pack rule; see the module docstring)."""
    if catalog not in CATALOGS:
        raise ValueError(f"catalog must be one of {CATALOGS}, got {catalog!r}")
    rng = np.random.default_rng(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    train = make_catalog(n_train, rng, image_dir, id_offset=100000, catalog=catalog)
    test = make_catalog(n_test, rng, image_dir, id_offset=200000, catalog=catalog)
    paths = {"train_csv": out / "train.csv", "test_csv": out / "test.csv", "test_labels": out / "test_labels.csv",
             "image_dir": image_dir}
    atomic_write(paths["train_csv"], lambda tmp: train.to_csv(tmp, index=False))
    atomic_write(paths["test_csv"], lambda tmp: test.drop(columns="price").to_csv(tmp, index=False))
    atomic_write(paths["test_labels"], lambda tmp: test[["sample_id", "price"]].to_csv(tmp, index=False))
    if tiny_clip:
        paths["clip_model"] = write_tiny_clip(out / "tiny_clip", seed=seed)
    return paths


def _body(args: argparse.Namespace) -> int:
    paths = write_sample_data(Path(args.out), args.n_train, args.n_test, args.seed, args.tiny_clip,
                              "quantities" if args.quantities else "default")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m price_fusion.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-clip", action="store_true", help="also write a tiny random CLIP to OUT/tiny_clip")
    parser.add_argument("--quantities", action="store_true",
                        help="Amazon-style quantities (mixed units, pack forms) priced by amount x unit x pack")
    return parser


main = guarded_main(_body, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
