"""Multi-head token loss: focal loss (common.losses.focal_loss) summed over the decoder's heads.

    L = FL(type) + FL(command) + FL(ptype) + FL(exponent) + FL(digits, over the K digit positions)
    FL = -sum_c q_c (1 - p_c)^gamma log p_c,  q = one-hot smoothed by `label_smoothing`

Each head averages over the positions where it applies (command only at command tokens, ptype/exponent/digits
only at parameter tokens, type at every position up to and including EOS); the rest are ignored.

decoder.value_mode=regress: the value head's loss is added,

    L = (the sum above) + w * SmoothL1_beta(value head[target letter], standardised target)

at parameter tokens, where the target is (value - anchor - centre) / scale (anchor: the window's last measured
position for X/Y/Z, else 0) or (log1p(value) - centre) / scale for F and S (`value_targets`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cnc_gcode.metrics import param_values
from cnc_gcode.model import HEADS, VALUE_HEAD
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


def value_targets(vocab: Vocabulary, tokens: np.ndarray, anchor: np.ndarray, center: np.ndarray, scale: np.ndarray,
                  log_letter: np.ndarray) -> tuple[Tensor, Tensor]:
    """Target ids [N,L], anchors [N,letters] and the decoder's value statistics -> (letter index [N,L] long, IGNORE
    off parameters; standardised target [N,L] float32, 0 off parameters)."""
    fields = vocab.fields(tokens)
    is_param = fields["ptype"] != IGNORE
    letter = np.where(is_param, fields["ptype"] // 2, 0)
    values = np.nan_to_num(param_values(fields))
    base = np.take_along_axis(np.asarray(anchor, dtype=np.float64), letter, axis=1)
    logs = np.asarray(log_letter, dtype=bool)[letter]
    # log letters relative to their anchor too (log(1 + plateau speed) for F, 0 for letters without one)
    raw = np.where(logs, np.log1p(np.maximum(values, 0.0)) - base, values - base)
    standardized = (raw - np.asarray(center)[letter]) / np.asarray(scale)[letter]
    return (torch.from_numpy(np.where(is_param, letter, IGNORE)),
            torch.from_numpy(np.where(is_param, standardized, 0.0).astype(np.float32)))


def head_losses(logits: dict[str, Tensor], targets: dict[str, Tensor], gamma: float,
                label_smoothing: float, value_weight: float = 1.0, value_beta: float = 0.02) -> dict[str, Tensor]:
    """Each head's focal loss averaged over the positions where it applies. logits from
    SensorMultiHeadDecoder.forward ([B,L,C] per head, digits [B,L,K,10]); targets from `token_targets`, same rows.
    With a value head (logits "value" [B,L,letters]; targets "value" = letter [B,L] and "value_target" [B,L] from
    `value_targets`) the weighted value loss is one more part."""
    regress = VALUE_HEAD in logits
    parts = {head: focal_loss(logits[head].reshape(-1, logits[head].shape[-1]), targets[head].reshape(-1),
                              gamma=gamma, label_smoothing=label_smoothing, ignore_index=IGNORE)
             for head in HEADS}
    if regress:
        letter = targets[VALUE_HEAD]
        keep = letter != IGNORE
        if keep.any():
            predicted = logits[VALUE_HEAD][keep].gather(1, letter[keep][:, None])[:, 0]
            loss = F.smooth_l1_loss(predicted, targets["value_target"][keep], beta=value_beta)
        else:
            loss = logits[VALUE_HEAD].sum() * 0.0
        parts[VALUE_HEAD] = loss * value_weight
    return parts


def multihead_loss(logits: dict[str, Tensor], targets: dict[str, Tensor], gamma: float,
                   label_smoothing: float, value_weight: float = 1.0,
                   value_beta: float = 0.02) -> tuple[Tensor, dict[str, float]]:
    """The sum of `head_losses` and the per-head values for logging."""
    parts = head_losses(logits, targets, gamma, label_smoothing, value_weight, value_beta)
    return sum(parts.values()), {k: v.item() for k, v in parts.items()}
