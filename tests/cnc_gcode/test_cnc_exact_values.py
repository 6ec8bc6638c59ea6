"""Values survive exactly (as decimals), and a decoded line or program means the same motion as its source."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from cnc_gcode.build_vocab import corpus_files, scan
from cnc_gcode.gcode import REASON_NON_ASCII, ModalState, parse_line, parse_program, read_program
from cnc_gcode.tokenizer import (
    REASON_H_CONFLICT,
    TokenizeError,
    Vocabulary,
    decode_program,
    round_trips,
    tokenize_text,
)

# An independent reading of a line's words (no cnc_gcode code): letter -> the decimal as written.
_COMMENT = re.compile(r"\([^()]*\)|;.*$")
_WORD = re.compile(r"([A-Za-z])\s*([+-]?\s*(?:\d+\.?\d*|\.\d+))")


def written_values(text: str) -> dict[str, Decimal]:
    body = _COMMENT.sub(" ", text)
    return {letter.upper(): Decimal(number.replace(" ", "")) for letter, number in _WORD.findall(body)
            if letter.upper() not in "GMNO"}


CAM = Vocabulary(commands=["G0", "G1", "G2", "G3", "G17", "G18", "G20", "G21", "G43", "G49", "G90", "G91", "M3",
                           "NONE"], letters=list("XYZIJKRFSH"), max_tokens=14)


def test_a_non_ascii_comment_never_drops_the_command_before_it():
    feed = parse_line("F500.00000 ;\u00a0Defines feed rate", 1, ModalState())
    assert feed.error is None and feed.values == {"F": Decimal("500.00000")} and feed.params == {"F": 500.0}
    moved = parse_line("G1 X1.5 (caf\u00e9 \ufffd) Y-2", 1, ModalState())
    assert moved.error is None and moved.codes == ("G1",) and moved.values == {"X": Decimal("1.5"), "Y": Decimal(-2)}
    assert CAM.decode_line(CAM.encode_line(feed)) == "F500"
    # non-ASCII in the code itself is still refused, with its reason
    assert parse_line("G1 X\u00b71", 1, ModalState()).error == REASON_NON_ASCII


@pytest.mark.parametrize("line", ["G2 X3519.5012 Y-0.0001 I3519.5012 J-12.3456 F36128.0795",
                                  "G1 X-99999.9999 Y0.00001 Z12.34567 F0.5"])
def test_values_come_back_exactly_as_decimals(line):
    decoded = parse_line(CAM.decode_line(tokenize_text(CAM, line)), 1, ModalState())
    assert decoded.values == written_values(line)
    assert round_trips(CAM, parse_line(line, 1, ModalState()))


def test_the_seed_mode_keeps_its_four_digits_for_comparison():
    seed = Vocabulary.seed(commands=CAM.commands, letters=CAM.letters, max_tokens=14)
    assert seed.decode_line(tokenize_text(seed, "G2 X3519.5012 I3519.5012 Z198.54")) == "G2 X3520 Z198.5 I3520"
    # exactly representable in the exact mode, refused (not rounded) beyond its digits
    assert CAM.decode_line(tokenize_text(CAM, "G2 X3519.5012 I3519.5012 Z198.54")) == "G2 X3519.5012 Z198.54 I3519.5012"
    with pytest.raises(TokenizeError, match="significant digits"):
        tokenize_text(CAM, "G1 X46.5833333333333")


def test_modal_state_is_part_of_each_line_and_of_a_decoded_program():
    program = ("G20 G91\nG1 X1 F10\nY-0.25\nG18\nG43 H2\nG2 X1 Z0 I0.5 K0\nG21 G90 G17 G49\nG1 X3\nG0 Z5\n"
               "G20\nX0.125\n")
    lines = [line for line in parse_program(program) if not line.is_empty]
    rows = [CAM.encode_line(line) for line in lines]
    alone = [CAM.decode_line(row) for row in rows]
    # each decoded line says the state it runs in: inch, incremental, XZ plane, tool length H2
    assert alone[2] == "G20 G91 G1 Y-0.25"
    assert alone[5] == "G20 G91 G18 G43 G2 X1 Z0 I0.5 K0 H2"
    assert alone[7] == "G1 X3" and alone[10] == "G20 G0 X0.125"  # defaults need no words; G20 does
    assert all(round_trips(CAM, line) for line in lines)
    # as a program: every line runs in its source state, and where the running state differs from a row's (an
    # inch row, then a mm row) the decoded program switches back explicitly
    decoded = [line for line in parse_program(decode_program(CAM, rows)) if not line.is_empty]
    assert len(decoded) == len(lines)
    for source, again in zip(lines, decoded):
        assert again.modal_state == source.modal_state and again.motion == source.motion, again.text
        assert {k: again.values[k] for k in source.values} == source.values
    shuffled = decode_program(CAM, [rows[10], rows[7]])  # an inch line, then a mm absolute line
    assert shuffled.splitlines() == ["G20 G0 X0.125", "G21 G1 X3"]


def test_an_own_h_word_under_a_bare_g43_is_refused_not_misread():
    lines = parse_program("G43\nG1 X1 H3")
    with pytest.raises(TokenizeError, match=re.escape(REASON_H_CONFLICT)):
        CAM.encode_line(lines[1])


@pytest.mark.real_data
@pytest.mark.parametrize("corpus, refused", [("gcode_pygcode", 0), ("gcode_linuxcnc", 2)])
def test_every_supported_real_line_round_trips_with_exact_decimals(real_data_dir, corpus, refused):
    """Over the two third-party corpora: each accepted line decodes to a line whose words, read independently,
    equal the written values as decimals, in the same modal state; whole programs decode to the same meaning."""
    files = corpus_files([str(real_data_dir / corpus)])
    parsed, report, commands, letters, digits = scan(files)
    vocab = Vocabulary(commands=sorted(commands) + ["NONE"], letters=sorted(letters), max_tokens=16,
                       n_digits=max(10, *digits))
    checked, not_representable = 0, 0
    for path, lines in parsed.items():
        rows, sources = [], []
        for line in lines:
            if line.error is not None or line.is_empty:
                continue
            try:
                row = vocab.encode_line(line)
            except TokenizeError:
                not_representable += 1
                continue
            text = vocab.decode_line(row)
            again = parse_line(text, 1, ModalState())
            expected = written_values(line.text)
            assert {k: again.values[k] for k in expected} == expected, (path.name, line.lineno, text)
            assert set(again.values) - set(expected) <= {"H"}, (path.name, line.lineno, text)
            assert (again.modal_state, again.motion) == (line.modal_state, line.motion), (path.name, line.lineno)
            rows.append(row)
            sources.append(line)
            checked += 1
        program = [line for line in parse_program(decode_program(vocab, rows)) if not line.is_empty]
        assert [(p.modal_state, p.motion) for p in program] == [(s.modal_state, s.motion) for s in sources], path
    assert not_representable == refused and checked == report.executable - refused
    assert checked > 7000
    assert read_program(files[0])  # the files were read through the package's reader
