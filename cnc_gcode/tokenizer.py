"""The hybrid G-code vocabulary: one token per command or parameter word, decomposable into heads.

A line becomes `max_tokens` ids: the modal state it runs in where that differs from a program's start (G20 inch,
G91 incremental, G18/G19 plane, G43 tool length with its H) unless the line writes it itself, its carried modal
motion, its own commands (`NONE` when it has none), then its parameter words in canonical letter order, then EOS,
then PAD. So a decoded line means, on its own, what the source line meant in its program:

    G20 G91 ... / G1 X1   ->   [G20, G91, G1, X+1000000000e0, EOS, PAD, ...]   ->   'G20 G91 G1 X1'

Token id layout (closed form, so no table of numbers has to be stored):

    0..3                 PAD, UNK, SOS, EOS
    4 .. 4+C-1           the C commands (default G0 G1 G3 G53 M30 NONE, the original's command set)
    P0 + ((ptype * E + e) * 10**K + D)
                         parameter tokens: ptype = letter index * 2 + (1 if negative), E exponent classes,
                         D = the K significant digits d1..dK; value = sign * d1.d2..dK * 10**(e + EXP_MIN)

so every id splits into the fields the decoder predicts with separate heads: type (PAD/EOS/command/param),
command, parameter type (letter + sign), exponent and K digits. The zero value is the single token with D = 0,
exponent class 0 and a positive sign.

Two value modes (`Vocabulary.n_digits`, `Vocabulary.exact`):

* exact (default, K = 10): a value is held exactly as written, as a decimal; that covers 4 decimal places in mm and 5
  in inch with up to 6 (mm) / 5 (inch) integer digits, and any other value of at most 10 significant digits.
  A value needing more digits is refused (TokenizeError, counted by callers), never rounded.
* seed (K = 4, `Vocabulary.seed()`): the original's 4 significant digits, rounded half-even; kept for comparison.

Vocabulary size = 4 + C + 2 * L * E * 10**K. It is never materialised: the decoder embeds tokens as a sum of field
embeddings. `Vocabulary.digest()` names a vocabulary in every tokenized NPZ (key `vocab_digest`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from cnc_gcode.gcode import (
    AXIS_CLAIMING_CODES,
    AXIS_LETTERS,
    DEFAULT_DISTANCE,
    DEFAULT_PLANE,
    DEFAULT_RETRACT,
    DEFAULT_TOOL_LENGTH,
    DEFAULT_UNITS,
    ModalState,
    ParsedLine,
    parse_line,
)
from common.errors import UserError

PAD, UNK, SOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("PAD", "UNK", "SOS", "EOS")
NONE_COMMAND = "NONE"
DEFAULT_COMMANDS = ("G0", "G1", "G3", "G53", "M30", NONE_COMMAND)
DEFAULT_LETTERS = ("F", "R", "X", "Y", "Z")
# Canonical order of parameter words in a line (CAM order: axes, arc centre, radius, feed, spindle, tool).
CANONICAL_LETTER_ORDER = "XYZABCUVWIJKRPQLHDEFST"
EXACT_DIGITS = 10
SEED_DIGITS = 4
MAX_DIGITS = 15  # 2 * 22 letters * 11 exponents * 10**15 ids still fit int64
EXP_MIN, EXP_MAX = -5, 5
MAX_TOKENS = 7
VOCAB_DIGEST_KEY = "vocab_digest"
FILE_FORMAT = "cnc_gcode-hybrid/2"

# Token types: the classes of the type head (SOS and UNK only appear as inputs).
TYPE_PAD, TYPE_EOS, TYPE_COMMAND, TYPE_PARAM = 0, 1, 2, 3
N_TYPES = 4
TYPE_SOS, TYPE_UNK = 4, 5
N_INPUT_TYPES = 6
IGNORE = -100
# Reasons a parsed line has no ids (TokenizeError messages start with these).
REASON_DIGITS = "value needs more significant digits than the vocabulary holds"
REASON_RANGE = "value outside the exponent range"
REASON_LENGTH = "too many words for max_tokens"
REASON_H_CONFLICT = "own H word while G43 is in force (a standalone line would read it as G43's H)"


class TokenizeError(ValueError):
    """A line that this vocabulary cannot represent; the message is the reason (counted by callers)."""


def _letter_key(letter: str) -> int:
    return CANONICAL_LETTER_ORDER.index(letter) if letter in CANONICAL_LETTER_ORDER else len(CANONICAL_LETTER_ORDER)


def _as_decimal(value) -> Decimal:
    if isinstance(value, Decimal):
        dec = value
    else:
        try:
            dec = Decimal(repr(float(value)))
        except (InvalidOperation, TypeError, ValueError) as exc:
            raise TokenizeError(f"value {value!r} is not a number") from exc
    if not dec.is_finite():
        raise TokenizeError(f"value {value!r} is not finite")
    return dec


def quantize(value, n_digits: int = EXACT_DIGITS, exact: bool = True) -> tuple[int, int, int]:
    """value (Decimal as written, or float) -> (negative 0/1, digits D of n_digits digits or 0, exponent class e).

    exact=True refuses (TokenizeError) a value with more than n_digits significant digits; exact=False rounds it
    half-even (the seed's 4-digit mode). Raises TokenizeError when |value| needs an exponent outside
    EXP_MIN..EXP_MAX.
    """
    dec = _as_decimal(value)
    if dec == 0:
        return 0, 0, -EXP_MIN
    negative = 1 if dec < 0 else 0
    magnitude = abs(dec).normalize()
    exponent = magnitude.adjusted()
    significant = len(magnitude.as_tuple().digits)
    if exact and significant > n_digits:
        raise TokenizeError(f"{REASON_DIGITS}: {value} has {significant}, the vocabulary {n_digits}")
    digits = int(magnitude.scaleb(n_digits - 1 - exponent).to_integral_value(ROUND_HALF_EVEN))
    if digits >= 10 ** n_digits:  # 9.9996 -> 10.00 at 4 digits
        digits //= 10
        exponent += 1
    if not EXP_MIN <= exponent <= EXP_MAX:
        raise TokenizeError(f"{REASON_RANGE}: {value} (1e{EXP_MIN}..1e{EXP_MAX + 1})")
    return negative, digits, exponent - EXP_MIN


def dequantize(negative: int, digits: int, exp_class: int, n_digits: int = EXACT_DIGITS) -> Decimal:
    """(negative, D, e) -> the exact decimal value D * 10**(e + EXP_MIN - (n_digits - 1)), signed."""
    value = Decimal(int(digits)).scaleb(int(exp_class) + EXP_MIN - (n_digits - 1))
    return -value if negative and digits else value


def format_number(value: Decimal) -> str:
    """Shortest plain decimal text: 45.00 -> '45', -0.0250 -> '-0.025', 1.2E+2 -> '120'."""
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def line_words(line: ParsedLine) -> tuple[list[str], dict[str, Decimal]]:
    """What a line's ids say: (commands, letter -> exact value).

    Commands: the modal state codes that differ from a program's start and that the line does not write itself
    (units, distance mode, plane, tool length; G98 on a canned-cycle line), then the carried motion, then the
    line's own codes. Values: the line's words plus the H of a G43 in force and a canned cycle's sticky Z/R/P/Q,
    so a decoded line needs no earlier line to mean the same motion (`X5 Y5` after `G81 X1 Y1 Z-2 R1` is
    `G81 X5 Y5 Z-2 R1`).
    """
    own = set(line.codes)
    state = [code for code, default in ((line.units, DEFAULT_UNITS), (line.distance, DEFAULT_DISTANCE),
                                        (line.plane, DEFAULT_PLANE), (line.tool_length, DEFAULT_TOOL_LENGTH))
             if code != default and code not in own]
    if line.is_cycle and line.retract != DEFAULT_RETRACT and line.retract not in own:
        state.append(line.retract)
    commands = state + ([line.motion] if line.carried and line.motion else []) + list(line.codes)
    values = dict(line.values) if line.values or not line.params else \
        {k: _as_decimal(v) for k, v in line.params.items()}
    if line.tool_length == "G43" and line.tool_offset is not None and "H" not in values:
        values["H"] = line.tool_offset
    for letter, value in line.cycle_words.items():  # a cycle's sticky Z/R/P/Q, so the line runs alone
        values.setdefault(letter, value)
    return commands or [NONE_COMMAND], values


@dataclass
class Vocabulary:
    """Commands, parameter letters and the value mode; everything else about ids follows from the layout above."""

    commands: list[str] = field(default_factory=lambda: list(DEFAULT_COMMANDS))
    letters: list[str] = field(default_factory=lambda: list(DEFAULT_LETTERS))
    max_tokens: int = MAX_TOKENS
    n_digits: int = EXACT_DIGITS
    exact: bool = True

    def __post_init__(self) -> None:
        if NONE_COMMAND not in self.commands:
            self.commands = [*self.commands, NONE_COMMAND]
        if len(set(self.commands)) != len(self.commands) or len(set(self.letters)) != len(self.letters):
            raise UserError(f"vocabulary has duplicate commands or letters: {self.commands} {self.letters}")
        bad = [x for x in self.letters if len(x) != 1 or not x.isalpha() or x in "GMNO"]
        if bad:
            raise UserError(f"vocabulary letters {bad} are not parameter letters; use single letters other than G M N O")
        self.letters = sorted(self.letters, key=_letter_key)
        if self.max_tokens < 2:
            raise UserError(f"vocabulary max_tokens={self.max_tokens}; need at least 2 (a command and EOS)")
        if not isinstance(self.n_digits, int) or not 1 <= self.n_digits <= MAX_DIGITS:
            raise UserError(f"vocabulary n_digits={self.n_digits!r}; use 1..{MAX_DIGITS} ({EXACT_DIGITS} exact, "
                            f"{SEED_DIGITS} for the seed's mode)")

    @classmethod
    def seed(cls, **kwargs) -> Vocabulary:
        """The original's 4-digit mode: values rounded to 4 significant digits (for comparison)."""
        return cls(n_digits=SEED_DIGITS, exact=False, **kwargs)

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_commands(self) -> int:
        return len(self.commands)

    @property
    def n_param_types(self) -> int:
        return 2 * len(self.letters)

    @property
    def n_exponents(self) -> int:
        return EXP_MAX - EXP_MIN + 1

    @property
    def digit_base(self) -> int:
        return 10 ** self.n_digits

    @property
    def param_base(self) -> int:
        return len(SPECIAL_TOKENS) + self.n_commands

    @property
    def size(self) -> int:
        return self.param_base + self.n_param_types * self.n_exponents * self.digit_base

    @property
    def mode(self) -> str:
        return "exact" if self.exact else f"rounded to {self.n_digits} significant digits"

    def fingerprint(self) -> dict:
        """What a checkpoint or a tokenized file must agree on to decode with this vocabulary."""
        return {"commands": list(self.commands), "letters": list(self.letters), "max_tokens": self.max_tokens,
                "exp_min": EXP_MIN, "exp_max": EXP_MAX, "n_digits": self.n_digits, "exact": self.exact}

    def digest(self) -> str:
        """16 hex digits of SHA-256 over the fingerprint: equal digests mean the same ids mean the same words."""
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]

    # -- ids <-> fields ----------------------------------------------------------------------------------------
    def command_id(self, command: str) -> int:
        return len(SPECIAL_TOKENS) + self.commands.index(command)

    def param_id(self, letter: str, value) -> int:
        negative, digits, exp_class = quantize(value, self.n_digits, self.exact)
        ptype = self.letters.index(letter) * 2 + negative
        return self.param_base + (ptype * self.n_exponents + exp_class) * self.digit_base + digits

    def fields(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Split ids [...] into head targets; fields that do not apply are IGNORE.

        Returns type (input type, 0..5), command, ptype, exponent [...] and digits [..., n_digits]. Raises UserError
        for ids outside 0..size-1.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)].ravel()[0]
            raise UserError(f"token id {int(bad)} outside this vocabulary (0..{self.size - 1}); the data was "
                            f"tokenized with another vocabulary: rebuild it or pass the matching vocab file")
        kind = np.full(ids.shape, TYPE_PARAM, dtype=np.int64)
        kind[ids == PAD] = TYPE_PAD
        kind[ids == EOS] = TYPE_EOS
        kind[ids == SOS] = TYPE_SOS
        kind[ids == UNK] = TYPE_UNK
        is_cmd = (ids >= len(SPECIAL_TOKENS)) & (ids < self.param_base)
        kind[is_cmd] = TYPE_COMMAND
        is_param = kind == TYPE_PARAM
        command = np.where(is_cmd, ids - len(SPECIAL_TOKENS), IGNORE)
        rel = np.where(is_param, ids - self.param_base, 0)
        digits_value = rel % self.digit_base
        exp_class = (rel // self.digit_base) % self.n_exponents
        ptype = rel // (self.digit_base * self.n_exponents)
        digits = np.stack([(digits_value // 10 ** (self.n_digits - 1 - i)) % 10 for i in range(self.n_digits)],
                          axis=-1)
        return {"type": kind, "command": command,
                "ptype": np.where(is_param, ptype, IGNORE), "exponent": np.where(is_param, exp_class, IGNORE),
                "digits": np.where(is_param[..., None], digits, IGNORE)}

    def compose(self, kind: np.ndarray, command: np.ndarray, ptype: np.ndarray, exponent: np.ndarray,
                digits: np.ndarray) -> np.ndarray:
        """Inverse of `fields` for predicted fields (digits [..., n_digits]); ids of types PAD/EOS ignore the rest."""
        kind, command, ptype, exponent = (np.asarray(a, dtype=np.int64) for a in (kind, command, ptype, exponent))
        digits = np.asarray(digits, dtype=np.int64)
        weights = 10 ** np.arange(self.n_digits - 1, -1, -1, dtype=np.int64)
        digit_value = (digits * weights).sum(-1)
        param = self.param_base + (ptype * self.n_exponents + exponent) * self.digit_base + digit_value
        ids = np.where(kind == TYPE_PARAM, param, PAD)
        ids = np.where(kind == TYPE_COMMAND, command + len(SPECIAL_TOKENS), ids)
        return np.where(kind == TYPE_EOS, EOS, ids)

    # -- lines <-> ids -----------------------------------------------------------------------------------------
    def encode_line(self, line: ParsedLine) -> list[int]:
        """A parsed line -> `max_tokens` ids (see `line_words`). Raises TokenizeError with the reason when it
        does not fit."""
        if line.error is not None:
            raise TokenizeError(line.error)
        if line.tool_length == "G43" and "G43" not in line.codes and "H" in line.values:
            raise TokenizeError(REASON_H_CONFLICT)
        commands, values = line_words(line)
        for code in commands:
            if code not in self.commands:
                raise TokenizeError(f"command {code} not in vocabulary")
        for letter in values:
            if letter not in self.letters:
                raise TokenizeError(f"word {letter} not in vocabulary")
        ids = [self.command_id(c) for c in commands]
        ids += [self.param_id(k, values[k]) for k in sorted(values, key=_letter_key)]
        if len(ids) + 1 > self.max_tokens:
            raise TokenizeError(f"{REASON_LENGTH}: the line needs {len(ids) + 1} tokens, max_tokens={self.max_tokens}")
        return ids + [EOS] + [PAD] * (self.max_tokens - len(ids) - 1)

    def decode_words(self, ids) -> tuple[list[str], list[tuple[str, Decimal]]]:
        """ids -> (commands, [(letter, exact value)]) up to the first EOS/PAD; UNK/SOS are skipped."""
        f = self.fields(np.asarray(list(ids), dtype=np.int64))
        commands, params = [], []
        for i in range(len(f["type"])):
            kind = f["type"][i]
            if kind in (TYPE_EOS, TYPE_PAD):
                break
            if kind == TYPE_COMMAND:
                commands.append(self.commands[f["command"][i]])
            elif kind == TYPE_PARAM:
                ptype = int(f["ptype"][i])
                digits = int("".join(str(d) for d in f["digits"][i]))
                params.append((self.letters[ptype // 2],
                               dequantize(ptype % 2, digits, int(f["exponent"][i]), self.n_digits)))
        return commands, params

    def decode_line(self, ids) -> str:
        """ids -> G-code text, e.g. 'G1 X12.5 Y-3 F400'. NONE renders as nothing (a parameter-only line)."""
        return words_text(*self.decode_words(ids))

    def token_str(self, token_id: int) -> str:
        """Readable name of one id, e.g. 'G1', 'X+1250000000e1', 'EOS'."""
        f = self.fields(np.asarray([token_id]))
        kind = f["type"][0]
        if kind == TYPE_COMMAND:
            return self.commands[f["command"][0]]
        if kind == TYPE_PARAM:
            ptype = int(f["ptype"][0])
            digits = "".join(str(d) for d in f["digits"][0])
            return f"{self.letters[ptype // 2]}{'-' if ptype % 2 else '+'}{digits}e{int(f['exponent'][0]) + EXP_MIN}"
        return SPECIAL_TOKENS[token_id]

    # -- files -------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FILE_FORMAT, "special": list(SPECIAL_TOKENS), **self.fingerprint(), "size": self.size,
                "digest": self.digest()}

    def save(self, path: str | Path) -> None:
        from common.io import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """A vocabulary JSON of build_vocab (files of the first, 4-digit format load in the seed mode)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"vocabulary file {path} not found; create it with `python -m cnc_gcode.build_vocab` "
                            f"or leave vocab_path empty for the default vocabulary")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "vocab" in data and "commands" not in data:
                raise UserError(f"vocabulary file {path} is in the original's token-table layout; convert it with "
                                f"`python -m cnc_gcode.seed_vocab {path} OUT.json` and pass OUT.json")
            legacy = "n_digits" not in data or "exact" not in data
            vocab = cls(commands=list(data["commands"]), letters=list(data["letters"]),
                        max_tokens=int(data.get("max_tokens", MAX_TOKENS)),
                        n_digits=int(data.get("n_digits", SEED_DIGITS)),
                        exact=bool(data.get("exact", False)) if not legacy else False)
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"vocabulary file {path}: cannot read it ({exc}); expected JSON with 'commands' and "
                            f"'letters' lists as written by cnc_gcode.build_vocab") from exc
        if (data.get("exp_min", EXP_MIN), data.get("exp_max", EXP_MAX)) != (EXP_MIN, EXP_MAX):
            raise UserError(f"vocabulary file {path}: exponent range differs from this version's "
                            f"{EXP_MIN}..{EXP_MAX}; rebuild it with cnc_gcode.build_vocab")
        return vocab

    def check_matches(self, other: dict, source: str) -> None:
        """Raise UserError when a checkpoint's vocabulary fingerprint differs from this one."""
        mine = self.fingerprint()
        if "exact" not in other and other.get("n_digits") == SEED_DIGITS:  # written before the exact mode existed
            other = {**other, "exact": False}
        diffs = [k for k in mine if other.get(k) != mine[k]]
        if diffs:
            raise UserError(f"{source}: the checkpoint was trained with a different vocabulary ({', '.join(diffs)} "
                            f"differ: {[other.get(k) for k in diffs]} vs {[mine[k] for k in diffs]}); pass the "
                            f"vocabulary file it was trained with (vocab_path) or retrain")


def words_text(commands: list[str], params: list[tuple[str, Decimal]]) -> str:
    """(commands, [(letter, value)]) -> 'G1 X12.5 Y-3 F400' (NONE renders as nothing)."""
    return " ".join([c for c in commands if c != NONE_COMMAND] + [f"{k}{format_number(v)}" for k, v in params])


def load_vocabulary(path: str | Path | None) -> Vocabulary:
    """The vocabulary at `path`, or the default one when `path` is empty/None."""
    return Vocabulary.load(path) if path else Vocabulary()


def tokenize_text(vocab: Vocabulary, text: str) -> list[int]:
    """One standalone line of G-code -> ids (no modal context). Raises TokenizeError."""
    return vocab.encode_line(parse_line(text, 1, ModalState()))


def significant_digits(value: Decimal) -> int:
    """Significant digits of a value as written, trailing zeros dropped: 3519.5012 -> 8, 500.00000 -> 1."""
    return len(abs(value).normalize().as_tuple().digits) if value else 1


def check_round_trip(vocab: Vocabulary, line: ParsedLine) -> tuple[bool, bool]:
    """(round trip, values exact) of one line. Round trip: ids -> text -> parse (alone, from a program's start
    state) -> ids gives the same ids, the same motion and modal state (units, distance, plane, tool length), and
    every decoded value equals the source value at the vocabulary's precision (as a decimal in the exact mode, at
    its significant digits in the seed mode). Values exact: every decoded value equals the written one as a
    `Decimal`. Raises TokenizeError when the line is not representable."""
    ids = vocab.encode_line(line)
    commands, params = vocab.decode_words(ids)
    _, expected = line_words(line)
    decoded = dict(params)
    exact = decoded.keys() == expected.keys() and all(decoded[k] == expected[k] for k in expected)
    again = parse_line(words_text(commands, params), 1, ModalState())
    same = (again.error is None and again.modal_state == line.modal_state and again.motion == line.motion
            and (not line.is_cycle or (again.retract, again.cycle_words) == (line.retract, line.cycle_words))
            and vocab.encode_line(again) == ids)
    if vocab.exact or not same:
        return same and exact, exact
    rounded = decoded.keys() == expected.keys() and all(
        quantize(decoded[k], vocab.n_digits, False) == quantize(expected[k], vocab.n_digits, False) for k in expected)
    return rounded, exact


def round_trips(vocab: Vocabulary, line: ParsedLine) -> bool:
    """The round-trip half of `check_round_trip`."""
    return check_round_trip(vocab, line)[0]


def decode_program(vocab: Vocabulary, rows) -> str:
    """Token rows of consecutive lines -> program text that means what each row means on its own.

    Each row states its non-default modal state itself (`line_words`); where the program's running state differs
    from a row's (say an inch row after a G20 row), the codes that restore it (G21, G90, G17, G49) are written
    before the row (G99 before a cycle row after a G98 one), and a row without motion whose axis words would pick
    up a running modal motion gets G80 (not a G10 / G28 / G30 / G52 / G92 row: its axis words are its own).
    """
    state, out = ModalState(), []
    for number, ids in enumerate(rows, start=1):
        text = vocab.decode_line(ids)
        alone = parse_line(text, number, ModalState())
        prefix = [code for running, code in ((state.units, alone.units), (state.distance, alone.distance),
                                             (state.plane, alone.plane), (state.tool_length, alone.tool_length))
                  if running != code and code not in alone.codes]
        if (state.tool_offset != alone.tool_offset and alone.tool_length not in alone.codes
                and alone.tool_length not in prefix):
            prefix.append(alone.tool_length)
        if alone.is_cycle and state.retract != alone.retract and alone.retract not in alone.codes:
            prefix.append(alone.retract)
        if (alone.motion is None and state.motion is not None and any(k in AXIS_LETTERS for k in alone.values)
                and not set(alone.codes) & set(AXIS_CLAIMING_CODES)):  # `G92 X0` never runs the modal motion
            prefix.append("G80")
        line_text = " ".join([*prefix, text]).strip()
        parse_line(line_text, number, state)
        out.append(line_text)
    return "\n".join(out) + "\n"
