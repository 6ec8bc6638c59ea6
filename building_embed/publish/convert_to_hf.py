"""Turn a trained projection head checkpoint into a Hugging Face model directory.

    python -m building_embed.publish.convert_to_hf runs/building_embed/default/checkpoints/best published/ \
        --config configs/building_embed/config.toml
    # then, anywhere (only torch + transformers needed):
    #   model = AutoModel.from_pretrained("published/", trust_remote_code=True)
    #   z = model(backbone_embeddings).embeddings     # [B, output_dim], unit length

CHECKPOINT is a checkpoint directory (`model.safetensors` + `meta.json`, common.checkpoint), a run directory (its
checkpoints/best, else checkpoints/latest) or a `model.safetensors` file. The config gives the head's widths
([training_model]) and the backbone the head expects ([embedding_model]: backend, name, img_size, global_pool,
model_kwargs), recorded in config.json as metadata. A checkpoint whose tensors do not fit the config's widths is
refused (exit 2) naming both.

OUT_DIR receives config.json (model_type spatial_embeddings, auto_map), model.safetensors,
configuration_spatial_embeddings.py, modeling_spatial_embeddings.py and a README.md model card. It is written in a
temporary sibling and renamed into place; an existing non-empty OUT_DIR is refused unless --force.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from building_embed.config import BuildingEmbedConfig
from building_embed.model import build_head
from building_embed.publish.configuration_spatial_embeddings import SpatialEmbeddingsConfig
from building_embed.publish.hub import IntermixedParser, head_dims
from building_embed.publish.modeling_spatial_embeddings import SpatialEmbeddingsModel
from common import checkpoint as ckpt_io
from common.cli import guarded_main
from common.config import config_help, load_config
from common.errors import UserError
from common.logs import setup_logging

log = logging.getLogger(__name__)


def resolve_weights(path: str | Path) -> tuple[Path, dict]:
    """(model.safetensors file, checkpoint meta or {}) of a checkpoint dir, run dir or safetensors file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path, (ckpt_io.read_meta(path.parent) if ckpt_io.is_complete(path.parent) else {})
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint directory (checkpoints/best), a run "
                        f"directory or a {ckpt_io.WEIGHTS_FILE} file")
    for candidate in (path / ckpt_io.BEST, path / "checkpoints" / ckpt_io.BEST):
        if ckpt_io.is_complete(candidate):
            path = candidate
            break
    ckpt = ckpt_io.find_checkpoint(path)
    return ckpt / ckpt_io.WEIGHTS_FILE, ckpt_io.read_meta(ckpt)


def published_config(cfg: BuildingEmbedConfig, training_info: dict) -> SpatialEmbeddingsConfig:
    head, backbone = cfg.training_model, cfg.embedding_model
    return SpatialEmbeddingsConfig(input_dim=head.input_dim, hidden_dim=head.hidden_dim, output_dim=head.output_dim,
                                   dropout=head.dropout, backbone_backend=backbone.backend,
                                   backbone_name=backbone.name, img_size=backbone.img_size,
                                   global_pool=backbone.global_pool, backbone_kwargs=dict(backbone.model_kwargs),
                                   training_info=training_info)


def check_fits(weights: Path, cfg: BuildingEmbedConfig, config_source: str) -> None:
    """UserError naming the checkpoint's widths and the config's when they differ."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:  # garbage, cut short or unreadable: one line, exit 2
        raise UserError(f"{weights}: not a readable safetensors file ({str(exc).strip()[:200]}); pass the "
                        f"{ckpt_io.WEIGHTS_FILE} of a training run (its checkpoints/best)") from exc
    shapes = dict(zip(ckpt_io.strip_wrapper_prefixes(dict.fromkeys(shapes)), shapes.values()))
    found = head_dims(shapes, str(weights))
    wanted = {k: getattr(cfg.training_model, k) for k in found}
    if found != wanted:
        differ = ", ".join(f"training_model.{k} {wanted[k]} (checkpoint: {found[k]})" for k in found
                           if found[k] != wanted[k])
        raise UserError(f"{weights}: the checkpoint's head ({found}) does not fit the config {config_source}: "
                        f"{differ}; pass the config the checkpoint was trained with or override those keys")


def convert(checkpoint: str | Path, out_dir: str | Path, cfg: BuildingEmbedConfig, config_source: str = "(defaults)",
            force: bool = False) -> Path:
    """Write the published directory; returns it. Raises UserError for bad input."""
    weights, meta = resolve_weights(checkpoint)
    check_fits(weights, cfg, config_source)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"{out_dir} exists and is not empty; choose another output directory or pass --force")
    tensors = ckpt_io.strip_wrapper_prefixes(load_file(str(weights)))
    info = {"source_weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            **({"epoch": meta["epoch"]} if "epoch" in meta else {})}
    model = SpatialEmbeddingsModel(published_config(cfg, info))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    _check_same_outputs(model, tensors, cfg)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "README.md").write_text(model_card(model.config), encoding="utf-8")
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out_dir)
    log.info("published %s (%s) -> %s", weights, model.config.training_info, out_dir)
    return out_dir


@torch.inference_mode()
def _check_same_outputs(model: SpatialEmbeddingsModel, tensors: dict, cfg: BuildingEmbedConfig) -> None:
    """The published module must compute exactly what the trainer's ProjectionHead computes with these weights."""
    head = build_head(cfg.training_model)
    head.load_state_dict(tensors, strict=True)
    head.eval()
    probe = torch.randn(8, cfg.training_model.input_dim, generator=torch.Generator().manual_seed(0))
    if not torch.equal(model(probe).embeddings, head(probe)):
        raise RuntimeError("published model and ProjectionHead disagree on the same weights (modeling file drifted)")


def model_card(config: SpatialEmbeddingsConfig) -> str:
    return f"""# Building re-identification embedding (projection head)

Maps a frozen `{config.backbone_name}` embedding ({config.backbone_backend}, {config.img_size} px,
`global_pool={config.global_pool}`) of width {config.input_dim} to a unit-length building embedding of width
{config.output_dim}: cosine similarity (a dot product) ranks views of the same building first.

```python
from transformers import AutoModel
model = AutoModel.from_pretrained("path/to/this/dir", trust_remote_code=True)
z = model(backbone_embeddings).embeddings   # [B, {config.input_dim}] -> [B, {config.output_dim}]
```

Architecture: LayerNorm -> Linear({config.input_dim}, {config.hidden_dim}) -> GELU -> Dropout({config.dropout}) ->
Linear({config.hidden_dim}, {config.output_dim}) -> L2 normalisation. Source: {config.training_info}.
Written by `python -m building_embed.publish.convert_to_hf`.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="python -m building_embed.publish.convert_to_hf", description=__doc__,
                              epilog=config_help(BuildingEmbedConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint dir (checkpoints/best), run dir or model.safetensors file")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    parser.add_argument("--config", default=None, help="the TOML config the head was trained with")
    parser.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. "
                        "training_model.output_dim=128")
    return parser


def _run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = load_config(BuildingEmbedConfig, args.config, args.overrides)
    convert(args.checkpoint, args.out_dir, cfg, args.config or "(defaults)", args.force)
    return 0


main = guarded_main(_run, build_parser())

if __name__ == "__main__":
    raise SystemExit(main())
