"""Ingest the University of Michigan CNC mill logs into the sensor-window NPZ layout, split by experiment.

    python -m studies.cnc_gcode.ingest_umich --config configs/cnc_gcode/umich.yaml
    python -m cnc_gcode.train_encoder --config configs/cnc_gcode/umich.yaml       # machining-phase accuracy

Input: experiment_XX.csv (100 ms rows; 48 signals; `Machining_Process` phase; `M1_sequence_number`), from
umich.data_dir or $REAL_DATA_DIR/cnc_umich_toolwear. Output in umich.out_dir: train/val/test.npz with
    continuous [N,64,C] float32   every numeric signal except program number and sequence number (C = 45)
    categorical [N,64,4] int64    direction of X, Y, Z command velocity and spindle state (0 still, 1 -, 2 +)
    operation_type [N] int64      the phase at the window's last row, one of PHASES (9), or of COARSE_PHASES (4)
                                  with umich.phase_grouping=coarse, or with umich.label_source=machine_state
                                  one of MACHINE_STATE_PHASES (8), derived from each row's own signals
                                  (machine_state_phases; manifest.json records its agreement with the recorded
                                  labels per run), or with umich.label_source=sequence_map one of PHASES, read
                                  through the sequence-number -> phase map learned on umich.map_experiment
                                  (learn_phase_map; see "Sequence-number map" below)
    tokens [N,7] int64            the NONE line (the G-code program is not part of the dataset, so there are no
                                  token targets: this data trains and evaluates the encoder only)
    vocab_digest [] str           the default vocabulary's digest (cnc_gcode.data checks it on load)
    categorical_names [4] str     x/y/z_direction, spindle_state (from the command velocities: group 'commanded')
    sequence_number, experiment, end_row [N] int64   the last row's line number, its run and its row in the file
channels.json: `groups` (controller / spindle / position / velocity / acceleration / motor_current, for the modality
ablation) and `input_groups` for data.channel_groups: measured_motion (X/Y/Z actual position, velocity,
acceleration), drives (X/Y/Z current feedback, bus voltage, output current / voltage / power), spindle (S1 actual
and drive channels, inertia) and commanded (every Command* channel, M1_CURRENT_FEEDRATE and the four direction
channels, which derive from command velocities). Measured only = every group but commanded.
Experiments, not windows, are split (umich.val_experiments / umich.test_experiments), so no run is in two splits.
Positions stay in machine coordinates unless umich.relative_positions=true subtracts each run's minimum: the passes
are cut at the same machine Z in every run (27.5-29.7 mm), and runs 04, 05 and 16 stop after the first pass, so a
per-run minimum would put their first pass where the other runs cut their third.

Label canonicalisation: 'Starting' (one row at the start of experiment 01) is merged into 'Prep' and 'end'
(experiment 01) into 'End'; whitespace is stripped. Nothing else is renamed.

Data check (manifest.json "experiments", one warning per run): in this copy of the dataset only experiment 01 is
a continuous recording. In the other 17 the rows come in 1 s blocks (10 rows) in shuffled order while the
`Machining_Process` column stays in file order, so a block's signals (Z height, feed direction, spindle) do not
match its phase label: every "Layer k" label holds rows at all depths and above the part. `continuity_report`
measures this without labels: the share of steps where an axis moves farther than its reported velocity allows
and the median length of the continuous stretches (about 10 rows in a shuffled run, tens of rows in 01).

Records: the logs were written in 1 s records, and the first row of every record reads `M1_sequence_number` 2
(RECORD_MARKER_SEQUENCE; in experiment 01 it recurs every 10-11 rows in every phase, and in 16 of the 17 shuffled runs
71-100 % of the position jumps fall exactly on such a row; 49 % in 02, whose records are mostly 6 rows). `record_segments` starts a new segment at each marker row and at
each jump; with umich.record_windows=true every window lies inside one segment (so inside one record of a shuffled
run), which needs a window of at most a record's length (6-11 rows; experiment 02 mostly has 6-row records).

Sequence-number map (umich.label_source=sequence_map): `M1_sequence_number` is the executing program line and moves
with its block, while `Machining_Process` stays in file order. `learn_phase_map` takes the majority recorded phase of
each line in the continuous run umich.map_experiment (01) and keeps the lines whose majority holds more than
umich.map_min_share of their rows (the marker line 2 spreads over every phase and stays out); every run is relabelled
through that map. A window takes the phase of its last row's line; a window whose last line is not in the map
(lines the 100 ms rows of 01 never caught) is dropped and counted (manifest.json: map agreement and coverage on
01, unmapped rows and dropped windows per run).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from cnc_gcode.config import CncConfig
from cnc_gcode.sample_data import SPLITS, save_npz
from cnc_gcode.tokenizer import NONE_COMMAND, VOCAB_DIGEST_KEY, Vocabulary
from common.cli import config_main
from common.errors import UserError
from common.io import require_finite, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
PHASES = ("Prep", "Layer 1 Up", "Layer 1 Down", "Repositioning", "Layer 2 Up", "Layer 2 Down", "Layer 3 Up",
          "Layer 3 Down", "End")
PHASE_ALIASES = {"starting": "Prep", "end": "End"}
# phase_grouping=coarse: prep / cutting a layer (any layer, up or down) / repositioning / end.
COARSE_PHASES = ("Prep", "Layer cutting", "Repositioning", "End")
COARSE_OF_PHASE = np.array([0, 1, 1, 2, 1, 1, 1, 1, 3])
LABEL_COLUMNS = ("Machining_Process", "M1_sequence_number", "M1_CURRENT_PROGRAM_NUMBER", "tool_condition")
DIRECTION_COLUMNS = ("X1_CommandVelocity", "Y1_CommandVelocity", "Z1_CommandVelocity", "S1_CommandVelocity")
STILL_SPEED = 1e-3
SAMPLE_S = 0.1  # one row every 100 ms
# A step "jumps" when an axis moves more than twice what its reported velocity allows in one sample, plus slack
# for the position channel's own lag and quantisation (mm).
JUMP_VELOCITY_FACTOR = 2.0
JUMP_SLACK_MM = 0.5
# The first row of every 1 s record reads this line number (see "Records" in the module docstring).
RECORD_MARKER_SEQUENCE = 2
CATEGORICAL_NAMES = ("x_direction", "y_direction", "z_direction", "spindle_state")
# A run whose continuous stretches have a median length this short (rows) is block-shuffled (the blocks are 10).
SHUFFLED_MEDIAN_SEGMENT = 20

# umich.label_source=machine_state: a row's phase from its own signals. Class i has the meaning of PHASES[i] for
# i = 1..7; class 0 is every spindle-off row (the recorded Prep and the idle part of End cannot be told apart from
# one row: before and after the program look the same). machine-state class of each recorded phase:
MACHINE_STATE_PHASES = ("Spindle off", "Layer 1 Up", "Layer 1 Down", "Repositioning", "Layer 2 Up", "Layer 2 Down",
                        "Layer 3 Up", "Layer 3 Down")
MACHINE_STATE_OF_PHASE = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0])
# Depth of the deepest (third) pass in machine Z, mm. Experiment 01 cuts at 29.5 / 28.5 / 27.5; the other runs at
# the same levels or 0.2 mm higher. Not the run's own lowest Z: runs 04, 05 and 16 stop after the first pass
# (lowest cut 29.5-29.7 mm), and a run-relative reference would call that pass layer 3.
LOWEST_LAYER_Z_MM = 27.5
LAYER_STEP_MM = 1.0
N_LAYERS = 3
LAYER_UP_CLASS = np.array([-1, 1, 4, 6])  # class id of "Layer k Up", indexed by k
LAYER_Z_TOLERANCE_MM = 0.5  # the 0.2 mm offset between runs plus the position channel's 0.1 mm quantisation
SPINDLE_ON = 1.0  # S1_CommandVelocity above this: spindle turning (53.3 while cutting)
MOVING_MM_S = 0.5  # |command velocity| above this: the axis moves (cutting moves read 3-20, the programmed feed)
MACHINE_STATE_COLUMNS = ("Z1_ActualPosition", "M1_CURRENT_FEEDRATE", "S1_CommandVelocity", "X1_CommandVelocity",
                         "Y1_CommandVelocity")


def default_data_dir() -> Path:
    root = os.environ.get("REAL_DATA_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return base / "cnc_umich_toolwear"


def experiment_files(data_dir: Path) -> list[tuple[int, Path]]:
    """(experiment number, path) of every experiment_XX.csv in `data_dir`, in order; UserError when there is none."""
    files = sorted(Path(data_dir).glob("experiment_*.csv"))
    if not files:
        raise UserError(f"config key 'umich.data_dir': no experiment_XX.csv in {data_dir}; point it at the UMich "
                        f"CNC mill tool-wear folder (or set REAL_DATA_DIR)")
    return [(int(re.search(r"(\d+)", path.stem).group(1)), path) for path in files]


def read_experiment(path: Path):
    """One CSV -> (signals DataFrame of numeric sensor columns, phase ids [S], sequence numbers [S])."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read CSV ({exc}); expected the UMich experiment_XX.csv layout") from exc
    for column in ("Machining_Process", "M1_sequence_number", *DIRECTION_COLUMNS):
        if column not in frame.columns:
            raise UserError(f"{path}: column '{column}' is missing; expected the UMich CNC mill tool-wear layout")
    phase_names = frame["Machining_Process"].astype(str).str.strip()
    phase_names = phase_names.map(lambda p: PHASE_ALIASES.get(p.lower(), p))
    unknown = sorted(set(phase_names) - set(PHASES))
    if unknown:
        raise UserError(f"{path}: column 'Machining_Process' holds unknown phases {unknown}; expected {PHASES}")
    phases = phase_names.map(PHASES.index).to_numpy(np.int64)
    signals = frame.drop(columns=[c for c in frame.columns if c in LABEL_COLUMNS or c.startswith("Unnamed")])
    signals = signals.apply(pd.to_numeric, errors="coerce")
    return signals, phases, frame["M1_sequence_number"].to_numpy()


def jump_rows(signals) -> np.ndarray:
    """[S] bool: True where an axis moved farther since the previous row than its reported velocity allows."""
    jumps = np.zeros(len(signals), bool)
    for axis in "XYZ":
        moved = np.abs(np.diff(signals[f"{axis}1_ActualPosition"].to_numpy(np.float64), prepend=np.nan))
        speed = np.abs(signals[f"{axis}1_ActualVelocity"].to_numpy(np.float64))
        allowed = np.maximum(speed, np.roll(speed, 1)) * SAMPLE_S * JUMP_VELOCITY_FACTOR + JUMP_SLACK_MM
        jumps |= np.nan_to_num(moved, nan=0.0) > allowed
    return jumps


def continuity_report(signals) -> dict:
    """Labels-free check that a run is one continuous recording.

    signals: DataFrame with X1/Y1/Z1 ActualPosition (mm) and ActualVelocity (mm/s) at 100 ms.
    Returns {"jump_rate": share of steps where an axis moves farther than its velocity allows,
    "median_segment_rows": median length of the stretches between jumps, "shuffled": bool}.
    """
    jumps = jump_rows(signals)
    segments = np.diff(np.r_[0, np.flatnonzero(jumps), len(signals)])
    median = float(np.median(segments[segments > 0]))
    return {"jump_rate": round(float(jumps.mean()), 4), "median_segment_rows": median,
            "shuffled": bool(median <= SHUFFLED_MEDIAN_SEGMENT)}


def record_segments(signals, sequence: np.ndarray) -> np.ndarray:
    """[S] int64 segment id per row, non-decreasing: a new segment starts at every record-marker row
    (sequence == RECORD_MARKER_SEQUENCE) and at every position jump (jump_rows). Rows of one segment are consecutive
    samples of one recording."""
    starts = jump_rows(signals) | (np.asarray(sequence) == RECORD_MARKER_SEQUENCE)
    starts[:1] = False  # the first row opens segment 0 either way
    return np.cumsum(starts).astype(np.int64)


def window_ends(n_rows: int, window: int, stride: int, segments: np.ndarray | None = None) -> np.ndarray:
    """Last-row indices of the windows: every `stride` rows from row window-1; with `segments` ([S] ids from
    record_segments) only windows whose rows all lie in one segment, every `stride` rows from each segment's start."""
    if segments is None:
        return np.arange(window - 1, n_rows, stride)
    bounds = np.r_[0, np.flatnonzero(np.diff(segments)) + 1, n_rows]
    return np.concatenate([np.arange(a + window - 1, b, stride) for a, b in zip(bounds[:-1], bounds[1:])]
                          + [np.zeros(0, np.int64)]).astype(np.int64)


def learn_phase_map(sequence: np.ndarray, phases: np.ndarray, min_share: float) -> tuple[dict[int, int], dict]:
    """Majority phase of each program line in one (continuous) run.

    sequence [S] line numbers, phases [S] phase ids. A line enters the map when its most frequent phase holds more
    than `min_share` of its rows (ties: the lower phase id). Returns ({line: phase}, stats) with stats:
    lines (distinct lines), mapped_lines, left_out (lines not mapped), coverage (share of rows whose line is mapped)
    and agreement (share of those rows whose recorded phase equals the map's).
    """
    import pandas as pd

    sequence = np.asarray(sequence).astype(np.int64)
    counts = pd.crosstab(sequence, np.asarray(phases))
    share = counts.max(axis=1) / counts.sum(axis=1)
    majority = counts.idxmax(axis=1)
    phase_map = {int(line): int(majority[line]) for line in counts.index if share[line] > min_share}
    mapped = apply_phase_map(phase_map, sequence)
    covered = mapped >= 0
    stats = {"lines": len(counts), "mapped_lines": len(phase_map),
             "left_out": sorted(int(line) for line in counts.index if int(line) not in phase_map),
             "coverage": round(float(covered.mean()), 4),
             "agreement": round(float((mapped == phases)[covered].mean()), 4) if covered.any() else None}
    return phase_map, stats


def apply_phase_map(phase_map: dict[int, int], sequence: np.ndarray) -> np.ndarray:
    """[S] int64 phase of each row's line through the map, -1 where the line is not in it."""
    lines = np.asarray(sequence).astype(np.int64)
    return np.array([phase_map.get(int(line), -1) for line in lines], dtype=np.int64)


def input_groups(channel_names: list[str]) -> dict[str, list[str]]:
    """data.channel_groups for UMich: commanded (Command* channels, M1_* controller readings and the categorical
    direction channels, which derive from command velocities), spindle (other S1_*), measured_motion (Actual*)
    and drives (the rest: currents, voltages, power)."""
    groups: dict[str, list[str]] = {"measured_motion": [], "drives": [], "spindle": [], "commanded": []}
    for name in channel_names:
        group = ("commanded" if "Command" in name or name.startswith("M1_") else "spindle" if name.startswith("S1_")
                 else "measured_motion" if "Actual" in name else "drives")
        groups[group].append(name)
    groups["commanded"] += list(CATEGORICAL_NAMES)
    return groups


def read_phase_map(cfg_umich, data_dir: Path) -> tuple[dict[int, int], dict]:
    """The sequence-number -> phase map learned on umich.map_experiment of `data_dir`; UserError when that run is
    missing."""
    files = dict(experiment_files(data_dir))
    if cfg_umich.map_experiment not in files:
        raise UserError(f"config key 'umich.map_experiment': experiment {cfg_umich.map_experiment} is not in "
                        f"{data_dir} (found {sorted(files)}); name the continuous run (01)")
    _, phases, sequence = read_experiment(files[cfg_umich.map_experiment])
    phase_map, stats = learn_phase_map(sequence, phases, cfg_umich.map_min_share)
    return phase_map, {"experiment": cfg_umich.map_experiment, "min_share": cfg_umich.map_min_share, **stats}


def machine_state_phases(signals) -> np.ndarray:
    """[S] int64 ids into MACHINE_STATE_PHASES, each from its own row's signals (no labels, no neighbouring rows).

    cutting   = spindle on, feed below the run's highest programmed feed (the positioning feed, 50), and Z within
                LAYER_Z_TOLERANCE_MM of one of the N_LAYERS pass depths (LOWEST_LAYER_Z_MM + 0/1/2 mm)
    layer     = 1 at the highest pass depth ... 3 at the lowest (Z rounded to the nearest pass)
    direction = Up when the Y command velocity is positive, Down when negative; when Y is still, the sign of the
                X command velocity; when both are still (plunge, dwell), Up
    otherwise = Spindle off (class 0) or, with the spindle on, Repositioning (class 3)
    """
    z = signals["Z1_ActualPosition"].to_numpy(np.float64)
    feed = signals["M1_CURRENT_FEEDRATE"].to_numpy(np.float64)
    spindle_on = signals["S1_CommandVelocity"].to_numpy(np.float64) > SPINDLE_ON
    depth = (z - LOWEST_LAYER_Z_MM) / LAYER_STEP_MM
    in_band = (depth > -LAYER_Z_TOLERANCE_MM) & (depth < N_LAYERS - 1 + LAYER_Z_TOLERANCE_MM)
    cutting = spindle_on & in_band & (feed < np.nanmax(feed))
    layer = N_LAYERS - np.clip(np.rint(np.nan_to_num(depth)), 0, N_LAYERS - 1).astype(np.int64)  # 1..3
    vx = signals["X1_CommandVelocity"].to_numpy(np.float64)
    vy = signals["Y1_CommandVelocity"].to_numpy(np.float64)
    up = np.where(np.abs(vy) >= MOVING_MM_S, vy > 0, np.where(np.abs(vx) >= MOVING_MM_S, vx > 0, True))
    layer_phase = LAYER_UP_CLASS[layer] + (~up).astype(np.int64)  # Layer k Down follows Layer k Up
    return np.where(cutting, layer_phase, np.where(spindle_on, 3, 0)).astype(np.int64)


def machine_state_agreement(derived: np.ndarray, recorded: np.ndarray) -> dict[str, float | None]:
    """How far machine-state labels agree with the recorded ones (both as machine-state classes, [S]): overall,
    cutting vs not, the layer on the recorded layer rows, and Up/Down on the rows where both give the same layer.
    Written to manifest.json per experiment."""
    layer_of = np.array([0, 1, 1, 0, 2, 2, 3, 3])  # 0 = not cutting
    cutting_d, cutting_r = layer_of[derived] > 0, layer_of[recorded] > 0
    same_layer = cutting_r & (layer_of[derived] == layer_of[recorded])

    def share(hits: np.ndarray, rows: np.ndarray) -> float | None:
        return round(float(hits[rows].mean()), 4) if rows.any() else None

    everything = np.ones(len(derived), dtype=bool)
    return {"machine_state_agreement": share(derived == recorded, everything),
            "cutting_agreement": share(cutting_d == cutting_r, everything),
            "layer_agreement": share(same_layer, cutting_r),
            "direction_agreement": share(derived == recorded, same_layer)}


def categorical_channels(signals) -> np.ndarray:
    """[S,4]: 0 still, 1 negative, 2 positive command velocity of X, Y, Z and the spindle."""
    velocity = signals[list(DIRECTION_COLUMNS)].to_numpy(np.float64)
    return np.where(np.abs(velocity) < STILL_SPEED, 0, np.where(velocity < 0, 1, 2)).astype(np.int64)


def ingest(cfg: CncConfig) -> int:
    setup_logging()
    uc = cfg.umich
    data_dir = Path(uc.data_dir) if uc.data_dir else default_data_dir()
    numbered = experiment_files(data_dir)
    files = [path for _, path in numbered]
    vocab = Vocabulary()
    none_line = [vocab.command_id(NONE_COMMAND), 3] + [0] * (vocab.max_tokens - 2)
    split_of = {e: "val" for e in uc.val_experiments} | {e: "test" for e in uc.test_experiments}
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    channel_names: list[str] | None = None
    checks: dict[int, dict] = {}
    phase_map, map_stats = read_phase_map(uc, data_dir) if uc.label_source == "sequence_map" else ({}, None)
    for number, path in numbered:
        signals, phases, sequence = read_experiment(path)
        if cfg.data.nan_policy == "error":  # with skip, windows holding NaN/inf are dropped and counted at loading
            require_finite(signals.to_numpy(np.float64), path, what="data row",
                           fix="repair those rows, or set data.nan_policy=skip to drop the windows that hold them")
        if channel_names is None:
            channel_names = list(signals.columns)
        elif list(signals.columns) != channel_names:
            raise UserError(f"{path}: signal columns differ from {files[0].name}; every experiment needs the same 48")
        checks[number] = continuity_report(signals)
        if checks[number]["shuffled"]:
            log.warning("%s: rows are in shuffled ~1 s blocks (median continuous stretch %.0f rows); its phase labels "
                        "do not follow its signals (see the module docstring)", path.name,
                        checks[number]["median_segment_rows"])
        if len(signals) < uc.window:
            log.warning("%s: %d rows, shorter than one window of %d; skipped", path, len(signals), uc.window)
            continue
        if uc.label_source == "machine_state":
            missing = [c for c in MACHINE_STATE_COLUMNS if c not in signals.columns]
            if missing:
                raise UserError(f"{path}: umich.label_source=machine_state needs columns {missing}; use "
                                f"label_source=recorded or add them")
            labels = machine_state_phases(signals)  # before relative_positions: the rule reads machine Z
            checks[number].update(machine_state_agreement(labels, MACHINE_STATE_OF_PHASE[phases]))
        elif uc.label_source == "sequence_map":
            labels = apply_phase_map(phase_map, sequence)
            checks[number].update({"unmapped_rows": int((labels < 0).sum()),
                                   "recorded_agreement": round(float((labels == phases)[labels >= 0].mean()), 4)})
        else:
            labels = COARSE_OF_PHASE[phases] if uc.phase_grouping == "coarse" else phases
        segments = record_segments(signals, sequence) if uc.record_windows else None  # before relative_positions
        if uc.relative_positions:
            # The earlier inputs, kept for the ablation: positions relative to the run's lowest point (no labels). It
            # mislabels the depth of runs that stop early (see the module docstring), hence off by default.
            for column in [c for c in signals.columns if "Position" in c and not c.startswith("S1")]:
                signals[column] = signals[column] - signals[column].min()
        continuous = signals.to_numpy(np.float32)
        categorical = categorical_channels(signals)
        ends = window_ends(len(signals), uc.window, uc.stride, segments)
        if uc.label_source == "sequence_map":  # a window whose last line has no phase in the map has no label
            checks[number]["dropped_windows"] = int((labels[ends] < 0).sum())
            ends = ends[labels[ends] >= 0]
        checks[number]["windows"] = len(ends)
        index = ends[:, None] - np.arange(uc.window - 1, -1, -1)[None]
        parts[split_of.get(number, "train")].append({
            "continuous": continuous[index], "categorical": categorical[index],
            "operation_type": labels[ends], "tokens": np.tile(np.asarray(none_line, np.int64), (len(ends), 1)),
            "sequence_number": sequence[ends].astype(np.int64), "experiment": np.full(len(ends), number, np.int64),
            "end_row": ends.astype(np.int64)})
    out = Path(uc.out_dir)
    names = (MACHINE_STATE_PHASES if uc.label_source == "machine_state" else
             COARSE_PHASES if uc.phase_grouping == "coarse" else PHASES)
    manifest = {"source": str(data_dir), "window": uc.window, "stride": uc.stride, "phases": list(names),
                "phase_grouping": uc.phase_grouping, "label_source": uc.label_source,
                "label_aliases": PHASE_ALIASES, "record_windows": uc.record_windows,
                "experiments": {str(k): v for k, v in checks.items()}, "splits": {}}
    if map_stats is not None:
        manifest["phase_map"] = {**map_stats, "map": {str(k): names[v] for k, v in sorted(phase_map.items())}}
    for split in SPLITS:
        if not parts[split]:
            raise UserError(f"split '{split}' got no experiments; check umich.val_experiments/test_experiments")
        arrays = {k: np.concatenate([p[k] for p in parts[split]]) for k in parts[split][0]}
        arrays["channel_names"] = np.asarray(channel_names)
        arrays["categorical_names"] = np.asarray(CATEGORICAL_NAMES)
        arrays[VOCAB_DIGEST_KEY] = np.asarray(vocab.digest())
        save_npz(out / f"{split}.npz", arrays)
        manifest["splits"][split] = {"experiments": sorted(set(arrays["experiment"].tolist())),
                                     "windows": len(arrays["operation_type"]),
                                     "phase_counts": np.bincount(arrays["operation_type"],
                                                                 minlength=len(names)).tolist()}
    groups: dict[str, list[str]] = {}
    for name in channel_names:
        prefix = name.split("_")[0]
        kind = "controller" if prefix == "M1" else ("spindle" if prefix == "S1" else
                                                    ("position" if "Position" in name else
                                                     "velocity" if "Velocity" in name else
                                                     "acceleration" if "Acceleration" in name else "motor_current"))
        groups.setdefault(kind, []).append(name)
    write_json(out / "channels.json", {"continuous": channel_names, "groups": groups,
                                       "input_groups": input_groups(channel_names),
                                       "categorical": list(CATEGORICAL_NAMES),
                                       "categorical_dims": [3, 3, 3, 3]})
    write_json(out / "manifest.json", manifest)
    log.info("UMich: %s", {s: v["windows"] for s, v in manifest["splits"].items()})
    print(f"umich: {out} {({s: v['windows'] for s, v in manifest['splits'].items()})}")
    return 0


main = config_main(CncConfig, ingest, __doc__, prog="python -m studies.cnc_gcode.ingest_umich")

if __name__ == "__main__":
    raise SystemExit(main())
