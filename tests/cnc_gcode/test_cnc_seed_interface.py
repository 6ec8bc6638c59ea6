"""The seed's interface: its 668-entry vocabulary file and token rows, its decoder constructor arguments, and
tokenized files that name their vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnc_gcode import seed_vocab, train_decoder
from cnc_gcode.data import load_windows
from cnc_gcode.model import SensorMultiHeadDecoder
from cnc_gcode.tokenizer import EXACT_DIGITS, Vocabulary
from common.errors import UserError

COMMANDS = ["G0", "G1", "G3", "G53", "M30", "NONE"]
LETTERS = ["F", "R", "X", "Y", "Z"]


def seed_table() -> dict:
    """A vocabulary in the original's layout with the original's 668 entries: 4 special, 6 commands, 5 letters and
    653 value tokens."""
    table = {name: i for i, name in enumerate(["PAD", "UNK", "SOS", "EOS", *COMMANDS, *LETTERS])}
    needed = ["NUM_X_1250", "NUM_F_0400", "NUM_Z_-005", "NUM_Y_0007", "NUM_R_0500", "NUM_X_-010", "NUM_X_0005"]
    filler = (f"NUM_{letter}_{number:04d}" for letter in "XYZ" for number in range(1, 10_000))
    for token in needed + [t for t in filler if t not in needed]:
        if len(table) == 668:
            break
        table[token] = len(table)
    return {"config": {"mode": "hybrid", "bucket_digits": 4, "vocab_size": 668,
                       "precision": {"X": 0.001, "Y": 0.001, "Z": 0.001, "F": 1.0, "R": 0.0001}}, "vocab": table}


@pytest.fixture
def seed_json(tmp_path):
    path = tmp_path / "vocabulary_4digit_hybrid.json"
    path.write_text(json.dumps(seed_table()))
    return path


def test_the_original_vocabulary_imports_and_its_rows_translate(seed_json):
    seed = seed_vocab.load_seed_vocabulary(seed_json)
    assert len(seed.tokens) == 668 and seed.commands == COMMANDS and seed.letters == LETTERS
    vocab = seed.vocabulary()
    assert vocab.fingerprint() == Vocabulary.seed().fingerprint()
    t = seed_table()["vocab"]
    rows = np.array([[t["G1"], t["X"], t["NUM_X_1250"], t["F"], t["NUM_F_0400"], t["EOS"], t["PAD"]],
                     [t["SOS"], t["G0"], t["Z"], t["NUM_Z_-005"], t["EOS"], t["PAD"], t["PAD"]],
                     [t["G3"], t["Y"], t["NUM_Y_0007"], t["R"], t["NUM_R_0500"], t["X"], t["NUM_X_-010"]]])
    ids, possibly_cut = seed.translate(rows)
    assert [vocab.decode_line(row) for row in ids] == ["G1 X1.25 F400", "G0 Z-0.005", "G3 X-0.01 Y0.007 R0.05"]
    assert possibly_cut == 1  # NUM_X_1250 fills all four places: 1.25, or a longer value the original cut
    with pytest.raises(UserError, match="row 0 position 1"):
        seed.translate(np.array([[t["G1"], t["NUM_X_1250"], t["EOS"]]]))  # a value token without its letter


def test_the_import_stage_writes_a_vocabulary_and_translated_npz(seed_json, tmp_path, capsys):
    t = seed_table()["vocab"]
    tokens = np.array([[t["G1"], t["X"], t["NUM_X_0005"], t["EOS"], 0, 0, 0]] * 3, dtype=np.int64)
    np.savez(tmp_path / "train_sequences.npz", continuous=np.zeros((3, 8, 2), np.float32),
             categorical=np.zeros((3, 8, 4), np.int64), tokens=tokens, operation_type=np.zeros(3, np.int64))
    out = tmp_path / "vocab_seed.json"
    assert seed_vocab.main([str(seed_json), str(out), "--npz", str(tmp_path / "train_sequences.npz"),
                            str(tmp_path / "train.npz")]) == 0
    printed = json.loads(capsys.readouterr().out)
    vocab = Vocabulary.load(out)
    assert printed["digest"] == vocab.digest() and printed["possibly_cut_values"] == 0
    windows = load_windows(tmp_path / "train.npz", vocab)
    assert vocab.decode_line(windows.tokens[0]) == "G1 X0.005"
    # the original's file is not this package's vocabulary: loading it directly says how to convert it
    with pytest.raises(UserError, match="cnc_gcode.seed_vocab"):
        Vocabulary.load(seed_json)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["vocab"].update({"FOO": 700}), "token 'FOO' (id 700) is none of"),
    (lambda d: d["vocab"].update({"G2": 4}), "id 4 is used by both 'G0' and 'G2'"),
    (lambda d: d["vocab"].update({"NUM_K_0001": 700}), "letters ['K'] but no letter token"),
    (lambda d: d.pop("vocab"), "no 'vocab' token table"),
])
def test_a_malformed_original_vocabulary_is_exit_2_naming_the_entry(tmp_path, capsys, change, message):
    data = seed_table()
    change(data)
    path = tmp_path / "v.json"
    path.write_text(json.dumps(data))
    assert seed_vocab.main([str(path), str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and not (tmp_path / "out.json").exists()


def test_the_seed_decoder_constructor_is_accepted_or_refused_clearly():
    seed_args = dict(sensor_dim=128, d_model=192, n_heads=8, n_layers=4, n_operations=9, n_types=4, n_commands=6,
                     n_param_types=10, max_seq_len=32, dropout=0.3)
    decoder = SensorMultiHeadDecoder(**seed_args).eval()
    assert decoder.vocab.fingerprint() == Vocabulary.seed().fingerprint() and decoder.n_operations == 9
    with torch.no_grad():
        logits = decoder(torch.zeros(2, 64, 128), torch.full((2, 7), 2))
    assert logits["digits"].shape == (2, 7, 4, 10) and logits["command"].shape == (2, 7, 6)
    assert SensorMultiHeadDecoder(Vocabulary(), n_commands=6, n_param_types=10).n_digits == EXACT_DIGITS
    with pytest.raises(UserError, match=r"n_commands=7\): the vocabulary has n_commands=6"):
        SensorMultiHeadDecoder(**{**seed_args, "n_commands": 7})
    with pytest.raises(UserError, match=r"n_param_types=10\): the vocabulary has n_param_types=14"):
        SensorMultiHeadDecoder(Vocabulary(letters=list("XYZIJFR")), n_param_types=10)
    with pytest.raises(UserError, match=r"n_types=5"):
        SensorMultiHeadDecoder(n_types=5)


def test_sample_data_in_the_seed_mode_names_its_vocabulary(tmp_path):
    from cnc_gcode.sample_data import make_dataset

    manifest = make_dataset(tmp_path, n_programs=3, seed=1, value_mode="seed4")
    vocab = Vocabulary.load(tmp_path / "vocab.json")
    assert vocab.fingerprint() == Vocabulary.seed().fingerprint() and manifest["vocab_digest"] == vocab.digest()
    windows = load_windows(tmp_path / "train.npz", vocab)
    assert windows.tokens.shape[1] == 7 and vocab.decode_line(windows.tokens[0])
    with pytest.raises(UserError, match="made with vocabulary"):
        load_windows(tmp_path / "train.npz", Vocabulary())


def test_tokens_of_another_vocabulary_are_refused_by_digest(sample_dir, trained_run, tmp_path, capsys):
    # the sample data records the default (exact) vocabulary; the seed vocabulary's ids would decode to garbage
    assert str(np.load(sample_dir / "train.npz")["vocab_digest"]) == Vocabulary().digest()
    with pytest.raises(UserError, match="made with vocabulary") as info:
        load_windows(sample_dir / "train.npz", Vocabulary.seed())
    assert "train.npz" in str(info.value) and "data.vocab_path" in str(info.value)
    Vocabulary.seed().save(tmp_path / "seed.json")
    runs, args = trained_run
    assert train_decoder.main([*args, "run.name=digest_check", f"data.vocab_path={tmp_path / 'seed.json'}",
                       f"train.encoder_checkpoint={runs / 't' / 'encoder' / 'checkpoints' / 'best'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.npz" in err[0] and Vocabulary().digest() in err[0]
    assert not (runs / "digest_check").exists()
    # a tokenized file that does not name its vocabulary is refused too
    with np.load(sample_dir / "val.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "vocab_digest"}
    np.savez(tmp_path / "nodigest.npz", **arrays)
    with pytest.raises(UserError, match="'vocab_digest' is missing"):
        load_windows(tmp_path / "nodigest.npz", Vocabulary())
