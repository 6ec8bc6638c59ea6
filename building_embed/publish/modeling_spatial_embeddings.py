"""Hugging Face model of the published building embedding: the trained projection head.

    model = AutoModel.from_pretrained("published_dir", trust_remote_code=True)
    z = model(backbone_embeddings).embeddings      # [B, input_dim] -> [B, output_dim] float32, unit L2 norm

Self-contained on purpose (copied into the published directory; it may import only torch, transformers and the
configuration file beside it). The module layout is building_embed.model.ProjectionHead's, parameter for parameter
(`net.0` LayerNorm, `net.1` Linear, `net.4` Linear), so a trainer checkpoint's state dict loads 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_spatial_embeddings import SpatialEmbeddingsConfig


@dataclass
class SpatialEmbeddingsOutput(ModelOutput):
    """embeddings: [B, output_dim] float32, each row of unit L2 norm (cosine similarity is a dot product)."""

    embeddings: torch.FloatTensor | None = None


class SpatialEmbeddingsModel(PreTrainedModel):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear, then L2 normalisation (ProjectionHead, as an HF model)."""

    config_class = SpatialEmbeddingsConfig
    base_model_prefix = "spatial_embeddings"
    main_input_name = "embeddings"

    def __init__(self, config: SpatialEmbeddingsConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(nn.LayerNorm(config.input_dim), nn.Linear(config.input_dim, config.hidden_dim),
                                 nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden_dim, config.output_dim))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation (what ProjectionHead gets); a published model overwrites it anyway."""
        if isinstance(module, nn.Linear | nn.LayerNorm):
            module.reset_parameters()

    def forward(self, embeddings: torch.Tensor, return_dict: bool | None = None) -> SpatialEmbeddingsOutput | tuple:
        """embeddings [B, input_dim] (any float dtype) -> SpatialEmbeddingsOutput(embeddings [B, output_dim])."""
        out = F.normalize(self.net(embeddings.float()), dim=-1)
        if return_dict is False:
            return (out,)
        return SpatialEmbeddingsOutput(embeddings=out)


SpatialEmbeddingsModel.register_for_auto_class("AutoModel")
