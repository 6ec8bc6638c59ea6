"""Token-level metrics of predicted vs target lines (numpy in, python floats out).

token accuracy: positions up to and including the target's EOS where the predicted id equals the target id
(all fields of a parameter: letter, sign, exponent and every digit). Type / command / ptype / digit accuracies
are over the positions where the target has that field. Line exact match: all positions of a row agree.
Numeric error: |decoded value - target value| in program units (mm) where the predicted token is a parameter
with the target's letter.
"""

from __future__ import annotations

import numpy as np

from cnc_gcode.tokenizer import EXP_MIN, PAD, TYPE_COMMAND, TYPE_PARAM, Vocabulary


def param_values(fields: dict[str, np.ndarray]) -> np.ndarray:
    """Float values of parameter tokens (NaN elsewhere) from `Vocabulary.fields` (digits [..., K])."""
    n_digits = fields["digits"].shape[-1]
    weights = 10 ** np.arange(n_digits - 1, -1, -1, dtype=np.int64)
    is_param = fields["type"] == TYPE_PARAM
    digits = np.where(is_param[..., None], fields["digits"], 0)
    magnitude = (digits * weights).sum(-1) * 10.0 ** (np.where(is_param, fields["exponent"], 0) + EXP_MIN
                                                       - (n_digits - 1))
    sign = np.where(np.where(is_param, fields["ptype"], 0) % 2 == 1, -1.0, 1.0)
    return np.where(is_param, sign * magnitude, np.nan)


def token_metrics(vocab: Vocabulary, predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """predicted / target ids [N,L] -> accuracies (fractions) and numeric errors (mm)."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    p, t = vocab.fields(predicted), vocab.fields(target)
    valid = target != PAD
    is_cmd, is_param = t["type"] == TYPE_COMMAND, t["type"] == TYPE_PARAM
    equal = predicted == target
    digit_equal = p["digits"] == t["digits"]
    out = {
        "token_acc": float(equal[valid].mean()),
        "type_acc": float((p["type"] == t["type"])[valid].mean()),
        "command_acc": float((p["command"] == t["command"])[is_cmd].mean()) if is_cmd.any() else float("nan"),
        "ptype_acc": float((p["ptype"] == t["ptype"])[is_param].mean()) if is_param.any() else float("nan"),
        "exponent_acc": float((p["exponent"] == t["exponent"])[is_param].mean()) if is_param.any() else float("nan"),
        "line_exact_match": float(np.all(equal | ~valid, axis=1).mean()),
        "n_tokens": int(valid.sum()),
        "n_lines": len(target),
    }
    for i in range(vocab.n_digits):
        out[f"digit{i + 1}_acc"] = float(digit_equal[..., i][is_param].mean()) if is_param.any() else float("nan")
    same_letter = is_param & (p["type"] == TYPE_PARAM) & (p["ptype"] // 2 == t["ptype"] // 2)
    if same_letter.any():
        errors = np.abs(param_values(p) - param_values(t))[same_letter]
        out.update({"numeric_mae_mm": float(errors.mean()), "numeric_median_mm": float(np.median(errors)),
                    "numeric_p95_mm": float(np.percentile(errors, 95)),
                    "param_letter_match": float(same_letter.sum() / is_param.sum())})
    return out


def most_frequent(ids: np.ndarray) -> int:
    """The most frequent id (the smallest among ties); ids reach 10**12, so no bincount over the id range."""
    values, counts = np.unique(ids, return_counts=True)
    return int(values[counts.argmax()])


def baselines(vocab: Vocabulary, train_tokens: np.ndarray, target: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Token accuracy of (a) uniform random tokens over the ids seen in training, (b) the majority token of each
    position in training."""
    rng = np.random.default_rng(seed)
    seen = np.unique(train_tokens)
    random_pred = rng.choice(seen, size=target.shape)
    majority = np.array([most_frequent(train_tokens[:, i]) for i in range(train_tokens.shape[1])])
    majority_pred = np.broadcast_to(majority, target.shape)
    valid = target != PAD
    return {"random_token_acc": float((random_pred == target)[valid].mean()),
            "majority_token_acc": float((majority_pred == target)[valid].mean())}


def teacher_forced_predictions(vocab: Vocabulary, logits: dict) -> np.ndarray:
    """Unconstrained argmax of every head -> ids [B,L] (for fast validation during training)."""
    return vocab.compose(logits["type"].argmax(-1).cpu().numpy(), logits["command"].argmax(-1).cpu().numpy(),
                         logits["ptype"].argmax(-1).cpu().numpy(), logits["exponent"].argmax(-1).cpu().numpy(),
                         logits["digits"].argmax(-1).cpu().numpy())
