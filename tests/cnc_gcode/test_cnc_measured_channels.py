"""G-code from physical signals: input-group selection, off-grid sample programs, learning from measured channels."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import numpy as np
import pytest
from learning_seed import seed_args
from safetensors.numpy import load_file

from cnc_gcode import evaluate, train_decoder, train_encoder
from cnc_gcode.data import load_windows, select_groups
from cnc_gcode.virtual_mill import (
    CATEGORICAL_CHANNELS,
    CHANNELS,
    CUTTING_OPS,
    INPUT_GROUPS,
    MEASURED_GROUPS,
    OPERATIONS,
    MachineConfig,
    execute,
    generate_program,
    record,
)
from common.checkpoint import read_meta
from studies.cnc_gcode import ablation_gamma, measured_only

SELECTED = ["measured_motion", "drives"]


def test_every_channel_is_in_exactly_one_input_group():
    members = [c for names in INPUT_GROUPS.values() for c in names]
    assert sorted(members) == sorted(CHANNELS + CATEGORICAL_CHANNELS)
    assert "commanded" not in MEASURED_GROUPS and set(MEASURED_GROUPS) | {"commanded"} == set(INPUT_GROUPS)
    # the setpoints that state the answer are all in `commanded`
    assert {"command_x", "dtg_x", "feed_command", "spindle_command", "motion_mode"} <= set(INPUT_GROUPS["commanded"])


def test_select_groups_keeps_their_channels_and_silences_other_categoricals(sample_dir):
    full = load_windows(sample_dir / "test.npz")
    assert set(full.groups) == set(INPUT_GROUPS)  # recorded in the NPZ itself
    picked = select_groups(full, SELECTED)
    expected = [c for c in CHANNELS if c in INPUT_GROUPS["measured_motion"] + INPUT_GROUPS["drives"]]
    assert picked.channel_names == expected and picked.continuous.shape[2] == 13
    # bit-exact: selecting channels copies values, it computes nothing
    assert np.array_equal(picked.continuous, full.continuous[..., [CHANNELS.index(c) for c in expected]])
    cat = list(CATEGORICAL_CHANNELS)
    # motion_mode (commanded), spindle_state (spindle), coolant (process) are held at 0; motion_phase is kept
    for name in ("motion_mode", "spindle_state", "coolant"):
        assert full.categorical[..., cat.index(name)].any() and not picked.categorical[..., cat.index(name)].any()
    assert np.array_equal(picked.categorical[..., cat.index("motion_phase")],
                          full.categorical[..., cat.index("motion_phase")])
    assert picked.groups_used == SELECTED and select_groups(full, []) is full


def test_model_width_and_stored_channels_follow_the_groups(sample_dir, tmp_path, stage_args):
    args = stage_args(sample_dir, tmp_path, "g", "encoder_train.epochs=1", "data.max_train_windows=64",
                      "run.num_threads=1", f"data.channel_groups=[{','.join(SELECTED)}]")
    assert train_encoder.main(args) == 0
    best = tmp_path / "g" / "encoder" / "checkpoints" / "best"
    meta = read_meta(best)
    expected = [c for c in CHANNELS if c in INPUT_GROUPS["measured_motion"] + INPUT_GROUPS["drives"]]
    assert meta["continuous_dim"] == 13 and meta["channel_names"] == expected and meta["channel_groups"] == SELECTED
    weights = load_file(str(best / "model.safetensors"))
    assert weights["continuous_proj.0.weight"].shape[1] == 13 and weights["channel_mean"].shape == (13,)
    report = json.loads((tmp_path / "g" / "reports" / "encoder_results_test.json").read_text())
    assert report["channel_groups"] == SELECTED and report["channels"] == expected


def test_unknown_group_exits_2_naming_it_and_the_known_groups(sample_dir, tmp_path, stage_args, capsys):
    args = stage_args(sample_dir, tmp_path, "u", "data.channel_groups=[measured_motion,torque_sensor]")
    assert train_encoder.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.channel_groups" in err and "'torque_sensor'" in err
    assert all(group in err for group in INPUT_GROUPS), err
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").rglob("*.safetensors"))


def _program_values(grid_mm: float) -> dict[str, list[Decimal]]:
    values: dict[str, list[Decimal]] = {"XY": [], "F": []}
    for seed in range(8):
        for kind in CUTTING_OPS:
            lines, _ = generate_program(np.random.default_rng([seed, len(kind)]), kind, grid_mm=grid_mm)
            for line in lines:
                for letter, number in re.findall(r"([XYF])(-?[\d.]+)", line):
                    values["F" if letter == "F" else "XY"].append(Decimal(number))
    return values


def on_grid(values: list[Decimal], step: str) -> float:
    return float(np.mean([v % Decimal(step) == 0 for v in values]))


def test_sample_programs_are_off_grid_with_continuous_feeds():
    values = _program_values(grid_mm=0.0)  # the default
    assert len(values["XY"]) > 500 and len(values["F"]) > 500
    # a 5 mm (or any 0.5 mm) grid generator puts every coordinate on 0.5 mm; continuous values are there 1 time in
    # 500, and the programs' final return to X0 Y0 adds ~5 % (measured 5.5 %)
    assert on_grid(values["XY"], "0.5") < 0.1
    assert on_grid([v for v in values["XY"] if v != 0], "0.5") < 0.01
    assert on_grid(values["XY"], "0.001") == 1.0  # written with at most 3 decimals
    assert np.mean([-v.as_tuple().exponent == 3 for v in values["XY"]]) > 0.5  # mostly all 3 of them
    assert on_grid(values["F"], "10") < 0.2 and len(set(values["F"])) > 100
    # the statistic separates: the earlier grid generator (still available as grid_mm=5) fails it
    grid = _program_values(grid_mm=5.0)
    assert on_grid(grid["XY"], "0.5") == 1.0 and on_grid(grid["F"], "50") == 1.0  # slot plunges at F/2


def test_spindle_speed_does_not_name_the_operation():
    """Each cutting operation draws its speed from one shared range: the same operation runs at many speeds, and
    different operations overlap, so spindle speed alone cannot tell the operation (it could with one speed each)."""
    speeds: dict[int, list[float]] = {}
    for seed in range(12):
        rng = np.random.default_rng(seed)
        lines, ops = generate_program(rng, CUTTING_OPS[seed % len(CUTTING_OPS)], n_ops=3)
        segments, _ = execute(lines, MachineConfig())
        log = record(segments, ops, MachineConfig(), rng)
        rpm = log["continuous"][:, CHANNELS.index("spindle_command")]
        for op in np.unique(log["operation"]):
            cutting = (log["operation"] == op) & (rpm > 0)
            speeds.setdefault(int(op), []).extend(np.unique(rpm[cutting]).tolist())
    cut_ids = [OPERATIONS.index(o) for o in CUTTING_OPS]
    spread = [np.ptp(speeds[i]) for i in cut_ids if len(speeds.get(i, [])) >= 2]
    assert len(spread) >= 4 and min(spread) > 1000  # one operation, speeds thousands of rpm apart
    ranges = [(min(speeds[i]), max(speeds[i])) for i in cut_ids if len(speeds.get(i, [])) >= 2]
    overlaps = sum(a[0] < b[1] and b[0] < a[1] for k, a in enumerate(ranges) for b in ranges[k + 1:])
    assert overlaps >= len(ranges)  # operations share speeds


@pytest.fixture(scope="module")
def measured_run(sample_dir, tmp_path_factory, stage_args, learning_seed):
    """Encoder + decoder trained on the measured groups only (no commanded channels) on the session sample data."""
    runs = tmp_path_factory.mktemp("cnc_measured")
    args = stage_args(sample_dir, runs, "m", "encoder_train.epochs=3", "train.epochs=8", "train.patience=8",
                      "run.num_threads=1", f"data.channel_groups=[{','.join(MEASURED_GROUPS)}]",
                      *seed_args("run.seed", learning_seed))
    assert train_encoder.main(args) == 0
    assert train_decoder.main(args) == 0
    return runs, args


@pytest.mark.learning
def test_learns_gcode_from_measured_channels_only(measured_run):
    runs, args = measured_run
    assert evaluate.main(args) == 0
    results = json.loads((runs / "m" / "reports" / "results_test.json").read_text())
    assert results["channel_groups"] == list(MEASURED_GROUPS)
    assert not {c for c in results["channels"]} & set(INPUT_GROUPS["commanded"])
    # measured, own seed / 1 / 2 / 3 (OMP_NUM_THREADS=1): token 0.423 / 0.396 / 0.412 / 0.460 vs majority-per-position
    # 0.252; operation 0.602 / 0.515 / 0.631 / 0.631 vs majority 0.0 (the training majority is absent from this test
    # split; chance about 0.11, the test split's most frequent class 0.398)
    assert results["token_acc"] > results["majority_token_acc"] + 0.07, results
    assert results["operation_acc"] > max(0.45, results["majority_operation_acc"] + 0.3), results


def test_nearest_neighbour_baseline_returns_the_nearest_training_window(sample_dir):
    train_w = select_groups(load_windows(sample_dir / "train.npz"), list(MEASURED_GROUPS))
    test_w = train_w.subset(np.arange(0, len(train_w), 7))
    ops, tokens = measured_only.knn_baseline(train_w, test_w, 1)
    assert np.array_equal(tokens, test_w.tokens) and np.array_equal(ops, test_w.operation_type)
    # a slightly perturbed window still finds its source; k=3 votes over token rows
    noisy = test_w.subset(np.arange(len(test_w)))
    noisy.continuous = noisy.continuous + np.random.default_rng(0).normal(0, 1e-3, noisy.continuous.shape).astype(
        np.float32) * noisy.continuous.std((0, 1))
    assert np.mean(np.all(measured_only.knn_baseline(train_w, noisy, 1)[1] == test_w.tokens, axis=1)) > 0.95
    assert measured_only.knn_baseline(train_w, test_w, 3)[1].shape == test_w.tokens.shape


def test_gamma_ablation_repeats_each_row_per_seed_and_reports_mean_and_spread(trained_run):
    runs, args = trained_run
    assert ablation_gamma.main([*args, "ablation.gammas=[2]", "ablation.seeds=[0,1]", "ablation.epochs=1",
                                "eval.max_windows=40"]) == 0
    (row,) = json.loads((runs / "t" / "reports" / "ablation_gamma.json").read_text())
    per_seed = row["per_seed"]
    assert [s["seed"] for s in per_seed] == [0, 1] and row["seeds"] == [0, 1]
    values = [s["token_acc"] for s in per_seed]
    assert row["token_acc"] == pytest.approx(np.mean(values))
    assert row["token_acc_std"] == pytest.approx(np.std(values, ddof=1))
    # one decoder per seed, each its own weights (exact inequality: one shared run would give identical arrays)
    first, second = (load_file(str(runs / "t" / "ablations" / f"gamma_2.0_seed{s}" / "decoder" / "checkpoints" /
                                   "latest" / "model.safetensors")) for s in (0, 1))
    assert not all(np.array_equal(first[k], second[k]) for k in first)
    table = (runs / "t" / "reports" / "ablation_gamma.md").read_text()
    assert "mean ± std over seeds [0, 1]" in table and " ± " in table.splitlines()[-1]
