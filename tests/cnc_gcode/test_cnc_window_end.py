"""Windows labelled with the line they complete (`window_end: completed`): where each window ends, which
line it is labelled with, that the streaming cutter of `simulate` agrees, and that the option is recorded and checked
as every other input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnc_gcode import sample_data, simulate
from cnc_gcode.virtual_mill import MachineConfig, WindowStream, execute, generate_program, record, windows

TINY = "configs/cnc_gcode/tiny.yaml"


def hand_log() -> dict:
    """Lines 3, 5, 6, 9 run for 7, 2, 6 and 4 samples (line 5 is shorter than a 4-sample window: its window reaches
    back into line 3); channel values are the sample index, so a window's rows say where it lies."""
    line_index = np.repeat([3, 5, 6, 9], [7, 2, 6, 4])
    n = len(line_index)
    return {"line_index": line_index, "continuous": np.arange(n, dtype=np.float32)[:, None].repeat(27, 1),
            "categorical": np.zeros((n, 4), np.int64)}


def test_completed_windows_end_on_each_lines_last_sample_with_that_line_as_label():
    log = hand_log()
    starts, labels = windows(log, 4, 2, 3, np.random.default_rng(0), "completed")
    # last samples: line 3 -> 6, line 5 -> 8, line 6 -> 14, line 9 -> 18; each window 4 samples long
    np.testing.assert_array_equal(starts + 3, [6, 8, 14, 18])
    np.testing.assert_array_equal(labels, [3, 5, 6, 9])
    for start, label in zip(starts, labels):
        assert log["line_index"][start + 3] == label and (start + 4 == len(log["line_index"])
                                                           or log["line_index"][start + 4] != label)
    # settle: the same lines, each window 2 samples later (the last one clipped at the log's end)
    starts2, labels2 = windows(log, 4, 2, 3, np.random.default_rng(0), "completed", settle=2)
    np.testing.assert_array_equal(starts2 + 3, [8, 10, 16, 18])
    np.testing.assert_array_equal(labels2, [3, 5, 6, 9])
    # the seed's labelling still ends windows mid-line, labelled with the executing line
    starts3, labels3 = windows(log, 4, 2, 10, np.random.default_rng(0), "executing")
    assert {3, 5, 7, 9}.issubset(set((starts3 + 3).tolist()))
    np.testing.assert_array_equal(labels3, log["line_index"][starts3 + 3])


@pytest.mark.parametrize("settle", [0, 2])
def test_window_stream_cuts_the_completed_windows_of_the_reference_function(settle):
    rng = np.random.default_rng(0)
    lines, ops = generate_program(rng, "pocket", n_ops=2)
    cfg = MachineConfig()
    log = record(execute(lines, cfg)[0], ops, cfg, np.random.default_rng(1))
    starts, labels = windows(log, 32, 8, 2, np.random.default_rng(5), "completed", settle)
    assert len(labels) == len(np.unique(labels)) > 10  # one window per line
    n = len(log["line_index"])
    for piece in (1, 3, 50, n):
        stream, got_cont, got_labels = WindowStream(32, 8, 2, np.random.default_rng(5), "completed", settle), [], []
        for begin in range(0, n, piece):
            part = {k: log[k][begin:begin + piece] for k in ("continuous", "categorical", "line_index")}
            cont, _, labels_part = stream.push(part, final=begin + piece >= n)
            got_cont.append(cont)
            got_labels.append(labels_part)
        np.testing.assert_array_equal(np.concatenate(got_labels), labels)
        np.testing.assert_array_equal(np.concatenate(got_cont), log["continuous"][starts[:, None] + np.arange(32)])


def test_completed_windows_see_the_end_point_their_target_names(tmp_path):
    """With settle 2 (the servo delay of the simulated actual position) the window's last measured position is the
    line's end point: the commanded position 2 samples earlier, noise 0.002 mm. Without settle it still trails."""
    rng = np.random.default_rng(3)
    lines, ops = generate_program(rng, "contour", n_ops=2)
    cfg = MachineConfig()
    segments = execute(lines, cfg)[0]
    log = record(segments, ops, cfg, np.random.default_rng(1))
    command = log["continuous"][:, 3:6]  # command_x/y/z: where each line's motion ends at its last sample
    moved = []
    for settle in (0, 2):
        starts, labels = windows(log, 16, 4, 2, np.random.default_rng(0), "completed", settle)
        last_of_line = np.array([np.flatnonzero(log["line_index"] == line)[-1] for line in labels])
        gap = np.abs(log["continuous"][starts + 15, 0:3] - command[last_of_line]).max(1)
        moved.append(gap)
    assert np.median(moved[1]) < 0.02 and np.quantile(moved[1], 0.9) < 0.1  # measured 0.002 mm noise
    assert np.median(moved[0]) > 5 * np.median(moved[1])


def test_sample_data_records_the_window_end_and_checks_it(tmp_path, capsys):
    manifest = sample_data.make_dataset(tmp_path / "c", n_programs=3, window=32, stride=16,
                                        window_end="completed", settle=2)
    assert manifest["window_end"] == "completed" and manifest["settle_samples"] == 2
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["window_end"] == "completed"
    with np.load(tmp_path / "c" / "train.npz") as data:
        keys = list(zip(data["program_id"].tolist(), data["line_index"].tolist()))
    assert len(keys) == len(set(keys)) > 0  # one window per (program, line)
    assert sample_data.main([str(tmp_path / "e"), "--programs", "3", "--window", "32"]) == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["window_end"] == "executing"  # the default
    capsys.readouterr()
    assert sample_data.main([str(tmp_path / "bad"), "--programs", "3", "--window-end", "finished"]) == 2
    err = capsys.readouterr().err
    assert "--window-end" in err and "completed" in err and len(err.strip().splitlines()) == 1
    assert sample_data.main([str(tmp_path / "bad"), "--programs", "3", "--settle-samples", "2"]) == 2
    assert "--settle-samples" in capsys.readouterr().err


def test_simulate_takes_the_window_end_and_rejects_a_bad_one(tmp_path, capsys):
    program = tmp_path / "part.nc"
    program.write_text("G21 G90\nG0 X0 Y0 Z5\nG1 Z-1 F300\nG1 X20 F600\nG1 Y15\nG1 X0\nG1 Y0\nG0 Z5\nM30\n")
    out = tmp_path / "part.npz"
    assert simulate.main(["--config", TINY, f"simulate.input={program}", f"simulate.out={out}", "simulate.window=16",
                          "simulate.window_end=completed", "simulate.settle_samples=2"]) == 0
    report = json.loads((tmp_path / "part_report.json").read_text())
    assert report["window_end"] == "completed" and report["settle_samples"] == 2
    with np.load(out) as data:
        lines = data["line_index"].tolist()
    assert lines == sorted(set(lines)) and {3, 4, 5, 6}.issubset(lines)  # each moving line once (0-based lines)
    capsys.readouterr()
    assert simulate.main(["--config", TINY, f"simulate.input={program}", f"simulate.out={out}",
                          "simulate.window_end=finished"]) == 2
    err = capsys.readouterr().err
    assert "simulate.window_end" in err and len(err.strip().splitlines()) == 1


def test_measured_only_reports_how_its_windows_were_labelled(tmp_path):
    from studies.cnc_gcode.measured_only import labelling

    sample_data.make_dataset(tmp_path / "c", n_programs=3, window=32, window_end="completed", settle=1)
    assert labelling(str(tmp_path / "c" / "train.npz")) == {"window_end": "completed", "settle_samples": 1}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"n_programs": 3}))  # written before the option
    assert labelling(str(tmp_path / "old" / "train.npz"))["window_end"] == "executing"
    assert labelling(str(tmp_path / "none" / "train.npz"))["window_end"] == "unknown"


def test_plateau_speed_reads_the_cruise_feed_and_the_error_breakdown_adds_up():
    from cnc_gcode.data import Windows
    from cnc_gcode.tokenizer import Vocabulary
    from studies.cnc_gcode.measured_only import error_breakdown, plateau_speed

    # one window: a rapid at 3000 mm/min, a stop, then a feed move ramping to 600 mm/min, cruising, stopping
    speed = np.concatenate([np.full(10, 3000.0), np.linspace(3000, 0, 6), np.linspace(0, 600, 8), np.full(30, 600.0),
                            np.linspace(600, 0, 8), [0.0, 40.0]])
    cont = np.zeros((1, len(speed), 3), np.float32)
    cont[0, :, 0] = speed / 60.0 * 0.6  # mm/s split over x and y: path speed = speed
    cont[0, :, 1] = speed / 60.0 * 0.8
    windows = Windows(cont, np.zeros((1, len(speed), 0), np.int64), None, None,
                      ["velocity_x", "velocity_y", "velocity_z"], {})
    assert abs(plateau_speed(windows)[0] - 600.0) < 600.0 * 1e-4  # the feed plateau, not the rapid nor the stop

    vocab = Vocabulary()
    target = np.asarray([vocab.encode_line(parse) for parse in _lines(["G1 X10.5 Y2 F600", "G0 Z5"])])
    predicted = target.copy()
    predicted[0, 1] = vocab.encode_line(_lines(["G1 X10.55 Y2 F600"])[0])[1]  # within 0.1 mm: right
    predicted[1, 0] = vocab.encode_line(_lines(["G1 Z5 F100"])[0])[0]  # wrong command
    groups = error_breakdown(vocab, predicted, target)
    assert groups["command"]["right_tol"] == 0.5 and groups["command"]["share_of_wrong"] == 1.0
    assert groups["xyz"]["right_tol"] == 1.0 and groups["f"]["right_tol"] == 1.0
    assert sum(g["tokens"] for g in groups.values()) == int((target != 0).sum())



def _lines(texts):
    """Each text parsed on its own from the start state (modal words written out in full)."""
    from cnc_gcode.gcode import parse_program

    return [parse_program(text)[0] for text in texts]
