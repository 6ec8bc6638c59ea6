"""In-memory tensors and index batching: the whole training set lives in four tensors, a batch is a fancy index.

A per-item `Dataset` + `DataLoader` pays Python overhead and a collate per sample; here one epoch is
`torch.randperm` plus one gather per batch (see benchmarks/price_fusion_epoch.py for the measured ratio).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

from .data import STRUCT_NAMES, Catalog, read_catalog
from .embedding_store import EmbeddingSet, align_to_ids, load_embeddings

# Per-epoch shuffling seed = seed * EPOCH_SEED_STRIDE + epoch, so every epoch's order is a pure function of
# (seed, epoch) and a resumed run replays exactly the order the uninterrupted one used.
EPOCH_SEED_STRIDE = 1_000_003


@dataclass
class FusionTensors:
    """Model inputs for N products (CPU tensors) and, for labelled data, the log price target."""

    sample_ids: np.ndarray  # [N] str
    image: torch.Tensor  # [N, D_img] float32
    has_image: torch.Tensor  # [N] bool
    text: torch.Tensor  # [N, D_txt] float32
    struct: torch.Tensor  # [N, S] float32
    log_price: torch.Tensor | None = None  # [N] float32, natural log of dollars

    def __len__(self) -> int:
        return len(self.sample_ids)

    def inputs(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
        """(image, has_image, text, struct) of `rows` (a LongTensor of row indices, or a slice)."""
        if isinstance(rows, slice):
            return self.image[rows], self.has_image[rows], self.text[rows], self.struct[rows]
        # index_select measured 1.5-2.5x faster than advanced indexing for these row gathers on this CPU
        return tuple(t.index_select(0, rows.to(t.device)) for t in (self.image, self.has_image, self.text, self.struct))

    def target(self, rows: torch.Tensor) -> torch.Tensor:
        """log price [len(rows)] of `rows`."""
        return self.log_price.index_select(0, rows.to(self.log_price.device))

    def to(self, device: torch.device | str) -> FusionTensors:
        """All tensors on `device` (the whole training set fits in GPU memory: 75k x 1795 float32 is 540 MB)."""
        return FusionTensors(self.sample_ids, self.image.to(device), self.has_image.to(device), self.text.to(device),
                             self.struct.to(device), None if self.log_price is None else self.log_price.to(device))

    def subset(self, rows: np.ndarray) -> FusionTensors:
        index = torch.as_tensor(rows, dtype=torch.long)
        return FusionTensors(self.sample_ids[rows], self.image[index], self.has_image[index], self.text[index],
                             self.struct[index], None if self.log_price is None else self.log_price[index])


def to_tensors(emb: EmbeddingSet, rows: np.ndarray | None = None, prices: np.ndarray | None = None,
               use_image: bool = True) -> FusionTensors:
    """Materialise (rows of) an embedding set as tensors; `use_image=False` masks the image branch everywhere."""
    rows = np.arange(len(emb)) if rows is None else rows
    mask = torch.from_numpy(np.asarray(emb.has_image[rows], dtype=bool))
    if not use_image:
        mask = torch.zeros_like(mask)
    log_price = None if prices is None else torch.from_numpy(np.log(prices).astype(np.float32))
    return FusionTensors(emb.sample_ids[rows], torch.from_numpy(np.asarray(emb.image[rows], dtype=np.float32)), mask,
                         torch.from_numpy(np.asarray(emb.text[rows], dtype=np.float32)),
                         torch.from_numpy(np.asarray(emb.struct[rows], dtype=np.float32)), log_price)


def load_split(embeddings_dir: str | Path, split: str, csv_path: str | Path, labelled: bool, bad_price: str = "skip",
               use_image: bool = True, group_column: str = "", structural: str = "") -> tuple[Catalog, FusionTensors]:
    """Read a CSV and its embeddings, aligned by sample id in CSV order (bad-price rows skipped or rejected); the
    CSV's `group_column` (if given) is read into `Catalog.group_values`. `structural` (data.structural), when given,
    must be the setting the embeddings were written under, else `UserError` (a manifest without the key is legacy
    when it names the legacy columns, as `embed` wrote them before the setting existed; else it is not checked)."""
    catalog = read_catalog(csv_path, require_price=labelled, bad_price=bad_price, group_column=group_column)
    emb = load_embeddings(Path(embeddings_dir) / split)
    written = emb.manifest.get("structural",
                               "legacy" if emb.manifest.get("struct_names") == list(STRUCT_NAMES) else structural)
    if structural and written != structural:
        raise UserError(f"{Path(embeddings_dir) / split}: structural features written with data.structural={written} "
                        f"but the config says data.structural={structural}; run python -m price_fusion.embed with "
                        f"this config, or set data.structural={written}")
    rows = align_to_ids(emb, catalog.sample_ids, str(csv_path))
    return catalog, to_tensors(emb, rows, catalog.prices, use_image)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Row-index batches [<= batch_size] of a permutation of range(n) that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    order = torch.randperm(n, generator=generator)  # on CPU, so the order is the same on every device
    yield from order.split(batch_size)


@torch.no_grad()
def predict_log_price(model: torch.nn.Module, data: FusionTensors, batch_size: int = 4096) -> np.ndarray:
    """[N] float64 predicted log price in eval mode (dropout off); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    out = [model(*data.inputs(slice(i, i + batch_size))) for i in range(0, len(data), batch_size)]
    model.train(was_training)
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)
