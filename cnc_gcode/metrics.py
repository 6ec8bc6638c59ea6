"""Token-level metrics of predicted vs target lines (numpy in, python floats out).

token accuracy: positions up to and including the target's EOS where the predicted id equals the target id
(all fields of a parameter: letter, sign, exponent and every digit). Type / command / ptype / digit accuracies
are over the positions where the target has that field. Line exact match: all positions of a row agree.
Numeric error: |decoded value - target value| in program units (mm) where the predicted token is a parameter
with the target's letter.

Token accuracy within tolerance (`token_acc_tol`): as token accuracy, but a parameter also counts when the
prediction is a parameter of the same letter whose value is within tolerance: coordinates and lengths (X Y Z, I J
K R, Q) within 0.1 (mm in a mm program), feed F and spindle speed S within 2 % of the target; any other letter
(P, H, T, ...) must be exact, and so must commands, EOS and the letter itself. Value errors per letter group, over
the target's parameters where the prediction has the same letter: coordinates (X Y Z) and arc words (I J K R) in
mm, F and S as a relative error in %; median and 95th percentile.
"""

from __future__ import annotations

import numpy as np

from cnc_gcode.tokenizer import EXP_MIN, PAD, TYPE_COMMAND, TYPE_PARAM, Vocabulary

ABS_TOLERANCE = 0.1  # program units (mm)
REL_TOLERANCE = 0.02
ABS_LETTERS = "XYZIJKRQ"
REL_LETTERS = "FS"
# (report name, letters, relative error?) of the per-group value errors
VALUE_GROUPS = (("xyz", "XYZ", False), ("ijkr", "IJKR", False), ("f", "F", True), ("s", "S", True))


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
    out.update(tolerance_metrics(vocab, predicted, target))
    return out


def _letter_table(vocab: Vocabulary, letters: str) -> np.ndarray:
    return np.array([k in letters for k in vocab.letters])


def value_errors(vocab: Vocabulary, predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(same letter [N,L] bool, error [N,L]): where the target is a parameter and the prediction a parameter of the
    same letter, |difference| (absolute letters) or |difference| / |target| (REL_LETTERS; 0 when both are 0)."""
    p, t = vocab.fields(np.asarray(predicted)), vocab.fields(np.asarray(target))
    same = (t["type"] == TYPE_PARAM) & (p["type"] == TYPE_PARAM) & (p["ptype"] // 2 == t["ptype"] // 2)
    letter = np.where(same, t["ptype"] // 2, 0)
    pv, tv = param_values(p), param_values(t)
    diff = np.abs(np.where(same, pv - tv, 0.0))
    relative = _letter_table(vocab, REL_LETTERS)[letter]
    target_size = np.abs(np.nan_to_num(tv))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, np.where(target_size > 0, diff / np.where(target_size > 0, target_size, 1.0),
                                                 np.inf))
    return same, np.where(relative, rel, diff)


def tolerance_metrics(vocab: Vocabulary, predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """token_acc_tol, value_acc (exact) and value_acc_tol over the target's parameters, and per-group value errors
    (value_err_<group>_median / _p95: mm for xyz and ijkr, % for f and s; NaN where a group has no matched token)."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    t = vocab.fields(target)
    valid, is_param = target != PAD, t["type"] == TYPE_PARAM
    same, error = value_errors(vocab, predicted, target)
    letter = np.where(is_param, t["ptype"] // 2, 0)
    absolute, relative = _letter_table(vocab, ABS_LETTERS)[letter], _letter_table(vocab, REL_LETTERS)[letter]
    close = same & ((absolute & (error <= ABS_TOLERANCE + 1e-9)) | (relative & (error <= REL_TOLERANCE + 1e-12)))
    right = (predicted == target) | close
    out = {"token_acc_tol": float(right[valid].mean()),
           "value_acc": float((predicted == target)[is_param].mean()) if is_param.any() else float("nan"),
           "value_acc_tol": float(right[is_param].mean()) if is_param.any() else float("nan"),
           "n_value_tokens": int(is_param.sum())}
    for name, letters, rel in VALUE_GROUPS:
        chosen = same & _letter_table(vocab, letters)[letter]
        errors = error[chosen] * (100.0 if rel else 1.0)
        unit = "pct" if rel else "mm"
        out[f"value_err_{name}_median_{unit}"] = float(np.median(errors)) if errors.size else float("nan")
        out[f"value_err_{name}_p95_{unit}"] = float(np.percentile(errors, 95)) if errors.size else float("nan")
        out[f"value_n_{name}"] = int(chosen.sum())
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


def teacher_forced_predictions(vocab: Vocabulary, logits: dict, values: np.ndarray | None = None,
                               decimals: np.ndarray | None = None, confidence: float = 2.0) -> np.ndarray:
    """Unconstrained argmax of every head -> ids [B,L] (for fast validation during training). With regressed
    `values` [B,L,letters] (program units) and their `decimals` [letters], a parameter's value comes from them
    unless the digit heads' probability of their argmax value (geometric mean over exponent and digits) reaches
    `confidence` (as in decoding)."""
    ids = vocab.compose(logits["type"].argmax(-1).cpu().numpy(), logits["command"].argmax(-1).cpu().numpy(),
                        logits["ptype"].argmax(-1).cpu().numpy(), logits["exponent"].argmax(-1).cpu().numpy(),
                        logits["digits"].argmax(-1).cpu().numpy())
    if values is not None:
        from cnc_gcode.decoding import value_tokens

        rows, cols = np.nonzero(ids >= vocab.param_base)
        if len(rows):
            import torch

            letters = logits["ptype"].argmax(-1).cpu().numpy()[rows, cols] // 2
            joint = ((torch.log_softmax(logits["exponent"], -1).amax(-1)
                      + torch.log_softmax(logits["digits"], -1).amax(-1).sum(-1)) / (vocab.n_digits + 1)
                     ).exp().cpu().numpy()[rows, cols]
            regressed = value_tokens(vocab, letters, np.asarray(values)[rows, cols], decimals)
            ids[rows, cols] = np.where(joint >= confidence, ids[rows, cols], regressed)
    return ids
