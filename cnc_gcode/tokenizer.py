"""The 4-digit hybrid G-code vocabulary: one token per command or parameter word, decomposable into heads.

A line becomes `max_tokens` ids: its commands (the carried modal motion first when the line relies on it,
`NONE` when the line has no command), then its parameter words in canonical letter order, then EOS, then PAD.

    G1 X12.5 Y-3 F400   ->   [G1, X+1250e1, Y-3000e0, F+4000e2, EOS, PAD, PAD]

Token id layout (closed form, so no table of numbers has to be stored):

    0..3                 PAD, UNK, SOS, EOS
    4 .. 4+C-1           the C commands (default G0 G1 G3 G53 M30 NONE, the original's command set)
    P0 + ((ptype * E + e) * 10**4 + D)
                         parameter tokens: ptype = letter index * 2 + (1 if negative), E exponent classes,
                         D = the 4 significant digits d1d2d3d4; value = sign * d1.d2d3d4 * 10**(e + EXP_MIN)

so every id splits into the fields the decoder predicts with separate heads: type (PAD/EOS/command/param),
command, parameter type (letter + sign), exponent and four digits. The exponent head is our addition: the
original used a fixed scale, which cannot hold both Z-0.025 and X198.5 at four significant digits. The zero
value is the single token with D = 0000, exponent class 0 and a positive sign.

Vocabulary size = 4 + C + 2 * L * E * 10**4 (1,000,010 for the default 6 commands, 5 letters, 10 exponents).
It is never materialised: the decoder embeds tokens as a sum of field embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from cnc_gcode.gcode import ModalState, ParsedLine, parse_line
from common.cli import UserError

PAD, UNK, SOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("PAD", "UNK", "SOS", "EOS")
NONE_COMMAND = "NONE"
DEFAULT_COMMANDS = ("G0", "G1", "G3", "G53", "M30", NONE_COMMAND)
DEFAULT_LETTERS = ("F", "R", "X", "Y", "Z")
# Canonical order of parameter words in a line (CAM order: axes, arc centre, radius, feed, spindle, tool).
CANONICAL_LETTER_ORDER = "XYZABCUVWIJKRPQLHDEFST"
N_DIGITS = 4
DIGIT_BASE = 10 ** N_DIGITS
EXP_MIN, EXP_MAX = -5, 5
MAX_TOKENS = 7

# Token types: the classes of the type head (SOS and UNK only appear as inputs).
TYPE_PAD, TYPE_EOS, TYPE_COMMAND, TYPE_PARAM = 0, 1, 2, 3
N_TYPES = 4
TYPE_SOS, TYPE_UNK = 4, 5
N_INPUT_TYPES = 6
IGNORE = -100


class TokenizeError(ValueError):
    """A line that this vocabulary cannot represent; the message is the reason (counted by callers)."""


def _letter_key(letter: str) -> int:
    return CANONICAL_LETTER_ORDER.index(letter) if letter in CANONICAL_LETTER_ORDER else len(CANONICAL_LETTER_ORDER)


def quantize(value: float) -> tuple[int, int, int]:
    """value -> (negative 0/1, digits D in 1000..9999 or 0, exponent class e) at 4 significant digits.

    Raises TokenizeError when |value| needs an exponent outside EXP_MIN..EXP_MAX.
    """
    try:
        dec = Decimal(repr(float(value)))
    except InvalidOperation as exc:
        raise TokenizeError(f"value {value!r} is not a number") from exc
    if not dec.is_finite():
        raise TokenizeError(f"value {value!r} is not finite")
    if dec == 0:
        return 0, 0, -EXP_MIN
    negative = 1 if dec < 0 else 0
    magnitude = abs(dec)
    exponent = magnitude.adjusted()
    digits = int((magnitude.scaleb(N_DIGITS - 1 - exponent)).to_integral_value(ROUND_HALF_EVEN))
    if digits >= DIGIT_BASE:  # 9.9996 -> 10.00
        digits //= 10
        exponent += 1
    if not EXP_MIN <= exponent <= EXP_MAX:
        raise TokenizeError(f"value {value!r} outside the 4-digit range 1e{EXP_MIN}..9.999e{EXP_MAX}")
    return negative, digits, exponent - EXP_MIN


def dequantize(negative: int, digits: int, exp_class: int) -> Decimal:
    """(negative, D, e) -> the exact decimal value D * 10**(e + EXP_MIN - 3), signed."""
    value = Decimal(int(digits)).scaleb(int(exp_class) + EXP_MIN - (N_DIGITS - 1))
    return -value if negative and digits else value


def format_number(value: Decimal) -> str:
    """Shortest plain decimal text: 45.00 -> '45', -0.0250 -> '-0.025', 1.2E+2 -> '120'."""
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass
class Vocabulary:
    """Commands and parameter letters; everything else about ids follows from the layout above."""

    commands: list[str] = field(default_factory=lambda: list(DEFAULT_COMMANDS))
    letters: list[str] = field(default_factory=lambda: list(DEFAULT_LETTERS))
    max_tokens: int = MAX_TOKENS

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
    def param_base(self) -> int:
        return len(SPECIAL_TOKENS) + self.n_commands

    @property
    def size(self) -> int:
        return self.param_base + self.n_param_types * self.n_exponents * DIGIT_BASE

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on to decode with this vocabulary."""
        return {"commands": list(self.commands), "letters": list(self.letters), "max_tokens": self.max_tokens,
                "exp_min": EXP_MIN, "exp_max": EXP_MAX, "n_digits": N_DIGITS}

    # -- ids <-> fields ----------------------------------------------------------------------------------------
    def command_id(self, command: str) -> int:
        return len(SPECIAL_TOKENS) + self.commands.index(command)

    def param_id(self, letter: str, value: float) -> int:
        negative, digits, exp_class = quantize(value)
        ptype = self.letters.index(letter) * 2 + negative
        return self.param_base + (ptype * self.n_exponents + exp_class) * DIGIT_BASE + digits

    def fields(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Split ids [...] into head targets; fields that do not apply are IGNORE.

        Returns type (input type, 0..5), command, ptype, exponent [...] and digits [..., 4]. Raises UserError for
        ids outside 0..size-1.
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
        digits_value = rel % DIGIT_BASE
        exp_class = (rel // DIGIT_BASE) % self.n_exponents
        ptype = rel // (DIGIT_BASE * self.n_exponents)
        digits = np.stack([(digits_value // 10 ** (N_DIGITS - 1 - i)) % 10 for i in range(N_DIGITS)], axis=-1)
        return {"type": kind, "command": command,
                "ptype": np.where(is_param, ptype, IGNORE), "exponent": np.where(is_param, exp_class, IGNORE),
                "digits": np.where(is_param[..., None], digits, IGNORE)}

    def compose(self, kind: np.ndarray, command: np.ndarray, ptype: np.ndarray, exponent: np.ndarray,
                digits: np.ndarray) -> np.ndarray:
        """Inverse of `fields` for predicted fields (digits [..., 4]); ids of types PAD/EOS ignore the rest."""
        kind, command, ptype, exponent = (np.asarray(a, dtype=np.int64) for a in (kind, command, ptype, exponent))
        digits = np.asarray(digits, dtype=np.int64)
        weights = 10 ** np.arange(N_DIGITS - 1, -1, -1)
        digit_value = (digits * weights).sum(-1)
        param = self.param_base + (ptype * self.n_exponents + exponent) * DIGIT_BASE + digit_value
        ids = np.where(kind == TYPE_PARAM, param, PAD)
        ids = np.where(kind == TYPE_COMMAND, command + len(SPECIAL_TOKENS), ids)
        return np.where(kind == TYPE_EOS, EOS, ids)

    # -- lines <-> ids -----------------------------------------------------------------------------------------
    def encode_line(self, line: ParsedLine) -> list[int]:
        """A parsed line -> `max_tokens` ids. Raises TokenizeError with the reason when it does not fit."""
        if line.error is not None:
            raise TokenizeError(line.error)
        commands = list(line.codes)
        if line.carried and line.motion:
            commands.insert(0, line.motion)
        if not commands:
            commands = [NONE_COMMAND]
        for code in commands:
            if code not in self.commands:
                raise TokenizeError(f"command {code} not in vocabulary")
        for letter in line.params:
            if letter not in self.letters:
                raise TokenizeError(f"word {letter} not in vocabulary")
        ids = [self.command_id(c) for c in commands]
        ids += [self.param_id(k, line.params[k]) for k in sorted(line.params, key=_letter_key)]
        if len(ids) + 1 > self.max_tokens:
            raise TokenizeError(f"line needs {len(ids) + 1} tokens, more than max_tokens={self.max_tokens}")
        return ids + [EOS] + [PAD] * (self.max_tokens - len(ids) - 1)

    def decode_words(self, ids) -> tuple[list[str], list[tuple[str, Decimal]]]:
        """ids -> (commands, [(letter, value)]) up to the first EOS/PAD; UNK/SOS are skipped."""
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
                params.append((self.letters[ptype // 2], dequantize(ptype % 2, digits, int(f["exponent"][i]))))
        return commands, params

    def decode_line(self, ids) -> str:
        """ids -> G-code text, e.g. 'G1 X12.5 Y-3 F400'. NONE renders as nothing (a parameter-only line)."""
        commands, params = self.decode_words(ids)
        words = [c for c in commands if c != NONE_COMMAND] + [f"{k}{format_number(v)}" for k, v in params]
        return " ".join(words)

    def token_str(self, token_id: int) -> str:
        """Readable name of one id, e.g. 'G1', 'X+1250e1', 'EOS'."""
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
        return {"format": "cnc_gcode-4digit-hybrid/1", "special": list(SPECIAL_TOKENS), **self.fingerprint(),
                "size": self.size}

    def save(self, path: str | Path) -> None:
        from common.io import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"vocabulary file {path} not found; create it with `python -m cnc_gcode.build_vocab` "
                            f"or leave vocab_path empty for the default vocabulary")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = cls(commands=list(data["commands"]), letters=list(data["letters"]),
                        max_tokens=int(data.get("max_tokens", MAX_TOKENS)))
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"vocabulary file {path}: cannot read it ({exc}); expected JSON with 'commands' and "
                            f"'letters' lists as written by cnc_gcode.build_vocab") from exc
        if (data.get("exp_min", EXP_MIN), data.get("exp_max", EXP_MAX)) != (EXP_MIN, EXP_MAX):
            raise UserError(f"vocabulary file {path}: exponent range differs from this version's "
                            f"{EXP_MIN}..{EXP_MAX}; rebuild it with cnc_gcode.build_vocab")
        return vocab

    def check_matches(self, other: dict, source: str) -> None:
        """Raise UserError when a checkpoint's vocabulary fingerprint differs from this one."""
        mine = self.fingerprint()
        diffs = [k for k in mine if other.get(k) != mine[k]]
        if diffs:
            raise UserError(f"{source}: the checkpoint was trained with a different vocabulary ({', '.join(diffs)} "
                            f"differ: {[other.get(k) for k in diffs]} vs {[mine[k] for k in diffs]}); pass the "
                            f"vocabulary file it was trained with (vocab_path) or retrain")


def load_vocabulary(path: str | Path | None) -> Vocabulary:
    """The vocabulary at `path`, or the default one when `path` is empty/None."""
    return Vocabulary.load(path) if path else Vocabulary()


def tokenize_text(vocab: Vocabulary, text: str) -> list[int]:
    """One standalone line of G-code -> ids (no modal context). Raises TokenizeError."""
    return vocab.encode_line(parse_line(text, 1, ModalState()))


def round_trips(vocab: Vocabulary, line: ParsedLine) -> bool:
    """ids -> text -> parse -> ids gives the same ids, and every decoded value equals the source value at
    4 significant digits. Raises TokenizeError when the line is not representable."""
    ids = vocab.encode_line(line)
    again = tokenize_text(vocab, vocab.decode_line(ids))
    if again != ids:
        return False
    _, decoded = vocab.decode_words(ids)
    for letter, value in decoded:
        if quantize(float(value)) != quantize(line.params[letter]):
            return False
    return True
