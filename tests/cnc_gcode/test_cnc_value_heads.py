"""Values as quantities (decoder.value_mode=regress): the value head's output becomes the tokenizer's id of the
rounded value, the tolerance metric, cached vs full decoding, ONNX parity and a learning check against digits."""

from __future__ import annotations

import json
from decimal import Decimal

import numpy as np
import pytest
import torch
from learning_seed import seed_args

from cnc_gcode import evaluate, export_onnx, losses, predict, train_decoder
from cnc_gcode.config import DecoderConfig, EncoderConfig
from cnc_gcode.decoding import Grammar, decode_cached, decode_uncached, value_token
from cnc_gcode.gcode import parse_program
from cnc_gcode.metrics import token_metrics
from cnc_gcode.model import VALUE_HEAD, build_decoder, build_encoder, decoder_inputs, plateau_speed
from cnc_gcode.sample_data import save_npz
from cnc_gcode.tokenizer import EOS, TYPE_COMMAND, TYPE_PARAM, Vocabulary, tokenize_text

TINY_DEC = DecoderConfig(d_model=16, n_heads=2, n_layers=2, ff_dim=32, max_seq_len=8, dropout=0.0,
                         value_mode="regress")


def _row(vocab: Vocabulary, text: str) -> list[int]:
    return tokenize_text(vocab, text)


@pytest.mark.parametrize("letter,value,decimals,written", [
    ("X", 12.34567, 3, "12.346"), ("X", -3.2104, 3, "-3.210"), ("Y", 0.0004, 3, "0"), ("F", 587.149, 1, "587.1"),
    ("Z", -0.00049, 3, "0"), ("R", 7.5, 0, "8"), ("X", 2.0e7, 3, "999999.999"),
])
def test_regressed_value_becomes_the_tokenizers_id_of_the_rounded_value(letter, value, decimals, written):
    vocab = Vocabulary()
    token = value_token(vocab, vocab.letters.index(letter), value, decimals)
    assert token == vocab.param_id(letter, Decimal(written))
    _, params = vocab.decode_words([token])
    assert params == [(letter, Decimal(written))]


def test_grammar_writes_the_regressed_value_with_its_sign_from_the_value():
    """The ptype head says 'X positive' but the value head says -3.21: the sign follows the value; the letter
    follows the ptype head with both signs summed."""
    vocab = Vocabulary()
    batch = 2
    grammar = Grammar(vocab, batch, value_decimals=np.full(len(vocab.letters), 3))
    logits = {"type": np.zeros((batch, 4)), "command": np.zeros((batch, vocab.n_commands)),
              "ptype": np.zeros((batch, vocab.n_param_types)), "exponent": np.zeros((batch, vocab.n_exponents)),
              "digits": np.zeros((batch, vocab.n_digits, 10)), VALUE_HEAD: np.zeros((batch, len(vocab.letters)))}
    logits["type"][:, TYPE_COMMAND] = 5.0
    logits["command"][:, vocab.commands.index("G1")] = 5.0
    first = grammar.choose(logits)
    assert list(first) == [vocab.command_id("G1")] * 2
    logits["type"][:] = 0.0
    logits["type"][:, TYPE_PARAM] = 5.0
    x, y = vocab.letters.index("X"), vocab.letters.index("Y")
    logits["ptype"][0, 2 * x] = 5.0  # row 0: X (positive sign preferred by the head)
    logits["ptype"][1, 2 * y + 1] = 5.0  # row 1: Y
    logits[VALUE_HEAD][0, x] = -3.21049
    logits[VALUE_HEAD][1, y] = 40.0004
    ids = grammar.choose(logits)
    assert ids[0] == vocab.param_id("X", Decimal("-3.210")) and ids[1] == vocab.param_id("Y", Decimal("40.000"))
    assert vocab.decode_line([first[0], ids[0], EOS]) == "G1 X-3.21"


def test_confident_digit_heads_keep_their_value_and_unsure_ones_give_way():
    """value_confidence: where the digit heads are sure (geometric-mean probability over exponent and digits at
    least the threshold), their value (Z5) is written; below it, the regressed one (Z4.871)."""
    vocab = Vocabulary()
    z = vocab.letters.index("Z")
    expected_digits = vocab.fields(np.array([vocab.param_id("Z", Decimal(5))]))
    for sharpness, written in ((20.0, "5"), (0.5, "4.871")):
        grammar = Grammar(vocab, 1, value_decimals=np.full(len(vocab.letters), 3), value_confidence=0.45)
        logits = {"type": np.zeros((1, 4)), "command": np.zeros((1, vocab.n_commands)),
                  "ptype": np.zeros((1, vocab.n_param_types)), "exponent": np.zeros((1, vocab.n_exponents)),
                  "digits": np.zeros((1, vocab.n_digits, 10)), VALUE_HEAD: np.zeros((1, len(vocab.letters)))}
        logits["type"][:, TYPE_COMMAND] = 5.0
        logits["command"][:, vocab.commands.index("G0")] = 5.0
        grammar.choose(logits)
        logits["type"][:] = 0.0
        logits["type"][:, TYPE_PARAM] = 5.0
        logits["ptype"][0, 2 * z] = 5.0
        logits["exponent"][0, expected_digits["exponent"][0]] = sharpness
        logits["digits"][0, np.arange(vocab.n_digits), expected_digits["digits"][0]] = sharpness
        logits[VALUE_HEAD][0, z] = 4.8712
        assert grammar.choose(logits)[0] == vocab.param_id("Z", Decimal(written)), sharpness


def test_tolerance_metric_on_hand_made_rows():
    vocab = Vocabulary()
    target = np.array([_row(vocab, "G1 X10 Y20 F500")] * 4)
    predicted = np.array([_row(vocab, "G1 X10.05 Y20 F505"),  # 0.05 mm and 1 %: both within tolerance
                          _row(vocab, "G1 X10.2 Y20 F515"),  # 0.2 mm and 3 %: neither
                          _row(vocab, "G0 X10.05 Y20 F500"),  # wrong command: never within tolerance
                          _row(vocab, "G1 X10 Y20.09 F490.5")])  # 0.09 mm, 1.9 %
    scores = token_metrics(vocab, predicted, target)
    n = 5  # G1 X Y F EOS per row
    right_exact = [3, 3, 3, 3]
    right_tol = [5, 3, 4, 5]
    assert scores["token_acc"] == pytest.approx(sum(right_exact) / (4 * n), abs=1e-12)
    assert scores["token_acc_tol"] == pytest.approx(sum(right_tol) / (4 * n), abs=1e-12)
    assert scores["value_acc_tol"] == pytest.approx((3 + 1 + 3 + 3) / 12, abs=1e-12)
    # X/Y/Z errors over the 8 matched X and Y tokens: 0.05, 0, 0.2, 0, 0.05, 0, 0, 0.09 -> median 0.025 mm
    assert scores["value_err_xyz_median_mm"] == pytest.approx(0.025, abs=1e-6)
    # F errors 1 %, 3 %, 0 %, 1.9 % -> median 1.45 %
    assert scores["value_err_f_median_pct"] == pytest.approx(1.45, abs=1e-6)
    # a wrong letter at a value position is not within tolerance whatever the value
    wrong_letter = np.array([_row(vocab, "G1 Y10 Z20 F500")])
    assert token_metrics(vocab, wrong_letter, target[:1])["token_acc_tol"] == pytest.approx(3 / 5, abs=1e-12)


def _regress_decoder(vocab: Vocabulary, sensor_dim: int = 12):
    torch.manual_seed(0)
    decoder = build_decoder(TINY_DEC, vocab, sensor_dim).eval()
    letters = vocab.letters
    decoder.set_value_statistics([{"X": 0, "Y": 1, "Z": 2}.get(k, -1) for k in letters],
                                 np.linspace(-1, 1, len(letters)), np.linspace(0.5, 5, len(letters)),
                                 np.full(len(letters), 3))
    return decoder


def test_value_anchor_reads_the_last_step_of_each_axis_channel():
    vocab = Vocabulary()
    decoder = _regress_decoder(vocab)
    continuous = torch.randn(3, 5, 4)
    anchor = decoder.value_anchor(continuous)
    for k, letter in enumerate(vocab.letters):
        expected = continuous[:, -1, "XYZ".index(letter)] if letter in "XYZ" else torch.zeros(3)
        assert torch.equal(anchor[:, k], expected)
    standardized = torch.randn(3, len(vocab.letters))
    values = decoder.absolute_values(standardized, anchor)
    raw = decoder.value_center + decoder.value_scale * standardized
    x, f = vocab.letters.index("X"), vocab.letters.index("F")
    torch.testing.assert_close(values[:, x], raw[:, x] + anchor[:, x], rtol=0, atol=1e-6)
    torch.testing.assert_close(values[:, f], torch.expm1(raw[:, f]), rtol=1e-5, atol=1e-4)



def _velocity_rows(speeds_mm_min: list[list[float]], n_channels: int = 5) -> torch.Tensor:
    """[B,T,C] raw windows whose velocity channels (1, 2, 4 here: velocity_x/y/z in mm/s) give these path speeds,
    split 3:4:0 over x:y, and noise on the other channels (the reading must ignore them)."""
    speed = torch.tensor(speeds_mm_min, dtype=torch.float32) / 60.0
    out = torch.randn(speed.shape[0], speed.shape[1], n_channels) * 50
    out[:, :, 1], out[:, :, 2], out[:, :, 4] = 0.6 * speed, 0.8 * speed, 0.0
    return out


VELOCITY_INDEX = torch.tensor([1, 2, 4])


def test_torch_plateau_reading_on_hand_made_rows():
    rows = [
        # ramp, a plateau at 600, a second plateau at 300 (the last one counts), then 3 stop / settle samples
        [0, 200, 400, 600, 600, 600, 450, 300, 300, 300, 300, 120, 10, 0],
        # the last run drifts inside 1 % per step: median of its 4 samples (299, 300, 301, 302) = 300.5
        [0, 100, 200, 250, 299, 300, 301, 302, 150, 100, 50, 20, 10, 0],
        # never flat (each step > 1 %): the top speed before the 3 left-out samples
        [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 5000, 5000, 5000],
    ]
    reading = plateau_speed(_velocity_rows(rows), VELOCITY_INDEX)
    torch.testing.assert_close(reading, torch.tensor([300.0, 300.5, 1100.0]), rtol=1e-5, atol=1e-3)


def test_torch_plateau_reading_matches_the_numpy_reading():
    """The decoder's ONNX-friendly reading and measured_only's loop agree on random speed profiles."""
    from cnc_gcode.data import Windows
    from studies.cnc_gcode.measured_only import plateau_speed as numpy_reading

    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(1, 40, (64, 4), generator=generator).float() * 50
    lengths = torch.randint(1, 6, (64, 4), generator=generator)
    speeds = [sum(([float(v)] * int(n) for v, n in zip(lv, ln)), [])[:16] for lv, ln in zip(levels, lengths)]
    speeds = [row + [0.0] * (16 - len(row)) for row in speeds]
    continuous = _velocity_rows(speeds)
    continuous[:, :, 1] += torch.rand(continuous.shape[:2], generator=generator) * 0.02  # small wobble
    names = ["a", "velocity_x", "velocity_y", "b", "velocity_z"]
    windows = Windows(continuous=continuous.numpy(), categorical=np.zeros((64, 16, 1), dtype=np.int64),
                      tokens=np.zeros((64, 8), dtype=np.int64), operation_type=np.zeros(64, dtype=np.int64),
                      channel_names=names, extra={})
    expected = numpy_reading(windows)
    got = plateau_speed(continuous, VELOCITY_INDEX).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-3)


def _speed_anchor_decoder(vocab: Vocabulary):
    decoder = _regress_decoder(vocab)
    letters = vocab.letters
    is_f = torch.tensor([k == "F" for k in letters])
    # F's correction to the anchor is small (the measured-only run fits centre ~0, scale ~0.13): values near the
    # plateau speed, not exp(centre + anchor) in the millions where float32 alone differs by more than 1e-3
    center = torch.where(is_f, torch.zeros(()), decoder.value_center)
    scale = torch.where(is_f, torch.full((), 0.1), decoder.value_scale)
    decoder.set_value_statistics(decoder.value_anchor_channel, center, scale, decoder.value_decimals, is_f,
                                 VELOCITY_INDEX)
    return decoder


def test_feed_anchor_round_trip():
    """F targets are standardised relative to log(1 + plateau speed) and read back to the same feed; S stays a
    plain log value (anchor 0)."""
    vocab = Vocabulary()
    decoder = _speed_anchor_decoder(vocab)
    speeds = [[0, 300, 600, 900, 900, 900, 900, 900, 400, 100, 0], [0, 50, 100, 150, 150, 150, 150, 150, 80, 10, 0]]
    continuous = _velocity_rows(speeds)
    anchor = decoder.value_anchor(continuous)
    f = vocab.letters.index("F")
    torch.testing.assert_close(anchor[:, f], torch.log1p(torch.tensor([900.0, 150.0])), rtol=1e-6, atol=1e-6)
    if "S" in vocab.letters:
        assert torch.equal(anchor[:, vocab.letters.index("S")], torch.zeros(2))
    rows = np.array([_row(vocab, "G1 X10.5 F912.5"), _row(vocab, "G1 Y-2 F140")])
    letter, target = losses.value_targets(vocab, rows, anchor.numpy(), decoder.value_center.numpy(),
                                          decoder.value_scale.numpy(), decoder.value_log.numpy())
    is_f = letter == f
    # the F target is the small log correction to the anchor, not the whole log feed
    raw = target[is_f] * decoder.value_scale[f] + decoder.value_center[f]
    torch.testing.assert_close(raw, torch.log(torch.tensor([913.5 / 901.0, 141.0 / 151.0])), rtol=1e-4, atol=1e-5)
    head = torch.zeros(2, rows.shape[1], len(vocab.letters))
    head[:, :, f] = target * is_f
    values = decoder.absolute_values(head, anchor)[:, :, f][is_f]
    torch.testing.assert_close(values, torch.tensor([912.5, 140.0]), rtol=1e-5, atol=1e-2)


def test_decoder_saved_before_the_feed_anchor_loads_without_it():
    vocab = Vocabulary()
    old_state = {k: v for k, v in _regress_decoder(vocab).state_dict().items()
                 if k not in ("value_speed_anchor", "value_velocity_channels")}
    decoder = _speed_anchor_decoder(vocab)
    decoder.load_state_dict(old_state, strict=True)
    assert not decoder.value_speed_anchor.any()
    continuous = _velocity_rows([[0, 300, 600, 900, 900, 900, 900, 900, 400, 100, 0]])
    assert torch.equal(decoder.value_anchor(continuous)[0, vocab.letters.index("F")], torch.tensor(0.0))


def test_digits_mode_is_unchanged_by_the_value_head_option():
    """The default decoder builds the same weights from a seed as before the option (no value head, no buffers)."""
    vocab = Vocabulary()
    torch.manual_seed(3)
    plain = build_decoder(DecoderConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, max_seq_len=8), vocab, 12)
    assert not plain.regress and not any(k.startswith("value") for k in plain.state_dict())
    torch.manual_seed(3)
    regress = build_decoder(DecoderConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, max_seq_len=8,
                                          value_mode="regress"), vocab, 12)
    for key, tensor in plain.state_dict().items():  # the value head is created last, after every other weight
        assert torch.equal(tensor, regress.state_dict()[key]), key


def test_cached_step_with_value_heads_matches_the_full_forward():
    vocab = Vocabulary()
    decoder = _regress_decoder(vocab)
    memory, continuous = torch.randn(3, 6, 12), torch.randn(3, 6, 4) * 20
    anchor = decoder.value_anchor(continuous)
    rows = np.array([_row(vocab, "G1 X10.5 Y-2 F500"), _row(vocab, "G0 Z5"), _row(vocab, "G3 X1 R2.5 F300")])
    inputs = decoder_inputs(torch.from_numpy(rows))
    with torch.no_grad():
        full = decoder.absolute_values(decoder(memory, inputs)[VALUE_HEAD], anchor)
        cache, cross, context = decoder.empty_cache(3), decoder.cross_kv(memory), decoder.step_context(memory)
        for position in range(vocab.max_tokens):
            logits, cache = decoder.step(inputs[:, position:position + 1], torch.tensor([position]), cache, cross,
                                         context)
            step = decoder.absolute_values(logits[VALUE_HEAD][:, 0], anchor)
            torch.testing.assert_close(step, full[:, position], rtol=1e-5, atol=1e-4)
    cached = decode_cached(decoder, memory, vocab, anchor)
    assert np.array_equal(cached, decode_uncached(decoder, memory, vocab, anchor))
    assert any(vocab.fields(cached)["type"].ravel() == TYPE_PARAM)  # values were written, so the path was used
    with pytest.raises(ValueError, match="anchor"):
        decode_cached(decoder, memory, vocab)


@pytest.mark.parametrize("feed_anchor", [False, True])
def test_onnx_graphs_carry_the_value_heads(tmp_path, feed_anchor):
    vocab = Vocabulary()
    torch.manual_seed(1)
    encoder = build_encoder(EncoderConfig(hidden_dim=12, lstm_layers=1), 5).eval()
    decoder = _speed_anchor_decoder(vocab) if feed_anchor else _regress_decoder(vocab)
    decoder.type_head.bias.data[TYPE_PARAM] += 2.0  # write parameters, so the values reach the ids
    continuous = (torch.randn(5, 8, 5) * 30).numpy()
    if feed_anchor:  # plateaus of different lengths and speeds, so the reading's every branch is exercised
        continuous = _velocity_rows([[0, 600, 600, 600, 600, 0, 0, 0], [0, 100, 200, 300, 400, 500, 600, 700],
                                     [300, 300, 900, 900, 900, 900, 0, 0], [0] * 8,
                                     [50, 100, 100, 101, 100, 20, 0, 0]]).numpy()
    categorical = torch.randint(0, 3, (5, 8, 4)).numpy()
    export_onnx.export(encoder, decoder, tmp_path, 17, 8, 5, 4)
    assert json.loads((tmp_path / export_onnx.VALUE_FILE).read_text())["decimals"] == [3] * len(vocab.letters)
    report = export_onnx.parity(encoder, decoder, vocab, export_onnx.OnnxPipeline(tmp_path, vocab), continuous,
                                categorical)
    assert report["max_abs_diff_step_logits"] < 1e-4 and report["max_abs_diff_values"] < 1e-3, report
    # ids equal, except where float32 noise (the 1e-3 above) puts a value on the other side of a rounding boundary
    # (seen here: F120.162 vs F120.161 in one of 5 rows)
    assert report["greedy_identical"] or report["greedy_rounding_only"], report
    assert not export_onnx.rounding_only(vocab, np.array([_row(vocab, "G1 X1.002")]),
                                         np.array([_row(vocab, "G1 X1")]), np.full(len(vocab.letters), 3))
    assert export_onnx.rounding_only(vocab, np.array([_row(vocab, "G1 X1.001")]),
                                     np.array([_row(vocab, "G1 X1")]), np.full(len(vocab.letters), 3))


@pytest.fixture(scope="module")
def regress_run(trained_run, learning_seed):
    """A regress-mode decoder over the trained_run fixture's encoder (same data, epochs and seed as its digits
    decoder 't'), in run 't_regress'."""
    runs, args = trained_run
    base = [a for a in args if not a.startswith("run.name=")]
    regress = [*base, "run.name=t_regress", "decoder.value_mode=regress",
               f"train.encoder_checkpoint={runs / 't' / 'encoder' / 'checkpoints' / 'best'}",
               *seed_args("run.seed", learning_seed)]
    assert train_decoder.main(regress) == 0
    assert evaluate.main(regress) == 0
    assert evaluate.main(args) == 0
    return runs, regress


def test_regress_pipeline_evaluates_predicts_and_exports(regress_run, sample_dir, tmp_path):
    runs, args = regress_run
    results = json.loads((runs / "t_regress" / "reports" / "results_test.json").read_text())
    assert 0.0 <= results["token_acc"] <= results["token_acc_tol"] <= 1.0
    with np.load(sample_dir / "test.npz") as test:
        save_npz(tmp_path / "sensors.npz", {"continuous": test["continuous"][:10],
                                             "categorical": test["categorical"][:10]})
    out = tmp_path / "out.nc"
    assert predict.main([*args, f"predict.input={tmp_path / 'sensors.npz'}", f"predict.output={out}"]) == 0
    lines = [line for line in parse_program(out.read_text()) if not line.is_empty]
    assert lines and all(line.error is None for line in lines)
    assert export_onnx.main(args) == 0
    parity = json.loads((runs / "t_regress" / "onnx" / "parity.json").read_text())
    assert parity["max_abs_diff_step_logits"] < 1e-4 and parity["max_abs_diff_values"] < 1e-2, parity
    assert parity["greedy_identical"] or parity["greedy_rounding_only"], parity


@pytest.mark.learning
def test_regress_mode_beats_digits_on_unseen_values(regress_run):
    """The fixture's test programs have continuous coordinates, so nearly every test X/Y value is new."""
    runs, _ = regress_run
    regress = json.loads((runs / "t_regress" / "reports" / "results_test.json").read_text())
    digits = json.loads((runs / "t" / "reports" / "results_test.json").read_text())
    # Measured (own seed / --learning-seed 1 / 2, OMP_NUM_THREADS=1): median X/Y/Z error regress 1.372 / 1.296 /
    # 1.297 mm vs digits 12.988 / 7.899 / 7.472 mm (ratios 0.11 / 0.16 / 0.17). Token accuracy with values within
    # tolerance is not asserted: at this size it is a wash (0.442 / 0.458 / 0.476 vs 0.426 / 0.423 / 0.481).
    assert regress["value_err_xyz_median_mm"] < 0.4 * digits["value_err_xyz_median_mm"], (regress, digits)
    assert regress["value_err_xyz_median_mm"] < 3.0, regress


@pytest.mark.learning
def test_feed_anchor_reads_the_feed_from_the_plateau(regress_run):
    """The fixture's data has velocity_x/y/z, so the regress decoder's F is a correction to the plateau speed."""
    runs, _ = regress_run
    regress = json.loads((runs / "t_regress" / "reports" / "results_test.json").read_text())
    digits = json.loads((runs / "t" / "reports" / "results_test.json").read_text())
    # Measured (own seed / --learning-seed 1 / 2, OMP_NUM_THREADS=1, 7 Dec): median F error regress 1.42 / 16.13 /
    # 1.50 % vs digits 70.63 / 13.33 / 16.63 %. At this size the correction is not always better than the digit
    # heads (seed 1), so only a bound is asserted: an anchor lost between training and decoding (F read as
    # expm1 of the small correction) or applied twice puts the median error near 100 % or far above it.
    assert regress["value_err_f_median_pct"] < 25.0, (regress, digits)
