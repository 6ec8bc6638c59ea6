"""The projection head: frozen backbone embeddings [B, input_dim] -> unit-length building embeddings [B, output_dim].

One builder serves the trainer, the Hugging Face export and inference, so every stage builds the same module from
`[training_model]`:

    head = build_head(cfg.training_model)
    z = head(x)            # [B, output_dim], L2-normalised: cosine similarity is a dot product
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from building_embed.config import TrainingModelConfig


class ProjectionHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear, then L2 normalisation.

    The input LayerNorm puts backbone features of any scale (DINOv2 CLS tokens, averaged patch tokens, float16 files)
    on one footing; normalising the output makes triplet distances cosine distances.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.net = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden_dim), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden_dim, output_dim))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, input_dim] (any float dtype) -> [B, output_dim] float32 with unit L2 norm."""
        return F.normalize(self.net(embeddings.float()), dim=-1)


def build_head(cfg: TrainingModelConfig) -> ProjectionHead:
    return ProjectionHead(cfg.input_dim, cfg.hidden_dim, cfg.output_dim, cfg.dropout)
