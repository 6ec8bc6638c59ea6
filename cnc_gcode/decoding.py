"""Constrained greedy decoding: every output is a valid line of the vocabulary's grammar.

Grammar of a line (max_tokens positions, the last always EOS):
    commands+ params* EOS
    - position 0 is a command; NONE only there and alone;
    - a command appears at most once, at most one motion command (G0-G3); no command after the first parameter;
    - parameter letters strictly follow the canonical order (so each letter at most once);
    - a parameter is either zero (+, exponent 0, 0000) or normalised (first digit 1..9).
At each step the head logits are masked to what the grammar allows, then the highest-scoring token is taken;
for parameters the best non-zero composition is compared with the best zero one by summed log-probabilities.

The grammar works on numpy logits, so the PyTorch path and the onnxruntime path share it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cnc_gcode.gcode import MOTION_CODES
from cnc_gcode.tokenizer import EOS, EXP_MIN, NONE_COMMAND, PAD, SOS, TYPE_COMMAND, TYPE_EOS, TYPE_PARAM, Vocabulary

NEG = -1e9


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Grammar:
    """Per-batch grammar state; `choose(logits)` picks the next token id for each row."""

    def __init__(self, vocab: Vocabulary, batch: int) -> None:
        self.vocab = vocab
        self.none_index = vocab.commands.index(NONE_COMMAND)
        self.is_motion = np.array([c in MOTION_CODES for c in vocab.commands])
        self.step = 0
        self.used_commands = np.zeros((batch, vocab.n_commands), dtype=bool)
        self.in_params = np.zeros(batch, dtype=bool)
        self.has_none = np.zeros(batch, dtype=bool)
        self.last_letter = np.full(batch, -1)
        self.done = np.zeros(batch, dtype=bool)

    def choose(self, logits: dict[str, np.ndarray]) -> np.ndarray:
        """logits: type [B,4], command [B,C], ptype [B,2L], exponent [B,E], digits [B,K,10] -> ids [B]."""
        vocab, batch = self.vocab, len(self.done)
        n_letters = len(vocab.letters)
        letter_of_ptype = np.arange(vocab.n_param_types) // 2
        ptype_ok = letter_of_ptype[None] > self.last_letter[:, None]  # [B,2L]
        command_ok = ~self.used_commands & ~self.in_params[:, None] & ~self.has_none[:, None]
        has_motion = (self.used_commands & self.is_motion[None]).any(1)
        command_ok &= ~(has_motion[:, None] & self.is_motion[None])
        command_ok[:, self.none_index] &= self.step == 0
        if self.step > 0:
            command_ok[:, self.none_index] = False
        last = self.step >= vocab.max_tokens - 1
        type_ok = np.zeros((batch, 4), dtype=bool)
        type_ok[:, TYPE_COMMAND] = command_ok.any(1) & ~last
        type_ok[:, TYPE_PARAM] = ptype_ok.any(1) & (self.step > 0) & ~last & (self.last_letter < n_letters - 1)
        type_ok[:, TYPE_EOS] = (self.step > 0) | last
        type_ok[self.done] = False
        type_ok[self.done, TYPE_EOS] = True

        kind = np.where(type_ok, logits["type"], NEG).argmax(1)
        command = np.where(command_ok, logits["command"], NEG).argmax(1)
        lp_ptype = np.where(ptype_ok, _log_softmax(logits["ptype"]), NEG)
        lp_exp = _log_softmax(logits["exponent"])
        lp_digits = _log_softmax(logits["digits"])  # [B,K,10]
        # non-zero: best allowed ptype, best exponent, first digit 1..9, free remaining digits
        ptype_nz = lp_ptype.argmax(1)
        exp_nz = lp_exp.argmax(1)
        first = lp_digits[:, 0, 1:].argmax(1) + 1
        rest = lp_digits[:, 1:].argmax(2)
        score_nz = (lp_ptype[np.arange(batch), ptype_nz] + lp_exp[np.arange(batch), exp_nz]
                    + lp_digits[np.arange(batch), 0, first] + lp_digits[:, 1:].max(2).sum(1))
        # zero: positive sign of the best allowed letter, exponent 0, all digits 0
        positive = lp_ptype[:, 0::2]
        ptype_zero = positive.argmax(1) * 2
        zero_exp = -EXP_MIN
        score_zero = positive.max(1) + lp_exp[:, zero_exp] + lp_digits[:, :, 0].sum(1)
        use_zero = score_zero > score_nz
        ptype = np.where(use_zero, ptype_zero, ptype_nz)
        exponent = np.where(use_zero, zero_exp, exp_nz)
        digits = np.where(use_zero[:, None], 0, np.concatenate([first[:, None], rest], axis=1))
        ids = vocab.compose(kind, command, ptype, exponent, digits)

        # update state
        is_cmd, is_param = kind == TYPE_COMMAND, kind == TYPE_PARAM
        rows = np.flatnonzero(is_cmd & ~self.done)
        self.used_commands[rows, command[rows]] = True
        self.has_none |= is_cmd & (command == self.none_index)
        self.in_params |= is_param
        self.last_letter = np.where(is_param & ~self.done, ptype // 2, self.last_letter)
        ids = np.where(self.done, PAD, ids)
        self.done |= kind == TYPE_EOS
        self.step += 1
        return ids


StepFn = Callable[[np.ndarray, int], dict[str, np.ndarray]]


def greedy_decode(step_fn: StepFn, vocab: Vocabulary, batch: int) -> np.ndarray:
    """Run the grammar over `step_fn(previous_ids [B], position) -> head logits at that position`.

    Returns ids [B, max_tokens] (EOS then PAD after the end)."""
    grammar = Grammar(vocab, batch)
    previous = np.full(batch, SOS, dtype=np.int64)
    out = np.full((batch, vocab.max_tokens), PAD, dtype=np.int64)
    for position in range(vocab.max_tokens):
        ids = grammar.choose(step_fn(previous, position))
        out[:, position] = ids
        previous = ids
        if grammar.done.all():
            break
    return out


def _to_numpy(logits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v[:, -1].float().cpu().numpy() for k, v in logits.items()}


@torch.no_grad()
def decode_cached(decoder, memory: torch.Tensor, vocab: Vocabulary) -> np.ndarray:
    """Greedy decoding with the key/value cache: one position per decoder call. memory [B,T,S] -> ids [B,L]."""
    batch = memory.shape[0]
    cross, context = decoder.cross_kv(memory), decoder.step_context(memory)
    state = {"cache": decoder.empty_cache(batch, memory.device)}

    def step(previous: np.ndarray, position: int) -> dict[str, np.ndarray]:
        token = torch.from_numpy(previous).to(memory.device).view(batch, 1)
        logits, state["cache"] = decoder.step(token, torch.tensor([position], device=memory.device),
                                              state["cache"], cross, context)
        return _to_numpy(logits)

    return greedy_decode(step, vocab, batch)


@torch.no_grad()
def decode_uncached(decoder, memory: torch.Tensor, vocab: Vocabulary) -> np.ndarray:
    """Greedy decoding that re-runs the whole prefix each step (the eager baseline of the latency benchmark)."""
    batch = memory.shape[0]
    prefix = [np.full(batch, SOS, dtype=np.int64)]

    def step(previous: np.ndarray, position: int) -> dict[str, np.ndarray]:
        if position > 0:
            prefix.append(previous)
        ids = torch.from_numpy(np.stack(prefix, axis=1)).to(memory.device)
        return _to_numpy(decoder(memory, ids))

    return greedy_decode(step, vocab, batch)


__all__ = ["Grammar", "greedy_decode", "decode_cached", "decode_uncached", "EOS"]
