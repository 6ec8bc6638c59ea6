"""Embed every image of the parquet intermediates with a frozen DINOv2 / DINOv3 backbone.

    python -m building_embed.generate.generate_embeddings --config configs/building_embed/config.toml \
        embedding_model.weights=/models/vit_base_patch14_dinov2.safetensors
    torchrun --nproc_per_node=4 -m building_embed.generate.generate_embeddings --config ...   # shards split by rank
    # real features on a CPU, no download: embedding_model.packaged=efficientnet_lite0
    #   embedding_model.name=tf_efficientnet_lite0 embedding_model.global_pool=avg   (1280-d)
    # plumbing-test size: embedding_model.random_init=true embedding_model.name=vit_small_patch14_dinov2
    #   embedding_model.global_pool=avg embedding_model.img_size=56
    #   'embedding_model.model_kwargs={depth: 2, embed_dim: 48, num_heads: 2}'

Input: `paths.intermediates_dir/*.parquet` (process_tar). Output: one `paths.embeddings_dir/<same name>.parquet` per
input shard (image_key, identity, dataset_id, target_id, embedding: float16 [D]; the schema metadata
`building_embed` records embedding_dim, backbone settings, the source shard's SHA-256 and how many images were
downscaled), written atomically, then `embeddings_manifest.json` once every shard is done (`downscaled`: the total).
DataLoader workers decode the JPEGs as people took them (common.images: EXIF orientation applied; a large photo
decoded at reduced size and downscaled to the backbone's resize size, never skipped; a header declaring more than
embedding_model.max_image_pixels, or an image that does not decode, stops the run with exit 2 naming the shard and
image); CUDA and autocast (bf16) are used when present. Rank r of a torchrun world of size W embeds shards r, r+W, ...

Resume (global.resume=auto): a shard whose output exists and records the same settings and source is skipped, so a
killed run continues at the shard where it stopped and writes the same bytes an uninterrupted run would. An output
made with other settings stops the run (exit 2) naming what changed; global.resume=false redoes every shard.
NaN / inf embeddings (also float16 overflow) stop the run (exit 2) naming the shard and image before it is written.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from building_embed.config import BuildingEmbedConfig
from building_embed.generate.backbone import ImagePreprocess, build_backbone
from building_embed.preprocess.schema import IDENTITY, IMAGE_BYTES, IMAGE_KEY, read_parquet_checked
from building_embed.progress import ProgressLog
from common.cli import config_main
from common.distributed import barrier, cleanup_distributed, setup_distributed
from common.errors import UserError
from common.fingerprint import fingerprint_changes, flatten
from common.images import ImageRefused
from common.io import atomic_write, require_finite, sha256_file, write_json
from common.logs import progress, setup_logging

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
META_KEY = b"building_embed"
MANIFEST_FILE = "embeddings_manifest.json"
ID_COLUMNS = (IMAGE_KEY, IDENTITY, "dataset_id", "target_id")


class JpegDataset(Dataset):
    """The images of one shard, decoded (in DataLoader workers) to ([3, S, S] float32, downscaled flag, refusal):
    an image open_photo refuses gives zeros and the refusal's one-line message (else "")."""

    def __init__(self, images: list[bytes], preprocess: ImagePreprocess, names: list[str] | None = None) -> None:
        self.images, self.preprocess, self.names = images, preprocess, names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        name = self.names[index] if self.names is not None else f"row {index}"
        try:
            return (*self.preprocess.load(self.images[index], name=name), "")
        except ImageRefused as exc:
            return torch.zeros(self.preprocess.shape), False, str(exc)


def shards_for_rank(shards: list[Path], rank: int, world_size: int) -> list[Path]:
    """Rank r takes shards r, r + W, r + 2W, ... (sorted by name), so ranks never share a shard."""
    return shards[rank::world_size]


def resolve_precision(autocast: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full float32 (bf16 on CPU is several times slower here: off by default)."""
    if autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]


def read_embedding_metadata(path: Path) -> dict | None:
    """The `building_embed` schema metadata of an embeddings parquet, or None when absent or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(metadata[META_KEY]) if META_KEY in metadata else None


def embeddings_table(ids: dict[str, list], embeddings: np.ndarray, metadata: dict) -> pa.Table:
    """ids + float16 [N, D] embeddings as a table whose schema metadata records `metadata`."""
    n, dim = embeddings.shape
    flat = pa.array(embeddings.astype(np.float16).reshape(-1), type=pa.float16())
    columns = {name: pa.array(values) for name, values in ids.items()}
    columns[EMBEDDING] = pa.FixedSizeListArray.from_arrays(flat, dim) if n else pa.array([], pa.list_(pa.float16(),
                                                                                                       dim))
    table = pa.table(columns)
    return table.replace_schema_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_embeddings(path: Path) -> tuple[pa.Table, np.ndarray]:
    """(id columns, float32 [N, D] embeddings) of one embeddings parquet."""
    table = pq.read_table(path)
    column = table.column(EMBEDDING).combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return table.drop_columns([EMBEDDING]), values.reshape(len(table), dim)


def _one_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers: no thread oversubscription beside the forward pass


@torch.inference_mode()
def embed_shard(model: torch.nn.Module, preprocess: ImagePreprocess, images: list[bytes], batch_size: int,
                num_workers: int, device: torch.device, precision: torch.dtype | None, *,
                names: list[str] | None = None, source: str = "images", stats: Counter | None = None,
                progress_every: int = 50) -> np.ndarray:
    """float32 [N, D] embeddings of one shard's JPEG bytes, in row order (batches never cross shards). `stats`
    counts `downscaled` images; an image that is refused (common.images.ImageRefused: a header beyond
    max_image_pixels, or not decodable) is a UserError naming `source` and the image."""
    loader = DataLoader(JpegDataset(images, preprocess, names), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_one_thread_worker)
    autocast = torch.autocast(device.type, dtype=precision) if precision is not None else nullcontext()
    out = []
    steps = ProgressLog(Path(source).name, total=len(loader), every=progress_every, logger=log)
    for batch, downscaled, refused in loader:
        problem = next((message for message in refused if message), None)
        if problem is not None:
            raise UserError(f"{source}: {problem}; remove that image or run process_tar on the source again")
        with autocast:
            features = model(batch.to(device, non_blocking=True))
        out.append(features.float().cpu().numpy())  # CPU-GPU sync point, once per batch
        if stats is not None:
            stats["downscaled"] += int(downscaled.sum())
        steps.step()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def generate(cfg: BuildingEmbedConfig) -> int:
    infra, model_cfg, resume = cfg.infrastructure, cfg.embedding_model, cfg.global_.resume
    if infra.num_threads > 0:
        torch.set_num_threads(infra.num_threads)
    in_dir, out_dir = Path(cfg.paths.intermediates_dir), Path(cfg.paths.embeddings_dir)
    shards = sorted(in_dir.glob("*.parquet")) if in_dir.is_dir() else []
    if not shards:
        raise UserError(f"{in_dir}: no intermediate *.parquet shards; run python -m "
                        "building_embed.preprocess.process_tar first or set paths.intermediates_dir")
    info = setup_distributed(None if infra.device == "auto" else infra.device)
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    try:
        torch.manual_seed(cfg.global_.seed)  # random_init weights are the same in every run (resume needs them)
        model, preprocess, dim = build_backbone(model_cfg)
        model = model.to(info.device)
        precision = resolve_precision(infra.autocast, info.device)
        settings = {k: v for k, v in cfg.to_section_dict("embedding_model").items()
                    if k not in ("max_shards_this_run", "max_image_pixels")}  # neither changes an embedding
        settings["precision"] = str(precision).removeprefix("torch.") if precision else "float32"
        if model_cfg.random_init:
            settings["seed"] = cfg.global_.seed
        mine = shards_for_rank(shards, info.rank, info.world_size)
        done_this_run = 0
        for shard in progress(mine, desc="shards"):
            out_path = out_dir / shard.name
            for stale in out_dir.glob(f".{shard.name}.*.tmp"):  # left by a run killed mid-write
                stale.unlink()
            source_sha = sha256_file(shard)
            metadata = {"embedding_dim": dim, "dtype": "float16", "settings": settings, "source": shard.name,
                        "source_sha256": source_sha}
            if out_path.exists() and resume != "false":
                previous = read_embedding_metadata(out_path)
                if previous is not None:
                    previous.pop("downscaled", None)  # a count of the run, not a setting
                if previous == metadata or resume == "force":
                    log.info("%s: done earlier, skipped", out_path.name)
                    continue
                raise UserError(f"{out_path}: made with other settings or another source shard "
                                f"({_differences(previous, metadata)}); set global.resume=false to redo every shard, "
                                "global.resume=force to keep it, or use another paths.embeddings_dir")
            if model_cfg.max_shards_this_run and done_this_run >= model_cfg.max_shards_this_run:
                log.info("stopping after %d shard(s) (embedding_model.max_shards_this_run)", done_this_run)
                break
            table = read_parquet_checked(shard, [*ID_COLUMNS, IMAGE_BYTES], "paths.intermediates_dir")
            keys = table.column(IMAGE_KEY).to_pylist()
            stats: Counter = Counter()
            embeddings = embed_shard(model, preprocess, table.column(IMAGE_BYTES).to_pylist(), model_cfg.batch_size,
                                     infra.num_workers, info.device, precision, names=keys, source=str(shard),
                                     stats=stats, progress_every=cfg.logging.progress_every)
            if len(table) and embeddings.shape[1] != dim:
                raise RuntimeError(f"backbone returned width {embeddings.shape[1]}, expected {dim}")
            fix = "check the backbone weights and embedding_model settings (fp16 overflows above 65504)"
            require_finite(embeddings, f"{out_path} (images of {shard})", what="row", row_ids=keys, fix=fix)
            require_finite(embeddings.astype(np.float16), f"{out_path} (float16, images of {shard})", what="row",
                           row_ids=keys, fix=fix)
            ids = {name: table.column(name).to_pylist() for name in ID_COLUMNS}
            out_table = embeddings_table(ids, embeddings if len(table) else np.zeros((0, dim)),
                                         {**metadata, "downscaled": stats["downscaled"]})
            atomic_write(out_path, lambda tmp, t=out_table: pq.write_table(t, tmp))
            done_this_run += 1
            log.info("%s: %d embeddings of width %d (%d images downscaled before the transform)", out_path.name,
                     len(table), dim, stats["downscaled"])
        barrier()
        if info.is_main:
            _write_manifest(shards, out_dir, dim, settings)
    finally:
        cleanup_distributed()
    return 0


def _differences(previous: dict | None, current: dict) -> str:
    """`settings.img_size: 28 -> 42; ...`: the dotted keys of a shard's recorded metadata that differ."""
    if previous is None:
        return "no building_embed metadata"
    return "; ".join(fingerprint_changes({"config": flatten(previous)}, {"config": flatten(current)}))


def _write_manifest(shards: list[Path], out_dir: Path, dim: int, settings: dict) -> None:
    outputs = [out_dir / s.name for s in shards]
    missing = [p.name for p in outputs if not p.exists()]
    if missing:
        log.info("%d of %d shards embedded; run again to resume (next: %s)", len(outputs) - len(missing),
                 len(outputs), missing[0])
        return
    rows = {p.name: pq.read_metadata(p).num_rows for p in outputs}
    downscaled = sum((read_embedding_metadata(p) or {}).get("downscaled", 0) for p in outputs)
    write_json(out_dir / MANIFEST_FILE, {"embedding_dim": dim, "dtype": "float16", "rows": sum(rows.values()),
                                         "downscaled": downscaled, "shards": rows, "settings": settings})
    log.info("embeddings complete: %d rows of width %d in %d shards (%d downscaled before the transform) -> %s",
             sum(rows.values()), dim, len(rows), downscaled, out_dir)


main = config_main(BuildingEmbedConfig, generate, __doc__, prog="python -m building_embed.generate.generate_embeddings")

if __name__ == "__main__":
    raise SystemExit(main())
