"""Build a vocabulary from a G-code corpus and report parsing and round-trip coverage per line.

    python -m cnc_gcode.build_vocab build_vocab.corpus=[../shared/data/gcode_pygcode] \
        build_vocab.out=data/cnc_gcode/vocab_pygcode.json build_vocab.max_tokens=16

Starts from the default vocabulary (the original's G0 G1 G3 G53 M30 NONE; F R X Y Z) and adds every command
and parameter letter used at least `min_count` times by lines the parser accepts (state codes such as G20 G91 G43
and the H word included: lines carry their modal state). Then every accepted line is tokenized with the new
vocabulary and decoded back to text, which parsed on its own must re-tokenize to the same ids, with the same motion
and modal state, and with every value equal to the source value as a `Decimal` (exact mode) or at 4 significant
digits (`value_mode=seed4`). Unsupported lines (O-words, # parameters, [ ] expressions, ...) and lines the
vocabulary cannot hold (too many words, values with more significant digits than the mode holds) are counted by
reason, never fatal. The report also scores the same commands and letters in the other value mode
(`other_mode`) and the default vocabulary (`default_vocab`), so one run compares the exact and the seed mode.
Folders are searched for the G-code suffixes (`GCODE_SUFFIXES`: .nc .ngc .tap .gcode .gc .g .cnc ...) and for
`.txt` files whose lines read as G-code (a CAM program saved as shapeoko.txt; a README.txt is not); every other file
is skipped, logged with the reason and listed in the report (`skipped_files`).
Writes the vocabulary JSON and a report JSON (counts per reason, round-trip and exact-value rates, failing lines).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from cnc_gcode.config import CncConfig
from cnc_gcode.gcode import ParseReport, parse_program, read_program
from cnc_gcode.tokenizer import (
    DEFAULT_COMMANDS,
    DEFAULT_LETTERS,
    EXACT_DIGITS,
    MAX_DIGITS,
    REASON_DIGITS,
    REASON_LENGTH,
    REASON_RANGE,
    TokenizeError,
    Vocabulary,
    check_round_trip,
    significant_digits,
)
from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
# What CAM posts and controllers name G-code files: LinuxCNC .ngc, Mach .tap, generic .nc/.cnc/.gcode/.gc/.g,
# Siemens .mpf/.spf, Fanuc-style .eia/.iso; `.txt` (Carbide Create, Easel and other hobby CAM) counts when its
# lines read as G-code (`TEXT_SUFFIXES`, `looks_like_gcode`).
GCODE_SUFFIXES = (".nc", ".ngc", ".tap", ".gcode", ".gc", ".g", ".cnc", ".ncc", ".mpf", ".spf", ".eia", ".iso")
TEXT_SUFFIXES = (".txt",)
ALL_SUFFIXES = GCODE_SUFFIXES + TEXT_SUFFIXES
MIN_GCODE_SHARE = 0.5
SNIFF_LINES = 2000


def looks_like_gcode(path: Path) -> tuple[bool, str]:
    """(accepted, why not) for a text file: at least MIN_GCODE_SHARE of its non-blank lines (of the first
    SNIFF_LINES) parse and one moves."""
    with open(path, "rb") as fh:
        head = b"".join(line for _, line in zip(range(SNIFF_LINES), fh)).decode("utf-8", errors="replace")
    lines = [line for line in parse_program(head) if line.text.strip()]
    parsed = sum(1 for line in lines if line.error is None and not line.is_empty)
    moving = any(line.error is None and line.moves for line in lines)
    if lines and parsed >= MIN_GCODE_SHARE * len(lines) and moving:
        return True, ""
    return False, (f"{path.suffix} file that does not read as G-code ({parsed} of {len(lines)} non-blank lines parse, "
                   f"{'a' if moving else 'no'} moving line; needs {MIN_GCODE_SHARE:.0%} and one move)")


def gcode_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """G-code files under `folder` (sorted) and the skipped ones with the reason (path -> reason), each logged."""
    files, skipped = [], {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in GCODE_SUFFIXES:
            files.append(path)
            continue
        if suffix in TEXT_SUFFIXES:
            accepted, reason = looks_like_gcode(path)
            if accepted:
                files.append(path)
                continue
        else:
            reason = f"suffix {suffix or '(none)'!r} is not a G-code suffix ({' '.join(ALL_SUFFIXES)})"
        skipped[str(path)] = reason
        log.info("skipped %s: %s", path, reason)
    return files, skipped


def corpus_files(paths: list[str]) -> list[Path]:
    return corpus_files_and_skipped(paths)[0]


def corpus_files_and_skipped(paths: list[str]) -> tuple[list[Path], dict[str, str]]:
    """The files of `build_vocab.corpus` (files as given, folders searched by `gcode_files`) and the skipped ones."""
    files: list[Path] = []
    skipped: dict[str, str] = {}
    for entry in paths:
        path = Path(entry)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found, left_out = gcode_files(path)
            files += found
            skipped.update(left_out)
        else:
            raise UserError(f"config key 'build_vocab.corpus': {path} does not exist; list G-code files or folders")
    if not files:
        raise UserError(f"config key 'build_vocab.corpus': no G-code files ({' '.join(ALL_SUFFIXES)})"
                        f" in {paths} ({len(skipped)} files skipped, see the log); pass the files themselves")
    return files, skipped


def scan(files: list[Path]) -> tuple[dict[Path, list], ParseReport, Counter, Counter, Counter]:
    """Parse every file. Returns (parsed lines per file, parse report, command counts, letter counts, counts of
    values by significant digits)."""
    parsed, report, commands, letters, digits = {}, ParseReport(), Counter(), Counter(), Counter()
    for path in files:
        lines = parse_program(read_program(path))
        parsed[path] = lines
        for line in lines:
            report.add(line)
            if line.error is None and not line.is_empty:
                commands.update(line.codes)
                letters.update(line.params.keys())
                digits.update(significant_digits(v) for v in line.values.values())
    return parsed, report, commands, letters, digits


def make_vocabulary(commands: list[str], letters: list[str], max_tokens: int, value_mode: str,
                    n_digits: int = EXACT_DIGITS) -> Vocabulary:
    if value_mode == "seed4":
        return Vocabulary.seed(commands=list(commands), letters=list(letters), max_tokens=max_tokens)
    return Vocabulary(commands=list(commands), letters=list(letters), max_tokens=max_tokens, n_digits=n_digits)


def coverage(vocab: Vocabulary, parsed: dict[Path, list]) -> dict:
    """Tokenize + round-trip every accepted line under `vocab`.

    round_trip_ok: lines whose decoded text re-tokenizes to the same ids with the same motion and modal state and
    values equal at the vocabulary's precision; values_exact: lines whose every decoded value equals the written
    one as a Decimal (the two agree in the exact mode)."""
    tokenized, round_tripped, exact, failures, inexact_examples = 0, 0, 0, [], []
    not_representable: Counter = Counter()
    for path, lines in parsed.items():
        for line in lines:
            if line.error is not None or line.is_empty:
                continue
            try:
                ok, same_values = check_round_trip(vocab, line)
            except TokenizeError as exc:
                reason = str(exc)
                for known in (REASON_DIGITS, REASON_RANGE, REASON_LENGTH):
                    reason = known if reason.startswith(known) else reason
                not_representable[reason] += 1
                continue
            tokenized += 1
            round_tripped += ok
            exact += same_values
            if not ok and len(failures) < 20:
                failures.append({"file": str(path), "line": line.lineno, "text": line.text})
            if not same_values and len(inexact_examples) < 5:
                inexact_examples.append({"file": str(path), "line": line.lineno, "text": line.text.strip(),
                                         "decoded": vocab.decode_line(vocab.encode_line(line))})
    return {"value_mode": vocab.mode, "tokenized_lines": tokenized, "round_trip_ok": round_tripped,
            "round_trip_rate": round_tripped / tokenized if tokenized else float("nan"),
            "values_exact": exact, "values_exact_rate": exact / tokenized if tokenized else float("nan"),
            "not_representable": dict(not_representable.most_common()), "round_trip_failures": failures,
            "inexact_examples": inexact_examples}


def build_vocab(cfg: CncConfig) -> int:
    setup_logging()
    bc = cfg.build_vocab
    files, skipped = corpus_files_and_skipped(bc.corpus)
    parsed, report, commands, letters, value_digits = scan(files)
    n_digits = bc.n_digits or min(MAX_DIGITS, max(EXACT_DIGITS, *value_digits))
    new_commands = sorted(c for c, n in commands.items() if n >= bc.min_count and c not in DEFAULT_COMMANDS)
    new_letters = sorted(k for k, n in letters.items() if n >= bc.min_count and k not in DEFAULT_LETTERS)
    commands, letters = [*DEFAULT_COMMANDS, *new_commands], [*DEFAULT_LETTERS, *new_letters]
    vocab = make_vocabulary(commands, letters, bc.max_tokens, bc.value_mode, n_digits)
    other = make_vocabulary(commands, letters, bc.max_tokens, "seed4" if bc.value_mode == "exact" else "exact",
                            n_digits)
    default = make_vocabulary(list(DEFAULT_COMMANDS), list(DEFAULT_LETTERS), bc.max_tokens, bc.value_mode)
    out = Path(bc.out)
    vocab.save(out)
    result = {"files": len(files), "skipped_files": skipped, "vocab_size": vocab.size, "digest": vocab.digest(),
              "commands": vocab.commands,
              "letters": vocab.letters, "max_tokens": vocab.max_tokens, "n_digits": vocab.n_digits,
              "value_significant_digits": dict(sorted(value_digits.items())), "parse": report.as_dict(),
              **coverage(vocab, parsed),
              "other_mode": {k: v for k, v in coverage(other, parsed).items() if k != "round_trip_failures"},
              "default_vocab": {"size": default.size, **{k: v for k, v in coverage(default, parsed).items()
                                                         if k not in ("round_trip_failures", "inexact_examples")}}}
    report_path = Path(bc.report) if bc.report else out.with_name(f"{out.stem}_report.json")
    write_json(report_path, result)
    log.info("%d files (%d skipped), %d lines: %d executable, %d unsupported %s", len(files), len(skipped),
             report.lines, report.executable, sum(report.unsupported.values()), dict(report.unsupported.most_common()))
    log.info("vocabulary: %d commands, %d letters, size %d, values %s; round trip %d/%d, every value exact %d/%d "
             "(%s: %d/%d)", vocab.n_commands, len(vocab.letters), vocab.size, vocab.mode, result["round_trip_ok"],
             result["tokenized_lines"], result["values_exact"], result["tokenized_lines"], other.mode,
             result["other_mode"]["values_exact"], result["other_mode"]["tokenized_lines"])
    print(f"vocab: {out} report: {report_path}")
    return 0


main = config_main(CncConfig, build_vocab, __doc__, prog="python -m cnc_gcode.build_vocab")

if __name__ == "__main__":
    raise SystemExit(main())
