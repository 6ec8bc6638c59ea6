"""Real-data benchmark: the IKEA Saudi Arabia catalogue (2020), text only, fusion model vs three baselines.

    python -m price_fusion.ikea --config configs/price_fusion/ikea.yaml
    python -m price_fusion.ikea --config configs/price_fusion/ikea.yaml ikea.max_products=600 train.epochs=30  # small

Reads $REAL_DATA_DIR/products_ikea/ikea_sa_2020.csv (default ../shared/data beside the repository; never copied into
the repository), keeps one row per item_id, and writes it in the challenge format under <run>/data/ (prices in SAR).
A stratified test split (ikea.test_fraction) is held out from everything; the fusion model trains on the rest with
its own inner 80/20 split for early stopping, with the image branch masked (no images), and the baselines fit on
the same training rows. Text: the packaged all-MiniLM-L6-v2. Writes <run>/reports/ikea_results.{json,md}, the
table price_fusion/README.md quotes, labels included (k, alpha and epochs are the ones this run chose).

    python -m price_fusion.ikea --config configs/price_fusion/ikea.yaml ikea.extras=true   # after the above

trains the variants (advanced_moe, gbt, 5-fold two_branch, two ensembles) on that run's split and embeddings and
writes <run>/reports/ikea_extras.{json,md} (scripts/price_fusion/ikea_extras.sh runs both).
"""

from __future__ import annotations

import dataclasses
import json
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
from .ensemble import ensemble
from .gbt import gbt
from .predict import predict
from .predictions import read_predictions
from .train import DONE_FILE, train

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
    rows_in_file = pd.read_csv(path, sep=";", decimal=",", encoding="utf-8-sig")
    raw = rows_in_file.drop_duplicates("item_id")

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

    frame = pd.DataFrame({"sample_id": raw.item_id.astype(str), "catalog_content": raw.apply(text, axis=1),
                          "image_link": "", "price": raw.price.astype(float)})
    frame.attrs["rows_in_file"] = len(rows_in_file)
    return frame


def ikea(cfg: PriceFusionConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    setup_logging(run_dir)
    if cfg.ikea.extras:
        return extras(cfg, run_dir)
    ic = cfg.ikea
    frame = ikea_catalog(real_data_dir() / ic.source)
    rows_in_file = frame.attrs["rows_in_file"]
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
    done = json.loads((run_dir / DONE_FILE).read_text())
    rows = [("median", "median price", median_baseline(train_price, len(truth)), {}),
            ("knn", f"kNN on text embeddings ({knn_label(knn_params)} by CV)", knn_pred, knn_params),
            ("ridge", f"ridge on text embeddings (alpha={ridge_params['alpha']:.2g} by CV)", ridge_pred, ridge_params),
            ("ridge_struct", "ridge on text embeddings + struct (extra, not required)", ridge_struct_pred,
             ridge_struct_params),
            ("fusion", f"**fusion {cfg.model.name}** ({cfg.train.loss}, {done['epochs']} epochs"
                       f"{', early stopped' if done['stopped_early'] else ''})", fused, {"loss": cfg.train.loss, **done})]
    results = [{"key": key, "method": name, "smape": metrics.smape(truth, pred), "mae": metrics.mae(truth, pred),
                "r2": metrics.r2(truth, pred), "params": params, "smape_ci95": smape_ci(truth, pred)}
               for key, name, pred, params in rows]
    required = results[:3]
    fusion = results[-1]
    beats = bool(fusion["smape"] < min(r["smape"] for r in required))
    apart = bool(fusion["smape_ci95"][1] < min(r["smape_ci95"][0] for r in required))
    write_json(run_dir / "reports" / "ikea_results.json", {
        "rows_in_file": rows_in_file, "n_products": len(frame), "n_train": len(train_rows), "n_test": len(test_rows),
        "price_min": float(frame.price.min()), "price_max": float(frame.price.max()),
        "fusion_beats_baselines": beats, "fusion_ci_below_baselines": apart, "results": results})
    table = ["| method | test SMAPE (%) | 95% CI | MAE (SAR) | R2 |", "|---|---|---|---|---|"]
    for r in results:
        smape = f"**{r['smape']:.2f}**" if r["key"] == "fusion" else f"{r['smape']:.2f}"
        table.append(f"| {r['method']} | {smape} | {r['smape_ci95'][0]:.1f}-{r['smape_ci95'][1]:.1f} | "
                     f"{r['mae']:.1f} | {r['r2']:.3f} |")
    atomic_write_text(run_dir / "reports" / "ikea_results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    log.info("fusion beats median, kNN and ridge: %s (95%% interval below theirs: %s) -> %s", beats, apart,
             run_dir / "reports" / "ikea_results.md")
    return 0


def knn_label(params: dict) -> str:
    """"cosine, k=3 distance-weighted" from the CV-chosen kNN parameters."""
    return f"cosine, k={params['n_neighbors']}{' distance-weighted' if params['weights'] == 'distance' else ''}"


def smape_ci(truth: np.ndarray, pred: np.ndarray) -> list[float]:
    """95% bootstrap interval of test SMAPE over test products (500 resamples, seed 0)."""
    return list(metrics.bootstrap_ci(metrics.smape, truth, pred, n_boot=500, seed=0)[1:])


def extras(cfg: PriceFusionConfig, run_dir: Path) -> int:
    """The variants table on the split and embeddings of a finished `ikea` run (ikea.extras=true).

    advanced_moe (single split); the trees + kNN head (gbt, K-fold, test = mean of the fold models); the plain mean
    of two_branch, advanced_moe and gbt; two_branch with train.kfold=5 (test = mean of the 5 fold models); and
    weights fitted on the out-of-fold predictions of that 5-fold run and gbt. Each scored on the held-out test
    labels; writes <run>/reports/ikea_extras.{json,md} (sibling runs <run_name>_moe, _gbt, _kfold, _mean, _fitted).
    """
    data_dir, runs = run_dir / "data", Path(cfg.runs_dir)
    if not (run_dir / "reports" / "ikea_results.json").is_file():
        raise UserError(f"{run_dir}/reports/ikea_results.json not found; run python -m price_fusion.ikea --config "
                        f"configs/price_fusion/ikea.yaml first (ikea.extras reuses its split and embeddings)")
    truth = read_predictions(data_dir / "test_labels.csv").set_index("sample_id").price
    name = cfg.run_name
    base = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train_csv=str(data_dir / "train.csv"),
                                      test_csv=str(data_dir / "test.csv"), image_dir=str(data_dir),
                                      embeddings_dir=str(run_dir / "embeddings")),
        model=dataclasses.replace(cfg.model, use_image=False),
        train=dataclasses.replace(cfg.train, resume=False),
        predict=dataclasses.replace(cfg.predict, checkpoint="best", split="test", output=""))

    def variant(suffix: str, **sections) -> PriceFusionConfig:
        changed = {k: dataclasses.replace(getattr(base, k), **v) for k, v in sections.items()}
        return dataclasses.replace(base, run_name=f"{name}_{suffix}", **changed)

    def test_out(run: str) -> Path:
        return runs / run / "predictions" / "test_out.csv"

    moe = variant("moe", model={"name": "advanced_moe"})
    train(moe)
    predict(moe)
    trees = variant("gbt")
    gbt(trees)
    kfold = variant("kfold", train={"kfold": 5})
    train(kfold)
    predict(kfold)
    mean_out, fitted_out = runs / f"{name}_mean" / "test_out.csv", runs / f"{name}_fitted" / "test_out.csv"
    ensemble(dataclasses.replace(base, ensemble=dataclasses.replace(
        base.ensemble, method="mean", inputs=[str(test_out(name)), str(test_out(moe.run_name)),
                                              str(test_out(trees.run_name))], output=str(mean_out))))
    ensemble(dataclasses.replace(base, ensemble=dataclasses.replace(
        base.ensemble, method="fitted", inputs=[str(test_out(kfold.run_name)), str(test_out(trees.run_name))],
        oof_inputs=[str(runs / r / "predictions" / "oof_predictions.csv") for r in (kfold.run_name, trees.run_name)],
        output=str(fitted_out))))
    setup_logging(run_dir)

    moe_done = json.loads((runs / moe.run_name / DONE_FILE).read_text())
    kfold_oof = json.loads((runs / kfold.run_name / "reports" / "train_summary.json").read_text())["smape"]
    blend = json.loads(fitted_out.with_suffix(".weights.json").read_text())
    w = blend["weights"]
    rows = [("advanced_moe", f"`advanced_moe` (single split, {moe_done['epochs']} epochs"
                             f"{', early stopped' if moe_done['stopped_early'] else ''})", test_out(moe.run_name)),
            ("gbt", f"trees + kNN head (`gbt`, {cfg.gbt.folds}-fold, test = mean of fold models)",
             test_out(trees.run_name)),
            ("mean3", f"mean of {cfg.model.name}, advanced_moe, gbt", mean_out),
            ("kfold", f"{cfg.model.name}, `train.kfold=5`, test = mean of the 5 fold models (OOF SMAPE {kfold_oof:.2f})",
             test_out(kfold.run_name)),
            ("fitted", f"weights fitted on OOF: {w[0]:.3f} x 5-fold {cfg.model.name} + {w[1]:.3f} x gbt "
                       f"(OOF {min(blend['oof_smape_per_model']):.2f} -> {blend['oof_smape_fitted']:.2f})", fitted_out)]
    results = []
    for key, label, path in rows:
        pred = read_predictions(path).set_index("sample_id").price.loc[truth.index].to_numpy()
        results.append({"key": key, "variant": label, "file": str(path), "smape": metrics.smape(truth.to_numpy(), pred),
                        "smape_ci95": smape_ci(truth.to_numpy(), pred)})
    write_json(run_dir / "reports" / "ikea_extras.json", {"n_test": len(truth), "fitted_weights": w,
                                                           "oof_smape": blend, "results": results})
    table = ["| variant | test SMAPE (%) | 95% CI |", "|---|---|---|"]
    table += [f"| {r['variant']} | {r['smape']:.2f} | {r['smape_ci95'][0]:.1f}-{r['smape_ci95'][1]:.1f} |"
              for r in results]
    atomic_write_text(run_dir / "reports" / "ikea_extras.md", "\n".join(table) + "\n")
    print("\n".join(table))
    log.info("IKEA variants -> %s", run_dir / "reports" / "ikea_extras.md")
    return 0


main = config_main(PriceFusionConfig, ikea, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
