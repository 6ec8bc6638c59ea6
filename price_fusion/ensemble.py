"""Combine prediction files: the plain mean, or weights fitted on out-of-fold predictions.

    python -m price_fusion.ensemble --config configs/price_fusion/demo.yaml \
        'ensemble.inputs=[runs/price_fusion/demo/predictions/test_out.csv,runs/price_fusion/demo_gbt/predictions/test_out.csv]'
    python -m price_fusion.ensemble ... ensemble.method=fitted \
        'ensemble.oof_inputs=[runs/price_fusion/kfold/predictions/oof_predictions.csv,runs/price_fusion/demo_gbt/predictions/oof_predictions.csv]'

The combination is a weighted arithmetic mean of dollar prices, sum_m w_m p_m with w >= 0 and sum w = 1 (the
original averaged its models this way with equal weights). `fitted` picks w minimising SMAPE on the out-of-fold
predictions of the same models (each model's OOF file must cover the same labelled ids, in any order), so the
weights never see a price the models were trained on. Each single model (w one-hot) and the plain mean are
candidates beside the optimiser's answer, so the fitted blend is never worse on those rows than the best input: with
the baselines among the inputs (`python -m price_fusion.baselines`), never worse there than the best baseline. A
blend that gains less than ensemble.min_gain SMAPE points there over the best single input is dropped for that input
alone (small gains on a few hundred products are noise).
Writes ensemble.output and <output>.weights.json.

The recommended output of the package on a catalogue (all on the same grouped folds;
scripts/price_fusion/recommended.sh CONFIG runs these):

    python -m price_fusion.train ... train.kfold=5 && python -m price_fusion.predict ...
    python -m price_fusion.gbt ... && python -m price_fusion.baselines ... run_name=<b>
    python -m price_fusion.ensemble ... ensemble.method=fitted ensemble.inputs=[<the five test_out.csv>] \
        ensemble.oof_inputs=[<their five oof_predictions.csv, same order>]
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from common import metrics
from common.cli import config_main
from common.errors import UserError
from common.logs import setup_logging, write_json

from .config import PriceFusionConfig
from .data import read_catalog
from .prediction_files import read_predictions, write_predictions

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
    """Weights [M] on the simplex minimising SMAPE(prices @ w, actual): softmax-parameterised Nelder-Mead, started
    from equal weights and from each model alone, against every single model and the plain mean as candidates.
    SMAPE(prices @ w) <= min over m of SMAPE(prices[:, m]) always holds (a one-hot w is a candidate)."""
    n_models = prices.shape[1]
    if n_models == 1:
        return np.ones(1)

    def softmax(logits: np.ndarray) -> np.ndarray:
        w = np.exp(logits - logits.max())
        return w / w.sum()

    def objective(logits: np.ndarray) -> float:
        return metrics.smape(actual, prices @ softmax(logits))

    candidates = [np.eye(n_models)[m] for m in range(n_models)] + [np.full(n_models, 1.0 / n_models)]
    for start in [np.zeros(n_models)] + [3.0 * np.eye(n_models)[m] for m in range(n_models)]:
        best = minimize(objective, start, method="Nelder-Mead",
                        options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 400 * n_models})
        candidates.append(softmax(best.x))
    scores = [metrics.smape(actual, prices @ w) for w in candidates]
    return candidates[int(np.argmin(scores))]


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
        best = int(np.argmin(report["oof_smape_per_model"]))
        report["oof_smape_blend"] = metrics.smape(actual, oof @ weights)
        report["blend_kept"] = bool(report["oof_smape_blend"] <= report["oof_smape_per_model"][best] - ec.min_gain)
        if not report["blend_kept"]:
            log.info("the fitted blend gains %.3f < ensemble.min_gain=%g SMAPE points over %s alone: using it alone",
                     report["oof_smape_per_model"][best] - report["oof_smape_blend"], ec.min_gain, ec.inputs[best])
            weights = np.eye(len(weights))[best]
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
