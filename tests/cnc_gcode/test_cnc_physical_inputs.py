"""Physical encoder inputs: the surface found from the sensors, the depth channel and robust scaling stored
in the encoder (checkpoint, ONNX), the classification loss on clean input, and selection on validation accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnc_gcode import train_encoder
from cnc_gcode.checkpoints import load_encoder
from cnc_gcode.config import DecoderConfig, EncoderConfig
from cnc_gcode.data import estimate_surface, input_stats
from cnc_gcode.model import build_decoder, build_encoder
from cnc_gcode.tokenizer import Vocabulary
from common.checkpoint import load_checkpoint
from common.errors import UserError
from common.logs import read_metrics

NAMES = ["X1_ActualVelocity", "Y1_ActualVelocity", "Z1_ActualPosition", "S1_ActualVelocity", "X1_ActualPosition"]
LAYERS_MM = (29.5, 28.5, 27.5)


def mill_rows(rng: np.random.Generator) -> np.ndarray:
    """[N,5] rows of a made-up mill in NAMES order: idle at the tool-change height (Z 120, spindle off), rapid moves
    at Z 40 (XY 50 mm/s, spindle on), a few cutting-feed approach rows at Z 35 (2 % of the cutting rows: below the
    5 % a surface level needs) and cutting at the three pass depths (XY 10 mm/s, spindle 53)."""
    def block(n, z, vx, spindle):
        return np.column_stack([np.full(n, vx), rng.normal(0, 0.5, n), np.full(n, z) + rng.normal(0, 0.02, n),
                                np.full(n, spindle), rng.uniform(100, 200, n)])
    cutting = [block(300, z, 10.0, 53.0) for z in LAYERS_MM]
    return np.concatenate([block(600, 120.0, 0.0, 0.0), block(200, 40.0, 50.0, 53.0), block(18, 35.0, 10.0, 53.0),
                           *cutting]).astype(np.float32)


def windows_of(rows: np.ndarray, length: int = 6) -> np.ndarray:
    return rows[: len(rows) // length * length].reshape(-1, length, rows.shape[1])


def robust_depth_encoder(train: np.ndarray, surface: float):
    enc = build_encoder(EncoderConfig(hidden_dim=16, lstm_layers=1, input_scaling="robust",
                                      depth_channel="Z1_ActualPosition"), continuous_dim=len(NAMES))
    enc.set_normalization(*input_stats(train, "robust"))
    enc.set_depth(NAMES.index("Z1_ActualPosition"), surface)
    return enc.eval()


def test_surface_is_the_highest_common_cutting_level_and_layers_stay_a_unit_apart():
    rng = np.random.default_rng(0)
    train = windows_of(mill_rows(rng))
    surface = estimate_surface(train, NAMES, "Z1_ActualPosition")
    # the idle (120), rapid (40) and rare approach (35) levels are not cutting levels; 29.5 is the top pass
    assert surface == pytest.approx(29.5, abs=1e-6)
    one_window_per_layer = torch.tensor(np.stack([np.tile([10.0, 0.0, z, 53.0, 150.0], (6, 1)) for z in LAYERS_MM]),
                                        dtype=torch.float32)
    enc = robust_depth_encoder(train, surface)
    with torch.no_grad():
        depth = enc.normalize(one_window_per_layer)[:, 0, -1]
    # depth below the surface in mm, centred on the band [-1, 3]: 0 / 1 / 2 mm -> -1 / 0 / 1
    torch.testing.assert_close(depth, torch.tensor([-1.0, 0.0, 1.0]), rtol=0, atol=1e-5)
    # the old inputs squeeze the same millimetre into a small fraction of a unit (UMich: 0.026)
    old = build_encoder(EncoderConfig(hidden_dim=16, lstm_layers=1), continuous_dim=len(NAMES))
    old.set_normalization(*input_stats(train, "zscore"))
    with torch.no_grad():
        old_z = old.normalize(one_window_per_layer)[:, 0, NAMES.index("Z1_ActualPosition")]
    assert float(old_z.diff().abs().max()) < 0.05
    # far above the part, the depth reads as the band's upper edge (-1 mm, centred: -2)
    idle = one_window_per_layer.clone()
    idle[..., NAMES.index("Z1_ActualPosition")] = 120.0
    with torch.no_grad():
        assert float(enc.normalize(idle)[0, 0, -1]) == pytest.approx(-2.0, abs=1e-6)


def test_robust_scaling_keeps_heavy_tails_bounded_and_the_common_range_spread():
    rng = np.random.default_rng(1)
    train = windows_of(mill_rows(rng))
    enc = robust_depth_encoder(train, 29.5)
    flat = torch.from_numpy(train.reshape(1, -1, len(NAMES)))
    with torch.no_grad():
        scaled = enc.normalize(flat)[0, :, : len(NAMES)]
    assert torch.isfinite(scaled).all() and float(scaled.abs().max()) < 10.0  # asinh: logarithmic tails
    # X position is uniform 100..200 in every block: its IQR maps to about +-1.35 / 2 before asinh
    x = scaled[:, NAMES.index("X1_ActualPosition")]
    assert 0.5 < float(torch.quantile(x, 0.75) - torch.quantile(x, 0.25)) < 1.5


def test_missing_channels_for_the_surface_are_refused_naming_the_key():
    train = windows_of(mill_rows(np.random.default_rng(2)))
    with pytest.raises(UserError, match="encoder.depth_channel"):
        estimate_surface(train, NAMES, "Z9_Position")
    with pytest.raises(UserError, match="spindle speed channel"):
        estimate_surface(train[..., [0, 1, 2, 4]], [n for n in NAMES if n != "S1_ActualVelocity"],
                         "Z1_ActualPosition")


def test_encoder_without_depth_has_the_buffers_of_earlier_checkpoints():
    enc = build_encoder(EncoderConfig(hidden_dim=16, lstm_layers=1), continuous_dim=5)
    buffers = {name for name, _ in enc.named_buffers()}
    assert buffers == {"channel_mean", "channel_std"} and enc.input_dim == 5


def test_onnx_graph_applies_the_same_transform_to_raw_units(tmp_path):
    from cnc_gcode.export_onnx import OnnxPipeline, export, parity

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    train = windows_of(mill_rows(rng))
    enc = robust_depth_encoder(train, estimate_surface(train, NAMES, "Z1_ActualPosition"))
    vocab = Vocabulary()
    dec = build_decoder(DecoderConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, max_seq_len=vocab.max_tokens + 1),
                        vocab, 16).eval()
    export(enc, dec, tmp_path, 17, window=6, channels=len(NAMES), n_categorical=4)
    pipeline = OnnxPipeline(tmp_path, vocab)
    windows = train[-8:].copy()  # cutting windows at the deepest pass
    categorical = np.zeros((len(windows), 6, 4), dtype=np.int64)
    report = parity(enc, dec, vocab, pipeline, windows, categorical)
    assert report["max_abs_diff_memory"] < 1e-4 and report["max_abs_diff_op_logits"] < 1e-4
    assert report["greedy_identical"]
    # the graph reads raw Z: one millimetre higher (a shallower pass) changes the memory onnxruntime computes
    shallower = windows.copy()
    shallower[..., NAMES.index("Z1_ActualPosition")] += 1.0
    before, after = pipeline.encode(windows, categorical)[0], pipeline.encode(shallower, categorical)[0]
    assert float(np.abs(after - before).max()) > 1e-2


def test_classification_loss_reads_the_clean_input():
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(hidden_dim=16, lstm_layers=1, dropout=0.0), continuous_dim=5).eval()
    step = train_encoder.EncoderStep(enc, reconstruct=True)
    clean, categorical = torch.randn(4, 6, 5), torch.randint(0, 3, (4, 6, 4))
    corrupted = train_encoder.corrupt(clean, 1.0, 0.5)
    with torch.no_grad():
        op_logits, reconstruction = step(clean, corrupted, categorical)
        _, from_clean = enc.encode_normalized(clean, categorical)
        memory_corrupted, from_corrupted = enc.encode_normalized(corrupted, categorical)
    torch.testing.assert_close(op_logits, from_clean, rtol=1e-5, atol=1e-5)
    assert float((op_logits - from_corrupted).abs().max()) > 1e-3  # not the corrupted input's logits
    torch.testing.assert_close(reconstruction, enc.reconstruct(memory_corrupted), rtol=1e-5, atol=1e-5)


def test_accuracy_stopping_prefers_accuracy_then_loss_and_round_trips():
    stopper = train_encoder.AccuracyStopping(patience=2)
    # epoch:        1      2      3      4 (tie, lower loss)   5
    steps = [(0.50, 1.0), (0.70, 2.0), (0.60, 0.1), (0.70, 1.5), (0.65, 0.05)]
    improved = [stopper.step(acc, loss) for acc, loss in steps]
    assert improved == [True, True, False, True, False] and not stopper.should_stop
    again = train_encoder.AccuracyStopping(patience=2)
    again.load_state_dict(stopper.state_dict())
    assert (again.best, again.best_loss, again.bad_epochs) == (0.70, 1.5, 1)
    assert not again.step(0.70, 1.6) and again.should_stop
    with pytest.raises(UserError, match="resume=false"):
        again.load_state_dict({"best": 0.3, "bad_epochs": 0, "patience": 2, "mode": "min"})


def test_best_checkpoint_is_the_validation_accuracy_epoch(sample_dir, tmp_path, stage_args, monkeypatch):
    """A scripted validation where the loss keeps falling but the accuracy peaks at epoch 2: `best` is epoch 2, the
    test report scores it, and metrics.jsonl keeps both figures. Also: the simulator's data takes the depth channel
    (actual_z, the surface from spindle_speed / velocity_x/y) and the checkpoint reloads it exactly."""
    scripted = iter([{"val_loss": 1.0, "val_op_acc": 0.4}, {"val_loss": 0.8, "val_op_acc": 0.6},
                     {"val_loss": 0.5, "val_op_acc": 0.5}, {"val_loss": 0.3, "val_op_acc": 0.55}])
    monkeypatch.setattr(train_encoder, "evaluate_encoder", lambda *args, **kwargs: next(scripted))
    args = stage_args(sample_dir, tmp_path, "sel", "encoder_train.epochs=4", "encoder_train.patience=5",
                      "data.max_train_windows=64", "run.num_threads=1", "encoder.input_scaling=robust",
                      "encoder.depth_channel=actual_z")
    assert train_encoder.main(args) == 0
    run = tmp_path / "sel"
    state, meta = load_checkpoint(run / "encoder" / "checkpoints" / "best")
    assert state["epoch"] == 2 and meta["val_op_acc"] == 0.6
    metrics = read_metrics(run / "encoder" / "metrics.jsonl")
    assert [m["val_op_acc"] for m in metrics] == [0.4, 0.6, 0.5, 0.55] and all("val_loss" in m for m in metrics)
    report = json.loads((run / "reports" / "encoder_results_test.json").read_text())
    assert report["checkpoint"].endswith("best") and report["depth_channel"] == "actual_z"
    encoder, meta, _ = load_encoder(run / "encoder" / "checkpoints" / "best")
    assert encoder.depth_band == (-1.0, 3.0) and float(encoder.surface_z) == pytest.approx(report["surface_z"])
    assert float(encoder.depth_select.sum()) == 1.0 and encoder.squash


@pytest.mark.real_data
def test_umich_positions_are_machine_coordinates_unless_relative_is_asked(real_data_dir, tmp_path):
    """Machine coordinates by default: every run cuts its passes at Z 27.5-29.7 mm, so the lowest Z is there; with
    umich.relative_positions=true (the earlier default, kept for the ablation) each run's minimum is subtracted."""
    from studies.cnc_gcode import ingest_umich

    z = {}
    for name, extra in (("machine", []), ("relative", ["umich.relative_positions=true"])):
        out = tmp_path / name
        argv = [f"umich.data_dir={real_data_dir / 'cnc_umich_toolwear'}", f"umich.out_dir={out}", "umich.stride=32",
                *extra]
        assert ingest_umich.main(argv) == 0
        with np.load(out / "train.npz") as data:
            z[name] = data["continuous"][..., list(data["channel_names"]).index("Z1_ActualPosition")]
    assert 27.0 < float(z["machine"].min()) < 28.0
    assert float(z["relative"].min()) == pytest.approx(0.0, abs=1e-6)
