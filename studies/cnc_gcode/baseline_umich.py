"""Tree-model baselines for the UMich phase labels: each row's machine state vs the row's position in its file.

    python -m studies.cnc_gcode.baseline_umich --config configs/cnc_gcode/umich.yaml
    python -m studies.cnc_gcode.baseline_umich --config configs/cnc_gcode/umich_machine_state.yaml

Reads the experiment CSVs as `ingest_umich` does (same labels, same experiment split) and fits sklearn
`HistGradientBoostingClassifier`s on every row of the training experiments with two feature sets:

    machine_state  Z above the run's lowest Z (mm), signs of the X and Y command velocity, spindle command speed,
                   M1_sequence_number, M1_CURRENT_FEEDRATE: what the machine is doing in that row
    file_position  the row's position in its file, 0 (first row) .. 1 (last row): what no sensor window carries

Both are scored on the rows that end a test window (`umich.window`, `umich.stride`, as `ingest_umich` makes them),
so the numbers sit beside the encoder's test report on the same windows, with the majority baseline (most frequent
training label). Writes <run_dir>/reports/baseline_umich.{json,md}.

With umich.label_source=sequence_map the labels are every line's phase in the map learned on umich.map_experiment,
and the trees train on the training experiments' windows and score the test windows, both exactly as ingest_umich
makes them (inside one record, last line in the map), with two feature sets:

    measured_window  the window's measured channels (data.channel_groups, default every UMich input group but
                     commanded; positions relative to the run's minimum as umich.relative_positions says), flattened
    file_position    the window's last row's position in its file, 0 .. 1

The machine_state set is left out there: it holds M1_sequence_number, of which these labels are a function.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cnc_gcode.config import CncConfig
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from common.metrics import macro_f1
from studies.cnc_gcode.ablation_gamma import markdown_table
from studies.cnc_gcode.ingest_umich import (
    COARSE_OF_PHASE,
    apply_phase_map,
    default_data_dir,
    experiment_files,
    input_groups,
    machine_state_phases,
    read_experiment,
    read_phase_map,
    record_segments,
    window_ends,
)

log = logging.getLogger(__name__)
FEATURE_SETS = ("machine_state", "file_position")
WINDOW_FEATURE_SETS = ("measured_window", "file_position")
MEASURED_GROUPS = ("measured_motion", "drives", "spindle")


def row_features(signals) -> dict[str, np.ndarray]:
    """Feature set name -> [S, F] float array of one experiment's rows."""
    z = signals["Z1_ActualPosition"].to_numpy(np.float64)
    state = np.stack([z - np.nanmin(z), np.sign(signals["X1_CommandVelocity"].to_numpy(np.float64)),
                      np.sign(signals["Y1_CommandVelocity"].to_numpy(np.float64)),
                      signals["S1_CommandVelocity"].to_numpy(np.float64),
                      signals["M1_sequence_number"].to_numpy(np.float64),
                      signals["M1_CURRENT_FEEDRATE"].to_numpy(np.float64)], axis=1)
    position = (np.arange(len(z)) / max(len(z) - 1, 1))[:, None]
    return {"machine_state": state, "file_position": position}


def window_features(cfg: CncConfig, signals, ends: np.ndarray) -> dict[str, np.ndarray]:
    """Feature set name -> [W, F] of one experiment's windows ending at `ends` (sequence_map mode)."""
    uc = cfg.umich
    groups = input_groups(list(signals.columns))
    wanted = cfg.data.channel_groups or list(MEASURED_GROUPS)
    unknown = [g for g in wanted if g not in groups]
    if unknown or "commanded" in wanted:
        raise UserError(f"config key 'data.channel_groups': {wanted} for baseline_umich; use measured groups among "
                        f"{', '.join(MEASURED_GROUPS)} (commanded channels state the line)")
    columns = [c for c in signals.columns if any(c in groups[g] for g in wanted)]
    values = signals[columns].to_numpy(np.float64, copy=True)
    if uc.relative_positions:
        relative = [i for i, c in enumerate(columns) if "Position" in c and not c.startswith("S1")]
        values[:, relative] -= np.nanmin(values[:, relative], axis=0)
    index = ends[:, None] - np.arange(uc.window - 1, -1, -1)[None]
    return {"measured_window": values[index].reshape(len(ends), -1),
            "file_position": (ends / max(len(signals) - 1, 1))[:, None]}


def score_baselines(cfg: CncConfig, train_x: dict[str, list[np.ndarray]], y_train: np.ndarray,
                    test_x: dict[str, list[np.ndarray]], y_test: np.ndarray) -> list[dict]:
    """The majority label's row, then gradient-boosted trees fitted on each feature set of `train_x` (name -> arrays
    per experiment) and scored on the same set of `test_x`: accuracy and macro F1."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    majority = np.bincount(y_train).argmax()
    rows = [{"model": "majority", "features": "-", "accuracy": float((y_test == majority).mean()),
             "macro_f1": macro_f1(y_test, np.full_like(y_test, majority))}]
    for name in train_x:
        model = HistGradientBoostingClassifier(random_state=cfg.run.seed)
        # run.num_threads caps OpenMP too: on a shared 2-core machine one thread fits 4x faster than oversubscribed
        with threadpool_limits(limits=cfg.run.num_threads or None):
            model.fit(np.concatenate(train_x[name]), y_train)
            predicted = model.predict(np.concatenate(test_x[name]))
        rows.append({"model": "gradient-boosted trees", "features": name,
                     "accuracy": float((predicted == y_test).mean()), "macro_f1": macro_f1(y_test, predicted)})
    return rows


def baseline_umich(cfg: CncConfig) -> int:

    setup_logging()
    uc = cfg.umich
    data_dir = Path(uc.data_dir) if uc.data_dir else default_data_dir()
    if uc.label_source == "sequence_map":
        return sequence_map_baselines(cfg, data_dir)
    held_out = set(uc.val_experiments) | set(uc.test_experiments)
    train_x: dict[str, list[np.ndarray]] = {name: [] for name in FEATURE_SETS}
    test_x: dict[str, list[np.ndarray]] = {name: [] for name in FEATURE_SETS}
    train_y, test_y = [], []
    for number, path in experiment_files(data_dir):
        signals, phases, sequence = read_experiment(path)
        signals = signals.assign(M1_sequence_number=sequence)
        if uc.label_source == "machine_state":
            labels = machine_state_phases(signals)
        else:
            labels = COARSE_OF_PHASE[phases] if uc.phase_grouping == "coarse" else phases
        features = row_features(signals)
        if number in uc.test_experiments:
            ends = np.arange(uc.window - 1, len(signals), uc.stride)
            for name in FEATURE_SETS:
                test_x[name].append(features[name][ends])
            test_y.append(labels[ends])
        elif number not in held_out:
            for name in FEATURE_SETS:
                train_x[name].append(features[name])
            train_y.append(labels)
    if not train_y or not test_y:
        raise UserError(f"{data_dir}: no training or no test experiment found; check umich.test_experiments")
    y_train, y_test = np.concatenate(train_y), np.concatenate(test_y)
    rows = score_baselines(cfg, train_x, y_train, test_x, y_test)
    result = {"label_source": uc.label_source, "phase_grouping": uc.phase_grouping, "test_windows": len(y_test),
              "train_rows": len(y_train), "test_experiments": list(uc.test_experiments), "rows": rows}
    return write_report(cfg, result)


def sequence_map_baselines(cfg: CncConfig, data_dir: Path) -> int:
    """Majority and trees on the windows ingest_umich makes with label_source=sequence_map (train on the training
    experiments' windows, score the test windows)."""

    uc = cfg.umich
    phase_map, map_stats = read_phase_map(uc, data_dir)
    held_out = set(uc.val_experiments) | set(uc.test_experiments)
    train_x: dict[str, list[np.ndarray]] = {name: [] for name in WINDOW_FEATURE_SETS}
    test_x: dict[str, list[np.ndarray]] = {name: [] for name in WINDOW_FEATURE_SETS}
    train_y, test_y = [], []
    for number, path in experiment_files(data_dir):
        if number in held_out and number not in uc.test_experiments:
            continue
        signals, _, sequence = read_experiment(path)
        if len(signals) < uc.window:
            continue
        labels = apply_phase_map(phase_map, sequence)
        ends = window_ends(len(signals), uc.window, uc.stride, record_segments(signals, sequence))
        ends = ends[labels[ends] >= 0]
        features = window_features(cfg, signals, ends)
        xs, ys = (test_x, test_y) if number in uc.test_experiments else (train_x, train_y)
        for name in WINDOW_FEATURE_SETS:
            xs[name].append(features[name])
        ys.append(labels[ends])
    if not train_y or not test_y:
        raise UserError(f"{data_dir}: no training or no test experiment found; check umich.test_experiments")
    y_train, y_test = np.concatenate(train_y), np.concatenate(test_y)
    rows = score_baselines(cfg, train_x, y_train, test_x, y_test)
    result = {"label_source": uc.label_source, "phase_map": map_stats, "window": uc.window, "stride": uc.stride,
              "relative_positions": uc.relative_positions, "channel_groups": list(cfg.data.channel_groups or MEASURED_GROUPS), "test_windows": len(y_test),
              "train_windows": len(y_train), "test_experiments": list(uc.test_experiments), "rows": rows}
    return write_report(cfg, result)


def write_report(cfg: CncConfig, result: dict) -> int:
    rows = result["rows"]
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "baseline_umich.json", result)
    table = markdown_table(["model", "features", "accuracy", "macro F1"],
                           [[r["model"], r["features"], r["accuracy"], r["macro_f1"]] for r in rows])
    atomic_write_text(reports / "baseline_umich.md", table)
    print(table)
    return 0


main = config_main(CncConfig, baseline_umich, __doc__, prog="python -m studies.cnc_gcode.baseline_umich")

if __name__ == "__main__":
    raise SystemExit(main())
