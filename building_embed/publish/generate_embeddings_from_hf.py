"""Images through the frozen backbone and a published head: building embeddings straight from pictures.

    python -m building_embed.publish.generate_embeddings_from_hf published/ data/building_embed/intermediates \
        data/building_embed/hf_embeddings --config configs/building_embed/config.toml \
        embedding_model.weights=/models/vit_base_patch14_dinov2.safetensors
    # a folder of image files works too: ... published/ photos/ out/ --config ...

INPUT is a folder of process_tar intermediates (*.parquet with image bytes; ids kept: image_key, identity,
dataset_id, target_id) or a folder of image files (*.jpg, *.jpeg, *.png; image_key = the path under INPUT). The
backbone is built from [embedding_model] exactly as generate_embeddings builds it (local weights, packaged weights,
or random_init seeded by global.seed; DataLoader workers decode photos as generate_embeddings does: EXIF orientation
applied, large photos decoded at reduced size and downscaled, the count logged; CUDA + autocast for the backbone when
present); the head always runs in float32. OUT_DIR gets one parquet per intermediate shard (or `images.parquet`): ids
+ float32 `embedding` [N, output_dim].

Refused (exit 2): a backbone other than the one the head was trained on (backend, name, img_size, global_pool,
model_kwargs as recorded in the published config.json; both values named), a backbone width other than the head's
input_dim, an image whose header does not read or declares more than embedding_model.max_image_pixels (checked
before any work), an image that does not decode, NaN / inf outputs.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from building_embed.config import BuildingEmbedConfig
from building_embed.generate.backbone import build_backbone
from building_embed.generate.generate_embeddings import ID_COLUMNS, embed_shard, resolve_precision
from building_embed.preprocess.schema import IMAGE_BYTES, IMAGE_KEY
from building_embed.publish.generate_embeddings_from_parquet import model_fingerprint
from building_embed.publish.hub import IntermixedParser, embeddings_table, load_published
from common.cli import guarded_main
from common.config import config_help, load_config
from common.errors import UserError
from common.images import DEFAULT_MAX_PIXELS, ImageRefused, declared_size
from common.io import atomic_write, require_finite
from common.logs import setup_logging

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class BackboneAndHead(nn.Module):
    """[B, 3, S, S] images -> backbone [B, input_dim] -> head [B, output_dim]; the head outside any autocast."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.head(features.float()).embeddings


def check_backbone(cfg: BuildingEmbedConfig, published, model_dir: Path) -> None:
    """UserError naming the first [embedding_model] key that differs from what the head was trained on."""
    ours = cfg.embedding_model
    pairs = {"backend": (ours.backend, published.backbone_backend), "name": (ours.name, published.backbone_name),
             "img_size": (ours.img_size, published.img_size), "global_pool": (ours.global_pool, published.global_pool),
             "model_kwargs": (dict(ours.model_kwargs), dict(published.backbone_kwargs))}
    if ours.backend == "transformers":  # a transformers directory is named by embedding_model.weights, not name
        pairs.pop("name")
        pairs.pop("global_pool")
    for key, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise UserError(f"embedding_model.{key} is {mine!r} but the head in {model_dir} was trained on "
                            f"{theirs!r} features; set embedding_model.{key}={theirs!r} (and the matching weights)")


def image_sources(input_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, pa.Table, list[bytes]]]:
    """[(output name, id columns, image bytes)] of INPUT: one per intermediate shard, or one for an image folder."""
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a folder; pass paths.intermediates_dir or a folder of images")
    shards = sorted(input_dir.glob("*.parquet"))
    if shards:
        out = []
        for shard in shards:
            table = pq.read_table(shard)
            if IMAGE_BYTES not in table.column_names:
                raise UserError(f"{shard}: no {IMAGE_BYTES!r} column; pass the intermediates of process_tar")
            out.append((shard.name, table.select([c for c in ID_COLUMNS if c in table.column_names]),
                        table.column(IMAGE_BYTES).to_pylist()))
        return out
    files = sorted(p for p in input_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{input_dir}: no *.parquet intermediates and no {'/'.join(IMAGE_SUFFIXES)} images")
    images = []
    for path in files:
        data = path.read_bytes()
        try:  # the header only: each image is decoded once, by the backbone's DataLoader
            declared_size(data, max_pixels=max_pixels, name=str(path))
        except ImageRefused as exc:
            raise UserError(f"{exc}; remove or replace it") from exc
        images.append(data)
    keys = [str(p.relative_to(input_dir)) for p in files]
    return [("images.parquet", pa.table({IMAGE_KEY: keys}), images)]


def run(model_dir: str | Path, input_dir: str | Path, out_dir: str | Path, cfg: BuildingEmbedConfig) -> list[Path]:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    infra = cfg.infrastructure
    if infra.num_threads > 0:
        torch.set_num_threads(infra.num_threads)
    head = load_published(model_dir)
    check_backbone(cfg, head.config, model_dir)
    sources = image_sources(Path(input_dir), cfg.embedding_model.max_image_pixels)
    torch.manual_seed(cfg.global_.seed)  # random_init backbones: the same weights generate_embeddings used
    backbone, preprocess, dim = build_backbone(cfg.embedding_model)
    if dim != head.config.input_dim:
        raise UserError(f"the backbone gives width {dim} but the head in {model_dir} expects input_dim "
                        f"{head.config.input_dim}; use the backbone weights the head was trained on")
    device = torch.device("cuda" if infra.device == "auto" and torch.cuda.is_available() else
                          "cpu" if infra.device == "auto" else infra.device)
    model = BackboneAndHead(backbone, head).to(device).eval()
    precision = resolve_precision(infra.autocast, device)
    metadata = {"model_dir": str(model_dir), "model_sha256": model_fingerprint(model_dir),
                "output_dim": head.config.output_dim, "backbone": cfg.to_section_dict("embedding_model")}
    written = []
    for name, ids, images in sources:
        stats: Counter = Counter()
        embeddings = embed_shard(model, preprocess, images, cfg.embedding_model.batch_size, infra.num_workers,
                                 device, precision, names=ids.column(IMAGE_KEY).to_pylist(),
                                 source=f"{input_dir}/{name}", stats=stats)
        require_finite(embeddings, f"{out_dir / name} (images of {input_dir})", what="row",
                       row_ids=ids.column(IMAGE_KEY).to_pylist(), fix="check the backbone weights and settings")
        if not len(images):
            embeddings = embeddings.reshape(0, head.config.output_dim)
        table = embeddings_table(ids, embeddings, {**metadata, "source": name})
        atomic_write(out_dir / name, lambda tmp, t=table: pq.write_table(t, tmp))
        written.append(out_dir / name)
        log.info("%s: %d images (%d downscaled before the transform) -> %s", name, len(images), stats["downscaled"],
                 out_dir / name)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="python -m building_embed.publish.generate_embeddings_from_hf", description=__doc__,
                              epilog=config_help(BuildingEmbedConfig),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a directory written by convert_to_hf")
    parser.add_argument("input", help="process_tar intermediates folder or a folder of image files")
    parser.add_argument("out_dir", help="folder for the output parquet files")
    parser.add_argument("--config", default=None, help="TOML config whose [embedding_model] builds the backbone")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. "
                        "embedding_model.weights=/models/vit_base_patch14_dinov2.safetensors")
    return parser


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(BuildingEmbedConfig, args.config, args.overrides)
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    run(args.model_dir, args.input, args.out_dir, cfg)
    return 0


main = guarded_main(_run, build_parser())

if __name__ == "__main__":
    raise SystemExit(main())
