"""Merge intermediates and embeddings, drop duplicates, split train / val / test by identity and by place.

    python -m building_embed.preprocess.merge_and_split --config configs/building_embed/config.toml

Inputs: `paths.intermediates_dir` (process_tar) and `paths.embeddings_dir` (generate_embeddings), joined on
image_key; every image must have exactly one finite embedding of one width. Steps:

1. Fingerprints: SHA-256 and phash of every image (compute_fingerprints).
2. Dedup within an identity: images within data.dedup_max_distance bits of another image of the same identity are
   dropped, keeping the first by image_key (exact = same SHA-256; near = the rest).
3. Groups: identities are joined (union-find) when any of their facade points or camera positions lie within
   data.place_radius_m metres (ground distance), or when two of their images lie within data.leak_audit_distance bits
   (a view copied under another identity, or a panorama shared by neighbours).
4. Split: whole groups, in a seeded random order, each to the split furthest below its share of images.
5. Audit, computed afresh on the result: image pairs within data.leak_audit_distance bits in different splits,
   identities and groups in two splits. All must be 0; otherwise the stage exits 1 (a bug), report written.

Writes to `paths.merged_dir`: train.parquet, val.parquet, test.parquet (metadata, place_group, phash, float16
embedding; schema metadata records embedding_dim), fingerprints.parquet, dedup_dropped.csv (each dropped image and
the one it duplicates), split_report.json, id_summary.json / id_summary.csv (summarize_ids).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

from building_embed.config import BuildingEmbedConfig, DataConfig
from building_embed.generate.generate_embeddings import EMBEDDING, META_KEY, embeddings_table, read_embeddings
from building_embed.preprocess.compute_fingerprints import (
    FINGERPRINTS_FILE,
    compute_fingerprints,
    intermediate_shards,
    near_pairs,
    write_fingerprints,
)
from building_embed.preprocess.schema import IDENTITY, IMAGE_BYTES, IMAGE_KEY, read_parquet_checked
from building_embed.preprocess.summarize_ids import write_summary
from building_embed.streetview import to_ecef
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write, atomic_write_text, require_finite, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
REPORT_FILE = "split_report.json"
KEEP_COLUMNS = [IMAGE_KEY, IDENTITY, "tar", "member", "dataset_id", "target_id", "patch_id", "street_view_id",
                "target_lat", "target_lon", "target_height", "camera_lat", "camera_lon", "distance", "heading",
                "pitch", "roll"]


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def labels(self) -> np.ndarray:
        """Component label of each element: 0, 1, ... numbered by each component's smallest element."""
        roots = [self.find(i) for i in range(len(self.parent))]
        first: dict[int, int] = {}
        return np.asarray([first.setdefault(r, len(first)) for r in roots], np.int64)


def load_metadata(intermediates_dir: str | Path) -> pd.DataFrame:
    """The metadata columns of every intermediate shard (no image bytes), sorted by image_key."""
    frames = [read_parquet_checked(p, [*KEEP_COLUMNS, IMAGE_BYTES], "paths.intermediates_dir",
                                   columns=KEEP_COLUMNS).to_pandas() for p in intermediate_shards(intermediates_dir)]
    frame = pd.concat(frames, ignore_index=True).sort_values(IMAGE_KEY, kind="stable").reset_index(drop=True)
    if frame[IMAGE_KEY].duplicated().any():
        key = frame[IMAGE_KEY][frame[IMAGE_KEY].duplicated()].iloc[0]
        raise UserError(f"{intermediates_dir}: image_key {key!r} appears in two intermediate shards; remove the "
                        "stale shard (or rerun process_tar into an empty folder)")
    return frame


def load_all_embeddings(embeddings_dir: str | Path) -> tuple[list[str], np.ndarray, int]:
    """(image keys, float32 [N, D] embeddings, D) of every embeddings shard, checked finite and of one width."""
    directory = Path(embeddings_dir)
    shards = sorted(directory.glob("*.parquet")) if directory.is_dir() else []
    if not shards:
        raise UserError(f"{directory}: no embeddings *.parquet; run python -m "
                        "building_embed.generate.generate_embeddings first or set paths.embeddings_dir")
    keys, parts, dim = [], [], None
    for shard in shards:
        try:
            ids, values = read_embeddings(shard)
        except (OSError, pa.ArrowInvalid, KeyError, AttributeError) as exc:
            raise UserError(f"{shard}: not a building_embed embeddings parquet ({exc}); regenerate it") from exc
        shard_keys = ids.column(IMAGE_KEY).to_pylist()
        require_finite(values, shard, what="row", row_ids=shard_keys,
                       fix="regenerate this shard (delete it and rerun generate_embeddings)")
        if dim is None:
            dim, first = values.shape[1], shard
        elif values.shape[1] != dim and len(values):
            raise UserError(f"{shard}: embedding width {values.shape[1]}, but {first.name} has {dim}; all shards "
                            "must come from one backbone: regenerate with one embedding_model setting")
        keys += shard_keys
        parts.append(values)
    return keys, np.concatenate(parts), int(dim)


def join_embeddings(meta: pd.DataFrame, keys: list[str], embeddings: np.ndarray, embeddings_dir: str) -> np.ndarray:
    """Embeddings in the row order of `meta`; every image needs exactly one."""
    index = pd.Index(keys)
    if index.has_duplicates:
        raise UserError(f"{embeddings_dir}: image_key {index[index.duplicated()][0]!r} has two embeddings; "
                        "remove stale shards and regenerate")
    position = index.get_indexer(meta[IMAGE_KEY])
    if (position < 0).any():
        missing = meta[IMAGE_KEY][position < 0]
        raise UserError(f"{embeddings_dir}: {len(missing)} images have no embedding (first {missing.iloc[0]!r}); "
                        "run generate_embeddings again (it resumes) on the same intermediates")
    extra = len(index) - len(set(position))
    if extra:
        raise UserError(f"{embeddings_dir}: {extra} embeddings belong to no intermediate image; the embeddings were "
                        "made from other intermediates: regenerate them (global.resume=false)")
    return embeddings[position]


def dedup_within_identity(frame: pd.DataFrame, pairs: np.ndarray) -> pd.DataFrame:
    """Rows to drop: image_key, duplicate_of (the kept image), kind (exact / near). `frame` sorted by image_key,
    `pairs` (i, j, distance) within data.dedup_max_distance."""
    same = frame[IDENTITY].to_numpy()[pairs[:, 0]] == frame[IDENTITY].to_numpy()[pairs[:, 1]] if len(pairs) else []
    uf = UnionFind(len(frame))
    for i, j, _ in pairs[np.asarray(same, bool)] if len(pairs) else []:
        uf.union(int(i), int(j))
    labels = uf.labels()
    keep_of = pd.Series(np.arange(len(frame))).groupby(labels).transform("min").to_numpy()
    dropped = np.flatnonzero(keep_of != np.arange(len(frame)))
    sha = frame["sha256"].to_numpy()
    return pd.DataFrame({IMAGE_KEY: frame[IMAGE_KEY].to_numpy()[dropped],
                         "duplicate_of": frame[IMAGE_KEY].to_numpy()[keep_of[dropped]],
                         "kind": np.where(sha[dropped] == sha[keep_of[dropped]], "exact", "near")})


def place_groups(frame: pd.DataFrame, radius_m: float, hash_pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """Group label of each row (over identities) and the number of cross-identity hash pairs that joined groups."""
    identities, owner = np.unique(frame[IDENTITY].to_numpy(), return_inverse=True)
    uf = UnionFind(len(identities))
    if radius_m > 0:
        lat = np.concatenate([frame.target_lat.to_numpy(float), frame.camera_lat.to_numpy(float)])
        lon = np.concatenate([frame.target_lon.to_numpy(float), frame.camera_lon.to_numpy(float)])
        # one point per (identity, position): a target repeats on every row of its images
        unique = np.unique(np.stack([np.concatenate([owner, owner]).astype(float), lat, lon], axis=1), axis=0)
        point_owner = unique[:, 0].astype(np.int64)
        pairs = cKDTree(to_ecef(unique[:, 1], unique[:, 2], np.zeros(len(unique)))).query_pairs(
            radius_m, output_type="ndarray")
        owners = np.sort(point_owner[pairs], axis=1) if len(pairs) else np.zeros((0, 2), np.int64)
        for a, b in np.unique(owners[owners[:, 0] != owners[:, 1]], axis=0):
            uf.union(int(a), int(b))
    cross = 0
    for i, j, _ in hash_pairs:
        if owner[i] != owner[j]:
            cross += 1
            uf.union(int(owner[i]), int(owner[j]))
    return uf.labels()[owner], cross


def assign_splits(groups: np.ndarray, data: DataConfig, seed: int) -> np.ndarray:
    """Split name of each row: whole groups in a seeded random order, each to the split furthest below its share."""
    labels, sizes = np.unique(groups, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    shares = np.asarray([1.0 - data.val_fraction - data.test_fraction, data.val_fraction, data.test_fraction])
    counts = np.zeros(3)
    split_of = {}
    for g in order:
        deficit = shares * (counts.sum() + sizes[g]) - counts
        deficit[shares == 0] = -np.inf
        choice = int(np.argmax(deficit))
        split_of[labels[g]] = choice
        counts[choice] += sizes[g]
    names = np.asarray(SPLITS)
    split = names[[split_of[g] for g in groups]]
    empty = [s for s, share in zip(SPLITS, shares) if share > 0 and not (split == s).any()]
    if empty:
        raise UserError(f"only {len(labels)} place groups: split(s) {empty} got none; lower data.place_radius_m or "
                        "data.leak_audit_distance, or set their fraction to 0")
    return split


def audit(frame: pd.DataFrame, max_distance: int) -> dict:
    """Leaks of a finished split, computed from scratch: near-duplicate pairs in different splits, identities and
    place groups in more than one split."""
    pairs = near_pairs(frame["phash"].to_numpy(np.uint64), max_distance)
    split = frame["split"].to_numpy()
    leaks = pairs[split[pairs[:, 0]] != split[pairs[:, 1]]] if len(pairs) else pairs
    keys = frame[IMAGE_KEY].to_numpy()
    return {
        "max_distance": max_distance,
        "near_duplicate_pairs_checked": int(len(pairs)),
        "cross_split_near_duplicate_pairs": int(len(leaks)),
        "leak_examples": [[keys[i], keys[j], int(d)] for i, j, d in leaks[:10]],
        "identities_in_several_splits": int((frame.groupby(IDENTITY)["split"].nunique() > 1).sum()),
        "place_groups_in_several_splits": int((frame.groupby("place_group")["split"].nunique() > 1).sum()),
    }


def merge_and_split(cfg: BuildingEmbedConfig) -> int:
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    data, out_dir = cfg.data, Path(cfg.paths.merged_dir)
    meta = load_metadata(cfg.paths.intermediates_dir)
    keys, all_embeddings, dim = load_all_embeddings(cfg.paths.embeddings_dir)
    embeddings = join_embeddings(meta, keys, all_embeddings, cfg.paths.embeddings_dir)
    if cfg.training_model.input_dim != dim:
        log.warning("embeddings are %d wide but training_model.input_dim is %d: set training_model.input_dim=%d "
                    "before training", dim, cfg.training_model.input_dim, dim)
    prints = compute_fingerprints(cfg.paths.intermediates_dir, data.dedup_hash_size)
    assert (prints[IMAGE_KEY].to_numpy() == meta[IMAGE_KEY].to_numpy()).all()  # both sorted by image_key
    frame = meta.assign(sha256=prints["sha256"].to_numpy(), phash=prints["phash"].to_numpy())

    dropped = dedup_within_identity(frame, near_pairs(frame["phash"].to_numpy(np.uint64), data.dedup_max_distance))
    keep = ~frame[IMAGE_KEY].isin(dropped[IMAGE_KEY]).to_numpy()
    frame, embeddings = frame[keep].reset_index(drop=True), embeddings[keep]
    groups, cross_pairs = place_groups(frame, data.place_radius_m,
                                       near_pairs(frame["phash"].to_numpy(np.uint64), data.leak_audit_distance))
    frame["place_group"] = groups
    frame["split"] = assign_splits(groups, data, cfg.global_.seed)
    result = audit(frame, data.leak_audit_distance)

    write_fingerprints(prints, out_dir / FINGERPRINTS_FILE)
    atomic_write_text(out_dir / "dedup_dropped.csv", dropped.to_csv(index=False))
    meta_json = {"embedding_dim": dim, "dtype": "float16"}
    for split in SPLITS:
        rows = (frame["split"] == split).to_numpy()
        part = frame[rows].drop(columns=["sha256"])
        table = embeddings_table({c: part[c].to_numpy() for c in part.columns}, embeddings[rows], meta_json)
        atomic_write(out_dir / f"{split}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
    identities_per_group = frame.groupby("place_group")[IDENTITY].nunique()
    report = {
        "inputs": {"images": int(len(meta)), "identities": int(meta[IDENTITY].nunique()), "embedding_dim": dim},
        "dedup": {"max_distance": data.dedup_max_distance,
                  "exact_duplicates_dropped": int((dropped["kind"] == "exact").sum()),
                  "near_duplicates_dropped": int((dropped["kind"] == "near").sum()),
                  "cross_identity_pairs_grouped": cross_pairs},
        "place": {"radius_m": data.place_radius_m, "groups": int(frame["place_group"].nunique()),
                  "groups_with_several_identities": int((identities_per_group > 1).sum()),
                  "largest_group_identities": int(identities_per_group.max())},
        "splits": {s: {"images": int((frame["split"] == s).sum()),
                       "identities": int(frame.loc[frame["split"] == s, IDENTITY].nunique()),
                       "place_groups": int(frame.loc[frame["split"] == s, "place_group"].nunique())} for s in SPLITS},
        "audit": result,
    }
    write_json(out_dir / REPORT_FILE, report)
    write_summary(out_dir)
    log.info("merge_and_split: %d images -> %s; dropped %d exact + %d near duplicates; %d groups; audit leaks %d",
             len(meta), {s: v["images"] for s, v in report["splits"].items()},
             report["dedup"]["exact_duplicates_dropped"], report["dedup"]["near_duplicates_dropped"],
             report["place"]["groups"], result["cross_split_near_duplicate_pairs"])
    leaks = (result["cross_split_near_duplicate_pairs"] + result["identities_in_several_splits"]
             + result["place_groups_in_several_splits"])
    if leaks:
        raise RuntimeError(f"split audit found leaks (see {out_dir / REPORT_FILE}): "
                           f"{json.dumps({k: v for k, v in result.items() if k != 'leak_examples'})}")
    return 0


def read_split(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata frame, float32 [N, D] embeddings) of a merged split parquet."""
    table = read_parquet_checked(path, [IMAGE_KEY, IDENTITY, "street_view_id", EMBEDDING], "paths.merged_dir",
                                 columns=[])
    try:
        _, values = read_embeddings(Path(path))
    except (pa.ArrowException, KeyError, AttributeError, ValueError) as exc:
        raise UserError(f"{path}: its {EMBEDDING!r} column is not a fixed-width float list ({exc}); rerun "
                        "merge_and_split") from exc
    return table.drop_columns([EMBEDDING]).to_pandas(), values


def split_embedding_dim(path: str | Path) -> int:
    """The embedding width a merged split records in its schema metadata (UserError when unreadable or absent)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return int(json.loads(metadata[META_KEY])["embedding_dim"])
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:200]}); rerun "
                        "merge_and_split") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a merged split of merge_and_split (no {META_KEY.decode()} embedding_dim in its "
                        "schema metadata); rerun merge_and_split or set paths.merged_dir") from exc


main = config_main(BuildingEmbedConfig, merge_and_split, __doc__,
                   prog="python -m building_embed.preprocess.merge_and_split")

if __name__ == "__main__":
    raise SystemExit(main())
