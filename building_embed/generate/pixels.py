"""A weight-free image descriptor: the image shrunk to S x S grey pixels, flattened and standardised per image.

    model, data_config = build_pixels_backbone(size=32)
    preprocess = EvalPreprocess.from_data_config(data_config)   # PIL image -> float32 [1, 32, 32]
    features = model(torch.stack([preprocess(img) for img in images]))   # [B, 1024], zero mean, unit variance

The same interface as `common.backbones.build_timm_backbone` (a module in eval mode with `num_features`, and a timm
style data config for `EvalPreprocess`: short side resized with a box filter, centre crop, greyscale). No weights,
nothing to download, a few milliseconds per hundred images: a descriptor with real signal for fast tests (on the ORL
faces a head over it, and PCA + LDA, gain retrieval accuracy on held-out people), not a production backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PIXELS_NAME = "pixels"


class PixelDescriptor(nn.Module):
    """[B, 1, S, S] grey images -> [B, S * S]: each image's pixels minus their mean, divided by their standard
    deviation (a flat image maps to zeros). Standardising per image removes global brightness and contrast."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.size = size
        self.eps = eps
        self.num_features = size * size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.float().flatten(1)
        if flat.shape[1] != self.num_features:
            raise ValueError(f"expected [B, 1, {self.size}, {self.size}] images, got {tuple(images.shape)}")
        centred = flat - flat.mean(dim=1, keepdim=True)
        return centred / centred.std(dim=1, keepdim=True).clamp_min(self.eps)


def build_pixels_backbone(size: int = 32) -> tuple[PixelDescriptor, dict[str, Any]]:
    """(descriptor in eval mode, data config for `common.backbones.EvalPreprocess.from_data_config`)."""
    if size < 4:
        raise ValueError(f"pixel descriptor size must be at least 4, got {size}")
    data_config = {"input_size": (1, size, size), "crop_pct": 1.0, "interpolation": "box", "mean": (0.5,),
                   "std": (0.5,)}
    return PixelDescriptor(size).eval(), data_config
