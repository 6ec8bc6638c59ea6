"""The embed stage end to end (`price_fusion.embed.main`: CSV, image files decoded in DataLoader workers, CLIP,
sentence encoder, chunk files, the final store) against the pure forward passes of the same two models on ready
tensors (pixel_values preprocessed once, text batches tokenized once in the same length-sorted order), in one process.

    python benchmarks/price_embed_throughput.py                      # 1,000 products, 1 torch thread, 2 workers
    python benchmarks/price_embed_throughput.py --n 500 --repeats 1  # quick check

Prints products/s each way and the ratio (end to end / pure forward; goal >= 0.85) and writes them, with every
setting, to --out (default runs/benchmarks/price_embed_throughput.json).

Data: N products with a JPEG each (--image-px square, drawn shapes + noise) and a catalogue text of 3 to 60 words (+ title and value lines).
Models: a random CLIP vision tower (hidden --clip-hidden, --clip-layers layers, 224 px, patch 16; saved with
save_pretrained, so the stage loads it like a real one) and the packaged all-MiniLM-L6-v2. Each timing is the best
of --repeats, the two alternated; the end-to-end time includes loading the models, reading the CSV and writing the
store (the stage's own costs), the pure time is the forward passes only.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.io import write_json

REPO = Path(__file__).resolve().parents[1]
WORDS = ("organic", "roasted", "coffee", "beans", "stainless", "steel", "travel", "mug", "leak-proof", "lid", "keeps",
         "drinks", "hot", "for", "hours", "premium", "cotton", "towel", "set", "soft", "absorbent", "quick", "dry",
         "family", "size", "value", "pack", "gluten", "free", "snack", "bars", "with", "almonds", "and", "honey")
UNITS = ("Ounce", "Fl Oz", "Count", "gram")


def write_products(root: Path, n: int, image_px: int, seed: int = 0) -> Path:
    """train.csv + images/<id>.jpg; returns the CSV path."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sid = str(100000 + i)
        pixels = rng.integers(0, 40, (image_px, image_px, 3), dtype=np.uint8) + 100
        img = Image.fromarray(pixels)
        lo, hi = sorted(rng.integers(10, image_px - 10, 2))
        ImageDraw.Draw(img).ellipse((lo, lo, hi + 10, hi + 10), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(images / f"{sid}.jpg", quality=90)
        words = " ".join(rng.choice(WORDS, rng.integers(3, 61)))
        text = (f"Item Name: {words.title()[:60]}\nBullet Point 1: {words}\n"
                f"Value: {rng.integers(1, 40)}.0\nUnit: {rng.choice(UNITS)}")
        rows.append({"sample_id": sid, "catalog_content": text, "image_link": f"{sid}.jpg",
                     "price": round(float(rng.lognormal(2.5, 0.8)), 2)})
    csv = root / "train.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def write_clip(out: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=224, patch_size=16, projection_dim=64)
    CLIPVisionModelWithProjection(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def pure_forward(cfg, csv: Path):
    """A function timing the two models' forward passes alone over every product, on inputs prepared here once:
    pixel_values preprocessed in batches of embed.image_batch_size, texts tokenized in the batches
    SentenceTransformer.encode forms (longest first within each chunk of embed.chunk_rows). Returns
    (function -> {"image_s", "text_s"}, the Encoders)."""
    import torch
    from PIL import Image
    from sentence_transformers.util import batch_to_device

    from price_fusion import embed
    from price_fusion.data import read_catalog

    catalog = read_catalog(csv, require_price=False)
    encoders = embed.Encoders(cfg)
    image, text = encoders.image, encoders.text
    ec = cfg.embed
    paths = [Path(cfg.data.image_dir) / link for link in catalog.image_links]
    pixel_batches = []
    for start in range(0, len(paths), ec.image_batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + ec.image_batch_size]]
        pixel_batches.append(image.processor(images=images, return_tensors="pt")["pixel_values"])
    texts = catalog.texts
    text_batches = []
    for lo in range(0, len(texts), ec.chunk_rows):
        chunk = texts[lo:lo + ec.chunk_rows]
        ordered = [chunk[i] for i in np.argsort([-len(t) for t in chunk])]
        text_batches += [text.model.preprocess(ordered[i:i + ec.text_batch_size])
                         for i in range(0, len(ordered), ec.text_batch_size)]

    def timed() -> dict:
        start = time.perf_counter()
        for pixels in pixel_batches:
            image.features(pixels).cpu()
        image_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode(), embed.autocast(encoders.device, encoders.precision):
            for features in text_batches:
                text.model(batch_to_device(features, encoders.device))["sentence_embedding"].cpu()
        return {"image_s": image_s, "text_s": time.perf_counter() - start}

    return timed, encoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (both ways)")
    parser.add_argument("--workers", type=int, default=2, help="embed.num_workers of the end-to-end run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--clip-hidden", type=int, default=128)
    parser.add_argument("--clip-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed afterwards")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "price_embed_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from common.config import load_config
    from price_fusion import embed
    from price_fusion.config import PriceFusionConfig

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pf_embed_speed_") as tmp:
        root = Path(args.workdir or tmp)
        start = time.perf_counter()
        csv = write_products(root, args.n, args.image_px)
        clip = write_clip(root / "clip", args.clip_hidden, args.clip_layers)
        print(f"wrote {args.n} products ({args.image_px} px JPEGs) in {time.perf_counter() - start:.1f} s")
        overrides = [f"data.train_csv={csv}", f"data.image_dir={root / 'images'}",
                     f"data.embeddings_dir={root / 'emb'}", "embed.splits=[train]", f"embed.clip_model={clip}",
                     "embed.text_model=minilm", f"embed.num_threads={args.threads}",
                     f"embed.num_workers={args.workers}", f"embed.device={args.device}"]
        cfg = load_config(PriceFusionConfig, None, overrides)
        pure_once, encoders = pure_forward(cfg, csv)
        pure_once()  # warm-up of both models (first-call initialisation); the stage's imports are done by now
        e2e_times, pure_times = [], []
        for _ in range(args.repeats):  # alternated, so both see the same background load
            start = time.perf_counter()
            assert embed.main(overrides) == 0
            e2e_times.append(time.perf_counter() - start)
            pure_times.append(pure_once())
    e2e_s = min(e2e_times)
    pure = dict(min(pure_times, key=lambda t: t["image_s"] + t["text_s"]))
    pure["total_s"] = pure["image_s"] + pure["text_s"]
    device = encoders.device
    report = {
        "n": args.n, "ratio": pure["total_s"] / e2e_s, "goal": 0.85,
        "end_to_end_products_per_s": args.n / e2e_s, "pure_forward_products_per_s": args.n / pure["total_s"],
        "end_to_end_s": e2e_s, "pure_forward_s": pure, "all_end_to_end_s": e2e_times, "all_pure_forward_s": pure_times,
        "settings": {"torch_threads": args.threads, "num_workers": args.workers, "device": device.type,
                     "precision": encoders.precision, "repeats": args.repeats,
                     "image_px": args.image_px, "clip": {"hidden": args.clip_hidden, "layers": args.clip_layers,
                                                         "image_size": 224, "patch": 16, "projection_dim": 64},
                     "text_model": "all-MiniLM-L6-v2", "image_batch_size": cfg.embed.image_batch_size,
                     "text_batch_size": cfg.embed.text_batch_size, "chunk_rows": cfg.embed.chunk_rows,
                     "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
                     "machine": platform.machine(), "torch": torch.__version__},
    }
    print(f"end to end {report['end_to_end_products_per_s']:.1f} products/s ({e2e_s:.1f} s), pure forward "
          f"{report['pure_forward_products_per_s']:.1f} products/s (image {pure['image_s']:.1f} s + text "
          f"{pure['text_s']:.1f} s): ratio {report['ratio']:.3f} (goal >= 0.85), {args.threads} torch thread(s), "
          f"{args.workers} workers, {device.type}")
    write_json(args.out, report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
