"""Import the original system's vocabulary (`vocabulary_4digit_hybrid.json`, 668 entries) and its token rows.

    python -m cnc_gcode.seed_vocab data/vocabulary_4digit_hybrid.json data/cnc_gcode/vocab_seed.json \
        [--npz outputs/stratified_splits_v2/train_sequences.npz data/cnc_gcode/seed/train.npz]

The original's file (written by its `GCodeTokenizer.save_vocab`) is a token table:

    {"config": {"mode": "hybrid", "bucket_digits": 4, "precision": {"X": 0.001, "F": 1.0, "R": 0.0001, ...},
                "special": {"PAD": 0, ...}, ...},
     "vocab":  {"PAD": 0, "UNK": 1, "SOS": 2, "EOS": 3, "G0": 4, ..., "NONE": 9, "F": 10, ..., "NUM_X_1250": 15, ...}}

Tokens: special (PAD UNK SOS/BOS EOS, optionally MASK), commands (G/M codes and NONE), parameter letters, and value
tokens `NUM_<letter>_<digits>`: the value divided by the letter's precision step (X 0.001, F 1, R 0.0001; the
original's defaults where the file has none), rounded, then cut to its first `bucket_digits` digits ('-' and one
digit fewer for a negative). A parameter word is its letter token followed by its value token.

The import gives this package's vocabulary with the same commands and letters in the seed's 4-digit mode
(`Vocabulary.seed`, max_tokens 7), written as JSON for `data.vocab_path`, and `SeedVocabulary.translate`, which turns
the original's token rows into ours (one token per parameter word, letters in canonical order). A value token is read
as digits x step: that is the value whenever the quantised integer had at most `bucket_digits` digits. Longer ones
were cut by the original itself and cannot be told apart (NUM_X_1250 is 1.25 or, cut, 12.50x); `translate` counts
value tokens whose digits fill every place (`possibly_cut`) so a user sees how many that may concern.
Anything else in the file (an id used twice, a token of no known kind, a value token of an unknown letter) is
refused with exit 2 naming the token.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from cnc_gcode.tokenizer import EOS, PAD, VOCAB_DIGEST_KEY, TokenizeError, Vocabulary, _letter_key
from common.cli import guarded_main
from common.errors import UserError

log = logging.getLogger(__name__)
SEED_SIZE = 668
# The original tokenizer's default precision steps (its DEFAULT_PRECISION) for letters the file does not list.
SEED_PRECISION = {"X": "0.001", "Y": "0.001", "Z": "0.001", "A": "0.001", "B": "0.001", "C": "0.001",
                  "I": "0.0001", "J": "0.0001", "K": "0.0001", "F": "1", "S": "10", "R": "0.0001",
                  "P": "0.001", "Q": "0.001", "E": "0.0001"}
SPECIAL_ALIASES = {"PAD": "PAD", "<PAD>": "PAD", "UNK": "UNK", "<UNK>": "UNK", "SOS": "SOS", "BOS": "SOS",
                   "<BOS>": "SOS", "<SOS>": "SOS", "EOS": "EOS", "<EOS>": "EOS", "MASK": "MASK", "<MASK>": "MASK"}
_COMMAND = re.compile(r"^[GM]\d+(\.\d+)?$")
_VALUE = re.compile(r"^NUM_([A-Z])_(-?\d+)$")


@dataclass
class SeedVocabulary:
    """The original's token table: id -> token, read into kinds."""

    path: Path
    tokens: dict[int, str]
    commands: list[str]
    letters: list[str]
    steps: dict[str, Decimal]
    bucket_digits: int
    special: dict[str, int] = field(default_factory=dict)

    def vocabulary(self) -> Vocabulary:
        """This package's vocabulary with the original's commands and letters, in the seed's 4-digit mode."""
        return Vocabulary.seed(commands=list(self.commands), letters=list(self.letters))

    def translate(self, rows: np.ndarray) -> tuple[np.ndarray, int]:
        """The original's token rows [N, L] -> (ids [N, 7] of `vocabulary()`, number of possibly cut values).

        Raises UserError naming the row and token when a row does not follow the original's grammar (a value token
        without its letter, an id outside the table) or does not fit 7 ids."""
        vocab = self.vocabulary()
        rows = np.asarray(rows)
        out = np.full((len(rows), vocab.max_tokens), PAD, dtype=np.int64)
        possibly_cut = 0
        for r, row in enumerate(rows):
            commands, values, letter = [], {}, None
            for position, token_id in enumerate(row.tolist()):
                token = self.tokens.get(int(token_id))
                if token is None:
                    raise UserError(f"{self.path}: row {r} position {position} holds id {token_id}, which the "
                                    f"vocabulary does not have; these rows were made with another vocabulary")
                kind = SPECIAL_ALIASES.get(token)
                if kind == "EOS" or (kind == "PAD" and (commands or values)):
                    break
                if kind is not None:
                    continue
                if letter is not None:
                    match = _VALUE.match(token)
                    if not match or match.group(1) != letter:
                        raise UserError(f"{self.path}: row {r} position {position}: letter {letter} is followed by "
                                        f"{token}, not by its NUM_{letter}_ value token")
                    digits = match.group(2)
                    body, places = digits.lstrip("-"), self.bucket_digits - digits.startswith("-")
                    possibly_cut += len(body) >= places and not body.startswith("0")  # every place filled
                    values[letter] = Decimal(digits) * self.steps[letter]
                    letter = None
                elif token in self.letters:
                    letter = token
                elif token in self.commands:
                    commands.append(token)
                else:
                    raise UserError(f"{self.path}: row {r} position {position}: value token {token} has no letter "
                                    f"before it")
            ordered = [vocab.command_id(c) for c in commands or ["NONE"]]
            try:
                ordered += [vocab.param_id(k, values[k]) for k in sorted(values, key=_letter_key)]
            except TokenizeError as exc:
                raise UserError(f"{self.path}: row {r}: {exc}") from exc
            if len(ordered) + 1 > vocab.max_tokens:
                raise UserError(f"{self.path}: row {r} needs {len(ordered) + 1} ids, more than {vocab.max_tokens}")
            out[r, :len(ordered) + 1] = [*ordered, EOS]
        return out, int(possibly_cut)


def load_seed_vocabulary(path: str | Path) -> SeedVocabulary:
    """Read the original's vocabulary JSON. Raises UserError naming the file and the offending entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass the original's data/vocabulary_4digit_hybrid.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path}: not JSON ({exc}); expected the original's {{'config': ..., 'vocab': ...}}") from exc
    table = data.get("vocab", data.get("token2id")) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise UserError(f"{path}: no 'vocab' token table (token -> id); expected the original's layout "
                        f"{{'config': {{...}}, 'vocab': {{'PAD': 0, 'G0': ..., 'NUM_X_1250': ...}}}}")
    config = data.get("config") or {}
    tokens: dict[int, str] = {}
    for token, token_id in table.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise UserError(f"{path}: token {token!r} has id {token_id!r}; ids must be non-negative integers")
        if token_id in tokens:
            raise UserError(f"{path}: id {token_id} is used by both {tokens[token_id]!r} and {token!r}")
        tokens[token_id] = token
    commands, letters, value_letters, special = [], [], set(), {}
    for token_id in sorted(tokens):
        token = tokens[token_id]
        if token in SPECIAL_ALIASES:
            special[SPECIAL_ALIASES[token]] = token_id
        elif _COMMAND.match(token) or token == "NONE":
            commands.append(token)
        elif len(token) == 1 and token.isalpha() and token not in "GMNO":
            letters.append(token)
        elif _VALUE.match(token):
            value_letters.add(_VALUE.match(token).group(1))
        else:
            raise UserError(f"{path}: token {token!r} (id {token_id}) is none of: special token, G/M command or NONE, "
                            f"parameter letter, NUM_<letter>_<digits> value; this is not the original's layout")
    missing = sorted(value_letters - set(letters))
    if missing:
        raise UserError(f"{path}: value tokens for letters {missing} but no letter token for them")
    if "EOS" not in special or "PAD" not in special:
        raise UserError(f"{path}: the special tokens PAD and EOS are missing (found {sorted(special)})")
    precision = {**SEED_PRECISION, **{k: str(v) for k, v in (config.get("precision") or {}).items()}}
    unknown = [k for k in letters if k not in precision]
    if unknown:
        raise UserError(f"{path}: no precision step for letters {unknown}; add them to config.precision")
    if len(tokens) != SEED_SIZE:
        log.warning("%s: %d entries, the original's vocabulary has %d", path, len(tokens), SEED_SIZE)
    return SeedVocabulary(path, tokens, commands, letters, {k: Decimal(precision[k]) for k in letters},
                          int(config.get("bucket_digits") or 4), special)


def _body(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seed = load_seed_vocabulary(args.seed_json)
    vocab = seed.vocabulary()
    vocab.save(args.out)
    result = {"entries": len(seed.tokens), "commands": seed.commands, "letters": seed.letters, "out": str(args.out),
              "digest": vocab.digest()}
    if args.npz:
        source, target = Path(args.npz[0]), Path(args.npz[1])
        from cnc_gcode.sample_data import save_npz

        try:
            with np.load(source, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{source}: not a readable .npz file ({exc})") from exc
        if "tokens" not in arrays:
            raise UserError(f"{source}: key 'tokens' is missing; nothing to translate")
        arrays["tokens"], result["possibly_cut_values"] = seed.translate(arrays["tokens"])
        arrays[VOCAB_DIGEST_KEY] = np.asarray(vocab.digest())
        save_npz(target, arrays)
        result["npz"] = str(target)
    print(json.dumps(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnc_gcode.seed_vocab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seed_json", type=Path, help="the original's vocabulary_4digit_hybrid.json")
    parser.add_argument("out", type=Path, help="this package's vocabulary JSON to write (pass as data.vocab_path)")
    parser.add_argument("--npz", nargs=2, metavar=("IN", "OUT"),
                        help="also translate the 'tokens' of one of the original's NPZ files into OUT")
    return parser


main = guarded_main(_body, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
