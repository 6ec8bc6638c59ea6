"""The pieces of a training loop both the classifier and the regressor stages use: seeded batch orders (sharded
across torchrun ranks), batch assembly from an ImplantDataset, the process group and device, and plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.distributed import DistInfo, setup_distributed
from implant_dims.config import ImplantConfig
from implant_dims.data import ImplantDataset
from implant_dims.stage_setup import autocast_dtype, pick_device

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def start_runtime(cfg: ImplantConfig) -> Runtime:
    """The process group under torchrun (gloo on CPU, NCCL on GPU; world size 1 alone), this rank's device and the
    autocast dtype of run.amp."""
    wanted = pick_device(cfg.run.device)
    info = setup_distributed(wanted.type)
    device = info.device if info.world_size > 1 else wanted
    return Runtime(info, device, autocast_dtype(cfg.run.amp, device))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                  world_size: int = 1) -> list[np.ndarray]:
    """Index batches of one epoch. The order is a permutation drawn from (seed, epoch) only, so a resumed run sees
    the batches the uninterrupted one would have. With several ranks each takes every world_size-th index of the
    order (padded by wrapping so every rank runs the same number of steps)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if world_size > 1:
        padded = int(np.ceil(n / world_size)) * world_size
        order = np.resize(order, padded)[rank::world_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(dataset: ImplantDataset, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in idx]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]).to(device) for key in items[0]}


def scatter_plot(true: np.ndarray, pred: np.ndarray, names: tuple[str, ...], path: Path, title: str) -> None:
    """Predicted against true, one panel per dimension, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.2))
    for k, (ax, name) in enumerate(zip(np.atleast_1d(axes), names)):
        lo, hi = float(min(true[:, k].min(), pred[:, k].min())), float(max(true[:, k].max(), pred[:, k].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.scatter(true[:, k], pred[:, k], s=8, alpha=0.6)
        mae = float(np.abs(true[:, k] - pred[:, k]).mean())
        ax.set_title(f"{name} (MAE {mae:.3f} mm)")
        ax.set_xlabel("true (mm)")
        ax.set_ylabel("predicted (mm)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_plot(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
