"""Tree-model baselines for the UMich phase labels: each row's machine state vs the row's position in its file.

    python -m cnc_gcode.baseline_umich --config configs/cnc_gcode/umich.yaml
    python -m cnc_gcode.baseline_umich --config configs/cnc_gcode/umich_machine_state.yaml

Reads the experiment CSVs as `ingest_umich` does (same labels, same experiment split) and fits sklearn
`HistGradientBoostingClassifier`s on every row of the training experiments with two feature sets:

    machine_state  Z above the run's lowest Z (mm), signs of the X and Y command velocity, spindle command speed,
                   M1_sequence_number, M1_CURRENT_FEEDRATE: what the machine is doing in that row
    file_position  the row's position in its file, 0 (first row) .. 1 (last row): what no sensor window carries

Both are scored on the rows that end a test window (`umich.window`, `umich.stride`, as `ingest_umich` makes them),
so the numbers sit beside the encoder's test report on the same windows, with the majority baseline (most frequent
training label). Writes <run_dir>/reports/baseline_umich.{json,md}.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cnc_gcode.ablation_gamma import markdown_table
from cnc_gcode.config import CncConfig
from cnc_gcode.ingest_umich import (
    COARSE_OF_PHASE,
    default_data_dir,
    experiment_files,
    machine_state_phases,
    read_experiment,
)
from common.cli import UserError, config_main
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from common.metrics import macro_f1

log = logging.getLogger(__name__)
FEATURE_SETS = ("machine_state", "file_position")


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


def baseline_umich(cfg: CncConfig) -> int:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    setup_logging()
    uc = cfg.umich
    data_dir = Path(uc.data_dir) if uc.data_dir else default_data_dir()
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
    majority = np.bincount(y_train).argmax()
    rows = [{"model": "majority", "features": "-", "accuracy": float((y_test == majority).mean()),
             "macro_f1": macro_f1(y_test, np.full_like(y_test, majority))}]
    for name in FEATURE_SETS:
        model = HistGradientBoostingClassifier(random_state=cfg.run.seed)
        # run.num_threads caps OpenMP too: on a shared 2-core machine one thread fits 4x faster than oversubscribed
        with threadpool_limits(limits=cfg.run.num_threads or None):
            model.fit(np.concatenate(train_x[name]), y_train)
            predicted = model.predict(np.concatenate(test_x[name]))
        rows.append({"model": "gradient-boosted trees", "features": name,
                     "accuracy": float((predicted == y_test).mean()), "macro_f1": macro_f1(y_test, predicted)})
    result = {"label_source": uc.label_source, "phase_grouping": uc.phase_grouping, "test_windows": len(y_test),
              "train_rows": len(y_train), "test_experiments": list(uc.test_experiments), "rows": rows}
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "baseline_umich.json", result)
    table = markdown_table(["model", "features", "accuracy", "macro F1"],
                           [[r["model"], r["features"], r["accuracy"], r["macro_f1"]] for r in rows])
    atomic_write_text(reports / "baseline_umich.md", table)
    print(table)
    return 0


main = config_main(CncConfig, baseline_umich, __doc__, prog="python -m cnc_gcode.baseline_umich")

if __name__ == "__main__":
    raise SystemExit(main())
