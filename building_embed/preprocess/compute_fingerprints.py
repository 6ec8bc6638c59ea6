"""SHA-256 and perceptual hash (imagehash.phash) of every image of the parquet intermediates.

    python -m building_embed.preprocess.compute_fingerprints --config configs/building_embed/config.toml

Writes `paths.merged_dir/fingerprints.parquet`: image_key, identity, sha256 (hex), phash (uint64: the
data.dedup_hash_size^2 hash bits, row-major). merge_and_split computes the same table itself when it runs.
`near_pairs` finds every pair of hashes within a Hamming distance without comparing all N^2 pairs.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from building_embed.config import BuildingEmbedConfig
from building_embed.preprocess.schema import IDENTITY, IMAGE_BYTES, IMAGE_KEY
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write
from common.logs import progress, setup_logging

log = logging.getLogger(__name__)
FINGERPRINTS_FILE = "fingerprints.parquet"
HASH_BITS = 64


def phash_uint64(data: bytes, hash_size: int = 8) -> int:
    """imagehash.phash of JPEG bytes, its hash_size^2 bits packed (row-major, first bit highest) into an int."""
    with Image.open(io.BytesIO(data)) as image:
        bits = imagehash.phash(image, hash_size=hash_size).hash.reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


def intermediate_shards(intermediates_dir: str | Path) -> list[Path]:
    directory = Path(intermediates_dir)
    shards = sorted(directory.glob("*.parquet")) if directory.is_dir() else []
    if not shards:
        raise UserError(f"{directory}: no intermediate *.parquet shards; run python -m "
                        "building_embed.preprocess.process_tar first or set paths.intermediates_dir")
    return shards


def compute_fingerprints(intermediates_dir: str | Path, hash_size: int = 8) -> pd.DataFrame:
    """One row per intermediate image: image_key, identity, sha256, phash (uint64), sorted by image_key."""
    frames = []
    for shard in progress(intermediate_shards(intermediates_dir), desc="fingerprints"):
        table = pq.read_table(shard, columns=[IMAGE_KEY, IDENTITY, IMAGE_BYTES])
        images = table.column(IMAGE_BYTES).to_pylist()
        frames.append(pd.DataFrame({
            IMAGE_KEY: table.column(IMAGE_KEY).to_pylist(), IDENTITY: table.column(IDENTITY).to_pylist(),
            "sha256": [hashlib.sha256(b).hexdigest() for b in images],
            "phash": np.asarray([phash_uint64(b, hash_size) for b in images], dtype=np.uint64)}))
    out = pd.concat(frames, ignore_index=True).sort_values(IMAGE_KEY, kind="stable").reset_index(drop=True)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.asarray(a, np.uint64) ^ np.asarray(b, np.uint64)).astype(np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs [P, 3] (i, j, distance), i < j, of hashes at Hamming distance <= max_distance, sorted.

    Pigeonhole: split the 64 bits into max_distance + 1 chunks; two hashes that close agree on at least one whole
    chunk, so only hashes sharing a chunk value are compared (per bucket, not all N^2 pairs).
    """
    h = np.asarray(hashes, np.uint64)
    bounds = np.linspace(0, HASH_BITS, max_distance + 2).astype(int)
    found = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        mask = np.uint64((1 << (hi - lo)) - 1)
        keys = (h >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(h)]
        for start, end in zip(starts, ends):
            if end - start < 2:
                continue
            members = order[start:end]
            dist = hamming(h[members][:, None], h[members][None, :])
            ii, jj = np.nonzero(np.triu(dist <= max_distance, 1))
            a, b = members[ii], members[jj]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b), dist[ii, jj]], axis=1))
    if not found:
        return np.zeros((0, 3), np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def write_fingerprints(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def run(cfg: BuildingEmbedConfig) -> int:
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    frame = compute_fingerprints(cfg.paths.intermediates_dir, cfg.data.dedup_hash_size)
    path = Path(cfg.paths.merged_dir) / FINGERPRINTS_FILE
    write_fingerprints(frame, path)
    log.info("%d fingerprints (%d distinct SHA-256) -> %s", len(frame), frame.sha256.nunique(), path)
    return 0


main = config_main(BuildingEmbedConfig, run, __doc__, prog="python -m building_embed.preprocess.compute_fingerprints")

if __name__ == "__main__":
    raise SystemExit(main())
