"""The event input layer both models share: frozen code-embedding table -> projection, plus values, time, position."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

DEFAULTS: dict[str, Any] = {"embedding_dim": None, "model_dim": 128, "n_heads": 4, "n_layers": 2, "dropout": 0.1,
                            "max_length": 512, "num_classes": 2, "vocab_size": None, "use_values": True,
                            "use_time": True}


def as_config(config: Any) -> dict[str, Any]:
    """A ModelConfig dataclass or the original's plain dict -> dict with defaults filled in."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return {**DEFAULTS, **dict(config)}


def resolve_embedding_dim(config: dict[str, Any], code_embeddings: Tensor | None) -> int:
    """The projection's input width: the table's real width; `embedding_dim` must agree when both are given.

    Raises ValueError on a disagreement (the original hard-coded 768 while MiniLM gives 384).
    """
    stated = config.get("embedding_dim")
    if code_embeddings is None:
        if stated is None:
            raise ValueError("model.embedding_dim is required when no code-embedding table is given")
        return int(stated)
    actual = int(code_embeddings.shape[1])
    if stated is not None and int(stated) != actual:
        raise ValueError(f"model.embedding_dim={stated} but the code-embedding table is {actual}-d; "
                         f"set model.embedding_dim={actual} or null (read from the table)")
    return actual


class EventEmbedding(nn.Module):
    """`batch -> [B, T, model_dim]`.

    Each event is its code's frozen description embedding (a non-persistent buffer gathered by token id, so
    checkpoints stay small and a table extended with unseen codes still loads), projected from the table's real
    width to model_dim, plus (optionally) a projection of [value_z, has_value] and of
    [log1p(hours since previous event), log1p(hours before prediction)], plus a learned position embedding.
    A batch may instead carry `embeddings` `[B, T, D]` directly (the original API).
    """

    def __init__(self, config: dict[str, Any], code_embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.embedding_dim = resolve_embedding_dim(config, code_embeddings)
        self.max_length = int(config["max_length"])
        model_dim = int(config["model_dim"])
        table = code_embeddings.detach().float().clone() if code_embeddings is not None else None
        self.register_buffer("code_embeddings", table, persistent=False)
        self.projection = nn.Linear(self.embedding_dim, model_dim)
        self.value_projection = nn.Linear(2, model_dim) if config["use_values"] else None
        self.time_projection = nn.Linear(2, model_dim) if config["use_time"] else None
        self.position = nn.Embedding(self.max_length, model_dim)
        self.dropout = nn.Dropout(float(config["dropout"]))

    def set_code_embeddings(self, code_embeddings: Tensor) -> None:
        """Swap in a (possibly extended) table of the same width."""
        if code_embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"code-embedding table is {code_embeddings.shape[1]}-d but this model projects "
                             f"{self.embedding_dim}-d embeddings; rebuild the table with the model's text encoder")
        self.code_embeddings = code_embeddings.detach().float().to(self.projection.weight.device)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if "embeddings" in batch:
            events = batch["embeddings"]
        else:
            if self.code_embeddings is None:
                raise ValueError("this model has no code-embedding table: pass batch['embeddings'] [B, T, D] or build "
                                 "the model with code_embeddings")
            events = self.code_embeddings[batch["token_ids"]]
        if events.shape[-1] != self.embedding_dim:
            raise ValueError(f"events are {events.shape[-1]}-d but the model projects {self.embedding_dim}-d")
        length = events.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds model.max_length={self.max_length}")
        x = self.projection(events)
        zeros = torch.zeros(events.shape[:2], device=x.device, dtype=x.dtype)
        if self.value_projection is not None:
            values = torch.stack([batch.get("value_z", zeros), batch.get("has_value", zeros)], dim=-1)
            x = x + self.value_projection(values)
        if self.time_projection is not None:
            hours = torch.stack([batch.get("hours_since_prev", zeros), batch.get("hours_before_pred", zeros)], dim=-1)
            x = x + self.time_projection(torch.log1p(hours.clamp(min=0)))
        x = x + self.position(torch.arange(length, device=x.device))
        return self.dropout(x)


def padding_mask_of(batch: dict[str, Tensor], like: Tensor) -> Tensor:
    """`[B, T]` bool, True at padding; all False when the batch has no mask."""
    mask = batch.get("padding_mask")
    if mask is None:
        return torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def transformer_stack(config: dict[str, Any]) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=int(config["model_dim"]), nhead=int(config["n_heads"]),
                                       dim_feedforward=4 * int(config["model_dim"]), dropout=float(config["dropout"]),
                                       batch_first=True, norm_first=True, activation="gelu")
    return nn.TransformerEncoder(layer, num_layers=int(config["n_layers"]), enable_nested_tensor=False)
