"""Evaluate a trained run on its held-out split (the original's evaluate_by_groups).

    python -m price_fusion.evaluate --config configs/price_fusion/demo.yaml
    python -m price_fusion.evaluate --config configs/price_fusion/demo.yaml evaluate.checkpoint=latest
    python -m price_fusion.evaluate --config ... evaluate.predictions=runs/price_fusion/gbt/predictions/oof_predictions.csv
    python -m price_fusion.evaluate --config ... evaluate.predictions=test_out.csv evaluate.labels=test_labels.csv

Single-split runs are re-predicted from `checkpoints/<evaluate.checkpoint>` on the validation ids in split.json;
K-fold runs are scored from their out-of-fold prediction CSV against train.csv prices; `evaluate.predictions=FILE`
scores any prediction CSV against `evaluate.labels` (default train.csv), writing into <FILE's folder>/eval_<stem>/.
Writes <run>/reports/: evaluation_results.csv (every product), evaluation_by_bin.csv, evaluation_by_range.csv,
worst_predictions.csv, best_predictions.csv, evaluation_summary.json; <run>/plots/: pred_vs_actual.png,
smape_by_bin.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common import metrics
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write
from common.logs import setup_logging, write_json

from .batching import load_split, predict_log_price
from .config import EvaluateConfig, PriceFusionConfig
from .data import read_catalog
from .model import load_trained_model
from .prediction_files import log_to_price, read_predictions

log = logging.getLogger(__name__)
RANGE_NAMES = ("Low", "Medium", "High")


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """`best` / `latest` / `epoch_N` inside run_dir/checkpoints, or any other path as given."""
    if which in ("best", "latest") or which.startswith("epoch_"):
        return run_dir / "checkpoints" / which
    return Path(which)


def bin_labels(edges: list[float]) -> list[str]:
    """["$0-5", "$5-10", ..., "$250+"] for edges [0, 5, 10, ..., 250]."""
    return [f"${a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f"${edges[-1]:g}+"]


def group_table(frame: pd.DataFrame, column: str, order: list[str]) -> pd.DataFrame:
    """SMAPE / MAE / RMSE / mean price per group of `column`, in `order`, skipping empty groups."""
    rows = []
    for name in order:
        part = frame[frame[column] == name]
        if len(part):
            rows.append({column: name, "count": len(part), "smape": metrics.smape(part.actual, part.predicted),
                         "mae": metrics.mae(part.actual, part.predicted),
                         "rmse": metrics.rmse(part.actual, part.predicted), "mean_actual": part.actual.mean()})
    return pd.DataFrame(rows)


def evaluate_predictions(ids: np.ndarray, predicted: np.ndarray, actual: np.ndarray, ec: EvaluateConfig,
                         out_dir: Path) -> dict:
    """Write every report and plot for one set of (predicted, actual) dollar prices; returns the summary."""
    edges = sorted(ec.bin_edges)
    frame = pd.DataFrame({"sample_id": ids, "actual": actual, "predicted": predicted,
                          "smape": metrics.smape_terms(actual, predicted)})
    labels = bin_labels(edges)
    frame["price_bin"] = [labels[i] for i in np.clip(np.searchsorted(edges, actual, side="right") - 1, 0, None)]
    frame["price_range"] = [RANGE_NAMES[i] for i in np.searchsorted(sorted(ec.range_edges), actual, side="right")]
    summary = {"n": len(frame), "smape": metrics.smape(actual, predicted), "mae": metrics.mae(actual, predicted),
               "rmse": metrics.rmse(actual, predicted), "r2": metrics.r2(actual, predicted) if len(frame) > 1 else None,
               "median_smape": float(frame.smape.median())}
    by_bin, by_range = group_table(frame, "price_bin", labels), group_table(frame, "price_range", list(RANGE_NAMES))
    ranked = frame.sort_values("smape", ascending=False, kind="stable")
    reports, plots = out_dir / "reports", out_dir / "plots"
    tables = {"evaluation_results.csv": frame, "evaluation_by_bin.csv": by_bin, "evaluation_by_range.csv": by_range,
              "worst_predictions.csv": ranked.head(ec.top_n), "best_predictions.csv": ranked.tail(ec.top_n)[::-1]}
    for name, table in tables.items():
        atomic_write(reports / name, lambda tmp, t=table: t.to_csv(tmp, index=False, float_format="%.6g"))
    write_json(reports / "evaluation_summary.json", {**summary, "by_bin": by_bin.to_dict("records"),
                                                       "by_range": by_range.to_dict("records")})
    _plot(frame, by_bin, plots)
    return summary


def _plot(frame: pd.DataFrame, by_bin: pd.DataFrame, plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(frame.actual, frame.predicted, s=4, alpha=0.4)
    low, high = float(min(frame.actual.min(), frame.predicted.min())), float(max(frame.actual.max(),
                                                                                 frame.predicted.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="actual price ($)", ylabel="predicted price ($)",
           title=f"SMAPE {metrics.smape(frame.actual, frame.predicted):.2f}%")
    atomic_write(plots / "pred_vs_actual.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(by_bin.price_bin, by_bin.smape)
    ax.set(xlabel="true price bin", ylabel="SMAPE (%)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    atomic_write(plots / "smape_by_bin.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def held_out_predictions(cfg: PriceFusionConfig, run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids, predicted dollars, actual dollars) of the run's held-out products."""
    if not (run_dir / "split.json").is_file():
        raise UserError(f"{run_dir}/split.json not found; train first (python -m price_fusion.train) with the same "
                        "run_name, or pass evaluate.predictions=FILE")
    split = json.loads((run_dir / "split.json").read_text())
    if split["kfold"]:
        return _from_file(cfg, run_dir / "predictions" / "oof_predictions.csv")
    model, meta = load_trained_model(checkpoint_path(run_dir, cfg.evaluate.checkpoint))
    catalog, data = load_split(cfg.data.embeddings_dir, "train", cfg.data.train_csv, labelled=True,
                               bad_price=cfg.data.bad_price, use_image=meta.get("use_image", True))
    rows = np.flatnonzero(np.isin(catalog.sample_ids, np.asarray(split["val_ids"][0], dtype=str)))
    val = data.subset(rows)
    return val.sample_ids, log_to_price(predict_log_price(model, val)), catalog.prices[rows]


def _from_file(cfg: PriceFusionConfig, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score a prediction CSV against `evaluate.labels` (sample_id,price), default the training CSV's prices."""
    preds = read_predictions(path)
    labels = cfg.evaluate.labels or cfg.data.train_csv
    catalog = read_catalog(labels, require_price=True, bad_price=cfg.data.bad_price, require_text=False)
    price_of = dict(zip(catalog.sample_ids.tolist(), catalog.prices.tolist()))
    unknown = [sid for sid in preds.sample_id if sid not in price_of]
    if unknown:
        raise UserError(f"{path}: {len(unknown)} sample ids have no valid price in {labels}, first "
                        f"{unknown[:5]}; evaluate predictions of labelled products only (evaluate.labels=FILE)")
    return preds.sample_id.to_numpy(), preds.price.to_numpy(), np.array([price_of[s] for s in preds.sample_id])


def evaluate(cfg: PriceFusionConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    setup_logging()
    if cfg.evaluate.predictions:
        ids, predicted, actual = _from_file(cfg, Path(cfg.evaluate.predictions))
        # beside the file, so scoring e.g. test_out.csv never overwrites the run's own held-out reports
        out_dir = Path(cfg.evaluate.predictions).parent / f"eval_{Path(cfg.evaluate.predictions).stem}"
    else:
        ids, predicted, actual = held_out_predictions(cfg, run_dir)
        out_dir = run_dir
    summary = evaluate_predictions(ids, predicted, actual, cfg.evaluate, out_dir)
    log.info("%d held-out products: SMAPE %.3f%%  MAE %.3f  RMSE %.3f  R2 %s -> %s/reports", summary["n"],
             summary["smape"], summary["mae"], summary["rmse"],
             "n/a" if summary["r2"] is None else f"{summary['r2']:.4f}", out_dir)
    return 0


main = config_main(PriceFusionConfig, evaluate, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
