"""The event input layer both models share: frozen code-embedding table -> projection, plus values, time, position.

Input scales (`model.input_scaling`). MiniLM rows have unit length, so through a default `nn.Linear` each output
component of a code is about 0.04, while a default position embedding starts at N(0, 1) and the value and time inputs
are near 1: code identity was almost invisible. `balanced` (the default) rescales every code row to unit RMS
(norm sqrt(D); a default Linear then gives components of about 0.6), divides log1p(hours) by log1p(720) (30 days
-> 1), keeps value z-scores (already unit scale) and starts positions at N(0, 0.02), so code, value, time and position
enter the residual stream on comparable scales. `none` is the earlier behaviour (runs trained before the option
existed load with it; see `prediction_files.run_config`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

DEFAULTS: dict[str, Any] = {"embedding_dim": None, "model_dim": 128, "n_heads": 4, "n_layers": 2, "dropout": 0.1,
                            "max_length": 512, "num_classes": 2, "vocab_size": None, "use_values": True,
                            "use_time": True, "input_scaling": "none", "code_embedding": "frozen",
                            "pooling": "mean"}
# the plain-dict (original) API keeps the original input scales and mean pooling unless asked; ModelConfig
# defaults to input_scaling="balanced", pooling="max"
INPUT_SCALINGS = ("balanced", "none")
CODE_EMBEDDINGS = ("frozen", "trainable")
TIME_SCALE_HOURS = 720.0  # log1p(hours) / log1p(720): 30 days -> 1, a day -> 0.49, a year -> 1.38
POSITION_INIT_STD = 0.02


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
    [log1p(hours since previous event), log1p(hours before prediction)], plus a learned position embedding
    (input scales: see the module docstring). A batch may instead carry `embeddings` `[B, T, D]` directly (the
    original API).

    `code_embedding=trainable` adds a learned per-code vector `code_offset[token_id]` (`[vocab_size, model_dim]`,
    zero at init) to the projected description embedding, for the `vocab_size` rows of the next-event vocabulary:
    each training code starts from its sentence embedding and may move away from it (weight decay pulls it back);
    description-only rows (codes unseen in training, met at inference) keep offset 0, so they are still read
    through their descriptions.
    """

    def __init__(self, config: dict[str, Any], code_embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.embedding_dim = resolve_embedding_dim(config, code_embeddings)
        self.max_length = int(config["max_length"])
        model_dim = int(config["model_dim"])
        self.input_scaling = str(config["input_scaling"])
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"model.input_scaling={self.input_scaling!r}: expected one of {INPUT_SCALINGS}")
        if config["code_embedding"] not in CODE_EMBEDDINGS:
            raise ValueError(f"model.code_embedding={config['code_embedding']!r}: expected one of {CODE_EMBEDDINGS}")
        table = code_embeddings.detach().float().clone() if code_embeddings is not None else None
        self.register_buffer("code_embeddings", table, persistent=False)
        self.projection = nn.Linear(self.embedding_dim, model_dim)
        self.code_offset = None
        if config["code_embedding"] == "trainable":
            if config.get("vocab_size") is None:
                raise ValueError("model.code_embedding=trainable needs model.vocab_size (the code table gives it)")
            # a plain Parameter, not nn.Embedding: common.training.param_groups decays it towards 0, i.e. towards
            # the description embedding, which is the prior a small dataset needs
            self.code_offset = nn.Parameter(torch.zeros(int(config["vocab_size"]), model_dim))
        self.value_projection = nn.Linear(2, model_dim) if config["use_values"] else None
        self.time_projection = nn.Linear(2, model_dim) if config["use_time"] else None
        self.position = nn.Embedding(self.max_length, model_dim)
        if self.input_scaling == "balanced":
            nn.init.normal_(self.position.weight, std=POSITION_INIT_STD)
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
        if self.input_scaling == "balanced":
            # unit RMS per component whatever the text model's norm (padding rows of zeros stay zero)
            events = events * (self.embedding_dim ** 0.5 / events.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        x = self.projection(events)
        if self.code_offset is not None:
            if "token_ids" not in batch:
                raise ValueError("model.code_embedding=trainable reads batch['token_ids'] (per-code vectors); a batch "
                                 "of raw embeddings cannot be mapped to codes")
            ids = batch["token_ids"]
            in_vocab = ids < self.code_offset.shape[0]  # description-only rows: no learned offset
            offset = nn.functional.embedding(torch.where(in_vocab, ids, torch.zeros_like(ids)), self.code_offset)
            x = x + offset * in_vocab.unsqueeze(-1).to(x.dtype)
        zeros = torch.zeros(events.shape[:2], device=x.device, dtype=x.dtype)
        if self.value_projection is not None:
            values = torch.stack([batch.get("value_z", zeros), batch.get("has_value", zeros)], dim=-1)
            x = x + self.value_projection(values)
        if self.time_projection is not None:
            hours = torch.stack([batch.get("hours_since_prev", zeros), batch.get("hours_before_pred", zeros)], dim=-1)
            log_hours = torch.log1p(hours.clamp(min=0))
            if self.input_scaling == "balanced":
                log_hours = log_hours / math.log1p(TIME_SCALE_HOURS)
            x = x + self.time_projection(log_hours)
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
