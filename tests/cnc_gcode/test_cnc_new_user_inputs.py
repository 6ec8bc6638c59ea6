"""What a new user met first: a CAM program saved as .txt, G92 after a G0 line, 4-axis
programs and long programs in `simulate`, and torch threads from the CPUs a process may use."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from cnc_gcode import build_vocab, simulate
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.gcode import REASON_AXIS_CLAIM, parse_program
from cnc_gcode.tokenizer import Vocabulary, decode_program
from cnc_gcode.virtual_mill import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    REASON_ROTARY,
    MachineConfig,
    SensorStream,
    WindowStream,
    execute,
    generate_program,
    record,
    windows,
)
from common import threads

TINY = "configs/cnc_gcode/tiny.yaml"
# The head of a Carbide Create (Shapeoko) post: what such a .txt holds.
SHAPEOKO = """(Design File: bracket.c2d)
(stockMin:0.00mm, 0.00mm, -12.70mm)
G90
G21
M3 S10000
G0 Z5.000
G0 X10.000 Y10.000
G1 Z-1.000 F300.0
G1 X40.000 Y10.000 F900.0
G1 X40.000 Y30.000
G0 Z5.000
M5
M30
"""


def test_build_vocab_reads_a_cam_program_saved_as_txt_and_logs_every_skipped_file(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "shapeoko.txt").write_text(SHAPEOKO)
    (corpus / "part.GC").write_text("G0 X1 Y1\nG1 Z-1 F100\n")
    (corpus / "PROVENANCE.txt").write_text("Source: a repository\nLicense: GPL-3.0, files copied as they are\n")
    (corpus / "README.md").write_text("# programs\n")
    (corpus / "photo.png").write_bytes(b"\x89PNG\r\n")
    out = tmp_path / "vocab.json"
    with caplog.at_level(logging.INFO):
        assert build_vocab.main([f"build_vocab.corpus=[{corpus}]", f"build_vocab.out={out}"]) == 0
    report = json.loads((tmp_path / "vocab_report.json").read_text())
    assert report["files"] == 2 and report["parse"]["executable"] == 11 + 2
    skipped = {name.rsplit("/", 1)[-1]: reason for name, reason in report["skipped_files"].items()}
    assert set(skipped) == {"PROVENANCE.txt", "README.md", "photo.png"}
    assert "does not read as G-code (0 of 2 non-blank lines parse" in skipped["PROVENANCE.txt"]
    assert skipped["README.md"].startswith("suffix '.md' is not a G-code suffix")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(logged) == 3 and all(any(name in m for m in logged) for name in skipped)


def test_simulate_takes_the_same_files_from_a_folder(tmp_path):
    (tmp_path / "shapeoko.txt").write_text(SHAPEOKO)
    (tmp_path / "notes.txt").write_text("cut the bracket twice\n")
    out = tmp_path / "o.npz"
    assert simulate.main(["--config", TINY, f"simulate.input={tmp_path}", f"simulate.out={out}",
                          "simulate.window=8"]) == 0
    report = json.loads((tmp_path / "o_report.json").read_text())
    assert list(report["per_file"]) == [str(tmp_path / "shapeoko.txt")] and report["executable"] == 11


def test_axis_words_of_g92_g28_g10_are_theirs_never_the_modal_motions():
    lines = parse_program("G0 X1\nG92 A0\nX2\nG28 Z0\nG10 L20 P1 X0\nG53 X0\nG4 P1\nG1 G92 X1\nG1 X3 F100")
    g92, after, g28, g10, g53, dwell, both, feed = lines[1:]
    assert (g92.motion, g92.carried, g92.moves) == (None, False, False)
    assert (after.motion, after.carried) == ("G0", True)  # the modal G0 is still in force after the G92 line
    assert g28.motion is None and g10.motion is None
    assert (g53.motion, g53.carried) == ("G0", True)  # G53 modifies the line's G0/G1 (LinuxCNC), written or modal
    assert dwell.motion is None and both.error == REASON_AXIS_CLAIM and feed.motion == "G1"
    vocab = Vocabulary(commands=["G0", "G1", "G10", "G28", "G92", "NONE"], letters=["A", "L", "P", "X", "Z", "F"])
    assert vocab.decode_line(vocab.encode_line(g92)) == "G92 A0"
    assert vocab.decode_line(vocab.encode_line(after)) == "G0 X2"
    assert vocab.decode_line(vocab.encode_line(g28)) == "G28 Z0"
    rows = [vocab.encode_line(line) for line in lines[:5]]
    assert decode_program(vocab, rows).splitlines() == ["G0 X1", "G92 A0", "G0 X2", "G28 Z0", "G10 X0 P1 L20"]


FOUR_AXIS = "G21 G90\nG0 X0 Y0 Z5 A0\nG1 Z-1 F200\nG1 X10 A90\nG0 A180\nG1 Y5 A0\nG91 G1 A0 X1\nM30\n"


def test_rotary_moves_are_counted_as_unsupported_with_the_reason(tmp_path, capsys):
    program = tmp_path / "four_axis.nc"
    program.write_text(FOUR_AXIS)
    args = ["--config", TINY, f"simulate.input={program}", f"simulate.out={tmp_path / 'o.npz'}", "simulate.window=8"]
    assert simulate.main(args) == 0
    report = json.loads((tmp_path / "o_report.json").read_text())
    # A0 where A already is (0) moves nothing and runs; A90 and A180 would turn the part
    assert report["unsupported_by_reason"] == {REASON_ROTARY: 2} and report["executable"] == 6
    assert report["per_file"][str(program)]["simulated_lines"] == 6
    data = np.load(tmp_path / "o.npz")
    assert not {3, 4} & set(data["line_index"].tolist())
    capsys.readouterr()
    assert simulate.main([*args, "simulate.on_unsupported=error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{program}:4: {REASON_ROTARY}" in err


def long_program(tmp_path, seed: int = 4):
    rng = np.random.default_rng(seed)
    lines = ["G21 G90 G17", "S9000 M3", "M8"]
    for kind in ("pocket", "contour", "drill", "slot"):
        lines += generate_program(rng, kind, n_ops=2)[0][:-1]
    path = tmp_path / "long.nc"
    path.write_text("\n".join([*lines, "M30"]) + "\n")
    return path


@pytest.mark.parametrize("chunk", [37, 400])
def test_simulate_in_chunks_writes_what_the_whole_program_at_once_writes(tmp_path, chunk):
    program = long_program(tmp_path)
    outputs = {}
    for name, samples in (("whole", 0), ("chunked", chunk)):
        out = tmp_path / f"{name}.npz"
        assert simulate.main(["--config", TINY, f"simulate.input={program}", f"simulate.out={out}",
                              f"simulate.chunk_samples={samples}", "simulate.max_per_line=2"]) == 0
        with np.load(out) as data:
            outputs[name] = {k: data[k] for k in data.files}
    whole, chunked = outputs["whole"], outputs["chunked"]
    report = json.loads((tmp_path / "chunked_report.json").read_text())
    assert report["per_file"][str(program)]["samples"] > 10 * chunk  # many chunk boundaries, lines across them
    assert len(whole["tokens"]) > 100 and sorted(whole) == sorted(chunked)
    for key in whole:  # bit for bit: the chunk boundaries change nothing
        assert whole[key].dtype == chunked[key].dtype and np.array_equal(whole[key], chunked[key]), key
    assert not list(tmp_path.glob(".chunked.npz.*"))  # the temporary parts are gone


def test_window_stream_cuts_the_windows_of_the_reference_function():
    """WindowStream, fed a log in pieces of any size, picks the windows `windows` picks with the same seed."""
    rng = np.random.default_rng(0)
    lines, ops = generate_program(rng, "contour", n_ops=3)
    cfg = MachineConfig()
    log = record(execute(lines, cfg)[0], ops, cfg, np.random.default_rng(1))
    starts, labels = windows(log, 32, 8, 2, np.random.default_rng(5))
    for piece in (1, 50, len(log["line_index"])):
        stream, got_cont, got_labels = WindowStream(32, 8, 2, np.random.default_rng(5)), [], []
        for begin in range(0, len(log["line_index"]), piece):
            part = {k: log[k][begin:begin + piece] for k in ("continuous", "categorical", "line_index")}
            cont, _, labels_part = stream.push(part, final=begin + piece >= len(log["line_index"]))
            got_cont.append(cont)
            got_labels.append(labels_part)
            assert len(stream.rows["line_index"]) <= 32 - 1 + np.bincount(log["line_index"]).max() + piece
        np.testing.assert_array_equal(np.concatenate(got_labels), labels)
        np.testing.assert_array_equal(np.concatenate(got_cont), log["continuous"][starts[:, None] + np.arange(32)])


def test_sensor_stream_keeps_only_its_context_between_chunks():
    cfg = MachineConfig()
    segments = execute(generate_program(np.random.default_rng(2), "pocket", n_ops=2)[0], cfg)[0]
    for segment in segments:
        segment.spindle_rpm, segment.coolant = 8000.0, 2
    stream = SensorStream(cfg, np.random.default_rng(0))
    emitted = 0
    for segment in segments:
        part = stream.push([segment])
        emitted += 0 if part is None else len(part["line_index"])
        assert len(stream.buffer["cmd"]) <= CONTEXT_BEFORE + CONTEXT_AFTER
    emitted += len(stream.push([], final=True)["line_index"])
    assert emitted == sum(len(s.command_xyz) for s in segments)


def test_thread_count_follows_the_cpus_the_process_may_use(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(quota) == 2
    quota.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(quota) is None and threads.cgroup_cpu_limit(tmp_path / "none") is None
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.available_cpus() == 6 and threads.thread_count() == 6 and threads.thread_count(cap=4) == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert threads.available_cpus() == 2 and threads.thread_count() == 2
    assert threads.thread_count(requested=5) == 5  # the config says otherwise: it wins
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.thread_count() == 3 and threads.thread_count(requested=4) == 4  # so does the environment
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1)
    assert threads.available_cpus() == 1


def test_cnc_stages_take_one_thread_unless_the_config_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert set_threads(CncConfig()) == 1 and torch.get_num_threads() == 1
        cfg = CncConfig()
        cfg.run.num_threads = 2
        assert set_threads(cfg) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
