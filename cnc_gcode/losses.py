"""Multi-head token loss: focal loss (common.losses.focal_loss) summed over the decoder's heads.

    L = FL(type) + FL(command) + FL(ptype) + FL(exponent) + FL(digits, over the K digit positions)
    FL = -sum_c q_c (1 - p_c)^gamma log p_c,  q = one-hot smoothed by `label_smoothing`

Each head averages over the positions where it applies (command only at command tokens, ptype/exponent/digits
only at parameter tokens, type at every position up to and including EOS); the rest are ignored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cnc_gcode.model import HEADS
from cnc_gcode.tokenizer import IGNORE, TYPE_PAD, TYPE_SOS, TYPE_UNK, Vocabulary
from common.losses import focal_loss


def token_targets(vocab: Vocabulary, tokens: np.ndarray) -> dict[str, Tensor]:
    """Target ids [N,L] -> per-head targets: type/command/ptype/exponent [N,L], digits [N,L,K] (IGNORE = -100)."""
    fields = vocab.fields(tokens)
    kind = fields["type"].copy()
    kind[np.isin(kind, (TYPE_PAD, TYPE_SOS, TYPE_UNK))] = IGNORE
    return {"type": torch.from_numpy(kind), "command": torch.from_numpy(fields["command"]),
            "ptype": torch.from_numpy(fields["ptype"]), "exponent": torch.from_numpy(fields["exponent"]),
            "digits": torch.from_numpy(fields["digits"])}


def head_losses(logits: dict[str, Tensor], targets: dict[str, Tensor], gamma: float,
                label_smoothing: float) -> dict[str, Tensor]:
    """Each head's focal loss averaged over the positions where it applies. logits from
    SensorMultiHeadDecoder.forward ([B,L,C] per head, digits [B,L,K,10]); targets from `token_targets`, same rows."""
    return {head: focal_loss(logits[head].reshape(-1, logits[head].shape[-1]), targets[head].reshape(-1),
                             gamma=gamma, label_smoothing=label_smoothing, ignore_index=IGNORE)
            for head in HEADS}


def multihead_loss(logits: dict[str, Tensor], targets: dict[str, Tensor], gamma: float,
                   label_smoothing: float) -> tuple[Tensor, dict[str, float]]:
    """The sum of `head_losses` and the per-head values for logging."""
    parts = head_losses(logits, targets, gamma, label_smoothing)
    return sum(parts.values()), {k: v.item() for k, v in parts.items()}
