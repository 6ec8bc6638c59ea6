"""The hybrid vocabulary (exact and seed 4-digit modes): quantisation, id fields, round trips, files, mismatches."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

from cnc_gcode.gcode import parse_program
from cnc_gcode.tokenizer import (
    EOS,
    PAD,
    TokenizeError,
    Vocabulary,
    dequantize,
    format_number,
    quantize,
    round_trips,
    tokenize_text,
)
from common.errors import UserError


@pytest.mark.parametrize("value, text", [(12.5, "12.5"), (-0.025, "-0.025"), (0.0, "0"), (198.5, "198.5"),
                                         (3.58514, "3.585"), (9.99962, "10"), (24000, "24000"), (0.0001, "0.0001")])
def test_seed_mode_keeps_four_significant_digits(value, text):
    assert format_number(dequantize(*quantize(value, 4, exact=False), n_digits=4)) == text


@pytest.mark.parametrize("text", ["3519.5012", "-0.00125", "0.0001", "198.54", "999999.9999", "-12.34567", "24000",
                                  "0.00001"])
def test_exact_mode_keeps_the_written_value(text):
    assert dequantize(*quantize(Decimal(text))) == Decimal(text)


def test_quantize_rejects_out_of_range_and_too_many_digits():
    with pytest.raises(TokenizeError, match="exponent range"):
        quantize(2e6)
    with pytest.raises(TokenizeError, match="not finite"):
        quantize(float("nan"))
    with pytest.raises(TokenizeError, match="significant digits"):
        quantize(Decimal("46.5833333333333"))  # 15 digits: refused, never rounded
    assert quantize(Decimal("46.5833333333333"), 4, exact=False) == (0, 4658, 6)


def test_default_vocabulary_matches_the_original_command_set():
    vocab = Vocabulary()
    assert vocab.commands == ["G0", "G1", "G3", "G53", "M30", "NONE"]
    assert sorted(vocab.letters) == ["F", "R", "X", "Y", "Z"]
    assert vocab.n_param_types == 10 and vocab.size == 4 + 6 + 10 * vocab.n_exponents * 10 ** 10
    assert Vocabulary.seed().size == 4 + 6 + 10 * 11 * 10_000 and Vocabulary.seed().digest() != vocab.digest()


def test_line_to_ids_and_back():
    vocab = Vocabulary()
    ids = tokenize_text(vocab, "G1 F400 Y-3 X12.5")
    assert len(ids) == vocab.max_tokens and ids[4] == EOS and ids[5:] == [PAD, PAD]
    assert [vocab.token_str(i) for i in ids[:4]] == ["G1", "X+1250000000e1", "Y-3000000000e0", "F+4000000000e2"]
    assert vocab.decode_line(ids) == "G1 X12.5 Y-3 F400"
    seed = Vocabulary.seed()
    assert [seed.token_str(i) for i in tokenize_text(seed, "G1 F400 Y-3 X12.5")[1:4]] == ["X+1250e1", "Y-3000e0",
                                                                                         "F+4000e2"]


def test_fields_and_compose_are_inverse():
    vocab = Vocabulary()
    ids = np.array([tokenize_text(vocab, t) for t in ("G1 X1 Y2 F300", "G53 G0 Z0", "G3 X-1.25 R0.5", "M30")])
    f = vocab.fields(ids)
    assert (vocab.compose(f["type"], np.maximum(f["command"], 0), np.maximum(f["ptype"], 0),
                          np.maximum(f["exponent"], 0), np.maximum(f["digits"], 0)) == ids).all()


def test_carried_motion_becomes_explicit_and_round_trips():
    vocab = Vocabulary()
    lines = parse_program("G1 X1 F100\nY2.25\nG3 X0 Y0 R1.125")
    assert vocab.decode_line(vocab.encode_line(lines[1])) == "G1 Y2.25"
    assert all(round_trips(vocab, line) for line in lines)


def test_unrepresentable_lines_raise_with_reason():
    vocab = Vocabulary()
    with pytest.raises(TokenizeError, match="G2 not in vocabulary"):
        tokenize_text(vocab, "G2 X1 Y1 I1 J0")
    with pytest.raises(TokenizeError, match="word I"):
        tokenize_text(Vocabulary(commands=["G2"]), "G2 X1 Y1 I1 J0")
    with pytest.raises(TokenizeError, match="max_tokens"):
        tokenize_text(Vocabulary(letters=list("XYZRF"), max_tokens=4), "G1 X1 Y1 Z1 F1")


def test_ids_outside_vocabulary_are_user_errors():
    vocab = Vocabulary()
    with pytest.raises(UserError, match="outside this vocabulary"):
        vocab.fields(np.array([vocab.size]))
    with pytest.raises(UserError):
        vocab.fields(np.array([-1]))


def test_vocabulary_file_round_trip_and_mismatch(tmp_path):
    vocab = Vocabulary(commands=["G0", "G1", "G2", "NONE"], letters=["X", "Y", "I", "J"])
    vocab.save(tmp_path / "v.json")
    again = Vocabulary.load(tmp_path / "v.json")
    assert again.fingerprint() == vocab.fingerprint()
    with pytest.raises(UserError, match="different vocabulary"):
        Vocabulary().check_matches(vocab.fingerprint(), "ckpt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    # a file of the first format (4 digits, no mode) loads in the seed mode it was written in
    (tmp_path / "old.json").write_text('{"format": "cnc_gcode-4digit-hybrid/1", "commands": ["G0", "G1", "NONE"], '
                                       '"letters": ["X", "F"], "max_tokens": 7, "exp_min": -5, "exp_max": 5, '
                                       '"n_digits": 4}')
    old = Vocabulary.load(tmp_path / "old.json")
    assert (old.n_digits, old.exact) == (4, False) and old.size == 4 + 3 + 4 * 11 * 10_000
    old.check_matches({k: v for k, v in old.fingerprint().items() if k != "exact"}, "old checkpoint")


def test_decoded_values_are_exact_decimals():
    vocab = Vocabulary()
    _, params = vocab.decode_words(tokenize_text(vocab, "G1 X-0.0250 Z198.54"))
    assert params == [("X", Decimal("-0.025")), ("Z", Decimal("198.54"))]
    seed = Vocabulary.seed()
    _, params = seed.decode_words(tokenize_text(seed, "G1 X-0.0250 Z198.54"))
    assert params == [("X", Decimal("-0.025")), ("Z", Decimal("198.5"))]
