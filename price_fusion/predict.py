"""Predict test prices: test_out.csv in the challenge format (sample_id,price), validated before it is written.

    python -m price_fusion.predict --config configs/price_fusion/demo.yaml
    python -m price_fusion.predict --config configs/price_fusion/demo.yaml predict.checkpoint=latest predict.output=out.csv

K-fold runs average the fold models' log prices (a geometric mean of dollar prices); runs trained with
train.refit=true use the refit model (refit/checkpoints/latest) instead. The ids written are those of the embedding
rows predicted, checked against the ids of the CSV: every CSV sample_id appears exactly once and every price is
positive and finite, or nothing is written and the exit code is 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from common.cli import config_main
from common.errors import UserError
from common.logs import setup_logging

from .batching import load_split, predict_log_price
from .config import PriceFusionConfig
from .data import read_catalog
from .evaluate import checkpoint_path
from .model import load_trained_model
from .prediction_files import log_to_price, write_predictions
from .train import REFIT_DIR

log = logging.getLogger(__name__)


def model_dirs(run_dir: Path, which: str) -> list[Path]:
    """The checkpoint directory of each model of a run: the refit model when the run has one, else one per fold for
    K-fold runs, else the run's own."""
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise UserError(f"{split_file} not found; train first (python -m price_fusion.train) with run_name "
                        f"{run_dir.name!r}")
    split = json.loads(split_file.read_text())
    if split.get("refit"):
        return [checkpoint_path(run_dir / REFIT_DIR, "latest")]
    k = split["kfold"]
    return [checkpoint_path(run_dir / f"fold_{i}", which) for i in range(k)] if k else [checkpoint_path(run_dir, which)]


def predict(cfg: PriceFusionConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    setup_logging()
    pc = cfg.predict
    csv_path = cfg.data.test_csv if pc.split == "test" else cfg.data.train_csv
    log_sum = None
    dirs = model_dirs(run_dir, pc.checkpoint)
    for ckpt in dirs:
        model, meta = load_trained_model(ckpt)
        catalog, data = load_split(cfg.data.embeddings_dir, pc.split, csv_path, labelled=False,
                                   use_image=meta.get("use_image", True))
        found = (data.image.shape[1], data.text.shape[1], data.struct.shape[1])
        if found != (meta["image_dim"], meta["text_dim"], meta["struct_dim"]):
            raise UserError(f"{cfg.data.embeddings_dir}/{pc.split}: embeddings are image {found[0]}-d / text "
                            f"{found[1]}-d / struct {found[2]}-d but {ckpt} was trained on {meta['image_dim']}-d / "
                            f"{meta['text_dim']}-d / {meta['struct_dim']}-d; embed the test CSV with the training "
                            "encoders and data.structural (the unit vocabulary fitted on train)")
        pred_log = predict_log_price(model, data)
        log_sum = pred_log if log_sum is None else log_sum + pred_log
    prices = log_to_price(log_sum / len(dirs))
    out = Path(pc.output) if pc.output else run_dir / "predictions" / "test_out.csv"
    # ids of the rows actually predicted, checked against the CSV read afresh (not against themselves)
    expected = read_catalog(csv_path, require_price=False, require_text=False).sample_ids
    write_predictions(out, data.sample_ids, prices, expected_ids=expected)
    log.info("%d predictions from %d model(s) -> %s (median $%.2f)", len(prices), len(dirs), out,
             float(np.median(prices)))
    return 0


main = config_main(PriceFusionConfig, predict, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
