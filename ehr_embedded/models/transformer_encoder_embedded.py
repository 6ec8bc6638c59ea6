"""Bidirectional transformer encoder over embedded events, pooled over non-padding, for classification.

    model = TransformerEncoderEmbedded(config, code_embeddings=table)   # table [V, D] gathered by token id
    logits = model(batch)                                                # [B, num_classes]

Pooling (`model.pooling`): `mean` (the original), `max` (per feature, over events) or `attention` (a learned
score per event, softmax over the non-padding events). Under mean pooling one decisive event among 256 moves the
pooled vector by 1/256 of its state; max and attention pooling let a single event decide, as a count feature does.

The original API works unchanged: `TransformerEncoderEmbedded(config_dict)` with `embedding_dim` in the dict, then
`model({'embeddings': [B, T, D], 'padding_mask': [B, T]})` (padding_mask True at padding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ehr_embedded.models.layers import EventEmbedding, as_config, padding_mask_of, transformer_stack

POOLINGS = ("mean", "max", "attention")


class TransformerEncoderEmbedded(nn.Module):
    def __init__(self, config: Any, code_embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.config = as_config(config)
        self.event_embedding = EventEmbedding(self.config, code_embeddings)
        self.encoder = transformer_stack(self.config)
        self.norm = nn.LayerNorm(int(self.config["model_dim"]))
        self.classifier = nn.Linear(int(self.config["model_dim"]), int(self.config["num_classes"]))
        self.pooling = str(self.config["pooling"])
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling={self.pooling!r}: expected one of {POOLINGS}")
        self.pool_score = nn.Linear(int(self.config["model_dim"]), 1) if self.pooling == "attention" else None

    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        """`[B, model_dim]`: the final hidden states pooled over non-padding events (`model.pooling`); a sequence
        of padding only pools to zeros."""
        x = self.event_embedding(batch)
        pad = padding_mask_of(batch, x)
        h = self.norm(self.encoder(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        empty = keep.sum(1) == 0  # [B, 1]
        if self.pooling == "max":
            pooled = h.masked_fill(pad.unsqueeze(-1), float("-inf")).amax(1)
        elif self.pooling == "attention":
            scores = self.pool_score(h).squeeze(-1).masked_fill(pad, float("-inf"))
            weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all -inf (padding only) -> nan -> 0
            pooled = (weights.unsqueeze(-1) * h).sum(1)
        else:
            return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return pooled.masked_fill(empty, 0.0)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """`[B, num_classes]` logits."""
        return self.classifier(self.encode(batch))
