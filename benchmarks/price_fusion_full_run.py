"""A full training run on 75,000 synthetic products at the original sizes (768 image + 1024 text + 3 struct,
TwoBranchFusionModel 512/512 -> 512 -> 256 -> 128 -> 1, batch 256, patience 15) until early stopping, on this CPU.
Reports wall time, epochs, time per epoch, peak resident memory of the training process, and the held-out SMAPE
against the median-price baseline on the same split.

    python benchmarks/price_fusion_full_run.py                       # 75k, 1 torch thread
    python benchmarks/price_fusion_full_run.py --n 5000 --threads 2  # quick check

Prints the numbers and writes them to --out (default runs/benchmarks/price_fusion_full_run.json).

The data are written with the package's own embedding store and trained with `python -m price_fusion.train`
(the production path, checkpoints every epoch included) in a child process, whose peak RSS comes from
getrusage(RUSAGE_CHILDREN). Synthetic rule: log price = 2.5 + 0.6 tanh(image . w_i) + 0.9 tanh(text . w_t)
+ 0.3 struct_0 + N(0, 0.15), so there is signal in each part and a floor on the achievable SMAPE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.io import write_json
from price_fusion.embeddings import write_embeddings

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIM, TEXT_DIM = 768, 1024


def write_synthetic(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, IMAGE_DIM), dtype=np.float32)
    text = rng.standard_normal((n, TEXT_DIM), dtype=np.float32)
    struct = rng.standard_normal((n, 3), dtype=np.float32)
    w_image = rng.standard_normal(IMAGE_DIM) / np.sqrt(IMAGE_DIM)
    w_text = rng.standard_normal(TEXT_DIM) / np.sqrt(TEXT_DIM)
    log_price = (2.5 + 0.6 * np.tanh(image @ w_image) + 0.9 * np.tanh(text @ w_text) + 0.3 * struct[:, 0]
                 + rng.normal(0, 0.15, n))
    ids = np.array([str(100000 + i) for i in range(n)])
    write_embeddings(root / "emb" / "train", ids, image, np.ones(n, dtype=bool), text, struct, {"synthetic": True})
    pd.DataFrame({"sample_id": ids, "catalog_content": "", "image_link": "",
                  "price": np.round(np.exp(log_price), 2)}).to_csv(root / "train.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=75_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed afterwards")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "price_fusion_full_run.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf_full_run_") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_synthetic(root, args.n)
        print(f"wrote {args.n} synthetic products in {time.perf_counter() - start:.1f} s")
        cmd = [sys.executable, "-m", "price_fusion.train", "--config", str(REPO / "configs/price_fusion/base.yaml"),
               f"runs_dir={root / 'runs'}", "run_name=full", f"data.train_csv={root / 'train.csv'}",
               f"data.embeddings_dir={root / 'emb'}", f"train.num_threads={args.threads}", "train.resume=false"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL, stderr=open(root / "train.stderr", "w"))
        wall = time.perf_counter() - start
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
        history = json.loads((root / "runs" / "full" / "training_history.json").read_text())
        done = json.loads((root / "runs" / "full" / "done.json").read_text())
        val = pd.read_csv(root / "runs" / "full" / "predictions" / "val_predictions.csv")
        train_prices = pd.read_csv(root / "train.csv").set_index("sample_id").price.drop(val.sample_id)
        median = float(np.median(train_prices))
        median_smape = float(np.mean(200 * np.abs(median - val.actual) / (median + val.actual)))
        best_epoch = min(history, key=lambda h: h["val_smape"])["epoch"]
        print(f"epochs {len(history)} (early stopped: {done['stopped_early']}, best at {best_epoch}), wall {wall:.0f} s "
              f"({wall / len(history):.1f} s/epoch incl. validation and checkpoints), peak RSS {peak_mib:.0f} MiB")
        print(f"held-out SMAPE {done['best_val_smape']:.2f}% vs median-price baseline {median_smape:.2f}% "
              f"({len(val)} held-out products, {args.threads} torch thread(s))")
        write_json(args.out, {"n": args.n, "threads": args.threads, "epochs": len(history),
                              "stopped_early": done["stopped_early"], "best_epoch": best_epoch, "wall_s": wall, "s_per_epoch": wall / len(history),
                              "peak_rss_mib": peak_mib, "held_out_smape": done["best_val_smape"],
                              "median_baseline_smape": median_smape, "n_held_out": len(val)})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
