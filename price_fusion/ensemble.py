"""Combine prediction files: the plain mean, or weights fitted on out-of-fold predictions.

    python -m price_fusion.ensemble --config configs/price_fusion/demo.yaml \
        'ensemble.inputs=[runs/price_fusion/demo/predictions/test_out.csv,runs/price_fusion/demo_gbt/predictions/test_out.csv]'
    python -m price_fusion.ensemble ... ensemble.method=fitted \
        'ensemble.oof_inputs=[runs/price_fusion/kfold/predictions/oof_predictions.csv,runs/price_fusion/demo_gbt/predictions/oof_predictions.csv]'

The combination is a weighted arithmetic mean of dollar prices, sum_m w_m p_m with w >= 0 and sum w = 1 (the
original averaged its models this way with equal weights). `fitted` picks w minimising SMAPE on the out-of-fold
predictions of the same models (each model's OOF file must cover the same labelled ids, in any order), so the
weights never see a price the models were trained on. Writes ensemble.output and <output>.weights.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from common import metrics
from common.cli import UserError, config_main
from common.logs import setup_logging, write_json

from .config import PriceFusionConfig
from .data import read_catalog
from .predictions import read_predictions, write_predictions

log = logging.getLogger(__name__)


def load_aligned(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sample_ids [N], prices [N, M]) of M prediction files, rows in the first file's order.

    Raises `UserError` naming the file and the first ids when the files do not cover the same products.
    """
    if not paths:
        raise UserError("ensemble.inputs is empty; list at least one prediction CSV (sample_id,price)")
    frames = [read_predictions(p) for p in paths]
    ids = frames[0].sample_id.to_numpy()
    columns = []
    for path, frame in zip(paths, frames):
        price_of = dict(zip(frame.sample_id, frame.price))
        missing = [s for s in ids if s not in price_of]
        extra = sorted(set(price_of) - set(ids.tolist()))
        if missing or extra:
            raise UserError(f"{path}: ids differ from {paths[0]}: {len(missing)} missing (first {missing[:5]}), "
                            f"{len(extra)} extra (first {extra[:5]}); combine predictions of the same products")
        columns.append([price_of[s] for s in ids])
    return ids, np.asarray(columns, dtype=np.float64).T


def fit_weights(prices: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Weights [M] on the simplex minimising SMAPE(prices @ w, actual); softmax-parameterised Nelder-Mead."""
    n_models = prices.shape[1]
    if n_models == 1:
        return np.ones(1)

    def objective(logits: np.ndarray) -> float:
        w = np.exp(logits - logits.max())
        return metrics.smape(actual, prices @ (w / w.sum()))

    best = minimize(objective, np.zeros(n_models), method="Nelder-Mead",
                    options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 400 * n_models})
    w = np.exp(best.x - best.x.max())
    return w / w.sum()


def ensemble(cfg: PriceFusionConfig) -> int:
    setup_logging()
    ec = cfg.ensemble
    ids, prices = load_aligned(ec.inputs)
    report: dict = {"inputs": ec.inputs, "method": ec.method}
    if ec.method == "fitted":
        if len(ec.oof_inputs) != len(ec.inputs):
            raise UserError(f"ensemble.oof_inputs has {len(ec.oof_inputs)} files for {len(ec.inputs)} inputs; give "
                            "one out-of-fold prediction CSV per input, in the same order")
        oof_ids, oof = load_aligned(ec.oof_inputs)
        catalog = read_catalog(cfg.data.train_csv, require_price=True, bad_price=cfg.data.bad_price)
        price_of = dict(zip(catalog.sample_ids.tolist(), catalog.prices.tolist()))
        unknown = [s for s in oof_ids if s not in price_of]
        if unknown:
            raise UserError(f"{ec.oof_inputs[0]}: {len(unknown)} ids have no price in {cfg.data.train_csv}, "
                            f"first {unknown[:5]}")
        actual = np.array([price_of[s] for s in oof_ids])
        weights = fit_weights(oof, actual)
        report["oof_smape_per_model"] = [metrics.smape(actual, oof[:, m]) for m in range(oof.shape[1])]
        report["oof_smape_mean"] = metrics.smape(actual, oof.mean(1))
        report["oof_smape_fitted"] = metrics.smape(actual, oof @ weights)
        log.info("OOF SMAPE per model %s, mean %.3f, fitted %.3f", [f"{v:.3f}" for v in report["oof_smape_per_model"]],
                 report["oof_smape_mean"], report["oof_smape_fitted"])
    else:
        weights = np.full(prices.shape[1], 1.0 / prices.shape[1])
    report["weights"] = weights.tolist()
    out = Path(ec.output)
    write_predictions(out, ids, prices @ weights, expected_ids=ids)
    write_json(out.with_suffix(".weights.json"), report)
    log.info("ensemble of %d files (weights %s) -> %s", prices.shape[1], np.round(weights, 3).tolist(), out)
    return 0


main = config_main(PriceFusionConfig, ensemble, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
