"""Frozen image backbones: DINOv2 / DINOv3 through timm or transformers, weights from local files only.

    model, preprocess = build_backbone(cfg.embedding_model)   # model: [B, 3, S, S] -> [B, D]
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from building_embed.config import EmbeddingModelConfig
from common.cli import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImagePreprocess:
    """JPEG bytes -> float32 [3, S, S]: RGB, bicubic resize to S x S, scaled to [0, 1], normalised by mean / std.
    A plain picklable object, so DataLoader workers can run it."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = size
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def __call__(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        array = np.asarray(rgb, np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((array - self.mean) / self.std)


class _TransformersPooled(nn.Module):
    """A transformers vision model as [B, 3, S, S] -> pooled [B, D] (the layer-normed CLS token for Dinov2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


def build_backbone(cfg: EmbeddingModelConfig) -> tuple[nn.Module, ImagePreprocess, int]:
    """(model in eval mode, preprocessing, embedding dimension). Raises UserError when weights are missing."""
    weights = Path(cfg.weights) if cfg.weights else None
    if weights is None and not cfg.random_init:
        raise UserError("embedding_model.weights is empty: give a local backbone weights file (timm: .safetensors / "
                        ".pth, e.g. the vit_base_patch14_dinov2 weights) or directory (transformers), or set "
                        "embedding_model.random_init=true for a test run; nothing is downloaded")
    if weights is not None and not weights.exists():
        raise UserError(f"embedding_model.weights: {weights} not found; point it at a local weights file or directory")
    if cfg.backend == "transformers":
        from transformers import AutoConfig, AutoModel

        if weights is None:
            raise UserError("embedding_model.backend=transformers needs embedding_model.weights (a local directory)")
        config = AutoConfig.from_pretrained(weights, local_files_only=True)
        model = _TransformersPooled(AutoModel.from_pretrained(weights, local_files_only=True))
        dim = int(config.hidden_size)
        preprocess = ImagePreprocess(cfg.img_size, IMAGENET_MEAN, IMAGENET_STD)
        return model.eval(), preprocess, dim
    import timm

    kwargs = dict(num_classes=0, img_size=cfg.img_size, global_pool=cfg.global_pool, **cfg.model_kwargs)
    try:
        if weights is not None:
            overlay = {"file": str(weights), "input_size": (3, cfg.img_size, cfg.img_size)}
            model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        else:
            model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"embedding_model.name: {exc}; use a timm name such as vit_base_patch14_dinov2") from exc
        raise UserError(f"embedding_model: cannot build {cfg.name} from {weights}: {str(exc).splitlines()[0]}") from exc
    except TypeError as exc:
        raise UserError(f"embedding_model.model_kwargs {cfg.model_kwargs}: {exc}") from exc
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    preprocess = ImagePreprocess(cfg.img_size, tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
                                 tuple(pretrained_cfg.get("std", IMAGENET_STD)))
    return model.eval(), preprocess, int(model.num_features)
