"""Run your own G-code programs on the virtual mill: program(s) -> sensor windows in the package's NPZ layout.

    python -m cnc_gcode.simulate --config configs/cnc_gcode/tiny.yaml \
        simulate.input=part.nc simulate.out=data/cnc_gcode/part.npz
    python -m cnc_gcode.simulate --config configs/cnc_gcode/tiny.yaml \
        simulate.input=../shared/data/gcode_linuxcnc simulate.out=data/cnc_gcode/linuxcnc.npz

Each program runs from the machine's start state (G17 G21 G90 G49 G99, position 0 0 10) through `simulator.Machine`:
modal motion, G2/G3 with R or I/J/K in G17/G18/G19 (full circles, helices), canned cycles G73 G74 G81-G86 G89 with
G98/G99 (LinuxCNC semantics), spindle S/M3/M4/M5 and coolant M7/M8/M9. A line the parser refuses (O-words, #
parameters, G87/G88, an arc without its centre, a cycle without its Z/R, ...) or the machine refuses where it
stands (a cycle's R below its Z, Q <= 0, an arc's R too short for its end point) is left out and counted by reason
(`simulate.on_unsupported=skip`, the default) or stops the stage with exit 2 naming the file and line (`error`).
Blank and comment-only lines take no machine time.

Writes `simulate.out` with the arrays sample_data writes (continuous [N,T,27], categorical [N,T,4], tokens [N,L],
vocab_digest, operation_type [N], program_id [N], line_index [N] (0-based source line), channel_names [C]),
the vocabulary `<stem>_vocab.json` (when `simulate.vocab_path` is empty: exact values, K fitted to the programs)
and a report `<stem>_report.json`: lines, executable, empty, unsupported by reason (parser and machine), moving
lines by motion (arcs by centre format and plane) and not tokenized by reason (a line that ran but that the
vocabulary cannot hold: its windows are dropped), per file and in total. `operation_type` is a motion class, not a
machining operation a CAM system would name: rapids before the first feed move `approach`, after the last
`retract_end`, between cuts `approach`; canned cycles `drill`; arcs and linear feed moves `contour`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from cnc_gcode.build_vocab import GCODE_SUFFIXES
from cnc_gcode.config import CncConfig
from cnc_gcode.gcode import ModalState, ParsedLine, ParseReport, parse_line, read_program
from cnc_gcode.sample_data import channel_arrays, save_npz
from cnc_gcode.simulator import OPERATIONS, Machine, MachineConfig, MachineError, record, windows
from cnc_gcode.tokenizer import (
    DEFAULT_COMMANDS,
    DEFAULT_LETTERS,
    EXACT_DIGITS,
    MAX_DIGITS,
    VOCAB_DIGEST_KEY,
    TokenizeError,
    Vocabulary,
    line_words,
    significant_digits,
)
from common.cli import UserError, config_main
from common.io import write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)


def program_files(entry: str) -> list[Path]:
    """The program at `entry`, or the G-code files under a folder (sorted). Raises UserError naming the key."""
    if not entry:
        raise UserError("config key 'simulate.input' is empty; pass simulate.input=PROGRAM.nc or a folder of programs")
    path = Path(entry)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in GCODE_SUFFIXES)
        if files:
            return files
        raise UserError(f"config key 'simulate.input': no G-code files ({', '.join(GCODE_SUFFIXES)}) in {path}")
    raise UserError(f"config key 'simulate.input': {path} does not exist; pass a G-code file or a folder of them")


def motion_operation(parsed: list[ParsedLine]) -> np.ndarray:
    """Operation index per line by the motion class rule in the module docstring (non-moving lines take the class
    of the move before them, or `approach`)."""
    cutting = [i for i, p in enumerate(parsed) if p.error is None and p.moves and p.motion != "G0"]
    last = cutting[-1] if cutting else -1
    ops, current = np.zeros(len(parsed), dtype=np.int64), OPERATIONS.index("approach")
    for i, line in enumerate(parsed):
        if line.error is None and line.moves:
            if line.is_cycle:
                current = OPERATIONS.index("drill")
            elif line.motion != "G0":
                current = OPERATIONS.index("contour")
            else:
                current = OPERATIONS.index("retract_end" if i > last else "approach")
        elif i > last and cutting:
            current = OPERATIONS.index("retract_end")
        ops[i] = current
    return ops


def motion_kind(line: ParsedLine) -> str:
    """'G1', 'G81', or for arcs 'G2 R G17' / 'G3 IJK G18': how a moving line is counted in the report."""
    if line.motion in ("G2", "G3"):
        return f"{line.motion} {'R' if 'R' in line.params else 'IJK'} {line.plane}"
    return str(line.motion)


def parse_file(path: Path, on_unsupported: str) -> list[ParsedLine]:
    state, parsed = ModalState(), []
    for number, text in enumerate(read_program(path).splitlines(), start=1):
        line = parse_line(text, number, state)
        if line.error is not None and on_unsupported == "error":
            raise UserError(f"{path}:{number}: {line.error}: {text.strip()[:80]!r}; remove or rewrite the line, or "
                            f"pass simulate.on_unsupported=skip to leave such lines out and count them")
        parsed.append(line)
    return parsed


def build_vocabulary(programs: dict[Path, list[ParsedLine]], max_tokens: int) -> Vocabulary:
    """The default commands and letters plus every command and letter the programs' runnable lines need, exact
    values with as many digits as the longest value needs (at least 10, at most 15, as build_vocab)."""
    commands, letters = Counter(), Counter()
    for lines in programs.values():
        for line in lines:
            if line.error is None and not line.is_empty:
                words, values = line_words(line)
                commands.update(words)
                letters.update(values)
    digits = [significant_digits(v) for lines in programs.values() for line in lines for v in line.values.values()]
    return Vocabulary(commands=[*DEFAULT_COMMANDS, *sorted(c for c in commands if c not in DEFAULT_COMMANDS)],
                      letters=[*DEFAULT_LETTERS, *sorted(k for k in letters if k not in DEFAULT_LETTERS)],
                      max_tokens=max_tokens, n_digits=min(MAX_DIGITS, max(EXACT_DIGITS, *digits, 0)))


def simulate_file(path: Path, parsed: list[ParsedLine], vocab: Vocabulary, machine_cfg: MachineConfig,
                  rng: np.random.Generator, window: int, stride: int, max_per_line: int,
                  on_unsupported: str) -> tuple[dict | None, dict]:
    """Run one parsed program. Returns (arrays of its windows or None when it yields none, its report)."""
    machine, segments = Machine(machine_cfg), []
    machine.rpm, machine.coolant = 0.0, 0  # spindle and coolant as the program states them (off until it does)
    tokens = np.zeros((len(parsed), vocab.max_tokens), dtype=np.int64)
    labelled = np.zeros(len(parsed), dtype=bool)
    report, not_tokenized, motions = ParseReport(), Counter(), Counter()
    for index, line in enumerate(parsed):
        report.add(line)
        if line.error is not None or line.is_empty:
            continue
        if line.moves:
            motions[motion_kind(line)] += 1
        try:
            segments.append(machine.run(line, index))
        except MachineError as exc:
            if on_unsupported == "error":
                raise UserError(f"{path}:{line.lineno}: {exc}: {line.text.strip()[:80]!r}; fix the line's values, or "
                                f"pass simulate.on_unsupported=skip to leave such lines out and count them") from exc
            report.executable -= 1
            report.unsupported[str(exc)] += 1
            continue
        try:
            tokens[index] = vocab.encode_line(line)
            labelled[index] = True
        except TokenizeError as exc:
            if on_unsupported == "error":
                raise UserError(f"{path}:{line.lineno}: the vocabulary cannot hold this line ({exc}): "
                                f"{line.text.strip()[:80]!r}; raise simulate.max_tokens or pass a vocabulary that "
                                f"holds it") from exc
            not_tokenized[str(exc).split(":")[0]] += 1
    result = {**report.as_dict(), "report": report, "simulated_lines": len(segments),
              "moving_lines_by_motion": dict(sorted(motions.items())),
              "not_tokenized_by_reason": dict(not_tokenized.most_common()), "windows": 0, "samples": 0}
    if not segments:
        return None, result
    sensor_log = record(segments, motion_operation(parsed).tolist(), machine_cfg, rng)
    result["samples"] = int(len(sensor_log["line_index"]))
    starts, labels = windows(sensor_log, window, stride, max_per_line or len(sensor_log["line_index"]), rng)
    keep = labelled[labels]
    starts, labels = starts[keep], labels[keep]
    result["windows"] = int(len(labels))
    if not len(labels):
        return None, result
    index = starts[:, None] + np.arange(window)[None]
    return {"continuous": sensor_log["continuous"][index], "categorical": sensor_log["categorical"][index],
            "tokens": tokens[labels], "operation_type": sensor_log["operation"][index[:, -1]].astype(np.int64),
            "line_index": labels.astype(np.int64)}, result


def simulate(cfg: CncConfig) -> int:
    setup_logging()
    sc = cfg.simulate
    files = program_files(sc.input)
    programs = {path: parse_file(path, sc.on_unsupported) for path in files}
    vocab = Vocabulary.load(sc.vocab_path) if sc.vocab_path else build_vocabulary(programs, sc.max_tokens)
    out = Path(sc.out)
    rng = np.random.default_rng(sc.seed)
    machine_cfg = MachineConfig(seed=sc.seed)
    parts, per_file, total, not_tokenized, motions = [], {}, ParseReport(), Counter(), Counter()
    for program_id, path in enumerate(files):
        arrays, result = simulate_file(path, programs[path], vocab, machine_cfg, rng, sc.window, sc.stride,
                                       sc.max_per_line, sc.on_unsupported)
        total.merge(result.pop("report"))
        not_tokenized.update(result["not_tokenized_by_reason"])
        motions.update(result["moving_lines_by_motion"])
        per_file[str(path)] = {"program_id": program_id, **result}
        if arrays is not None:
            arrays["program_id"] = np.full(len(arrays["tokens"]), program_id, dtype=np.int64)
            parts.append(arrays)
    if not parts:
        raise UserError(f"simulate.input {sc.input}: no program gave a {sc.window}-sample window of a line the "
                        f"vocabulary holds (see the counts per reason above); check the files or lower "
                        f"simulate.window")
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    arrays.update(channel_arrays())
    arrays[VOCAB_DIGEST_KEY] = np.asarray(vocab.digest())
    save_npz(out, arrays)
    vocab_path = Path(sc.vocab_path) if sc.vocab_path else out.with_name(f"{out.stem}_vocab.json")
    if not sc.vocab_path:
        vocab.save(vocab_path)
    summary = {"files": len(files), **total.as_dict(), "not_tokenized_by_reason": dict(not_tokenized.most_common()),
               "moving_lines_by_motion": dict(sorted(motions.items())), "windows": int(len(arrays["tokens"])),
               "vocab": str(vocab_path), "vocab_digest": vocab.digest(),
               "per_file": per_file}
    report_path = Path(sc.report) if sc.report else out.with_name(f"{out.stem}_report.json")
    write_json(report_path, summary)
    log.info("%d files, %d lines: %d executable, %d unsupported %s; not tokenized %s; %d windows", len(files),
             total.lines, total.executable, sum(total.unsupported.values()), dict(total.unsupported.most_common()),
             dict(not_tokenized), summary["windows"])
    print(f"windows: {out} ({summary['windows']}) vocab: {vocab_path} report: {report_path}")
    return 0


main = config_main(CncConfig, simulate, __doc__, prog="python -m cnc_gcode.simulate")

if __name__ == "__main__":
    raise SystemExit(main())
