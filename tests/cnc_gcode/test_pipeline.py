"""In-process end-to-end runs of the stages on simulated data, kill-and-resume, ONNX parity, ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from cnc_gcode import ablation_gamma, ablation_modality, evaluate, export_onnx, predict, train, train_encoder
from cnc_gcode.gcode import parse_program
from cnc_gcode.sample_data import save_npz
from cnc_gcode.tokenizer import Vocabulary


def test_encoder_learns_operations(trained_run):
    runs, _ = trained_run
    result = json.loads((runs / "t" / "reports" / "encoder_results_test.json").read_text())
    assert result["operation_acc"] > max(0.4, result["majority_operation_acc"] + 0.2), result
    assert (runs / "t" / "reports" / "encoder_confusion_test.png").stat().st_size > 1000


def test_evaluate_writes_metrics_and_plot(trained_run):
    runs, args = trained_run
    assert evaluate.main(args) == 0
    results = json.loads((runs / "t" / "reports" / "results_test.json").read_text())
    for key in ("operation_acc", "token_acc", "type_acc", "command_acc", "ptype_acc", "digit1_acc", "digit4_acc",
                "line_exact_match", "random_token_acc", "majority_token_acc", "majority_operation_acc"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["random_token_acc"] < 0.05  # over 10^6 ids a random guess is almost never right
    assert results["type_acc"] > 0.5  # even a 2-epoch tiny decoder learns where lines end
    assert (runs / "t" / "reports" / "confusion_test.png").is_file()
    assert "target" in (runs / "t" / "reports" / "samples_test.txt").read_text()


def test_predict_writes_valid_gcode(trained_run, sample_dir, tmp_path):
    runs, args = trained_run
    with np.load(sample_dir / "test.npz") as test:
        save_npz(tmp_path / "sensors.npz", {"continuous": test["continuous"][:12], "categorical": test["categorical"][:12]})
    out = tmp_path / "out.nc"
    assert predict.main([*args, f"predict.input={tmp_path / 'sensors.npz'}", f"predict.output={out}"]) == 0
    vocab = Vocabulary()
    lines = [line for line in parse_program(out.read_text()) if not line.is_empty]
    assert lines and all(line.error is None for line in lines)
    assert all(vocab.encode_line(line) for line in lines)  # grammar-constrained output is always representable
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 13


def test_onnx_export_matches_pytorch(trained_run):
    runs, args = trained_run
    assert export_onnx.main(args) == 0
    parity = json.loads((runs / "t" / "onnx" / "parity.json").read_text())
    assert parity["max_abs_diff_memory"] < 1e-4 and parity["max_abs_diff_step_logits"] < 1e-4
    assert parity["greedy_identical"] is True


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(trained_run, sample_dir, tmp_path, stage_args):
    runs, _ = trained_run
    encoder = f"train.encoder_checkpoint={runs / 't' / 'encoder' / 'checkpoints' / 'best'}"
    straight = stage_args(sample_dir, tmp_path, "straight", encoder, "train.epochs=3", "data.max_train_windows=200")
    resumed = stage_args(sample_dir, tmp_path, "resumed", encoder, "train.epochs=3", "data.max_train_windows=200")
    assert train.main(straight) == 0
    assert train.main([*resumed, "train.stop_after_epochs=1"]) == 0  # "killed" after epoch 1
    assert train.main([*resumed, "train.stop_after_epochs=1"]) == 0  # requeued: epoch 2, killed again
    assert train.main(resumed) == 0  # requeued: finishes
    a = load_file(str(tmp_path / "straight" / "decoder" / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "decoder" / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "resumed" / "decoder" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_ablations_write_tables(trained_run):
    runs, args = trained_run
    assert ablation_modality.main(args) == 0
    table = (runs / "t" / "reports" / "ablation_modality.md").read_text()
    assert "full model" in table and "- proximity" in table and "- pressure" in table
    rows = json.loads((runs / "t" / "reports" / "ablation_modality.json").read_text())
    assert len(rows) == 10 and all(0 <= r["token_acc"] <= 1 for r in rows)
    assert ablation_gamma.main([*args, "ablation.gammas=[ce,2]", "ablation.epochs=1", "eval.max_windows=40"]) == 0
    gamma_rows = json.loads((runs / "t" / "reports" / "ablation_gamma.json").read_text())
    assert [(r["gamma"], r["label_smoothing"]) for r in gamma_rows] == [(0.0, 0.0), (2.0, 0.1)]
    assert (runs / "t" / "reports" / "ablation_gamma.png").is_file()


def test_encoder_resume_continues_from_latest(sample_dir, tmp_path, stage_args):
    args = stage_args(sample_dir, tmp_path, "enc", "encoder_train.epochs=2", "data.max_train_windows=64")
    assert train_encoder.main([*args, "encoder_train.epochs=1"]) == 0
    assert train_encoder.main(args) == 0
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "enc" / "encoder" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
