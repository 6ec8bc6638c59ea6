"""Model builders: `build_model(model_cfg, table)` picks the encoder or the decoder by `model.type`."""

from __future__ import annotations

from typing import Any

import torch

from common.errors import UserError
from ehr_embedded.models.layers import as_config
from ehr_embedded.models.transformer_decoder_embedded import TransformerDecoderEmbedded
from ehr_embedded.models.transformer_encoder_embedded import TransformerEncoderEmbedded

MODEL_TYPES = {"transformer_encoder_embedded": TransformerEncoderEmbedded,
               "transformer_decoder_embedded": TransformerDecoderEmbedded}

__all__ = ["MODEL_TYPES", "TransformerDecoderEmbedded", "TransformerEncoderEmbedded", "build_model"]


def build_model(model_cfg: Any, code_embeddings: torch.Tensor, lm_vocab_size: int,
                task: str = "classification") -> torch.nn.Module:
    """The model named by `model.type`, with `vocab_size` filled from the code table when null.

    Raises UserError for an unknown type, a vocab_size that disagrees with the table, or an embedding_dim that
    disagrees with the table's width.
    """
    config = as_config(model_cfg)
    if config["vocab_size"] is None:
        config["vocab_size"] = lm_vocab_size
    elif int(config["vocab_size"]) != lm_vocab_size:
        raise UserError(f"model.vocab_size={config['vocab_size']} but the code table's next-event vocabulary has "
                        f"{lm_vocab_size} rows; set model.vocab_size=null")
    config["task"] = task
    cls = MODEL_TYPES.get(config["type"]) if "type" in config else TransformerEncoderEmbedded
    if cls is None:
        raise UserError(f"model.type={config['type']!r}: expected one of {sorted(MODEL_TYPES)}")
    try:
        return cls(config, code_embeddings=code_embeddings)
    except ValueError as exc:
        raise UserError(f"model: {exc}") from exc
