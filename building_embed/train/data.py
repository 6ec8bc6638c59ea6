"""Training data: the merged splits as tensors, and P x K batches whose negatives come from one difficulty band.

    splits = load_splits(cfg)                       # train / val / test: embeddings [N, D], identity codes, panoramas
    negatives = BandNegatives.from_difficulty(path, splits["train"], n_bands)
    rows = pk_batch(train, negatives, band, P, K, n_negative, anchors, rng)   # [P * K] row indices into train

A batch holds P identities x K views: P - n_negative anchor identities (every identity with >= 2 images anchors once
per epoch, in a seeded order) and n_negative identities that the difficulty file lists as neighbours, in the chosen
band, of the anchors' images (band 0 = the nearest other identities). When the band holds too few, random other
identities fill the batch; the last band (rank past the last edge, beyond neighbors_k) is therefore random negatives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from building_embed.config import BuildingEmbedConfig
from building_embed.difficulty.compute_visual_neighbors import OUTPUT_FILE, REPORT_FILE
from building_embed.preprocess.merge_and_split import SPLITS, read_split, split_embedding_dim
from building_embed.preprocess.schema import IDENTITY, IMAGE_KEY, read_parquet_checked
from building_embed.train.retrieval import relevant_counts
from common.errors import UserError
from common.io import require_finite

PANORAMA = "street_view_id"


@dataclass
class SplitData:
    """One split: float32 embeddings [N, D], identity codes [N] (int64), panorama codes [N] and the frame."""

    name: str
    path: Path
    frame: pd.DataFrame
    embeddings: torch.Tensor
    identity: np.ndarray
    panorama: np.ndarray

    def __len__(self) -> int:
        return len(self.identity)


def split_paths(cfg: BuildingEmbedConfig) -> dict[str, Path]:
    return {s: Path(cfg.paths.merged_dir) / f"{s}.parquet" for s in SPLITS}


def difficulty_path(cfg: BuildingEmbedConfig) -> Path:
    return Path(cfg.paths.difficulty_dir) / OUTPUT_FILE


def load_split(path: Path, name: str, input_dim: int) -> SplitData:
    """Read a merged split, refusing (UserError) a missing file, a width other than `input_dim` or NaN rows."""
    if not path.is_file():
        raise UserError(f"{path}: split not found; run python -m building_embed.preprocess.merge_and_split first")
    width = split_embedding_dim(path)
    if width != input_dim:
        raise UserError(f"{path}: embeddings are {width} wide but training_model.input_dim is {input_dim}; set "
                        f"training_model.input_dim={width} (or regenerate the embeddings with the backbone the "
                        "head was configured for)")
    frame, values = read_split(path)
    require_finite(values, path, what="row", row_ids=frame[IMAGE_KEY].tolist(),
                   fix="regenerate the embeddings and rerun merge_and_split")
    identity = pd.factorize(frame[IDENTITY], sort=True)[0].astype(np.int64)
    panorama = pd.factorize(frame[PANORAMA].astype(str), sort=True)[0].astype(np.int64)
    return SplitData(name, path, frame, torch.from_numpy(np.ascontiguousarray(values, np.float32)), identity, panorama)


def load_splits(cfg: BuildingEmbedConfig) -> dict[str, SplitData]:
    return {s: load_split(p, s, cfg.training_model.input_dim) for s, p in split_paths(cfg).items()}


def require_trainable(train: SplitData, val: SplitData) -> None:
    """UserError (before anything is written) when the train split has no identity with two images (no triplet can
    be formed) or the val split has no identity with images from two panoramas (nothing to retrieve)."""
    counts = np.bincount(train.identity) if len(train) else np.zeros(0, np.int64)
    if not (counts >= 2).any():
        raise UserError(f"{train.path}: no identity of the train split has two images ({len(train)} images, "
                        f"{len(counts)} identities), so no triplet can be formed; rerun merge_and_split on data with "
                        "several views per building (or lower data.dedup_max_distance if deduplication dropped them)")
    if not (relevant_counts(val.identity, val.panorama) > 0).any():
        raise UserError(f"{val.path}: no identity of the val split has images from two panoramas ({len(val)} images, "
                        f"{len(np.unique(val.identity))} identities), so recall and mAP@R (which leave the query's own "
                        "panorama out) cannot be measured; raise data.val_fraction or rerun merge_and_split with "
                        "another global.seed")


@dataclass
class BandNegatives:
    """For each train identity and band: the other identities whose images neighbour its images in that band."""

    by_band: list[list[np.ndarray]]  # [band][identity] -> sorted unique identity codes
    n_bands: int

    @classmethod
    def from_difficulty(cls, path: Path, train: SplitData) -> BandNegatives:
        if not path.is_file():
            raise UserError(f"{path}: difficulty file not found; run python -m "
                            "building_embed.difficulty.compute_visual_neighbors first")
        table = read_parquet_checked(path, ["split", "row", IMAGE_KEY, "neighbor_rows", "neighbor_band"],
                                     "paths.difficulty_dir", types=None).to_pandas()
        table = table[table["split"] == "train"].sort_values("row")
        keys = train.frame[IMAGE_KEY].to_numpy()
        if len(table) != len(train) or not (table[IMAGE_KEY].to_numpy() == keys).all():
            raise UserError(f"{path}: its train rows do not match {train.path} (written from other splits); rerun "
                            "compute_visual_neighbors after merge_and_split")
        report_path = path.parent / REPORT_FILE
        edges = json.loads(report_path.read_text(encoding="utf-8"))["band_edges"] if report_path.is_file() else None
        n_bands = (len(edges) + 1) if edges is not None else int(max(b.max() for b in table["neighbor_band"])) + 1
        n_ids = int(train.identity.max()) + 1
        pairs: list[list[set]] = [[set() for _ in range(n_ids)] for _ in range(n_bands)]
        for row, (neighbors, bands) in enumerate(zip(table["neighbor_rows"], table["neighbor_band"])):
            own = train.identity[row]
            for nb, band in zip(np.asarray(neighbors), np.asarray(bands)):
                if band >= 0:
                    pairs[int(band)][own].add(int(train.identity[nb]))
        by_band = [[np.array(sorted(s), dtype=np.int64) for s in band] for band in pairs]
        return cls(by_band, n_bands)


class IdentityIndex:
    """Rows of each identity, and the identities that can anchor (>= 2 images)."""

    def __init__(self, identity: np.ndarray) -> None:
        self.n_identities = int(identity.max()) + 1
        order = np.argsort(identity, kind="stable")
        bounds = np.searchsorted(identity[order], np.arange(self.n_identities + 1))
        self.rows = [order[bounds[i]:bounds[i + 1]] for i in range(self.n_identities)]
        self.anchorable = np.array([i for i, r in enumerate(self.rows) if len(r) >= 2], dtype=np.int64)


def anchor_schedule(index: IdentityIndex, n_anchor: int, n_batches: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Anchor identities of each batch of an epoch: seeded permutations of the anchorable identities, cycled."""
    if not len(index.anchorable):
        raise ValueError("no identity has two images: nothing can anchor a batch (see require_trainable)")
    rng = np.random.default_rng([seed, epoch, 0])
    order: list[int] = []
    while len(order) < n_anchor * n_batches:
        order += rng.permutation(index.anchorable).tolist()
    return [np.array(order[b * n_anchor:(b + 1) * n_anchor]) for b in range(n_batches)]


def pk_batch(index: IdentityIndex, negatives: BandNegatives, band: int, anchors: np.ndarray, n_negative: int,
             views: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices [(len(unique anchors) + n_negative) * views] of one batch.

    Negatives: identities neighbouring the anchors in `band`, drawn uniformly among them without replacement;
    random other identities fill any shortfall.
    """
    anchors = np.unique(anchors)
    candidates = np.unique(np.concatenate([negatives.by_band[band][a] for a in anchors]))
    candidates = np.setdiff1d(candidates, anchors)
    chosen = rng.choice(candidates, size=min(n_negative, len(candidates)), replace=False) if len(candidates) else \
        np.empty(0, np.int64)
    if len(chosen) < n_negative:
        rest = np.setdiff1d(np.arange(index.n_identities), np.concatenate([anchors, chosen]))
        chosen = np.concatenate([chosen, rng.choice(rest, size=min(n_negative - len(chosen), len(rest)),
                                                    replace=False)])
    rows = [rng.choice(index.rows[i], size=views, replace=len(index.rows[i]) < views)
            for i in np.concatenate([anchors, chosen]).astype(np.int64)]
    return np.concatenate(rows)
