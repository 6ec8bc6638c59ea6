"""Run your own G-code programs on the virtual mill: program(s) -> sensor windows in the package's NPZ layout.

    python -m cnc_gcode.simulate --config configs/cnc_gcode/tiny.yaml \
        simulate.input=part.nc simulate.out=data/cnc_gcode/part.npz
    python -m cnc_gcode.simulate --config configs/cnc_gcode/tiny.yaml \
        simulate.input=../shared/data/gcode_linuxcnc simulate.out=data/cnc_gcode/linuxcnc.npz

Each program runs from the machine's start state (G17 G21 G90 G49 G99, position 0 0 10) through `virtual_mill.Machine`:
modal motion, G2/G3 with R or I/J/K in G17/G18/G19 (full circles, helices), canned cycles G73 G74 G81-G86 G89 with
G98/G99 (LinuxCNC semantics), spindle S/M3/M4/M5 and coolant M7/M8/M9. A line the parser refuses (O-words, #
parameters, G87/G88, an arc without its centre, a cycle without its Z/R, ...) or the machine refuses where it
stands (a cycle's R below its Z, Q <= 0, an arc's R too short for its end point, a move of a rotary A/B/C or a
U/V/W axis, which the 3-axis mill lacks) is left out and counted by reason (`simulate.on_unsupported=skip`, the
default) or stops the stage with exit 2 naming the file and line (`error`). Blank and comment-only lines take no
machine time. A folder is searched as build_vocab searches one (G-code suffixes, `.txt` that reads as G-code; other
files skipped and logged).

Memory stays bounded for any program length: the programs are read twice, line by line (once for the vocabulary,
once to run), and every `simulate.chunk_samples` samples the sensor log so far (`virtual_mill.SensorStream`) is cut
into the windows of the lines it completes (`virtual_mill.WindowStream`) and appended to the output on disk
(`npz_stream.NpzChunkWriter`). The sensor noise and the window choice come from two streams of `simulate.seed`, so
the output is the same for every chunk size, bit for bit (`chunk_samples=0`, the whole program at once with every
window in memory, gives the same output; tests/cnc_gcode/test_cnc_new_user_inputs.py and
benchmarks/cnc_simulate_memory.py compare the two).

Writes `simulate.out` with the arrays sample_data writes (continuous [N,T,27], categorical [N,T,4], tokens [N,L],
vocab_digest, operation_type [N], program_id [N], line_index [N] (0-based source line), channel_names [C]),
the vocabulary `<stem>_vocab.json` (when `simulate.vocab_path` is empty: exact values, K fitted to the programs)
and a report `<stem>_report.json`: lines, executable, empty, unsupported by reason (parser and machine), moving
lines by motion (arcs by centre format and plane) and not tokenized by reason (a line that ran but that the
vocabulary cannot hold: its windows are dropped), per file and in total. `operation_type` is a motion class, not a
machining operation a CAM system would name: rapids before the first feed move `approach`, after the last
`retract_end`, between cuts `approach`; canned cycles `drill`; arcs and linear feed moves `contour`.
`simulate.window_end` (recorded in the report): executing (default) labels windows every `simulate.stride` samples
with the line executing at their last sample; completed cuts one window per line, ending on its last sample (plus
`simulate.settle_samples`) and labelled with that line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnc_gcode.build_vocab import GCODE_SUFFIXES, gcode_files
from cnc_gcode.config import CncConfig, SimulateConfig
from cnc_gcode.gcode import ModalState, ParsedLine, ParseReport, parse_line
from cnc_gcode.npz_stream import NpzChunkWriter
from cnc_gcode.sample_data import channel_arrays, save_npz
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
from cnc_gcode.virtual_mill import OPERATIONS, Machine, MachineConfig, MachineError, SensorStream, WindowStream
from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)


def program_files(entry: str) -> list[Path]:
    """The program at `entry`, or the G-code files under a folder (sorted; others skipped and logged, as in
    build_vocab). Raises UserError naming the key."""
    if not entry:
        raise UserError("config key 'simulate.input' is empty; pass simulate.input=PROGRAM.nc or a folder of programs")
    path = Path(entry)
    if path.is_file():
        return [path]
    if path.is_dir():
        files, skipped = gcode_files(path)
        if files:
            return files
        raise UserError(f"config key 'simulate.input': no G-code files ({' '.join(GCODE_SUFFIXES)}, G-code .txt) in "
                        f"{path} ({len(skipped)} other files skipped, see the log)")
    raise UserError(f"config key 'simulate.input': {path} does not exist; pass a G-code file or a folder of them")


def is_cutting(line: ParsedLine) -> bool:
    return line.error is None and line.moves and line.motion != "G0"


def motion_operation(index: int, line: ParsedLine, last_cut: int, previous: int) -> int:
    """Operation index of line `index` by the motion class rule in the module docstring. last_cut: index of the
    program's last cutting line (-1 when none); previous: the class of the line before (a non-moving line keeps it)."""
    if line.error is None and line.moves:
        if line.is_cycle:
            return OPERATIONS.index("drill")
        if line.motion != "G0":
            return OPERATIONS.index("contour")
        return OPERATIONS.index("retract_end" if index > last_cut else "approach")
    if last_cut >= 0 and index > last_cut:
        return OPERATIONS.index("retract_end")
    return previous


def motion_kind(line: ParsedLine) -> str:
    """'G1', 'G81', or for arcs 'G2 R G17' / 'G3 IJK G18': how a moving line is counted in the report."""
    if line.motion in ("G2", "G3"):
        return f"{line.motion} {'R' if 'R' in line.params else 'IJK'} {line.plane}"
    return str(line.motion)


def parse_lines(path: Path, on_unsupported: str) -> Iterator[ParsedLine]:
    """The program's lines one by one (never the whole program in memory as parsed lines); with
    on_unsupported=error the first line the parser refuses raises UserError naming the file and line."""
    state = ModalState()
    number = 0
    with open(path, "rb") as fh:
        for raw in fh:  # the lines of read_program(path).splitlines(), one file line at a time
            for text in raw.decode("utf-8", errors="replace").splitlines():
                number += 1
                line = parse_line(text, number, state)
                if line.error is not None and on_unsupported == "error":
                    raise UserError(f"{path}:{number}: {line.error}: {text.strip()[:80]!r}; remove or rewrite the "
                                    f"line, or pass simulate.on_unsupported=skip to leave such lines out and count "
                                    f"them")
                yield line


@dataclass
class ProgramScan:
    """What the first pass over a program learns: words for the vocabulary and the last cutting line."""

    commands: Counter = field(default_factory=Counter)
    letters: Counter = field(default_factory=Counter)
    digits: int = 0
    last_cut: int = -1


def scan_program(path: Path, on_unsupported: str) -> ProgramScan:
    scan = ProgramScan()
    for index, line in enumerate(parse_lines(path, on_unsupported)):
        if line.error is None and not line.is_empty:
            words, values = line_words(line)
            scan.commands.update(words)
            scan.letters.update(values)
            scan.digits = max([scan.digits, *(significant_digits(v) for v in line.values.values())])
        if is_cutting(line):
            scan.last_cut = index
    return scan


def build_vocabulary(scans: list[ProgramScan], max_tokens: int) -> Vocabulary:
    """The default commands and letters plus every command and letter the programs' runnable lines need, exact
    values with as many digits as the longest value needs (at least 10, at most 15, as build_vocab)."""
    commands, letters = Counter(), Counter()
    for scan in scans:
        commands.update(scan.commands)
        letters.update(scan.letters)
    return Vocabulary(commands=[*DEFAULT_COMMANDS, *sorted(c for c in commands if c not in DEFAULT_COMMANDS)],
                      letters=[*DEFAULT_LETTERS, *sorted(k for k in letters if k not in DEFAULT_LETTERS)],
                      max_tokens=max_tokens,
                      n_digits=min(MAX_DIGITS, max(EXACT_DIGITS, *(scan.digits for scan in scans))))


class WindowSink:
    """Where windows go: kept in memory and written with np.savez at the end (chunk_samples=0), or
    appended to disk chunk by chunk (`NpzChunkWriter`)."""

    def __init__(self, out: Path, streaming: bool) -> None:
        self.out = out
        self.writer = NpzChunkWriter(out) if streaming else None
        self.parts: list[dict] = []
        self.windows = 0

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        if not len(arrays["tokens"]):
            return
        self.windows += len(arrays["tokens"])
        if self.writer is not None:
            self.writer.append(arrays)
        else:
            self.parts.append(arrays)

    def close(self, extra: dict[str, np.ndarray]) -> None:
        if self.writer is not None:
            self.writer.close(extra)
        else:
            save_npz(self.out, {**{k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}, **extra})

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def simulate_file(path: Path, program_id: int, scan: ProgramScan, vocab: Vocabulary, machine_cfg: MachineConfig,
                  sc: SimulateConfig, noise_rng: np.random.Generator, window_rng: np.random.Generator,
                  sink: WindowSink) -> dict:
    """Run one program line by line, turning its sensor log into windows every `sc.chunk_samples` samples (0: once,
    at the end) and handing them to `sink`. Returns its report."""
    machine = Machine(machine_cfg)
    machine.rpm, machine.coolant = 0.0, 0  # spindle and coolant as the program states them (off until it does)
    sensors = SensorStream(machine_cfg, noise_rng)
    cutter = WindowStream(sc.window, sc.stride, sc.max_per_line, window_rng, sc.window_end, sc.settle_samples)
    report, not_tokenized, motions = ParseReport(), Counter(), Counter()
    pending: list = []
    pending_samples, simulated, samples, windows_before = 0, 0, 0, sink.windows
    tokens: dict[int, list[int]] = {}  # tokenized lines whose windows are not cut yet
    operation: dict[int, int] = {}
    previous_op = OPERATIONS.index("approach")

    def flush(final: bool) -> None:
        nonlocal samples
        part = sensors.push(pending, final)
        pending.clear()
        samples += 0 if part is None else len(part["line_index"])
        continuous, categorical, labels = cutter.push(part, final)
        keep = np.asarray([label in tokens for label in labels.tolist()], dtype=bool)
        labels = labels[keep]
        rows = np.asarray([tokens[k] for k in labels.tolist()], dtype=np.int64).reshape(-1, vocab.max_tokens)
        sink.add({"continuous": continuous[keep], "categorical": categorical[keep], "tokens": rows,
                  "operation_type": np.asarray([operation[k] for k in labels.tolist()], dtype=np.int64),
                  "line_index": labels.astype(np.int64), "program_id": np.full(len(labels), program_id, np.int64)})
        if cutter.rows is not None and not final:  # lines before the one still running have all their windows
            running = int(cutter.rows["line_index"][0])
            for done in [k for k in operation if k < running]:
                operation.pop(done)
                tokens.pop(done, None)

    for index, line in enumerate(parse_lines(path, sc.on_unsupported)):
        report.add(line)
        previous_op = motion_operation(index, line, scan.last_cut, previous_op)
        if line.error is not None or line.is_empty:
            continue
        if line.moves:
            motions[motion_kind(line)] += 1
        try:
            segment = machine.run(line, index)
        except MachineError as exc:
            if sc.on_unsupported == "error":
                raise UserError(f"{path}:{line.lineno}: {exc}: {line.text.strip()[:80]!r}; fix the line's values, or "
                                f"pass simulate.on_unsupported=skip to leave such lines out and count them") from exc
            report.executable -= 1
            report.unsupported[str(exc)] += 1
            continue
        simulated += 1
        operation[index] = previous_op
        try:
            tokens[index] = vocab.encode_line(line)
        except TokenizeError as exc:
            if sc.on_unsupported == "error":
                raise UserError(f"{path}:{line.lineno}: the vocabulary cannot hold this line ({exc}): "
                                f"{line.text.strip()[:80]!r}; raise simulate.max_tokens or pass a vocabulary that "
                                f"holds it") from exc
            not_tokenized[str(exc).split(":")[0]] += 1
        pending.append(segment)
        pending_samples += len(segment.command_xyz)
        if sc.chunk_samples and pending_samples >= sc.chunk_samples:
            flush(final=False)
            pending_samples = 0
    if simulated:
        flush(final=True)
    return {**report.as_dict(), "report": report, "simulated_lines": simulated,
            "moving_lines_by_motion": dict(sorted(motions.items())),
            "not_tokenized_by_reason": dict(not_tokenized.most_common()), "windows": sink.windows - windows_before,
            "samples": samples}


def simulate(cfg: CncConfig) -> int:
    setup_logging()
    sc = cfg.simulate
    files = program_files(sc.input)
    scans = [scan_program(path, sc.on_unsupported) for path in files]
    vocab = Vocabulary.load(sc.vocab_path) if sc.vocab_path else build_vocabulary(scans, sc.max_tokens)
    out = Path(sc.out)
    # separate streams for the sensor noise and the window choice, so neither depends on where chunks end
    noise_rng, window_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(sc.seed).spawn(2))
    machine_cfg = MachineConfig(seed=sc.seed)
    per_file, total, not_tokenized, motions = {}, ParseReport(), Counter(), Counter()
    sink = WindowSink(out, streaming=sc.chunk_samples > 0)
    try:
        for program_id, (path, scan) in enumerate(zip(files, scans)):
            result = simulate_file(path, program_id, scan, vocab, machine_cfg, sc, noise_rng, window_rng, sink)
            total.merge(result.pop("report"))
            not_tokenized.update(result["not_tokenized_by_reason"])
            motions.update(result["moving_lines_by_motion"])
            per_file[str(path)] = {"program_id": program_id, **result}
        if not sink.windows:
            raise UserError(f"simulate.input {sc.input}: no program gave a {sc.window}-sample window of a line the "
                            f"vocabulary holds (see the counts per reason above); check the files or lower "
                            f"simulate.window")
        sink.close({**channel_arrays(), VOCAB_DIGEST_KEY: np.asarray(vocab.digest())})
    except BaseException:
        sink.abort()
        raise
    vocab_path = Path(sc.vocab_path) if sc.vocab_path else out.with_name(f"{out.stem}_vocab.json")
    if not sc.vocab_path:
        vocab.save(vocab_path)
    summary = {"files": len(files), **total.as_dict(), "not_tokenized_by_reason": dict(not_tokenized.most_common()),
               "moving_lines_by_motion": dict(sorted(motions.items())), "windows": sink.windows,
               "window_end": sc.window_end, "settle_samples": sc.settle_samples, "vocab": str(vocab_path), "vocab_digest": vocab.digest(), "per_file": per_file}
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
