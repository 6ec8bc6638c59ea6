"""Write a simulated machining dataset in the original NPZ layout, split by program.

    python -m cnc_gcode.sample_data data/cnc_gcode/sample --programs 60 --seed 0

Writes OUT/train.npz, val.npz, test.npz with
    continuous      [N, 64, C] float32   C = 27 simulated channels (see channels.json / cnc_gcode.virtual_mill)
    categorical     [N, 64, 4] int64     motion_mode, spindle_state, coolant, motion_phase (3 values each)
    tokens          [N, 7]     int64     the window's line (--window-end) in the default (exact) vocabulary, written
                                         as OUT/vocab.json
    vocab_digest    []         str       Vocabulary.digest() of that vocabulary (checked whenever tokens are loaded)
    operation_type  [N]        int64     one of 9 operations (virtual_mill.OPERATIONS)
    program_id, line_index [N] int64     provenance of each window
    channel_names   [C]        str
    categorical_names [4]      str
    channel_groups  []         str       JSON {group: [channel names]} of the input groups (virtual_mill.INPUT_GROUPS)
plus OUT/programs/*.nc (the G-code that was executed), OUT/channels.json and OUT/manifest.json.
Programs use continuous coordinates (3 decimals) and feeds (1 decimal) unless --grid is given, and each cutting
operation draws its spindle speed from one shared range (see cnc_gcode.virtual_mill).
Programs, not windows, are split (stratified by the program's first operation), so no program is in two splits.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from cnc_gcode.tokenizer import VOCAB_DIGEST_KEY, Vocabulary
from cnc_gcode.virtual_mill import (
    CATEGORICAL_CHANNELS,
    CATEGORICAL_DIMS,
    CATEGORICAL_NAMES_KEY,
    CHANNEL_GROUPS,
    CHANNEL_GROUPS_KEY,
    CHANNELS,
    CUTTING_OPS,
    INPUT_GROUPS,
    OPERATIONS,
    MachineConfig,
    check_window_end,
    execute,
    generate_program,
    record,
    windows,
)
from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write, atomic_write_text, write_json

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


def split_programs(kinds: list[str], seed: int) -> dict[str, list[int]]:
    """Program ids per split, stratified by kind: programs are shuffled within each kind and interleaved across
    kinds (first of every kind, then second, ...); val takes the first 15 %, test the next 15 % (at least one
    each), train the rest, so every split sees the kinds in proportion."""
    rng = np.random.default_rng(seed)
    per_kind = []
    for kind in sorted(set(kinds)):
        ids = [i for i, k in enumerate(kinds) if k == kind]
        rng.shuffle(ids)
        per_kind.append(ids)
    interleaved = [ids[r] for r in range(max(map(len, per_kind))) for ids in per_kind if r < len(ids)]
    n = len(interleaved)
    n_val = max(1, round(n * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(n * SPLIT_FRACTIONS[2]))
    return {"val": sorted(interleaved[:n_val]), "test": sorted(interleaved[n_val:n_val + n_test]),
            "train": sorted(interleaved[n_val + n_test:])}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez through a temporary sibling, so a kill never leaves a torn file."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    atomic_write(path, write)


def channel_arrays() -> dict[str, np.ndarray]:
    """The channel names and input groups every simulator NPZ records (data.channel_groups selects from them)."""
    return {"channel_names": np.asarray(CHANNELS), CATEGORICAL_NAMES_KEY: np.asarray(CATEGORICAL_CHANNELS),
            CHANNEL_GROUPS_KEY: np.asarray(json.dumps({k: list(v) for k, v in INPUT_GROUPS.items()}))}


def simulate_program(program_id: int, kind: str, seed: int, machine: MachineConfig, vocab: Vocabulary,
                     window: int, stride: int, max_per_line: int, grid_mm: float,
                     window_end: str = "executing", settle: int = 0) -> tuple[list[str], dict]:
    """Generate, execute and window one program. Returns (G-code lines, arrays for its windows)."""
    rng = np.random.default_rng([seed, program_id])
    lines, ops = generate_program(rng, kind, n_ops=int(rng.integers(2, 4)), grid_mm=grid_mm)
    segments, parsed = execute(lines, machine)
    sensor_log = record(segments, ops, machine, rng)
    line_tokens = np.asarray([vocab.encode_line(p) for p in parsed], dtype=np.int64)
    starts, labels = windows(sensor_log, window, stride, max_per_line, rng, window_end, settle)
    index = starts[:, None] + np.arange(window)[None]
    return lines, {
        "continuous": sensor_log["continuous"][index],
        "categorical": sensor_log["categorical"][index],
        "tokens": line_tokens[labels],
        "operation_type": np.asarray(ops, dtype=np.int64)[labels],
        "program_id": np.full(len(labels), program_id, dtype=np.int64),
        "line_index": labels.astype(np.int64),
    }


def make_dataset(out_dir: str | Path, n_programs: int = 60, seed: int = 0, window: int = 64, stride: int = 16,
                 max_per_line: int = 3, grid_mm: float = 0.0, value_mode: str = "exact",
                 window_end: str = "executing", settle: int = 0) -> dict:
    """Simulate `n_programs` programs and write the three splits. Returns the manifest.

    value_mode 'exact' tokenizes with the default vocabulary, 'seed4' with the seed's 4-digit one
    (`Vocabulary.seed()`; then pass data.vocab_path=OUT/vocab.json to the other stages). window_end: how windows
    are cut and labelled (virtual_mill.WINDOW_ENDS); settle: samples a completed window runs past its line's end."""
    if n_programs < 3:
        raise UserError(f"--programs {n_programs}: need at least 3 programs (one per split)")
    out = Path(out_dir)
    machine = MachineConfig(seed=seed)
    if value_mode not in ("exact", "seed4"):
        raise UserError(f"--value-mode {value_mode!r}: use exact or seed4")
    check_window_end(window_end, "--window-end")
    if settle < 0 or (settle and window_end != "completed"):
        raise UserError(f"--settle-samples {settle}: use 0, or a count >= 0 together with --window-end completed")
    vocab = Vocabulary.seed() if value_mode == "seed4" else Vocabulary()
    kinds = [CUTTING_OPS[i % len(CUTTING_OPS)] for i in range(n_programs)]
    splits = split_programs(kinds, seed)
    per_program = {}
    for pid, kind in enumerate(kinds):
        lines, arrays = simulate_program(pid, kind, seed, machine, vocab, window, stride, max_per_line, grid_mm,
                                         window_end, settle)
        atomic_write_text(out / "programs" / f"program_{pid:04d}.nc",
                          f"(cnc_gcode simulator program {pid}: {kind})\n" + "\n".join(lines) + "\n")
        per_program[pid] = arrays
    manifest = {"n_programs": n_programs, "seed": seed, "window": window, "stride": stride, "grid_mm": grid_mm,
                "max_per_line": max_per_line, "window_end": window_end,
                "settle_samples": settle, "dt_s": machine.dt_s, "operations": list(OPERATIONS), "program_kinds": kinds,
                "vocab_digest": vocab.digest(), "value_mode": value_mode, "splits": {}}
    for split in SPLITS:
        parts = [per_program[p] for p in splits[split]]
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        arrays.update(channel_arrays())
        arrays[VOCAB_DIGEST_KEY] = np.asarray(vocab.digest())
        save_npz(out / f"{split}.npz", arrays)
        manifest["splits"][split] = {"programs": splits[split], "windows": int(len(arrays["tokens"]))}
    write_json(out / "channels.json", {"continuous": list(CHANNELS), "groups": {k: list(v) for k, v in
                                                                               CHANNEL_GROUPS.items()},
                                       "input_groups": {k: list(v) for k, v in INPUT_GROUPS.items()},
                                       "categorical": list(CATEGORICAL_CHANNELS),
                                       "categorical_dims": list(CATEGORICAL_DIMS)})
    vocab.save(out / "vocab.json")
    write_json(out / "manifest.json", manifest)
    return manifest


def _body(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = make_dataset(args.out, args.programs, args.seed, args.window, args.stride, args.max_per_line,
                            args.grid, args.value_mode, args.window_end,
                            args.settle_samples)
    counts = {s: v["windows"] for s, v in manifest["splits"].items()}
    print(json.dumps({"out": str(args.out), "windows": counts, "channels": len(CHANNELS)}))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnc_gcode.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--programs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--max-per-line", type=int, default=3)
    parser.add_argument("--grid", type=float, default=0.0,
                        help="coordinate grid of generated programs in mm (0, the default: continuous coordinates "
                             "with 3 decimals and feeds with 1; e.g. 5 for the 5 mm grid of the held-out-programs table)")
    parser.add_argument("--window-end", default="executing",
                        help="executing (default, the seed's labelling): windows every --stride samples and at each "
                             "line's end, labelled with the line executing at their last sample (its end point may "
                             "lie ahead); completed: one window per line, ending on its last sample, labelled with "
                             "that just-completed line (a controller log segmented by line number)")
    parser.add_argument("--settle-samples", type=int, default=0,
                        help="with --window-end completed: end each window this many samples after its line's last "
                             "sample (the measured position trails the command by the servo delay, 2 samples)")
    parser.add_argument("--value-mode", choices=("exact", "seed4"), default="exact",
                        help="token values exact (default vocabulary) or the seed's 4 significant digits "
                             "(then pass data.vocab_path=OUT/vocab.json)")
    return parser


main = guarded_main(_body, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
