"""G-code means what a controller would do: canned cycles, I/J/K arcs, the simulate stage, grammar of meaning.

Positions are hand-computed from LinuxCNC's rules (cycles: rapid XY at the current height, rapid to R, feed to Z,
retract to R with G99 or to the initial level with G98; G83 pecks back out to R and rapids down to 0.254 mm above
the last depth; arcs: centre = start + (I, J), G2 clockwise).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cnc_gcode import simulate
from cnc_gcode.decoding import Grammar, greedy_decode
from cnc_gcode.gcode import (
    REASON_ARC_CENTRE,
    REASON_ARC_MIXED,
    REASON_ARC_PLANE,
    REASON_CYCLE_PLANE,
    REASON_CYCLE_UNSUPPORTED,
    REASON_CYCLE_WORDS,
    REASON_POLAR,
    ModalState,
    parse_line,
    parse_program,
)
from cnc_gcode.tokenizer import EOS, TYPE_EOS, Vocabulary, decode_program, tokenize_text
from cnc_gcode.virtual_mill import MachineConfig, MachineError, execute

CFG = MachineConfig()


def waypoints(segment) -> list[tuple[float, float, float]]:
    """The end points of the moves a line made (consecutive distinct per-sample targets), checked to be reached."""
    target = np.broadcast_to(segment.target, segment.command_xyz.shape)
    change = np.flatnonzero(np.any(np.diff(target, axis=0) != 0, axis=1))
    ends = [*change.tolist(), len(target) - 1]
    for i in ends:  # each move ends exactly on its target before the next one starts
        np.testing.assert_allclose(segment.command_xyz[i], target[i], atol=1e-9)
    return [tuple(np.round(target[i], 9)) for i in ends]


def modes(segment) -> list[int]:
    mode = np.broadcast_to(segment.mode, len(segment.command_xyz))
    target = np.broadcast_to(segment.target, segment.command_xyz.shape)
    change = np.flatnonzero(np.any(np.diff(target, axis=0) != 0, axis=1))
    return [int(mode[i]) for i in [*change.tolist(), len(target) - 1]]


# ---------------------------------------------------------------------------------------------- arcs ----------
def test_g2_ij_quarter_circle_follows_the_circle_clockwise():
    segments, _ = execute(["G0 X10 Y0 Z0", "G2 X0 Y-10 I-10 J0 F600"], CFG)
    xyz = segments[1].command_xyz
    np.testing.assert_allclose(np.hypot(xyz[:, 0], xyz[:, 1]), 10.0, atol=1e-9)  # centre (10-10, 0+0)
    assert np.all(xyz[:, 0] >= -1e-9) and np.all(xyz[:, 1] <= 1e-9)  # only the clockwise quarter (IV)
    angle = np.arctan2(xyz[:, 1], xyz[:, 0])
    assert np.all(np.diff(angle) < 0)  # clockwise all the way
    np.testing.assert_allclose(xyz[-1], [0.0, -10.0, 0.0], atol=1e-12)
    # 5*pi mm at 10 mm/s, 800 mm/s^2: 2 * 0.0125 s + (15.708 - 0.125) / 10 s = 1.5833 s -> 80 samples of 20 ms
    assert len(xyz) == 80 and segments[1].mode == 2
    # sample 39 is t = 0.8 s, cruising: s = 0.5 * 800 * 0.0125^2 + 10 * (0.8 - 0.0125) = 7.9375 mm along the arc,
    # i.e. 0.79375 rad clockwise from (10, 0)
    np.testing.assert_allclose(xyz[39], [10 * math.cos(0.79375), -10 * math.sin(0.79375), 0.0], atol=1e-9)
    # at half the path length (by symmetry of the profile) the tool is at -45 degrees: (7.0711, -7.0711)
    path = np.vstack([[10.0, 0.0, 0.0], xyz])  # the samples start one step after the start point
    s = np.cumsum(np.r_[0, np.linalg.norm(np.diff(path, axis=0), axis=1)])
    half = np.interp(s[-1] / 2, s, np.r_[0.0, angle])
    assert half == pytest.approx(-math.pi / 4, abs=2e-3)


def test_g3_ending_at_its_start_is_a_full_circle_and_g18_arcs_turn_in_the_zx_plane():
    segments, _ = execute(["G0 X10 Y0 Z0", "G3 X10 Y0 I-10 F600"], CFG)  # end == start: a full circle
    xyz = segments[1].command_xyz
    np.testing.assert_allclose(np.hypot(xyz[:, 0], xyz[:, 1]), 10.0, atol=1e-9)
    assert xyz[:, 1].max() > 9.99 and xyz[:, 0].min() < -9.99 and xyz[:, 1].min() < -9.99  # all four quadrants
    np.testing.assert_allclose(xyz[-1], [10.0, 0.0, 0.0], atol=1e-9)
    assert len(xyz) == 315  # 20*pi mm: 0.025 s + (62.832 - 0.125) / 10 s = 6.2957 s
    # G18: plane axes (Z, X); from X0 Z0 with centre X10 Z0 (I10), G3 to X10 Z10 is the quarter through
    # (z, x) = (7.0711, 2.9289); G2 goes the long way, through z = -10.
    for code, z_min in (("G3", 0.0), ("G2", -10.0)):
        segments, _ = execute(["G0 X0 Y0 Z0", f"G18 {code} X10 Z10 I10 F600"], CFG)
        xyz = segments[1].command_xyz
        np.testing.assert_allclose(np.hypot(xyz[:, 2], xyz[:, 0] - 10.0), 10.0, atol=1e-9)
        assert np.all(xyz[:, 1] == 0.0)  # exact: Y is the arc's fixed axis, 0 + t * 0 stays 0
        if code == "G3":
            assert np.all(xyz[:, 2] >= -1e-9) and np.all(xyz[:, 0] <= 10 + 1e-9)
            assert np.linalg.norm(xyz[:, [2, 0]] - [7.0711, 2.9289], axis=1).min() < 0.11  # within half a step
        else:
            assert xyz[:, 2].min() == pytest.approx(z_min, abs=1e-3)
        np.testing.assert_allclose(xyz[-1], [10.0, 0.0, 10.0], atol=1e-12)


@pytest.mark.parametrize("text, reason", [
    ("G2 X1 Y1", REASON_ARC_CENTRE),
    ("G3 X1 I1 K2", REASON_ARC_PLANE),
    ("G2 X1 I1 R2", REASON_ARC_MIXED),
    ("G81 X1 Y1 Z-2", REASON_CYCLE_WORDS),
    ("G83 X1 Z-2 R1", REASON_CYCLE_WORDS),  # G83 needs Q
    ("G18 G81 X1 Z-2 R1", REASON_CYCLE_PLANE),
    ("G87 X1 Z-2 R1 I1 J1 K1", REASON_CYCLE_UNSUPPORTED),
])
def test_arcs_and_cycles_without_their_words_are_refused_with_a_reason(text, reason):
    lines = parse_program(f"G1 X0 F100\n{text}\nX3")
    assert lines[1].error == reason
    assert lines[2].motion == "G1" and lines[2].plane == "G17"  # the refused line changed no state


# ---------------------------------------------------------------------------------------------- cycles --------
def test_a_bare_xy_after_a_cycle_is_another_cycle_with_the_sticky_z_and_r():
    lines = parse_program("G0 Z5\nG81 X1 Y1 Z-2 R1 F100\nX5 Y5\nZ-3\nG80\nX6\nG1 X7\nG81 X8")
    assert lines[2].motion == "G81" and lines[2].carried
    assert {k: str(v) for k, v in lines[2].cycle_words.items()} == {"Z": "-2", "R": "1"}
    assert {k: str(v) for k, v in lines[3].cycle_words.items()} == {"Z": "-3", "R": "1"}  # a new Z sticks too
    assert lines[5].motion is None  # G80 cancelled the cycle
    assert lines[7].error == REASON_CYCLE_WORDS  # G1 in between: the sticky words are gone
    vocab = Vocabulary(commands=["G0", "G1", "G81", "G80"], letters=["F", "R", "X", "Y", "Z"], max_tokens=8)
    assert vocab.decode_line(vocab.encode_line(lines[2])) == "G81 X5 Y5 Z-2 R1"  # means the same alone
    decoded = parse_program(decode_program(vocab, [vocab.encode_line(line) for line in lines[:7]]))
    assert [(d.motion, d.cycle_words) for d in decoded] == [(s.motion, s.cycle_words) for s in lines[:7]]


def test_g81_cycles_retract_to_the_initial_level_with_g98_and_to_r_with_g99():
    program = ["G0 X0 Y0 Z10", "G98 G81 X1 Y1 Z-2 R1 F100", "X5 Y5", "G80", "G0 Z10",
               "G99 G81 X1 Y1 Z-2 R1", "X5 Y5"]
    segments, parsed = execute(program, CFG)
    assert parsed[2].motion == "G81" and parsed[6].motion == "G81"
    assert waypoints(segments[1]) == [(1, 1, 10), (1, 1, 1), (1, 1, -2), (1, 1, 10)]
    assert modes(segments[1]) == [0, 0, 1, 0]  # rapid, rapid, feed, rapid
    assert waypoints(segments[2]) == [(5, 5, 10), (5, 5, 1), (5, 5, -2), (5, 5, 10)]
    assert waypoints(segments[5]) == [(1, 1, 10), (1, 1, 1), (1, 1, -2), (1, 1, 1)]
    assert waypoints(segments[6]) == [(5, 5, 1), (5, 5, -2), (5, 5, 1)]  # moves over at the R plane
    assert segments[1].feed_mm_min == 100.0


@pytest.mark.parametrize("code, expected", [
    ("G83", [(2, 2, 5), (2, 2, 1), (2, 2, -0.2), (2, 2, 1), (2, 2, 0.054), (2, 2, -1.4), (2, 2, 1),
             (2, 2, -1.146), (2, 2, -2.6), (2, 2, 1), (2, 2, -2.346), (2, 2, -3), (2, 2, 1)]),
    ("G73", [(2, 2, 5), (2, 2, 1), (2, 2, -0.2), (2, 2, 0.054), (2, 2, -1.4), (2, 2, -1.146), (2, 2, -2.6),
             (2, 2, -2.346), (2, 2, -3), (2, 2, 1)]),
])
def test_peck_cycles_peck_by_q(code, expected):
    segments, _ = execute(["G0 X0 Y0 Z5", f"G99 {code} X2 Y2 Z-3 R1 Q1.2 F100"], CFG)
    np.testing.assert_allclose(waypoints(segments[1]), expected, atol=1e-9)


def test_incremental_cycle_with_repeats_and_a_dwell():
    segments, _ = execute(["G0 X0 Y0 Z5", "G91 G81 X2 Z-3 R-4 L3 F100"], CFG)
    # R is relative to the initial level 5 (-> 1), Z to R (-> -2), X steps 2 per repeat; G99 retracts to R
    assert waypoints(segments[1]) == [(2, 0, 5), (2, 0, 1), (2, 0, -2), (2, 0, 1), (4, 0, 1), (4, 0, -2),
                                      (4, 0, 1), (6, 0, 1), (6, 0, -2), (6, 0, 1)]
    segments, _ = execute(["G0 X0 Y0 Z5", "G82 X1 Y0 Z-1 R1 P0.5 F100"], CFG)
    xyz = segments[1].command_xyz
    at_bottom = np.flatnonzero(np.all(np.isclose(xyz, [1, 0, -1]), axis=1))
    assert len(at_bottom) == 25 + 1  # the dwell of 0.5 s = 25 samples, plus the sample arriving there


def test_the_machine_refuses_cycle_values_a_controller_refuses():
    with pytest.raises(ValueError, match="R below its Z"):
        execute(["G0 Z5", "G81 X1 Z2 R1"], CFG)
    segments, parsed = execute(["G0 Z5", "G83 X1 Z-2 R1 Q0", "G0 X3"], CFG, skip_unsupported=True)
    assert len(segments) == 2 and parsed[1].error is None  # the Q0 line is left out, the rest runs
    assert issubclass(MachineError, ValueError)


# ---------------------------------------------------------------------------------------------- grammar -------
MOTION_VOCAB = Vocabulary(commands=["G0", "G1", "G2", "G3", "G17", "G18", "G19", "G81", "G82", "G83", "G98"],
                          letters=["F", "R", "X", "Y", "Z", "I", "J", "K", "Q", "P"], max_tokens=7)


def _shapes(vocab):
    return {"type": (4,), "command": (vocab.n_commands,), "ptype": (vocab.n_param_types,),
            "exponent": (vocab.n_exponents,), "digits": (vocab.n_digits, 10)}


def test_decoder_never_emits_an_arc_or_cycle_without_its_words():
    vocab, batch = MOTION_VOCAB, 600
    rng = np.random.default_rng(0)
    wanted = [vocab.commands.index(c) for c in ("G2", "G3", "G81", "G82", "G83")]

    def step(previous, position):  # random heads that like arcs and cycles and want to stop early
        logits = {k: rng.normal(0, 3, (batch, *s)) for k, s in _shapes(vocab).items()}
        logits["command"][:, wanted] += 3
        logits["type"][:, TYPE_EOS] += 2
        return logits

    motions = {}
    for row in greedy_decode(step, vocab, batch):
        text = vocab.decode_line(row)
        line = parse_line(text, 1, ModalState())
        assert line.error is None, text
        assert tokenize_text(vocab, text) == row.tolist(), text
        motions[line.motion] = motions.get(line.motion, 0) + 1
        if line.motion in ("G2", "G3"):
            offsets = {"G17": "IJ", "G18": "IK", "G19": "JK"}[line.plane]
            assert ("R" in line.params) != any(k in line.params for k in offsets), text
        if line.motion in ("G81", "G82", "G83"):
            assert {"Z", "R"} <= set(line.params) and line.plane == "G17", text
    assert all(motions.get(code, 0) >= 50 for code in ("G2", "G3", "G81", "G82", "G83")), motions


def test_an_arc_that_wants_to_stop_early_gets_its_centre_first():
    vocab = Vocabulary(commands=["G0", "G1", "G2", "G3"], letters=["F", "R", "X", "Y", "Z", "I", "J"],
                       max_tokens=4)
    grammar = Grammar(vocab, 1)
    letter = {k: i for i, k in enumerate(vocab.letters)}

    def logits(kind_scores, command=None, ptype_order=()):
        head = {"type": np.array([kind_scores], dtype=float), "command": np.zeros((1, vocab.n_commands)),
                "ptype": np.zeros((1, vocab.n_param_types)), "exponent": np.zeros((1, 11)),
                "digits": np.zeros((1, vocab.n_digits, 10))}
        head["exponent"][0, 5] = 5.0  # 10^0
        head["digits"][0, 0, 2] = 5.0  # leading digit 2
        if command:
            head["command"][0, vocab.commands.index(command)] = 9.0
        for rank, k in enumerate(ptype_order):
            head["ptype"][0, 2 * letter[k]] = 9.0 - rank
        return head

    eos_first = [0, 9, 0, 5]  # EOS > PARAM > COMMAND
    ids = [grammar.choose(logits([0, 0, 9, 0], "G2"))[0],
           grammar.choose(logits(eos_first, ptype_order=("X",)))[0],
           grammar.choose(logits(eos_first, ptype_order=("F", "X", "R", "J")))[0],
           grammar.choose(logits(eos_first))[0]]
    # after G2 X2 only one position is left before EOS: F (after R) and X (used) cannot give the arc its centre
    assert vocab.decode_line(ids) == "G2 X2 R2" and ids[-1] == EOS
    assert grammar.done.all()


def test_a_vocabulary_without_centre_letters_never_decodes_an_arc():
    vocab = Vocabulary(commands=["G0", "G1", "G2", "G3"], letters=["F", "X", "Y", "Z"], max_tokens=7)
    rng = np.random.default_rng(1)

    def step(previous, position):
        logits = {k: rng.normal(0, 3, (64, *s)) for k, s in _shapes(vocab).items()}
        logits["command"][:, [2, 3]] += 20  # the model insists on G2/G3
        return logits

    texts = [vocab.decode_line(row) for row in greedy_decode(step, vocab, 64)]
    assert not any(t.startswith(("G2", "G3")) for t in texts) and all(
        parse_line(t, 1, ModalState()).error is None for t in texts)


# ---------------------------------------------------------------------------------------------- simulate ------
@pytest.mark.real_data
def test_simulate_stage_on_a_linuxcnc_program(real_data_dir, tmp_path):
    program = real_data_dir / "gcode_linuxcnc" / "polar.ngc"
    if not program.is_file():
        pytest.skip(f"{program} not present")
    out = tmp_path / "polar.npz"
    assert simulate.main(["--config", "configs/cnc_gcode/tiny.yaml", f"simulate.input={program}",
                          f"simulate.out={out}"]) == 0
    report = json.loads((tmp_path / "polar_report.json").read_text())
    # 21 lines: 10 blank/comment, 6 run (G20 G90, G0 X0 Y0 Z0, G0 X2.5 Y0, G81 R.1 Z-0.5 F60, G90 G0 X2 Y0, M2),
    # 4 with @ ^ polar words and one with a [ ] expression (which also holds ^)
    assert (report["lines"], report["empty"], report["executable"]) == (21, 10, 6)
    assert report["unsupported_by_reason"] == {REASON_POLAR: 4, "[ ] expression": 1}
    data = np.load(out)
    vocab = Vocabulary.load(tmp_path / "polar_vocab.json")
    assert str(data["vocab_digest"]) == vocab.digest() == report["vocab_digest"]
    assert data["continuous"].shape[1:] == (64, 27) and data["categorical"].shape[1:] == (64, 4)
    assert len(data["tokens"]) == report["windows"] == report["per_file"][str(program)]["windows"] > 0
    assert set(data["line_index"].tolist()) <= {3, 4, 7, 8, 16, 20}  # 0-based indices of the six lines that ran
    drill = np.flatnonzero(data["line_index"] == 8)
    assert len(drill) and vocab.decode_line(data["tokens"][drill[0]]) == "G20 G81 Z-0.5 R0.1 F60"
    assert (data["operation_type"][drill] == 5).all()  # drill
    # the cycle in inches: from (63.5, 0, 0) up to R (2.54 mm), feed to -12.7 mm, back to R (G99)
    segments, _ = execute(program.read_text().splitlines(), CFG, skip_unsupported=True)
    cycle = next(s for s in segments if s.line_index == 8)
    np.testing.assert_allclose(waypoints(cycle), [(63.5, 0, 2.54), (63.5, 0, -12.7), (63.5, 0, 2.54)], atol=1e-9)
    command_z = data["continuous"][drill][:, :, 5]  # command_z of windows ending in the cycle
    assert command_z.min() >= -12.7 - 1e-4 and command_z[:, -1].max() <= 2.54 + 1e-4


def test_simulate_stage_bad_input_exits_2_naming_file_and_line(tmp_path, capsys):
    program = tmp_path / "part.nc"
    program.write_text("G0 X0 Y0 Z5\nG1 X#1 F100\nG81 X1 Y1 Z-2 R1\n")
    args = ["--config", "configs/cnc_gcode/tiny.yaml", f"simulate.input={program}",
            f"simulate.out={tmp_path / 'o.npz'}"]
    assert simulate.main([*args, "simulate.on_unsupported=error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{program}:2: # parameter" in err
    assert not (tmp_path / "o.npz").exists()
    assert simulate.main([*args, "simulate.window=8"]) == 0
    report = json.loads((tmp_path / "o_report.json").read_text())
    assert report["unsupported_by_reason"] == {"# parameter": 1} and report["executable"] == 2
    assert simulate.main(["--config", "configs/cnc_gcode/tiny.yaml", f"simulate.input={tmp_path / 'none.nc'}"]) == 2
