"""Constrained greedy decoding: every output is a valid line of the vocabulary's grammar.

Grammar of a line (max_tokens positions, the last always EOS):
    commands+ params* EOS
    - position 0 is a command; NONE only there and alone;
    - a command appears at most once, at most one motion command (G0-G3, a canned cycle); no command after the first
      parameter;
    - parameter letters strictly follow the canonical order (so each letter at most once);
    - a parameter is either zero (+, exponent 0, 0000) or normalised (first digit 1..9);
    - the words a motion needs to mean anything (LinuxCNC): an arc (G2/G3) has R or a centre offset of its plane
      (I/J in G17, I/K with G18, J/K with G19; none of another plane, not R with offsets); a canned cycle has Z and
      R, G73/G83 also Q, G82/G86/G89 also P. A command or parameter that would leave too few positions (or only
      letters earlier in the canonical order) for the words still owed is masked, and EOS waits until they are
      written; a motion whose words the vocabulary lacks is never chosen. At most one plane code, and a canned
      cycle only in G17.
At each step the head logits are masked to what the grammar allows, then the highest-scoring token is taken;
for parameters the best non-zero composition is compared with the best zero one by summed log-probabilities.
With value heads (decoder.value_mode=regress; the step's logits carry "value" [B, letters] in program units) a
parameter's letter is the allowed letter with the highest probability (both signs summed); its value is the digit
heads' composition (sign from the ptype head) where their probability (the geometric mean over the exponent and
the K digits) reaches `value_confidence`, else the
regressed one rounded to that letter's decimals and turned into the id the tokenizer gives that decimal
(`value_token`), so it is fed back as the next input exactly like a tokenized value.

The grammar works on numpy logits, so the PyTorch path and the onnxruntime path share it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import numpy as np
import torch

from cnc_gcode.gcode import ARC_CODES, ARC_OFFSETS, CYCLE_CODES, CYCLE_REQUIRED, MOTION_CODES, PLANE_CODES
from cnc_gcode.tokenizer import (
    EOS,
    EXP_MAX,
    EXP_MIN,
    NONE_COMMAND,
    PAD,
    SOS,
    TYPE_COMMAND,
    TYPE_EOS,
    TYPE_PARAM,
    TokenizeError,
    Vocabulary,
)

NEG = -1e9


def value_token(vocab: Vocabulary, letter: int, value: float, decimals: int) -> int:
    """The id the tokenizer gives `value` of letter index `letter` rounded to `decimals` places (half-even on the
    decimal text). A value the vocabulary cannot hold is brought inside it: beyond the exponent range it is clamped
    to the largest magnitude, with more significant digits than the vocabulary has it loses decimals."""
    value = float(np.nan_to_num(value, nan=0.0))
    limit = 10.0 ** (EXP_MAX + 1)
    if abs(value) >= limit:
        value = float(np.sign(value)) * (limit - 10.0 ** -max(decimals, 0))
    for places in range(max(int(decimals), 0), -1, -1):
        try:
            return vocab.param_id(vocab.letters[letter], Decimal(f"{value:.{places}f}"))
        except TokenizeError:
            continue
    return vocab.param_id(vocab.letters[letter], Decimal(0))


def value_tokens(vocab: Vocabulary, letters: np.ndarray, values: np.ndarray, decimals: np.ndarray) -> np.ndarray:
    """Vectorised `value_token`: letters [N] (indices), values [N, letters] (the value of every letter; the one of
    each row's letter is used), decimals [letters] -> ids [N]."""
    letters = np.asarray(letters, dtype=np.int64)
    return np.array([value_token(vocab, int(k), float(values[i, k]), int(decimals[k])) for i, k in enumerate(letters)],
                    dtype=np.int64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Grammar:
    """Per-batch grammar state; `choose(logits)` picks the next token id for each row. `value_decimals` [letters]:
    the rounding of regressed values (used when the logits carry "value"); `value_confidence`: the digit heads' joint
    probability from which their value is taken instead (above 1: never)."""

    def __init__(self, vocab: Vocabulary, batch: int, value_decimals: np.ndarray | None = None,
                 value_confidence: float = 2.0) -> None:
        self.vocab = vocab
        self.value_confidence = value_confidence
        self.value_decimals = None if value_decimals is None else np.asarray(value_decimals, dtype=np.int64)
        self.none_index = vocab.commands.index(NONE_COMMAND)
        self.is_motion = np.array([c in MOTION_CODES for c in vocab.commands])
        self.step = 0
        self.used_commands = np.zeros((batch, vocab.n_commands), dtype=bool)
        self.in_params = np.zeros(batch, dtype=bool)
        self.has_none = np.zeros(batch, dtype=bool)
        self.last_letter = np.full(batch, -1)
        self.done = np.zeros(batch, dtype=bool)
        self.emitted = np.zeros((batch, len(vocab.letters)), dtype=bool)
        # Words owed by a motion, as groups of letters of which one must be written: 0 the arc's centre (per
        # plane), 1 Z, 2 R, 3 Q, 4 P of a canned cycle.
        letters = list(vocab.letters)
        n_groups = 5
        self.plane_codes = list(PLANE_CODES)
        self.command_plane = np.array([self.plane_codes.index(c) if c in PLANE_CODES else -1 for c in vocab.commands])
        self.command_groups = np.zeros((vocab.n_commands, n_groups), dtype=bool)
        for i, code in enumerate(vocab.commands):
            if code in ARC_CODES:
                self.command_groups[i, 0] = True
            elif code in CYCLE_CODES:
                for letter in CYCLE_REQUIRED[code]:
                    self.command_groups[i, {"Z": 1, "R": 2, "Q": 3, "P": 4}[letter]] = True
        self.group_letters = np.zeros((len(PLANE_CODES), n_groups, len(letters)), dtype=bool)  # [plane, group, L]
        for p, plane in enumerate(PLANE_CODES):
            for letter in (*ARC_OFFSETS[plane], "R"):
                if letter in letters:
                    self.group_letters[p, 0, letters.index(letter)] = True
            for g, letter in enumerate("ZRQP", start=1):
                if letter in letters:
                    self.group_letters[p, g, letters.index(letter)] = True
        self.offset_letter = np.array([k in "IJK" for k in letters])
        self.off_plane = np.array([[k in "IJK" and k not in ARC_OFFSETS[plane] for k in letters]
                                   for plane in PLANE_CODES])  # [plane, L]
        self.r_letter = np.array([k == "R" for k in letters])
        self.is_arc = np.array([c in ARC_CODES for c in vocab.commands])
        self.is_cycle = np.array([c in CYCLE_CODES for c in vocab.commands])
        self.is_other_plane = np.array([c in PLANE_CODES and c != "G17" for c in vocab.commands])

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
        command_ok, ptype_ok, owed = self._owed_words(command_ok, ptype_ok, letter_of_ptype)
        last = self.step >= vocab.max_tokens - 1
        type_ok = np.zeros((batch, 4), dtype=bool)
        type_ok[:, TYPE_COMMAND] = command_ok.any(1) & ~last
        type_ok[:, TYPE_PARAM] = ptype_ok.any(1) & (self.step > 0) & ~last & (self.last_letter < n_letters - 1)
        type_ok[:, TYPE_EOS] = ((self.step > 0) | last) & ~owed
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
        if "value" in logits:  # regressed values: the letter from ptype (signs summed), the value from its head
            if self.value_decimals is None:
                raise ValueError("Grammar: logits carry regressed values but no value_decimals were given")
            letter = np.logaddexp(lp_ptype[:, 0::2], lp_ptype[:, 1::2]).argmax(1)
            rows = np.flatnonzero(kind == TYPE_PARAM)
            if len(rows):
                regressed = value_tokens(vocab, letter[rows], np.asarray(logits["value"])[rows], self.value_decimals)
                # the digit heads' own value where they are sure of it (log-probability without the letter)
                digits_lp = np.where(use_zero, score_zero - positive.max(1),
                                     score_nz - lp_ptype[np.arange(batch), ptype_nz])
                sign = (lp_ptype[np.arange(batch), 2 * letter + 1] > lp_ptype[np.arange(batch), 2 * letter]) & ~use_zero
                from_digits = vocab.compose(kind, command, 2 * letter + sign, exponent, digits)
                # geometric mean over the exponent and K digits, so the rule does not depend on K
                sure = np.exp(digits_lp[rows] / (vocab.n_digits + 1)) >= self.value_confidence
                ids[rows] = np.where(sure, from_digits[rows], regressed)
                ptype = ptype.copy()
                ptype[rows] = vocab.fields(ids[rows])["ptype"]

        # update state
        is_cmd, is_param = kind == TYPE_COMMAND, kind == TYPE_PARAM
        rows = np.flatnonzero(is_cmd & ~self.done)
        self.used_commands[rows, command[rows]] = True
        self.has_none |= is_cmd & (command == self.none_index)
        self.in_params |= is_param
        self.last_letter = np.where(is_param & ~self.done, ptype // 2, self.last_letter)
        rows = np.flatnonzero(is_param & ~self.done)
        self.emitted[rows, ptype[rows] // 2] = True
        ids = np.where(self.done, PAD, ids)
        self.done |= kind == TYPE_EOS
        self.step += 1
        return ids

    def _plane(self, used: np.ndarray) -> np.ndarray:
        """Plane index per row (0 G17, 1 G18, 2 G19) from the plane code among `used` commands [B, C]."""
        planes = np.where(used & (self.command_plane >= 0)[None], self.command_plane[None], -1).max(1)
        return np.maximum(planes, 0)

    def _owed_words(self, command_ok: np.ndarray, ptype_ok: np.ndarray, letter_of_ptype: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask commands and parameter types that would leave an arc's or a cycle's required words unwritable.

        Returns (command_ok [B,C], ptype_ok [B,2L], owed [B]: words still owed now, so EOS must wait)."""
        vocab = self.vocab
        slots = vocab.max_tokens - 2 - self.step  # parameter positions left after this one (the last is EOS)
        n_letters = len(vocab.letters)
        order = np.arange(n_letters)
        # commands: the groups each candidate would leave owed must fit the positions left and have letters
        plane = self._plane(self.used_commands)
        active = (self.used_commands[:, :, None] & self.command_groups[None]).any(1)  # [B,G]
        cand_plane = np.where(self.command_plane[None] >= 0, self.command_plane[None], plane[:, None])  # [B,C]
        cand_groups = active[:, None, :] | self.command_groups[None]  # [B,C,G]
        has_letters = self.group_letters.any(2)[cand_plane]  # [B,C,G]
        command_ok = command_ok & (cand_groups <= has_letters).all(2) & (cand_groups.sum(2) <= slots)
        has_plane = (self.used_commands & (self.command_plane >= 0)[None]).any(1)
        command_ok &= ~(has_plane[:, None] & (self.command_plane >= 0)[None])
        has_cycle = (self.used_commands & self.is_cycle[None]).any(1)
        has_other_plane = (self.used_commands & self.is_other_plane[None]).any(1)
        command_ok &= ~(has_cycle[:, None] & self.is_other_plane[None])
        command_ok &= ~(has_other_plane[:, None] & self.is_cycle[None])
        # parameters: after writing letter l, every owed group needs a letter after l, and positions for each
        letters = self.group_letters[plane]  # [B,G,L]
        satisfied = (letters & self.emitted[:, None, :]).any(2)
        owed_now = active & ~satisfied
        sat_after = satisfied[:, None, :] | letters.transpose(0, 2, 1)  # [B,L,G]
        owed_after = active[:, None, :] & ~sat_after
        last_index = np.where(letters, order[None, None], -1).max(2)  # [B,G]
        reachable = last_index[:, None, :] > order[None, :, None]  # [B,L,G]
        letter_ok = (owed_after <= reachable).all(2) & (owed_after.sum(2) <= slots)
        arc = (self.used_commands & self.is_arc[None]).any(1)
        letter_ok &= ~(arc[:, None] & self.off_plane[plane])
        offsets_written = (self.emitted & self.offset_letter[None]).any(1)
        letter_ok &= ~((arc & offsets_written)[:, None] & self.r_letter[None])
        return command_ok, ptype_ok & letter_ok[:, letter_of_ptype], owed_now.any(1)


StepFn = Callable[[np.ndarray, int], dict[str, np.ndarray]]


def greedy_decode(step_fn: StepFn, vocab: Vocabulary, batch: int,
                  value_decimals: np.ndarray | None = None, value_confidence: float = 2.0) -> np.ndarray:
    """Run the grammar over `step_fn(previous_ids [B], position) -> head logits at that position` (with "value"
    [B, letters] in program units when the decoder regresses values; `value_decimals` [letters] then rounds them).

    Returns ids [B, max_tokens] (EOS then PAD after the end)."""
    grammar = Grammar(vocab, batch, value_decimals, value_confidence)
    previous = np.full(batch, SOS, dtype=np.int64)
    out = np.full((batch, vocab.max_tokens), PAD, dtype=np.int64)
    for position in range(vocab.max_tokens):
        ids = grammar.choose(step_fn(previous, position))
        out[:, position] = ids
        previous = ids
        if grammar.done.all():
            break
    return out


def _to_numpy(logits: dict[str, torch.Tensor], decoder=None, anchor: torch.Tensor | None = None
              ) -> dict[str, np.ndarray]:
    last = {k: v[:, -1] for k, v in logits.items()}
    if "value" in last:
        last["value"] = decoder.absolute_values(last["value"], anchor)
    return {k: v.float().cpu().numpy() for k, v in last.items()}


def _value_setup(decoder, batch: int, anchor: torch.Tensor | None) -> tuple[torch.Tensor | None, np.ndarray | None]:
    if not getattr(decoder, "regress", False):
        return None, None
    if anchor is None:
        raise ValueError("a decoder with value heads needs anchor=decoder.value_anchor(raw continuous [B,T,C])")
    if anchor.shape[0] != batch:
        raise ValueError(f"anchor has {anchor.shape[0]} rows, memory {batch}")
    return anchor, decoder.value_decimals.cpu().numpy()


@torch.no_grad()
def decode_cached(decoder, memory: torch.Tensor, vocab: Vocabulary, anchor: torch.Tensor | None = None) -> np.ndarray:
    """Greedy decoding with the key/value cache: one position per decoder call. memory [B,T,S] -> ids [B,L].
    A decoder with value heads needs `anchor` [B, letters] (`decoder.value_anchor` of the raw continuous input)."""
    batch = memory.shape[0]
    anchor, decimals = _value_setup(decoder, batch, anchor)
    cross, context = decoder.cross_kv(memory), decoder.step_context(memory)
    state = {"cache": decoder.empty_cache(batch, memory.device)}

    def step(previous: np.ndarray, position: int) -> dict[str, np.ndarray]:
        token = torch.from_numpy(previous).to(memory.device).view(batch, 1)
        logits, state["cache"] = decoder.step(token, torch.tensor([position], device=memory.device),
                                              state["cache"], cross, context)
        return _to_numpy(logits, decoder, anchor)

    return greedy_decode(step, vocab, batch, decimals, getattr(decoder, "value_digits_confidence", 2.0))


@torch.no_grad()
def decode_uncached(decoder, memory: torch.Tensor, vocab: Vocabulary, anchor: torch.Tensor | None = None
                    ) -> np.ndarray:
    """Greedy decoding that re-runs the whole prefix each step (the eager baseline of the latency benchmark)."""
    batch = memory.shape[0]
    anchor, decimals = _value_setup(decoder, batch, anchor)
    prefix = [np.full(batch, SOS, dtype=np.int64)]

    def step(previous: np.ndarray, position: int) -> dict[str, np.ndarray]:
        if position > 0:
            prefix.append(previous)
        ids = torch.from_numpy(np.stack(prefix, axis=1)).to(memory.device)
        return _to_numpy(decoder(memory, ids), decoder, anchor)

    return greedy_decode(step, vocab, batch, decimals, getattr(decoder, "value_digits_confidence", 2.0))


__all__ = ["Grammar", "greedy_decode", "decode_cached", "decode_uncached", "value_token", "value_tokens", "EOS"]
