"""Real-data benchmark: the IKEA Saudi Arabia catalogue (2020), text only, fusion model vs three baselines.

    python -m price_fusion.ikea --config configs/price_fusion/ikea.yaml
    python -m price_fusion.ikea --config configs/price_fusion/ikea.yaml ikea.max_products=600 train.epochs=30  # small

Reads $REAL_DATA_DIR/products_ikea/ikea_sa_2020.csv (default ../shared/data beside the repository; never copied into
the repository), keeps one row per item_id, and writes it in the challenge format under <run>/data/ (prices in SAR).
A stratified test split (ikea.test_fraction) is held out from everything; the fusion model trains on the rest with
its own inner 80/20 split for early stopping, with the image branch masked (no images), and the baselines fit on
the same training rows. Text: the packaged all-MiniLM-L6-v2. Writes <run>/reports/ikea_results.{json,md}.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from common import metrics
from common.cli import UserError, config_main
from common.io import atomic_write, atomic_write_text
from common.logs import setup_logging, write_json

from .baselines import knn_baseline, median_baseline, ridge_baseline
from .config import PriceFusionConfig
from .data import stratified_split
from .embed import embed
from .embeddings import load_embeddings
from .predict import predict
from .predictions import read_predictions
from .train import train

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """$REAL_DATA_DIR, else ../shared/data beside the repository."""
    root = Path(os.environ.get("REAL_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        raise UserError(f"real data folder {root} not found; set REAL_DATA_DIR to the folder holding products_ikea/")
    return root


def ikea_catalog(path: Path) -> pd.DataFrame:
    """The IKEA SA CSV as a challenge-format frame (sample_id, catalog_content, image_link, price), one row per item.

    Size goes into the structural lines as ``Value: <width> / Unit: cm`` when the width is known (furniture's analogue
    of the challenge's quantity); ``old_price`` is dropped (it would leak the price).
    """
    if not path.is_file():
        raise UserError(f"{path}: IKEA catalogue not found; see ../shared/data/products_ikea/PROVENANCE.txt")
    raw = pd.read_csv(path, sep=";", decimal=",", encoding="utf-8-sig").drop_duplicates("item_id")

    def text(row: pd.Series) -> str:
        desc = " ".join(str(row.short_description).split())
        sizes = ", ".join(f"{k} {row[k]:g} cm" for k in ("width", "depth", "height") if pd.notna(row[k]))
        lines = [f"Item Name: {row['name']}, {desc}", f"Category: {row.category}", f"Designer: {row.designer}",
                 f"Other colours: {row.other_colors}"]
        if sizes:
            lines.append(f"Size: {sizes}")
        if pd.notna(row.width):
            lines += [f"Value: {row.width:g}", "Unit: cm"]
        return "\n".join(lines)

    return pd.DataFrame({"sample_id": raw.item_id.astype(str), "catalog_content": raw.apply(text, axis=1),
                         "image_link": "", "price": raw.price.astype(float)})


def ikea(cfg: PriceFusionConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    setup_logging(run_dir)
    ic = cfg.ikea
    frame = ikea_catalog(real_data_dir() / ic.source)
    if ic.max_products and ic.max_products < len(frame):
        frame = frame.sample(ic.max_products, random_state=cfg.data.split_seed).reset_index(drop=True)
    train_rows, test_rows = stratified_split(frame.price.to_numpy(), ic.test_fraction, cfg.data.n_price_bins,
                                             cfg.data.split_seed + 1)
    data_dir = run_dir / "data"
    train_frame, test_frame = frame.iloc[train_rows], frame.iloc[test_rows]
    atomic_write(data_dir / "train.csv", lambda tmp: train_frame.to_csv(tmp, index=False))
    atomic_write(data_dir / "test.csv", lambda tmp: test_frame.drop(columns="price").to_csv(tmp, index=False))
    atomic_write(data_dir / "test_labels.csv", lambda tmp: test_frame[["sample_id", "price"]].to_csv(tmp, index=False))
    log.info("IKEA: %d products, %d train / %d held-out test", len(frame), len(train_rows), len(test_rows))

    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train_csv=str(data_dir / "train.csv"),
                                      test_csv=str(data_dir / "test.csv"), image_dir=str(data_dir),
                                      embeddings_dir=str(run_dir / "embeddings")),
        embed=dataclasses.replace(cfg.embed, clip_model="", import_clip_dir="", import_qwen_pickle=""),
        model=dataclasses.replace(cfg.model, use_image=False),
        # the split is rebuilt on every call, so a checkpoint of an earlier call may belong to other data
        train=dataclasses.replace(cfg.train, resume=False),
        predict=dataclasses.replace(cfg.predict, checkpoint="best", split="test", output=""))
    embed(cfg)
    train(cfg)
    predict(cfg)
    setup_logging(run_dir)

    truth = test_frame.price.to_numpy()
    fused = read_predictions(run_dir / "predictions" / "test_out.csv").set_index("sample_id").loc[
        test_frame.sample_id, "price"].to_numpy()
    train_emb, test_emb = load_embeddings(run_dir / "embeddings" / "train"), load_embeddings(run_dir / "embeddings" / "test")
    train_x, test_x = np.asarray(train_emb.text), np.asarray(test_emb.text)
    train_price = train_frame.price.to_numpy()
    # BLAS threads for the baselines follow train.num_threads (0: library default)
    with threadpool_limits(limits=cfg.train.num_threads or None):
        knn_pred, knn_params = knn_baseline(train_x, train_price, test_x, cfg.data.split_seed)
        ridge_pred, ridge_params = ridge_baseline(train_x, train_price, test_x)
        struct_x = np.hstack([train_x, np.asarray(train_emb.struct)]), np.hstack([test_x, np.asarray(test_emb.struct)])
        ridge_struct_pred, ridge_struct_params = ridge_baseline(struct_x[0], train_price, struct_x[1])
    rows = [("median", "median price", median_baseline(train_price, len(truth)), {}),
            ("knn", "kNN on text embeddings", knn_pred, knn_params),
            ("ridge", "ridge on text embeddings", ridge_pred, ridge_params),
            ("ridge_struct", "ridge on text embeddings + struct (extra)", ridge_struct_pred, ridge_struct_params),
            ("fusion", f"fusion {cfg.model.name} (image branch masked)", fused, {"loss": cfg.train.loss})]
    results = [{"key": key, "method": name, "smape": metrics.smape(truth, pred), "mae": metrics.mae(truth, pred),
                "r2": metrics.r2(truth, pred), "params": params,
                "smape_ci95": list(metrics.bootstrap_ci(metrics.smape, truth, pred, n_boot=500, seed=0)[1:])}
               for key, name, pred, params in rows]
    required = [r["smape"] for r in results[:3]]
    beats = bool(results[-1]["smape"] < min(required))
    write_json(run_dir / "reports" / "ikea_results.json", {"n_train": len(train_rows), "n_test": len(test_rows),
                                                            "fusion_beats_baselines": beats, "results": results})
    table = ["| method | test SMAPE (%) | 95% CI | MAE (SAR) | R2 |", "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['smape']:.2f} | {r['smape_ci95'][0]:.1f}-{r['smape_ci95'][1]:.1f} | "
              f"{r['mae']:.1f} | {r['r2']:.3f} |" for r in results]
    atomic_write_text(run_dir / "reports" / "ikea_results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    log.info("fusion beats median, kNN and ridge: %s", beats)
    return 0


main = config_main(PriceFusionConfig, ikea, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
