"""The resume guard of both training stages (common.runs.open_run): resume=auto never continues a run whose config,
data or frozen encoder changed; raising the epochs continues a finished run; resume=force continues and says so.

The tests share one small finished run and run in file order: the refusals first (they change nothing), then the
continuations (each adds epochs), then a longer encoder, which the decoder must then refuse.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from cnc_gcode import train_decoder, train_encoder
from cnc_gcode.sample_data import save_npz
from common.logs import read_metrics

SMALL = ("encoder_train.epochs=1", "train.epochs=2", "data.max_train_windows=64", "run.num_threads=1")


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (train.log, config.yaml, metrics, checkpoints, reports), by path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def weights(run: Path, stage: str) -> dict[str, np.ndarray]:
    return load_file(str(run / stage / "checkpoints" / "latest" / "model.safetensors"))


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Bit-exact: used as `not same(...)`, the weights training wrote are not the ones it started from."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def epochs(run: Path, stage: str) -> list[int]:
    return [r["epoch"] for r in read_metrics(run / stage / "metrics.jsonl")]


@pytest.fixture(scope="module")
def guarded(sample_dir, tmp_path_factory, stage_args):
    """(run dir, argv builder, data dir): encoder 1 epoch + decoder 2 epochs, finished, on a private copy of the
    sample data (one test rewrites a data file)."""
    root = tmp_path_factory.mktemp("cnc_guard")
    data = root / "data"
    shutil.copytree(sample_dir, data, ignore=shutil.ignore_patterns("programs"))

    def args(*extra: str, data_dir: Path = data) -> list[str]:
        return stage_args(data_dir, root / "runs", "g", *SMALL, *extra)

    assert train_encoder.main(args()) == 0
    assert train_decoder.main(args()) == 0
    return root / "runs" / "g", args, data


def refused(main, argv, run: Path, capsys) -> str:
    """Run a stage that must refuse: exit 2, the run directory byte-identical; returns the error line."""
    capsys.readouterr()
    before = tree_digest(run)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert tree_digest(run) == before, "a refused resume wrote into the run directory"
    assert "resume=false" in err and "resume=force" in err and "new run name" in err
    return err


@pytest.mark.parametrize("stage, overrides, named", [
    ("encoder", ["encoder_train.lr=0.01", "run.seed=4"], ["encoder_train.lr: 0.005 -> 0.01", "run.seed: 0 -> 4"]),
    ("decoder", ["train.lr=0.01", "decoder.dropout=0.3"], ["train.lr: 0.003 -> 0.01", "decoder.dropout: 0.1 -> 0.3"]),
])
def test_changed_key_is_refused_and_nothing_is_written(guarded, capsys, stage, overrides, named):
    run, args, _ = guarded
    main = train_encoder.main if stage == "encoder" else train_decoder.main
    err = refused(main, args(*overrides), run, capsys)
    assert all(text in err for text in named), err
    assert f"{stage}/checkpoints/latest" in err


def test_changed_data_file_is_refused(guarded, capsys):
    run, args, data = guarded
    original = (data / "train.npz").read_bytes()
    with np.load(data / "train.npz") as npz:
        n = len(npz["tokens"])
        fewer = {k: npz[k][:500] if npz[k].shape[:1] == (n,) else npz[k] for k in npz.files}
    try:
        save_npz(data / "train.npz", fewer)
        err = refused(train_decoder.main, args(), run, capsys)
        assert "data 'train' changed" in err and "train.npz" in err, err
    finally:
        (data / "train.npz").write_bytes(original)


def test_raising_the_epochs_continues_a_finished_run(guarded, tmp_path):
    """A finished decoder (its epoch limit reached) continues when train.epochs goes up, also from a moved copy of
    the same data (paths are not part of the fingerprint, contents are) and with other evaluation settings;
    config.yaml stays the one the run started with."""
    run, args, data = guarded
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    config_before = (run / "decoder" / "config.yaml").read_bytes()
    weights_before, done = weights(run, "decoder"), epochs(run, "decoder")
    assert done == [1, 2]
    # eval/predict/export settings do not decide the decoder's weights: changing them is no reason to refuse
    assert train_decoder.main(args("train.epochs=3", "eval.max_windows=7", "export.opset=18", data_dir=moved)) == 0
    assert epochs(run, "decoder") == [1, 2, 3]
    assert json.loads((run / "decoder" / "checkpoints" / "latest" / "meta.json").read_text())["epoch"] == 3
    assert not same(weights(run, "decoder"), weights_before)
    assert (run / "decoder" / "config.yaml").read_bytes() == config_before


def test_resume_force_continues_and_logs_what_changed(guarded, capsys):
    run, args, _ = guarded
    config_before = (run / "decoder" / "config.yaml").read_bytes()
    done = epochs(run, "decoder")
    capsys.readouterr()
    assert train_decoder.main(args("train.lr=0.01", f"train.epochs={done[-1] + 1}", "train.resume=force")) == 0
    assert epochs(run, "decoder") == [*done, done[-1] + 1]
    log = (run / "decoder" / "train.log").read_text()
    assert "resume=force: continuing" in log and "train.lr: 0.003 -> 0.01" in log
    assert "resume=force" in capsys.readouterr().err
    assert (run / "decoder" / "config.yaml").read_bytes() == config_before


def test_a_longer_encoder_continues_and_the_decoder_then_refuses_it(guarded, capsys):
    run, args, _ = guarded
    encoder_before = weights(run, "encoder")
    config_before = (run / "encoder" / "config.yaml").read_bytes()
    assert train_encoder.main(args("encoder_train.epochs=2")) == 0
    assert epochs(run, "encoder") == [1, 2]
    assert not same(weights(run, "encoder"), encoder_before)
    assert (run / "encoder" / "config.yaml").read_bytes() == config_before
    # the encoder's latest checkpoint now holds other weights than the one the decoder froze (epoch 1; `best` moves to
    # epoch 2 only when its validation loss is lower, which depends on the data): continuing would mix them
    frozen = f"train.encoder_checkpoint={run / 'encoder' / 'checkpoints' / 'latest'}"
    err = refused(train_decoder.main, args(f"train.epochs={epochs(run, 'decoder')[-1] + 1}", frozen), run, capsys)
    assert "data 'encoder_weights' changed" in err, err


def test_resume_false_starts_the_run_over(guarded):
    """The third way on that a refusal names: the same run name, started over with the new value."""
    run, args, _ = guarded
    assert train_encoder.main(args("encoder_train.lr=0.01", "encoder_train.resume=false")) == 0
    assert epochs(run, "encoder") == [1]
    assert "lr: 0.01" in (run / "encoder" / "config.yaml").read_text()
    meta = json.loads((run / "encoder" / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["fingerprint"]["config"]["encoder_train.lr"] == 0.01
