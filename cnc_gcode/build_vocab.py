"""Build a vocabulary from a G-code corpus and report parsing and round-trip coverage per line.

    python -m cnc_gcode.build_vocab build_vocab.corpus=[../shared/data/gcode_pygcode] \
        build_vocab.out=data/cnc_gcode/vocab_pygcode.json build_vocab.max_tokens=10

Starts from the default vocabulary (the original's G0 G1 G3 G53 M30 NONE; F R X Y Z) and adds every command
and parameter letter used at least `min_count` times by lines the parser accepts. Then every accepted line is
tokenized with the new vocabulary and decoded back to text, which must re-tokenize to the same ids with each value
equal at 4 significant digits. Unsupported lines (O-words, # parameters, [ ] expressions, ...) and lines the
vocabulary cannot hold (too many words, values out of range) are counted by reason, never fatal.
Writes the vocabulary JSON and a report JSON (counts per reason, round-trip rate, first failing lines).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from cnc_gcode.config import CncConfig
from cnc_gcode.gcode import ParseReport, parse_program, read_program
from cnc_gcode.tokenizer import DEFAULT_COMMANDS, DEFAULT_LETTERS, TokenizeError, Vocabulary, round_trips
from common.cli import UserError, config_main
from common.io import write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
GCODE_SUFFIXES = (".nc", ".ngc", ".tap", ".gcode", ".cnc")


def corpus_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in GCODE_SUFFIXES)
        else:
            raise UserError(f"config key 'build_vocab.corpus': {path} does not exist; list G-code files or folders")
    if not files:
        raise UserError(f"config key 'build_vocab.corpus': no G-code files ({', '.join(GCODE_SUFFIXES)}) in {paths}")
    return files


def scan(files: list[Path]) -> tuple[dict[Path, list], ParseReport, Counter, Counter]:
    """Parse every file. Returns (parsed lines per file, parse report, command counts, letter counts)."""
    parsed, report, commands, letters = {}, ParseReport(), Counter(), Counter()
    for path in files:
        lines = parse_program(read_program(path))
        parsed[path] = lines
        for line in lines:
            report.add(line)
            if line.error is None and not line.is_empty:
                commands.update(line.codes)
                letters.update(line.params.keys())
    return parsed, report, commands, letters


def coverage(vocab: Vocabulary, parsed: dict[Path, list]) -> dict:
    """Tokenize + round-trip every accepted line under `vocab`."""
    tokenized, round_tripped, failures = 0, 0, []
    not_representable: Counter = Counter()
    for path, lines in parsed.items():
        for line in lines:
            if line.error is not None or line.is_empty:
                continue
            try:
                ok = round_trips(vocab, line)
            except TokenizeError as exc:
                reason = str(exc)
                reason = "value out of 4-digit range" if reason.startswith("value") else reason
                reason = "too many words for max_tokens" if reason.startswith("line needs") else reason
                not_representable[reason] += 1
                continue
            tokenized += 1
            round_tripped += ok
            if not ok and len(failures) < 20:
                failures.append({"file": str(path), "line": line.lineno, "text": line.text})
    return {"tokenized_lines": tokenized, "round_trip_ok": round_tripped,
            "round_trip_rate": round_tripped / tokenized if tokenized else float("nan"),
            "not_representable": dict(not_representable.most_common()), "round_trip_failures": failures}


def build_vocab(cfg: CncConfig) -> int:
    setup_logging()
    bc = cfg.build_vocab
    files = corpus_files(bc.corpus)
    parsed, report, commands, letters = scan(files)
    new_commands = sorted(c for c, n in commands.items() if n >= bc.min_count and c not in DEFAULT_COMMANDS)
    new_letters = sorted(k for k, n in letters.items() if n >= bc.min_count and k not in DEFAULT_LETTERS)
    vocab = Vocabulary(commands=[*DEFAULT_COMMANDS, *new_commands], letters=[*DEFAULT_LETTERS, *new_letters],
                       max_tokens=bc.max_tokens)
    out = Path(bc.out)
    vocab.save(out)
    result = {"files": len(files), "vocab_size": vocab.size, "commands": vocab.commands, "letters": vocab.letters,
              "max_tokens": vocab.max_tokens, "parse": report.as_dict(), **coverage(vocab, parsed),
              "default_vocab": {"size": Vocabulary().size, **{k: v for k, v in coverage(
                  Vocabulary(max_tokens=bc.max_tokens), parsed).items() if k != "round_trip_failures"}}}
    report_path = Path(bc.report) if bc.report else out.with_name(f"{out.stem}_report.json")
    write_json(report_path, result)
    log.info("%d files, %d lines: %d executable, %d unsupported %s", len(files), report.lines, report.executable,
             sum(report.unsupported.values()), dict(report.unsupported.most_common()))
    log.info("vocabulary: %d commands, %d letters, size %d; round trip %d/%d", vocab.n_commands, len(vocab.letters),
             vocab.size, result["round_trip_ok"], result["tokenized_lines"])
    print(f"vocab: {out} report: {report_path}")
    return 0


main = config_main(CncConfig, build_vocab, __doc__, prog="python -m cnc_gcode.build_vocab")

if __name__ == "__main__":
    raise SystemExit(main())
