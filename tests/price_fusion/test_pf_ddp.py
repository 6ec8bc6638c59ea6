"""torchrun DDP (gloo, CPU) of price_fusion.train: 2 processes take the steps 1 process takes with the same global
batch (train.batch_size), only rank 0 writes, and resume=auto continues a DDP run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from torchrun_launch import torchrun

from common.config import load_config
from common.logs import read_metrics
from common.seed import seed_everything
from price_fusion import train
from price_fusion.config import PriceFusionConfig
from price_fusion.model import build_model

pytestmark = pytest.mark.slow  # torchrun subprocesses that import torch: ~10 s each on 2 shared cores
# Dropout off: it draws its masks per rank, so with it on the two runs differ by design. A global batch of 25 splits
# 13 / 12 rows between the ranks, and the default loss (weighted_smape, a price-tier-weighted mean) gives the two
# halves unequal loss weights: the share weighting of unequal parts is exercised on every step.
DDP = ("model.dropout=0", "train.batch_size=25", "train.epochs=3", "train.patience=50", "train.resume=auto")
# Tolerances. The same global batch goes through the same ops, but as two half-batches whose gradients gloo sums:
# the float32 summation order differs (GEMM blocking by batch size, the all-reduce, the share factors), which moves
# the weights by a few ulp per step, and AdamW divides each step by the gradient's own root mean square, so entries
# with tiny gradients carry that rounding into lr-sized steps. Measured here after 24 steps: max weight difference
# 1.8e-6 (text_branch.0.weight), metrics 8.6e-7 relative. 2e-5 leaves 10x room for other BLAS builds and is far below
# what training moves (asserted > 1e-2; ~7e-2 here); dropping the share weighting (each rank's plain batch mean)
# gives 3.8e-2 and fails both the weight and the loss-curve checks.
WEIGHT_TOL = 2e-5
LOSS_REL_TOL = 1e-5


def weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def initial_weights(argv: list[str], run: Path) -> dict[str, np.ndarray]:
    """The weights fit_one starts from (before the data-fitted struct stats and output bias): build_model right after
    seed_everything(train.seed), with the dims the checkpoint records."""
    cfg = load_config(PriceFusionConfig, None, argv)
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, meta["image_dim"], meta["text_dim"], meta["struct_dim"])
    return {k: v.numpy() for k, v in model.state_dict().items()}


def worst_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max((float(np.abs(a[k] - b[k]).max()), k) for k in a)


def assert_same_curves(ddp: Path, single: Path, epochs: list[int]) -> float:
    curve_a, curve_b = read_metrics(ddp / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    # exactly one line per epoch: only rank 0 writes metrics.jsonl
    assert [m["epoch"] for m in curve_a] == [m["epoch"] for m in curve_b] == epochs
    worst = 0.0
    for x, y in zip(curve_a, curve_b, strict=True):
        for key in ("train_loss", "val_smape", "val_mae", "best_val_smape"):
            worst = max(worst, abs(x[key] - y[key]) / abs(y[key]))
            assert x[key] == pytest.approx(y[key], rel=LOSS_REL_TOL), (x["epoch"], key)
        assert x["lr"] == y["lr"]  # train.lr x plateau_factor^k: the same k gives the same float, exact
    return worst


def test_torchrun_two_processes_equal_one_and_resume(sample_env, tmp_path):
    args = sample_env["args"](tmp_path, *DDP)
    assert train.main([*args, "run_name=single"]) == 0
    done = torchrun("price_fusion.train", [*args, "run_name=ddp"])
    ddp, single = tmp_path / "ddp", tmp_path / "single"

    worst, key = worst_difference(weights(ddp), weights(single))
    start = initial_weights(args, single)
    # not the buffers set from the data (struct standardisation) nor the output bias (set to the mean log price)
    trained = [k for k in start if not k.endswith(("struct_mean", "struct_std"))
               and not (k.endswith("bias") and start[k].shape == (1,))]
    moved = max(float(np.abs(weights(ddp)[k] - start[k]).max()) for k in trained)
    print(f"2 ranks vs 1: max |w_ddp - w_single| {worst:.2e} ({key}), moved from init {moved:.2e}")
    assert worst < WEIGHT_TOL, (worst, key)
    assert moved > 1e-2, moved
    print(f"max rel metric diff {assert_same_curves(ddp, single, [1, 2, 3]):.2e}")

    # only rank 0 logs, writes the checkpoints, the predictions and the report
    log = (ddp / "train.log").read_text()
    assert log.count("epoch 1  loss") == log.count("epoch 3  loss") == 1
    assert done.stderr.count("val_predictions.csv: SMAPE") == 1
    for path in ("config.yaml", "split.json", "done.json", "checkpoints/best/meta.json",
                 "predictions/val_predictions.csv", "reports/train_summary.json"):
        assert (ddp / path).is_file(), path
    assert json.loads((ddp / "split.json").read_text()) == json.loads((single / "split.json").read_text())
    assert not list(ddp.rglob(".tmp-*")) and not list(ddp.rglob(".old-*"))

    # resume=auto under DDP: rank 0 wrote epoch 3, both ranks load it and train epoch 4; one process does the same
    torchrun("price_fusion.train", [*args, "run_name=ddp", "train.epochs=4"])
    assert train.main([*args, "run_name=single", "train.epochs=4"]) == 0
    assert "resumed from" in (ddp / "train.log").read_text()
    assert_same_curves(ddp, single, [1, 2, 3, 4])
    worst, key = worst_difference(weights(ddp), weights(single))
    assert worst < WEIGHT_TOL, (worst, key)
