"""Exact nearest neighbours of every embedding, grouped into difficulty bands for negative sampling.

    python -m building_embed.difficulty.compute_visual_neighbors --config configs/building_embed/config.toml

For each split in data.difficulty_splits (each searched on its own, so a negative never comes from another split):
L2-normalise the embeddings, find the data.neighbors_k nearest other images by cosine similarity, exactly
(data.knn_method: faiss IndexFlatIP, or blocked matrix products in torch; both exhaustive), and give each neighbour
of another identity a band: by its rank among the negatives (data.band_by=rank, data.band_edges are rank upper
bounds) or by cosine similarity (band_by=cosine, band_edges are lower bounds, descending); len(band_edges) + 1
bands, band 0 the hardest. A neighbour of the same identity gets band -1 (a positive, never a negative).

Writes `paths.difficulty_dir/difficulty_metadata.parquet`, one row per image: split, image_key, identity, row (its
row in the split file), neighbor_rows [k], neighbor_keys [k], neighbor_cosine [k] (descending), neighbor_band [k],
hardest_negative_cosine; and difficulty_report.json (neighbours per band, images with a negative in band 0).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from building_embed.config import BuildingEmbedConfig, DataConfig
from building_embed.preprocess.merge_and_split import read_split
from building_embed.preprocess.schema import IDENTITY, IMAGE_KEY
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write, require_finite, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
OUTPUT_FILE = "difficulty_metadata.parquet"
REPORT_FILE = "difficulty_report.json"
SAME_IDENTITY_BAND = -1


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_faiss(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine [N, k], index [N, k]) of each row's k nearest other rows; exhaustive IndexFlatIP."""
    import faiss

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(np.ascontiguousarray(unit))
    sims, idx = index.search(np.ascontiguousarray(unit), k + 1)
    return _drop_self(sims, idx, k)


def knn_torch(unit: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(cosine [N, k], index [N, k]) by blocked matrix products: memory O(block * N), not O(N^2)."""
    data = torch.from_numpy(np.ascontiguousarray(unit))
    sims, idx = [], []
    for start in range(0, len(data), block):
        scores = data[start:start + block] @ data.T
        top = torch.topk(scores, k + 1, dim=1)
        sims.append(top.values.numpy())
        idx.append(top.indices.numpy())
    return _drop_self(np.concatenate(sims), np.concatenate(idx), k)


def _drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k + 1 results (it need not come first when duplicates tie)."""
    n = len(idx)
    is_self = idx == np.arange(n)[:, None]
    # rows where self is missing (ties beyond k + 1): drop the last result instead
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return sims[keep].reshape(n, k), idx[keep].reshape(n, k)


def exact_knn(embeddings: np.ndarray, k: int, method: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities [N, k] (descending) and indices [N, k] of each row's k nearest other rows."""
    unit = l2_normalize(embeddings)
    k = min(k, len(unit) - 1)
    if k < 1:
        raise UserError(f"need at least 2 embeddings for neighbours, got {len(unit)}")
    return knn_faiss(unit, k) if method == "faiss" else knn_torch(unit, k)


def assign_bands(sims: np.ndarray, same_identity: np.ndarray, data: DataConfig) -> np.ndarray:
    """Band [N, k] of each neighbour: 0 hardest; SAME_IDENTITY_BAND (-1) for a neighbour of the same identity.

    len(band_edges) + 1 bands. band_by=rank: a negative's rank r counts negatives only (1 = the nearest other
    identity); band b holds edges[b-1] < r <= edges[b] (band len(edges): r > the last edge). band_by=cosine
    (edges descending): band b holds edges[b] <= cosine < edges[b-1].
    """
    edges = np.asarray(data.band_edges, np.float64)
    if data.band_by == "rank":
        negative_rank = np.cumsum(~same_identity, axis=1)
        bands = np.searchsorted(edges, negative_rank, side="left")
    else:
        bands = (sims[..., None] < edges).sum(axis=-1)
    return np.where(same_identity, SAME_IDENTITY_BAND, bands).astype(np.int16)


def neighbors_for_split(path: Path, split: str, data: DataConfig) -> pd.DataFrame:
    frame, embeddings = read_split(path)
    require_finite(embeddings, path, what="row", row_ids=frame[IMAGE_KEY].tolist(),
                   fix="regenerate the embeddings and rerun merge_and_split")
    sims, idx = exact_knn(embeddings, data.neighbors_k, data.knn_method)
    identity = frame[IDENTITY].to_numpy()
    same = identity[idx] == identity[:, None]
    bands = assign_bands(sims, same, data)
    keys = frame[IMAGE_KEY].to_numpy()
    negative_sims = np.where(same, -np.inf, sims)
    return pd.DataFrame({
        "split": split, IMAGE_KEY: keys, IDENTITY: identity, "row": np.arange(len(frame)),
        "neighbor_rows": list(idx.astype(np.int64)), "neighbor_keys": list(keys[idx]),
        "neighbor_cosine": list(sims.astype(np.float32)), "neighbor_band": list(bands),
        "hardest_negative_cosine": np.where(np.isfinite(negative_sims.max(axis=1)), negative_sims.max(axis=1),
                                            np.nan).astype(np.float32),
    })


def compute(cfg: BuildingEmbedConfig) -> int:
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    if cfg.infrastructure.num_threads > 0:
        torch.set_num_threads(cfg.infrastructure.num_threads)
    merged, out_dir = Path(cfg.paths.merged_dir), Path(cfg.paths.difficulty_dir)
    frames = []
    for split in cfg.data.difficulty_splits:
        path = merged / f"{split}.parquet"
        if not path.is_file():
            raise UserError(f"{path}: not found (data.difficulty_splits names {split!r}); run merge_and_split first")
        frames.append(neighbors_for_split(path, split, cfg.data))
    result = pd.concat(frames, ignore_index=True)
    table = pa.Table.from_pandas(result, preserve_index=False)
    atomic_write(out_dir / OUTPUT_FILE, lambda tmp: pq.write_table(table, tmp))
    bands = np.concatenate(result["neighbor_band"].to_numpy())
    report = {"splits": list(cfg.data.difficulty_splits), "images": len(result), "method": cfg.data.knn_method,
              "band_by": cfg.data.band_by, "band_edges": list(cfg.data.band_edges),
              "neighbors_per_band": {str(b): int((bands == b).sum()) for b in sorted(set(bands.tolist()))},
              "same_identity_share_of_first_neighbor": float(np.mean([b[0] == SAME_IDENTITY_BAND
                                                                      for b in result["neighbor_band"]]))}
    write_json(out_dir / REPORT_FILE, report)
    log.info("difficulty: %d images, neighbours per band %s -> %s", len(result), report["neighbors_per_band"],
             out_dir / OUTPUT_FILE)
    return 0


main = config_main(BuildingEmbedConfig, compute, __doc__,
                   prog="python -m building_embed.difficulty.compute_visual_neighbors")

if __name__ == "__main__":
    raise SystemExit(main())
