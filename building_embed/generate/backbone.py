"""Frozen image backbones: DINOv2 / DINOv3 from local files (the production default) through timm or transformers,
packaged ImageNet weights (common.backbones.PACKAGED), a weight-free grey-pixel descriptor (backend=pixels, fast
tests), or random weights for plumbing tests.

    model, preprocess, dim = build_backbone(cfg.embedding_model)   # model: [B, 3, S, S] -> [B, D]
    tensor, downscaled = preprocess.load(jpeg_bytes)               # [3, S, S]; preprocess(jpeg_bytes) -> tensor

The preprocessing is the backbone's own eval transform (timm's data config, or the image processor config of a
transformers directory): the photo upright (EXIF orientation), large photos decoded at reduced size, short side
resized by crop_pct with the aspect ratio kept, centre crop, mean / std.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from building_embed.config import EmbeddingModelConfig
from building_embed.generate.pixels import build_pixels_backbone
from common.backbones import EvalPreprocess, build_timm_backbone
from common.errors import UserError
from common.images import DEFAULT_MAX_PIXELS, open_photo

log = logging.getLogger(__name__)

# transformers' image processors name Pillow resampling filters by number
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ImagePreprocess:
    """Encoded image bytes -> float32 [C, S, S] by `transform` (an EvalPreprocess), after open_photo: EXIF orientation
    applied, decoded / downscaled to the transform's resize size (never below it), refused (ImageRefused) above
    `max_pixels` declared pixels. A plain picklable object, so DataLoader workers can run it."""

    def __init__(self, transform: EvalPreprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.transform, self.max_pixels = transform, max_pixels

    @property
    def size(self) -> int:
        return self.transform.size

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.transform.mean), self.transform.size, self.transform.size

    def load(self, data: bytes, name: str = "") -> tuple[torch.Tensor, bool]:
        """(tensor, whether the photo was decoded or resized below its stored size first)."""
        photo = open_photo(data, self.transform.resize_short_side, max_pixels=self.max_pixels, mode="RGB",
                           interpolation=self.transform.interpolation, name=name)
        return self.transform(photo.image), photo.downscaled

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.load(data)[0]


class _TransformersPooled(nn.Module):
    """A transformers vision model as [B, 3, S, S] -> pooled [B, D] (the layer-normed CLS token for Dinov2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


def transformers_transform(directory: Path, img_size: int) -> EvalPreprocess:
    """The eval transform of a save_pretrained directory from its preprocessor_config.json (mean / std, resample,
    shortest_edge / crop_size as crop_pct), at `img_size`. Without that file: timm's ImageNet defaults, with a
    warning."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    path = directory / "preprocessor_config.json"
    if not path.is_file():  # Dinov2's own processor uses these; a directory saved without it says nothing else
        log.warning("%s: no preprocessor_config.json; using the ImageNet mean / std %s / %s, no crop", directory,
                    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        return EvalPreprocess(img_size, 1.0, "bicubic", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        mean, std = tuple(spec["image_mean"]), tuple(spec["image_std"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an image processor config with image_mean / image_std ({exc}); "
                        "save it with the model's AutoImageProcessor.save_pretrained") from exc
    crop_pct = 1.0
    size, crop = spec.get("size") or {}, spec.get("crop_size") or {}
    edge = size.get("shortest_edge") if isinstance(size, dict) else None
    crop_side = crop.get("height") if isinstance(crop, dict) else None
    if spec.get("do_center_crop", True) and edge and crop_side and crop_side <= edge:
        crop_pct = crop_side / edge
    return EvalPreprocess(img_size, crop_pct, _RESAMPLE.get(spec.get("resample", 3), "bicubic"), mean, std)


def build_backbone(cfg: EmbeddingModelConfig) -> tuple[nn.Module, ImagePreprocess, int]:
    """(model in eval mode, preprocessing, embedding dimension). Raises UserError when weights are missing."""
    if cfg.backend == "pixels":  # weight-free grey-pixel descriptor of img_size x img_size (fast tests)
        model, data_config = build_pixels_backbone(cfg.img_size)
        return model, ImagePreprocess(EvalPreprocess.from_data_config(data_config), cfg.max_image_pixels), \
            model.num_features
    weights = Path(cfg.weights) if cfg.weights else None
    if weights is None and not cfg.random_init and not cfg.packaged:
        raise UserError("embedding_model.weights is empty: give local backbone weights (timm: a .safetensors / .pth "
                        "file, e.g. the vit_base_patch14_dinov2 weights; transformers: a directory), or "
                        "embedding_model.packaged=efficientnet_lite0 (with embedding_model.name=tf_efficientnet_lite0 "
                        "embedding_model.global_pool=avg), or embedding_model.random_init=true for a plumbing test; "
                        "nothing is downloaded")
    if weights is not None and not weights.exists():
        raise UserError(f"embedding_model.weights: {weights} not found; point it at a local weights file or directory")
    if cfg.backend == "transformers":
        from transformers import AutoConfig, AutoModel

        if weights is None or not weights.is_dir():
            raise UserError("embedding_model.backend=transformers needs embedding_model.weights (a local "
                            "save_pretrained directory)")
        config = AutoConfig.from_pretrained(weights, local_files_only=True)
        model = _TransformersPooled(AutoModel.from_pretrained(weights, local_files_only=True))
        preprocess = ImagePreprocess(transformers_transform(weights, cfg.img_size), cfg.max_image_pixels)
        return model.eval(), preprocess, int(config.hidden_size)
    model, data_config = build_timm_backbone(cfg.name, weights=weights, packaged=cfg.packaged or None,
                                             random_init=cfg.random_init, global_pool=cfg.global_pool,
                                             img_size=cfg.img_size, key_prefix="embedding_model.",
                                             **cfg.model_kwargs)
    preprocess = ImagePreprocess(EvalPreprocess.from_data_config(data_config), cfg.max_image_pixels)
    return model, preprocess, int(model.num_features)
