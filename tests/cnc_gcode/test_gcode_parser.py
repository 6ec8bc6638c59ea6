"""G-code parser: comments, N-numbers, modal state, and counted reasons for unsupported syntax."""

from __future__ import annotations

import pytest

from cnc_gcode.gcode import (
    REASON_EXPRESSION,
    REASON_OWORD,
    REASON_PARAMETER,
    REASON_REPEATED,
    ParseReport,
    parse_program,
)


def test_comments_line_numbers_and_codes_are_normalised():
    lines = parse_program("%\nN010 G00 X1.5 Y-2 (rapid) ; tail\n( only a comment )\nN020 M03 S4000")
    assert lines[0].is_empty and lines[2].is_empty
    rapid = lines[1]
    assert rapid.codes == ("G0",) and rapid.params == {"X": 1.5, "Y": -2.0} and rapid.line_number == 10
    assert rapid.motion == "G0" and not rapid.carried
    assert lines[3].codes == ("M3",) and lines[3].params == {"S": 4000.0}


def test_modal_motion_is_carried_and_cancelled():
    lines = parse_program("G1 X1 F100\nY2\nF200\nG80\nX3")
    assert lines[1].motion == "G1" and lines[1].carried
    assert lines[2].motion is None  # feed only: no axis words, nothing moves
    assert lines[4].motion is None  # G80 cancelled the modal motion


def test_modal_groups_take_effect_on_their_own_line():
    lines = parse_program("G20 G91 G18\nG1 X1\nG21 G90\nX2")
    assert (lines[1].units, lines[1].distance, lines[1].plane) == ("G20", "G91", "G18")
    assert (lines[3].units, lines[3].distance) == ("G21", "G90")


@pytest.mark.parametrize("text, reason", [
    ("o100 sub", REASON_OWORD),
    ("N5 O<probe> call", REASON_OWORD),
    ("G1 X#1", REASON_PARAMETER),
    ("#<depth> = 2", REASON_PARAMETER),
    ("G1 X[1 + 2]", REASON_EXPRESSION),
    ("G1 X1 X2", REASON_REPEATED),
    ("G1 G0 X1", "two motion codes on one line"),
    ("G1 X1 (open comment", "unclosed ( comment"),
    ("G1 X1 ?", "malformed word"),
])
def test_unsupported_lines_get_a_reason_and_do_not_change_state(text, reason):
    lines = parse_program(f"G1 X0\n{text}\nY1")
    assert lines[1].error == reason
    assert lines[2].motion == "G1"  # the bad line did not disturb the modal state
    report = ParseReport()
    for line in lines:
        report.add(line)
    assert report.unsupported == {reason: 1} and report.executable == 2


def test_garbage_never_raises_and_each_line_gets_its_reason():
    garbage = "\x00\x01G1 X\n]]]\n((()\n\u00e9t\u00e9 G1\nG1 X1e5\n;;;\nN\n" + "G" * 1000
    lines = parse_program(garbage)
    assert [line.error for line in lines] == ["malformed word", REASON_EXPRESSION, "unclosed ( comment",
                                              "non-ASCII characters", None, None, "malformed word", "malformed word"]
    assert all(not line.codes and not line.params for line in lines if line.error)  # refused lines carry nothing
    # `X1e5` is two words (X1, E5), as any letter+number is a word; `;;;` is a comment-only line
    assert lines[4].codes == ("G1",) and lines[4].params == {"X": 1.0, "E": 5.0} and lines[4].motion == "G1"
    assert lines[5].is_empty and not any(line.is_empty for line in lines[:5])
