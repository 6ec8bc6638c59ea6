"""Real-data benchmark: the IKEA Saudi Arabia catalogue (2020), text only, on products whose name is unseen.

    python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml
    # small:
    python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml ikea.max_products=600 train.epochs=30
    # row-level split (every item its own group):
    python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml run_name=ikea_rows ikea.group=item

Reads $REAL_DATA_DIR/products_ikea/ikea_sa_2020.csv (default ../shared/data beside the repository; never copied into
the repository), keeps one row per item_id, and writes it in the challenge format under <run>/data/ (prices in SAR)
with a `group` column: IKEA's product name (ikea.group=name), so the colours and sizes of one name are all in train
or all in test. A grouped test split (ikea.test_fraction of the names, stratified by their median price) is held out
from everything, and every stage inside groups by the same column (data.group_column=group). On the rest:

- fusion (single grouped split for early stopping; <run>), and fusion with train.kfold=ikea.kfold (test = mean of
  the fold models; <run>_kfold), each fold early-stopped on an inner split of its own training rows;
- the trees + kNN head (gbt, ikea.kfold folds; <run>_gbt);
- the baselines (median, kNN, ridge; <run>_baselines), hyperparameters by grouped CV on the training rows;
- the recommended blend: simplex weights fitted on the honest out-of-fold predictions of k-fold fusion, trees and
  the three baselines (<run>_recommended).

Text: the packaged all-MiniLM-L6-v2; the image branch is masked. 95% intervals: bootstrap over test groups (names),
not rows. Writes <run>/reports/ikea_results.{json,md}, the table studies/price_fusion/RESULTS.md quotes, labels
included.

    python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml ikea.extras=true   # after the above

trains advanced_moe on that run's split and embeddings and the mean of two_branch, advanced_moe and gbt, and writes
<run>/reports/ikea_extras.{json,md} (studies/price_fusion/ikea_extras.sh runs this second step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from common import metrics
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write, atomic_write_text
from common.logs import setup_logging, write_json
from price_fusion.baselines import baselines
from price_fusion.config import BASELINE_METHODS, PriceFusionConfig
from price_fusion.data import grouped_split
from price_fusion.embed import embed
from price_fusion.ensemble import ensemble
from price_fusion.gbt import gbt
from price_fusion.predict import predict
from price_fusion.prediction_files import read_predictions
from price_fusion.train import DONE_FILE, train

GROUP_COL = "group"
N_BOOT = 1000

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def real_data_dir() -> Path:
    """$REAL_DATA_DIR, else ../shared/data beside the repository."""
    root = Path(os.environ.get("REAL_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        raise UserError(f"real data folder {root} not found; set REAL_DATA_DIR to the folder holding products_ikea/")
    return root


def ikea_catalog(path: Path) -> pd.DataFrame:
    """The IKEA SA CSV as a challenge-format frame (sample_id, catalog_content, image_link, price) plus `name` (the
    product family: IKEA's name), one row per item.

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
                          "image_link": "", "price": raw.price.astype(float), "name": raw["name"].astype(str)})
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
    frame[GROUP_COL] = frame["name"] if ic.group == "name" else frame["sample_id"]
    frame = frame.drop(columns="name")
    train_rows, test_rows = grouped_split(frame.price.to_numpy(), frame[GROUP_COL].to_numpy(str), ic.test_fraction,
                                          cfg.data.n_price_bins, cfg.data.split_seed + 1)
    data_dir = run_dir / "data"
    train_frame, test_frame = frame.iloc[train_rows], frame.iloc[test_rows]
    atomic_write(data_dir / "train.csv", lambda tmp: train_frame.to_csv(tmp, index=False))
    atomic_write(data_dir / "test.csv", lambda tmp: test_frame.drop(columns="price").to_csv(tmp, index=False))
    atomic_write(data_dir / "test_labels.csv",
                 lambda tmp: test_frame[["sample_id", "price", GROUP_COL]].to_csv(tmp, index=False))
    seen_names = set(ikea_catalog_names(train_frame))
    test_seen = float(np.mean([n in seen_names for n in ikea_catalog_names(test_frame)]))
    log.info("IKEA: %d products in %d groups, %d train / %d held-out test (%.1f%% of test products share a name with "
             "a training product)", len(frame), frame[GROUP_COL].nunique(), len(train_rows), len(test_rows),
             100 * test_seen)

    cfg = benchmark_config(cfg, run_dir)
    runs = Path(cfg.runs_dir)
    name = cfg.run_name
    kfold = variant(cfg, "kfold", train={"kfold": ic.kfold})
    trees = variant(cfg, "gbt", gbt={"folds": ic.kfold})
    simple = variant(cfg, "baselines", baselines={"folds": ic.kfold, "num_threads": cfg.train.num_threads})
    embed(cfg)
    for stage_cfg in (cfg, kfold):
        train(stage_cfg)
        predict(stage_cfg)
    gbt(trees)
    baselines(simple)
    members = [("fusion_kfold", runs / kfold.run_name / "predictions"), ("gbt", runs / trees.run_name / "predictions"),
               *((m, runs / simple.run_name / m / "predictions") for m in BASELINE_METHODS)]
    recommended = runs / f"{name}_recommended" / "test_out.csv"
    ensemble(dataclasses.replace(cfg, ensemble=dataclasses.replace(
        cfg.ensemble, method="fitted", inputs=[str(d / "test_out.csv") for _, d in members],
        oof_inputs=[str(d / "oof_predictions.csv") for _, d in members], output=str(recommended))))
    setup_logging(run_dir)

    truth = test_frame.price.to_numpy()
    groups = test_frame[GROUP_COL].to_numpy(str)
    blend = json.loads(recommended.with_suffix(".weights.json").read_text())
    done = json.loads((run_dir / DONE_FILE).read_text())
    params = json.loads((runs / simple.run_name / "reports" / "baselines_summary.json").read_text())
    oof = dict(zip([m for m, _ in members], blend["oof_smape_per_model"]))
    oof["recommended"] = blend["oof_smape_fitted"]  # optimistic: the weights were fitted on these rows
    weights = ", ".join(f"{w:.2f} {m}" for (m, _), w in zip(members, blend["weights"]) if w >= 0.005)
    rows = [("median", "median price", runs / simple.run_name / "median" / "predictions" / "test_out.csv"),
            ("knn", f"kNN on text embeddings ({knn_label(params['knn']['params'])} by grouped CV)",
             runs / simple.run_name / "knn" / "predictions" / "test_out.csv"),
            ("ridge", f"ridge on text embeddings + struct (alpha={params['ridge']['params']['alpha']:.2g} by grouped CV)",
             runs / simple.run_name / "ridge" / "predictions" / "test_out.csv"),
            ("gbt", f"trees + kNN head (`gbt`, {ic.kfold}-fold, test = mean of fold models)",
             runs / trees.run_name / "predictions" / "test_out.csv"),
            ("fusion", f"**fusion {cfg.model.name}** ({cfg.train.loss}, {done['epochs']} epochs"
                       f"{', early stopped' if done['stopped_early'] else ''})", run_dir / "predictions" / "test_out.csv"),
            ("fusion_kfold", f"**fusion {cfg.model.name}, {ic.kfold}-fold mean** (each fold early-stopped on an inner "
                             "split)", runs / kfold.run_name / "predictions" / "test_out.csv"),
            ("recommended", f"recommended: blend fitted on OOF ({weights})", recommended)]
    results, preds = [], {}
    for key, label, path in rows:
        preds[key] = read_predictions(path).set_index("sample_id").price.loc[test_frame.sample_id].to_numpy()
        pred = preds[key]
        results.append({"key": key, "method": label, "file": str(path), "smape": metrics.smape(truth, pred),
                        "mae": metrics.mae(truth, pred), "r2": metrics.r2(truth, pred),
                        "smape_ci95": group_bootstrap_ci(truth, pred, groups), "oof_smape": oof.get(key)})
    smape = {r["key"]: r["smape"] for r in results}
    ci = {r["key"]: r["smape_ci95"] for r in results}
    verdict = {f"{f}_beats_{b}": bool(smape[f] < smape[b]) for f in ("fusion", "fusion_kfold") for b in ("knn", "ridge")}
    # paired: the difference of SMAPE on the same resampled test names, for the comparisons the benchmark is about
    paired = {f"{a}_minus_{b}": [smape[a] - smape[b], *group_bootstrap_ci(truth, preds[a], groups, reference=preds[b])]
              for a, b in (("fusion", "knn"), ("fusion", "ridge"), ("fusion_kfold", "knn"), ("fusion_kfold", "ridge"),
                           ("fusion_kfold", "gbt"), ("recommended", "knn"), ("recommended", "ridge"))}
    verdict["recommended_at_or_below_best_baseline"] = bool(
        smape["recommended"] <= min(smape[b] for b in BASELINE_METHODS))
    verdict["fusion_kfold_ci_below_knn_and_ridge"] = bool(ci["fusion_kfold"][1] < min(ci["knn"][0], ci["ridge"][0]))
    write_json(run_dir / "reports" / "ikea_results.json", {
        "rows_in_file": rows_in_file, "n_products": len(frame), "n_train": len(train_rows), "n_test": len(test_rows),
        "group": ic.group, "n_groups": int(frame[GROUP_COL].nunique()), "n_test_groups": int(len(np.unique(groups))),
        "test_share_with_name_in_train": test_seen, "price_min": float(frame.price.min()),
        "price_max": float(frame.price.max()), "bootstrap": f"{N_BOOT} resamples of test groups ({GROUP_COL})",
        "recommended_weights": dict(zip([m for m, _ in members], blend["weights"])), **verdict,
        "paired_smape_difference_ci95": paired, "results": results})
    table = ["| method | test SMAPE (%) | 95% CI (groups) | out-of-fold SMAPE (%) | MAE (SAR) | R2 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        value = f"**{r['smape']:.2f}**" if r["key"].startswith("fusion") else f"{r['smape']:.2f}"
        oof_text = "" if r["oof_smape"] is None else f"{r['oof_smape']:.2f}"
        table.append(f"| {r['method']} | {value} | {r['smape_ci95'][0]:.1f}-{r['smape_ci95'][1]:.1f} | {oof_text} | "
                     f"{r['mae']:.1f} | {r['r2']:.3f} |")
    table += ["", "| paired difference (test names resampled together) | SMAPE points | 95% CI |", "|---|---|---|"]
    table += [f"| {name.replace('_minus_', ' - ')} | {d:+.2f} | {lo:+.1f} to {hi:+.1f} |"
              for name, (d, lo, hi) in paired.items()]
    atomic_write_text(run_dir / "reports" / "ikea_results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    log.info("%s -> %s", verdict, run_dir / "reports" / "ikea_results.md")
    return 0


def ikea_catalog_names(frame: pd.DataFrame) -> list[str]:
    """IKEA's product name of each row (the first part of its Item Name line)."""
    return [text.split("\n", 1)[0].removeprefix("Item Name: ").split(",", 1)[0] for text in frame.catalog_content]


def benchmark_config(cfg: PriceFusionConfig, run_dir: Path) -> PriceFusionConfig:
    """The config every stage of the benchmark runs with: the run's data, grouped by its `group` column, text only."""
    data_dir = run_dir / "data"
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train_csv=str(data_dir / "train.csv"),
                                      test_csv=str(data_dir / "test.csv"), image_dir=str(data_dir),
                                      embeddings_dir=str(run_dir / "embeddings"), group_column=GROUP_COL),
        embed=dataclasses.replace(cfg.embed, clip_model="", import_clip_dir="", import_qwen_pickle=""),
        model=dataclasses.replace(cfg.model, use_image=False),
        # the split is rebuilt on every call, so a checkpoint of an earlier call may belong to other data
        train=dataclasses.replace(cfg.train, resume=False),
        predict=dataclasses.replace(cfg.predict, checkpoint="best", split="test", output=""))


def variant(base: PriceFusionConfig, suffix: str, **sections: dict) -> PriceFusionConfig:
    """`base` under run_name <run_name>_<suffix> with the given section fields replaced."""
    changed = {k: dataclasses.replace(getattr(base, k), **v) for k, v in sections.items()}
    return dataclasses.replace(base, run_name=f"{base.run_name}_{suffix}", **changed)


def knn_label(params: dict) -> str:
    """"cosine, k=3 distance-weighted" from the CV-chosen kNN parameters."""
    return f"cosine, k={params['n_neighbors']}{' distance-weighted' if params['weights'] == 'distance' else ''}"


def group_bootstrap_ci(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray, n_boot: int = N_BOOT,
                       seed: int = 0, reference: np.ndarray | None = None) -> list[float]:
    """95% percentile bootstrap interval of SMAPE resampling whole groups with replacement (a resample holds every
    product of each drawn group, once per draw; common.metrics.grouped_mean_bootstrap_ci), since products of one
    group are not independent. With `reference`: the interval of SMAPE(pred) - SMAPE(reference) on the same
    resamples (paired; below 0 = `pred` is better)."""
    terms = metrics.smape_terms(truth, pred)  # in percent
    if reference is not None:
        terms = terms - metrics.smape_terms(truth, reference)
    return list(metrics.grouped_mean_bootstrap_ci(terms, groups, n_boot=n_boot, seed=seed))


def extras(cfg: PriceFusionConfig, run_dir: Path) -> int:
    """The variants table on the split and embeddings of a finished `ikea` run (ikea.extras=true): advanced_moe
    (single grouped split; <run_name>_moe) and the plain mean of two_branch, advanced_moe and the run's gbt
    (<run_name>_mean), each scored on the held-out test labels with group-bootstrap intervals; writes
    <run>/reports/ikea_extras.{json,md}."""
    runs = Path(cfg.runs_dir)
    if not (run_dir / "reports" / "ikea_results.json").is_file():
        raise UserError(f"{run_dir}/reports/ikea_results.json not found; run python -m studies.price_fusion.ikea "
                        "--config configs/price_fusion/ikea.yaml first (ikea.extras reuses its split and embeddings)")
    labels = pd.read_csv(run_dir / "data" / "test_labels.csv", dtype={"sample_id": str, GROUP_COL: str})
    base = benchmark_config(cfg, run_dir)
    moe = variant(base, "moe", model={"name": "advanced_moe"})
    train(moe)
    predict(moe)
    test_out = {key: runs / run / "predictions" / "test_out.csv"
                for key, run in (("two_branch", base.run_name), ("advanced_moe", moe.run_name),
                                 ("gbt", f"{base.run_name}_gbt"))}
    mean_out = runs / f"{base.run_name}_mean" / "test_out.csv"
    ensemble(dataclasses.replace(base, ensemble=dataclasses.replace(
        base.ensemble, method="mean", inputs=[str(p) for p in test_out.values()], output=str(mean_out))))
    setup_logging(run_dir)

    moe_done = json.loads((runs / moe.run_name / DONE_FILE).read_text())
    rows = [("advanced_moe", f"`advanced_moe` (single grouped split, {moe_done['epochs']} epochs"
                             f"{', early stopped' if moe_done['stopped_early'] else ''})", test_out["advanced_moe"]),
            ("mean3", f"mean of {cfg.model.name}, advanced_moe, gbt", mean_out)]
    truth, groups = labels.price.to_numpy(), labels[GROUP_COL].to_numpy(str)
    results = []
    for key, label, path in rows:
        pred = read_predictions(path).set_index("sample_id").price.loc[labels.sample_id].to_numpy()
        results.append({"key": key, "variant": label, "file": str(path), "smape": metrics.smape(truth, pred),
                        "smape_ci95": group_bootstrap_ci(truth, pred, groups)})
    write_json(run_dir / "reports" / "ikea_extras.json", {"n_test": len(truth), "results": results})
    table = ["| variant | test SMAPE (%) | 95% CI (groups) |", "|---|---|---|"]
    table += [f"| {r['variant']} | {r['smape']:.2f} | {r['smape_ci95'][0]:.1f}-{r['smape_ci95'][1]:.1f} |"
              for r in results]
    atomic_write_text(run_dir / "reports" / "ikea_extras.md", "\n".join(table) + "\n")
    print("\n".join(table))
    log.info("IKEA variants -> %s", run_dir / "reports" / "ikea_extras.md")
    return 0


main = config_main(PriceFusionConfig, ikea, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
