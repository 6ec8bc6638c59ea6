"""pretrain / finetune / evaluate / baseline on the sample store: learning, outputs, resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ehr_helpers import TINY_MODEL, train_config
from safetensors.torch import load_file

from common.config import load_config
from ehr_embedded import evaluate as evaluate_stage
from ehr_embedded import finetune as finetune_stage
from ehr_embedded import pretrain as pretrain_stage
from ehr_embedded.baseline import fit_baseline
from ehr_embedded.config import BaselineConfig
from ehr_embedded.engine import load_pretrained, model_for
from ehr_embedded.evaluate import PREDICTION_SCHEMA
from ehr_embedded.finetune import finetune
from ehr_embedded.predict import predict_split
from ehr_embedded.pretrain import next_event_targets, pretrain
from ehr_embedded.storage import load_dataset_table


def weights(run_dir, which="latest"):
    return load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_encoder_learns_and_writes_meds_predictions(built, tmp_path):
    cfg = train_config(built.store, tmp_path / "enc", "training.epochs=6", "training.early_stopping_patience=6")
    report = finetune(cfg)
    run = tmp_path / "enc"
    # the sample label is learnable from events before prediction_time (a broken cut or model sits near 0.5)
    assert report["auroc"]["value"] > 0.8, report["auroc"]
    assert report["auroc"]["low"] <= report["auroc"]["value"] <= report["auroc"]["high"]
    for name in ("auprc", "f1", "accuracy", "brier"):
        assert 0.0 <= report[name]["value"] <= 1.0
    threshold = json.loads((run / "reports" / "threshold.json").read_text())["threshold"]
    assert report["threshold"] == threshold
    predictions = pq.read_table(run / "predictions" / "held_out.parquet")
    assert predictions.schema.equals(PREDICTION_SCHEMA)
    assert len(predictions) == report["n"]
    probs = predictions.column("predicted_boolean_probability").to_numpy()
    assert np.array_equal(predictions.column("predicted_boolean_value").to_numpy(zero_copy_only=False),
                          probs >= threshold)
    assert (run / "plots" / "calibration_held_out.png").stat().st_size > 1000
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, len(lines) + 1))
    # the run directory alone is enough to reload the model (predict.load_run) and reproduce the predictions
    again = predict_split(run, "held_out")
    np.testing.assert_allclose(again["predicted_boolean_probability"].to_numpy(), probs, rtol=1e-5, atol=1e-6)


class Killed(Exception):
    """Stands in for SIGKILL: raised from inside the training loop, so nothing after it runs."""


def kill_after(monkeypatch, module, name, calls):
    """Make `module.name` raise Killed on call number `calls + 1` (a kill mid-epoch, between optimizer steps)."""
    real = getattr(module, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_finetune_kill_mid_epoch_and_resume_is_bit_identical(built, tmp_path, monkeypatch):
    """Three epochs straight == a run killed in the middle of epoch 2 and resumed with resume=auto (dropout RNG,
    data order, optimizer, plateau scheduler and early stopping all come back from checkpoints/latest)."""
    args = ("training.selection_metric=loss",)
    finetune(train_config(built.store, tmp_path / "a", *args))
    batches_per_epoch = -(-96 // 16)
    with monkeypatch.context() as patch:
        kill_after(patch, finetune_stage, "focal_loss", batches_per_epoch + 2)
        with pytest.raises(Killed):
            finetune(train_config(built.store, tmp_path / "b", *args))
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest" / "meta.json").read_text())["epoch"] == 1
    finetune(train_config(built.store, tmp_path / "b", *args, "training.resume=auto"))
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert same_weights(weights(tmp_path / "a", "best"), weights(tmp_path / "b", "best"))

    def losses(run):
        return [json.loads(x)["tuning_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_pretrain_kill_resume_and_decoder_init_from_pretrained(built, tmp_path, monkeypatch):
    pre = ("training.epochs=2", "training.learning_rate=0.003")
    kind = {"model_type": "transformer_decoder_embedded", "task": "autoregressive"}
    tuning = pretrain(train_config(built.store, tmp_path / "p1", *pre, **kind))
    assert np.isfinite(tuning["loss"]) and 0.0 < tuning["top10_accuracy"] <= 1.0
    with monkeypatch.context() as patch:
        kill_after(patch, pretrain_stage, "lm_loss", 6 + 1 + 3)  # 6 train + 1 tuning batch, then 3 of epoch 2
        with pytest.raises(Killed):
            pretrain(train_config(built.store, tmp_path / "p2", *pre, **kind))
    assert json.loads((tmp_path / "p2" / "checkpoints" / "latest" / "meta.json").read_text())["epoch"] == 1
    pretrain(train_config(built.store, tmp_path / "p2", *pre, **kind))
    assert same_weights(weights(tmp_path / "p1"), weights(tmp_path / "p2"))

    table = load_dataset_table(built.store)
    cfg = train_config(built.store, tmp_path / "ft", model_type="transformer_decoder_embedded")
    model = model_for(cfg, table, "classification")
    load_pretrained(model, tmp_path / "p1", table, built.store)
    pretrained = weights(tmp_path / "p1", "best")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    report = finetune(train_config(built.store, tmp_path / "ft", f"training.pretrained_checkpoint={tmp_path / 'p1'}",
                                   model_type="transformer_decoder_embedded"))
    assert 0.0 <= report["auroc"]["value"] <= 1.0


def test_next_event_targets_ignore_padding_and_description_only_rows():
    ids = torch.tensor([[5, 6, 9, 0], [7, 8, 3, 4]])
    pad = ids == 0
    targets = next_event_targets(ids, pad, vocab_size=9)
    assert targets.tolist() == [[6, -100, -100, -100], [8, 3, 4, -100]]  # 9 is a description-only row


def test_baseline_counts_logistic_regression(built, tmp_path):
    cfg = load_config(BaselineConfig, None, [f"embedding_output_dir={built.store}", f"output_dir={tmp_path}",
                                             "n_bootstrap=100", "c_grid=[0.1, 1.0]"])
    report = fit_baseline(cfg)
    assert report["C"] in (0.1, 1.0) and 0.0 <= report["auroc"]["value"] <= 1.0
    assert pq.read_table(tmp_path / "predictions" / "held_out.parquet").schema.equals(PREDICTION_SCHEMA)


def test_checkpoint_table_dimension_mismatch_is_a_clear_error(built, tmp_path, capsys):
    run = tmp_path / "run"
    finetune(train_config(built.store, run, "training.epochs=1"))
    other = tmp_path / "store32"
    shutil.copytree(built.store, other)
    emb = np.load(other / "code_table" / "embeddings.npy")
    np.save(other / "code_table" / "embeddings.npy", emb[:, :32].copy())
    args = [*TINY_MODEL, f"data.embedding_output_dir={other}", f"training.output_dir={run}"]
    assert evaluate_stage.main(args) == 2
    err = capsys.readouterr().err
    assert "32-d" in err and "384-d" in err


@pytest.mark.parametrize("args, needle", [
    (["model.type=transformer_encoder_embedded", "training.task=autoregressive"], "transformer_decoder_embedded"),
    (["data.embedding_output_dir=/nonexistent/store"], "create_vocab_embeddings"),
    (["model.model_dim=30", "model.n_heads=4"], "divisible"),
    (["training.class_weights=[1.0, 2.0, 3.0]"], "class_weights"),
    (["training.learning_rat=0.1"], "learning_rate"),
])
def test_training_stage_errors_exit_2(built, tmp_path, capsys, args, needle):
    base = [*TINY_MODEL, f"data.embedding_output_dir={built.store}", f"training.output_dir={tmp_path / 'r'}",
            "training.epochs=1"]
    main = pretrain_stage.main if "training.task=autoregressive" in args else finetune_stage.main
    assert main([*base, *args]) == 2
    assert needle in capsys.readouterr().err


def test_finetune_sigkill_then_resume_is_bit_identical(built, tmp_path):
    """A real `kill -9` of the finetune process after its first checkpoint, then resume=auto in a new process:
    the same final weights as a run that was never interrupted (both in subprocesses, one thread each)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ehr_helpers import train_overrides

    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(run_dir):
        return [sys.executable, "-m", "ehr_embedded.finetune", *train_overrides(
            built.store, run_dir, "training.selection_metric=loss", "training.epochs=4", "training.num_threads=1")]

    subprocess.run(command(tmp_path / "a"), check=True, env=env, capture_output=True, timeout=300)
    metrics = tmp_path / "b" / "metrics.jsonl"
    proc = subprocess.Popen(command(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline, "finetune made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(command(tmp_path / "b"), check=True, env=env, capture_output=True, timeout=300)
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert same_weights(weights(tmp_path / "a", "best"), weights(tmp_path / "b", "best"))
