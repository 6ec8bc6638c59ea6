"""Causal transformer over embedded events: next-event prediction (pretraining) and classification (finetuning).

    model = TransformerDecoderEmbedded(config, code_embeddings=table)
    next_logits = model(batch, task="autoregressive")    # [B, T, vocab_size]: logits of event t+1 at position t
    class_logits = model(batch, task="classification")   # [B, num_classes], from the last real event's state

Decoder-only (GPT-style): self-attention with a causal mask, no cross-attention. Classification reads the hidden
state of the last non-padding event, which has attended to the whole sequence. `vocab_size` covers the training
vocabulary only; description-only rows of an extended table are inputs, never targets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ehr_embedded.models.layers import EventEmbedding, as_config, padding_mask_of, transformer_stack

TASKS = ("autoregressive", "classification")


class TransformerDecoderEmbedded(nn.Module):
    def __init__(self, config: Any, code_embeddings: Tensor | None = None) -> None:
        super().__init__()
        self.config = as_config(config)
        vocab_size = self.config.get("vocab_size")
        if vocab_size is None:
            raise ValueError("model.vocab_size is required for the decoder (create_embeddings' code table gives it)")
        model_dim = int(self.config["model_dim"])
        self.default_task = self.config.get("task") or "classification"
        self.event_embedding = EventEmbedding(self.config, code_embeddings)
        self.decoder = transformer_stack(self.config)
        self.norm = nn.LayerNorm(model_dim)
        self.lm_head = nn.Linear(model_dim, int(vocab_size))
        self.classifier = nn.Linear(model_dim, int(self.config["num_classes"]))

    def hidden_states(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(`[B, T, model_dim]` causal hidden states, `[B, T]` padding mask)."""
        x = self.event_embedding(batch)
        pad = padding_mask_of(batch, x)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        # both masks as additive floats (mixing bool and float masks is deprecated in torch)
        pad_additive = torch.zeros(pad.shape, device=x.device, dtype=x.dtype).masked_fill(pad, float("-inf"))
        h = self.decoder(x, mask=causal, src_key_padding_mask=pad_additive, is_causal=True)
        return self.norm(h), pad

    @staticmethod
    def last_event_state(h: Tensor, pad: Tensor) -> Tensor:
        """`[B, model_dim]`: the state of each row's last non-padding event (row 0 for padding only)."""
        last = ((~pad).sum(1) - 1).clamp(min=0)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        """`[B, model_dim]`: the patient representation the classification head reads (the last real event's
        state, which has attended to the whole sequence); `ehr_embedded.represent` exports it."""
        return self.last_event_state(*self.hidden_states(batch))

    def forward(self, batch: dict[str, Tensor], task: str | None = None) -> Tensor:
        task = task or self.default_task
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        h, pad = self.hidden_states(batch)
        if task == "autoregressive":
            return self.lm_head(h)
        return self.classifier(self.last_event_state(h, pad))
