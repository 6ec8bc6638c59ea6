"""Bidirectional transformer encoder over embedded events, mean-pooled over non-padding, for classification.

    model = TransformerEncoderEmbedded(config, code_embeddings=table)   # table [V, D] gathered by token id
    logits = model(batch)                                                # [B, num_classes]

The original API works unchanged: `TransformerEncoderEmbedded(config_dict)` with `embedding_dim` in the dict, then
`model({'embeddings': [B, T, D], 'padding_mask': [B, T]})` (padding_mask True at padding).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ehr_embedded.models.layers import EventEmbedding, as_config, padding_mask_of, transformer_stack


class TransformerEncoderEmbedded(nn.Module):
    def __init__(self, config: Any, code_embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.config = as_config(config)
        self.event_embedding = EventEmbedding(self.config, code_embeddings)
        self.encoder = transformer_stack(self.config)
        self.norm = nn.LayerNorm(int(self.config["model_dim"]))
        self.classifier = nn.Linear(int(self.config["model_dim"]), int(self.config["num_classes"]))

    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        """`[B, model_dim]`: mean of the final hidden states over non-padding events."""
        x = self.event_embedding(batch)
        pad = padding_mask_of(batch, x)
        h = self.norm(self.encoder(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """`[B, num_classes]` logits."""
        return self.classifier(self.encode(batch))
