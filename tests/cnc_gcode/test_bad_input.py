"""Bad inputs give one clear error (exit code 2) or a counted skip, never a crash or a half-written file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnc_gcode import build_vocab, evaluate, predict, train_encoder
from cnc_gcode.data import load_windows
from cnc_gcode.sample_data import save_npz
from cnc_gcode.tokenizer import Vocabulary, tokenize_text
from common.errors import UserError


def windows(n=6, t=8, c=5, **overrides):
    vocab = Vocabulary()
    arrays = {"continuous": np.random.default_rng(0).normal(size=(n, t, c)).astype(np.float32),
              "categorical": np.zeros((n, t, 4), dtype=np.int64),
              "tokens": np.tile(np.asarray(tokenize_text(vocab, "G1 X1 F100"), dtype=np.int64), (n, 1)),
              "operation_type": np.zeros(n, dtype=np.int64), "vocab_digest": np.asarray(vocab.digest())}
    arrays.update(overrides)
    return arrays


@pytest.mark.parametrize("overrides, message", [
    ({"continuous": np.zeros((6, 8), np.float32)}, "must be [N,T,C]"),
    ({"continuous": np.zeros((6, 8, 5), np.int64)}, "must be float32"),
    ({"categorical": np.zeros((6, 8, 4), np.float32)}, "must be int64"),
    ({"categorical": np.full((6, 8, 4), 7, np.int64)}, "outside 0..2"),
    ({"tokens": np.full((6, 7), 10**15, np.int64)}, "outside this vocabulary"),
    ({"tokens": np.zeros((6, 9), np.int64)}, "max_tokens=7"),
    ({"operation_type": np.zeros(5, np.int64)}, "operation_type"),
    ({"operation_type": np.full(6, 12, np.int64)}, "outside 0..8"),
])
def test_malformed_npz_is_rejected_with_the_key(tmp_path, overrides, message):
    save_npz(tmp_path / "bad.npz", windows(**overrides))
    with pytest.raises(UserError) as info:
        load_windows(tmp_path / "bad.npz", Vocabulary(), [3, 3, 3, 3], 9)
    assert message in str(info.value) and "bad.npz" in str(info.value)


def test_missing_key_and_unreadable_file(tmp_path):
    arrays = windows()
    del arrays["tokens"]
    save_npz(tmp_path / "nokey.npz", arrays)
    with pytest.raises(UserError, match="'tokens' is missing"):
        load_windows(tmp_path / "nokey.npz", Vocabulary())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable"):
        load_windows(tmp_path / "junk.npz")


def test_nan_windows_are_skipped_and_counted_or_refused(tmp_path):
    arrays = windows()
    arrays["continuous"][[1, 4], 3, 2] = np.nan
    arrays["continuous"][5, 0, 0] = np.inf
    save_npz(tmp_path / "nan.npz", arrays)
    loaded = load_windows(tmp_path / "nan.npz", Vocabulary(), nan_policy="skip")
    assert len(loaded) == 3 and loaded.skipped_nan == 3 and np.isfinite(loaded.continuous).all()
    # bit-exact: written then read back (no arithmetic), the clean windows in order
    assert np.array_equal(loaded.continuous, arrays["continuous"][[0, 2, 3]])
    with pytest.raises(UserError, match=r"nan.npz: key 'continuous': window 1 holds NaN or inf \(3 bad windows"):
        load_windows(tmp_path / "nan.npz", Vocabulary(), nan_policy="error")


@pytest.mark.parametrize("stage", ["train_encoder", "train_decoder", "evaluate", "predict"])
def test_nan_policy_error_is_exit_2_naming_file_and_window_in_every_stage(trained_run, sample_dir, tmp_path, capsys,
                                                                          stage):
    """Every stage that reads sensor windows refuses NaN/inf with data.nan_policy=error: exit 2, one line naming
    the file and the first bad window, and nothing written for a training stage."""
    from cnc_gcode import train_decoder

    runs, args = trained_run
    with np.load(sample_dir / "test.npz") as test:
        arrays = {k: test[k] for k in test.files}
    arrays["continuous"][[3, 7], 10, 4] = np.nan
    bad = tmp_path / "bad.npz"
    save_npz(bad, arrays)
    key = {"train_encoder": "data.train_path", "train_decoder": "data.val_path", "evaluate": "data.test_path",
           "predict": "predict.input"}[stage]
    main = {"train_encoder": train_encoder.main, "train_decoder": train_decoder.main, "evaluate": evaluate.main,
            "predict": predict.main}[stage]
    out = tmp_path / "runs"
    argv = [*args, f"{key}={bad}", "data.nan_policy=error", f"run.out_dir={out}",
            f"train.encoder_checkpoint={runs / 't' / 'encoder' / 'checkpoints' / 'best'}",
            f"eval.checkpoint={runs / 't' / 'decoder' / 'checkpoints' / 'best'}"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: key 'continuous': window 3 holds NaN or inf (2 bad windows" in err, err
    assert not out.exists()


def test_cli_exit_code_2_for_bad_npz(tmp_path, capsys, stage_args):
    save_npz(tmp_path / "train.npz", windows(categorical=np.full((6, 8, 4), 5, np.int64)))
    code = train_encoder.main(stage_args(tmp_path, tmp_path / "runs"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.npz" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # the data is checked before the run directory is made


def test_unknown_config_key_is_named(tmp_path, capsys, stage_args):
    assert train_encoder.main(stage_args(tmp_path, tmp_path, "t", "encoder_train.epoch=3")) == 2
    assert "did you mean 'encoder_train.epochs'" in capsys.readouterr().err


def test_checkpoint_vocabulary_mismatch_is_exit_2(trained_run, tmp_path, capsys):
    _, args = trained_run
    other = Vocabulary(commands=["G0", "G1", "G2", "NONE"], letters=["X", "Y", "I", "J"])
    other.save(tmp_path / "other.json")
    assert evaluate.main([*args, f"data.vocab_path={tmp_path / 'other.json'}"]) == 2
    assert "different vocabulary" in capsys.readouterr().err


def test_predict_rejects_wrong_channel_count(trained_run, tmp_path, capsys):
    _, args = trained_run
    save_npz(tmp_path / "s.npz", {"continuous": np.zeros((2, 64, 5), np.float32),
                                  "categorical": np.zeros((2, 64, 4), np.int64)})
    assert predict.main([*args, f"predict.input={tmp_path / 's.npz'}"]) == 2
    assert "C=5 channels" in capsys.readouterr().err
    assert predict.main([*args, "predict.input="]) == 2
    assert "config key 'predict.input' is empty" in capsys.readouterr().err


def test_bad_gcode_is_counted_not_fatal(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.ngc").write_text("G0 X1 Y2\no100 sub\nG1 X#1\nG1 X[2*3]\nG2 X1 Y1 I1 J0 F100\n\x00\x07garbage ?\n")
    (corpus / "b.nc").write_bytes(b"G1 X1\n\xff\xfe broken bytes\n")
    out = tmp_path / "v.json"
    assert build_vocab.main([f"build_vocab.corpus=[{corpus}]", f"build_vocab.out={out}"]) == 0
    report = json.loads((tmp_path / "v_report.json").read_text())
    assert report["parse"]["unsupported_by_reason"] == {"o-word subroutine/control flow": 1, "# parameter": 1,
                                                        "[ ] expression": 1, "malformed word": 1,
                                                        "non-ASCII characters": 1}
    assert report["round_trip_rate"] == 1.0 and "G2" in report["commands"] and "I" in report["letters"]
    assert build_vocab.main([f"build_vocab.corpus=[{tmp_path / 'nope'}]", f"build_vocab.out={out}"]) == 2
    capsys.readouterr()
