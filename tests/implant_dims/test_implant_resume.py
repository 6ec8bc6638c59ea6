"""Resume of the implant_dims training stages: a real SIGKILL of train_dual (across an unfreezing boundary) and of
train_classifier, then resume=auto in a new process, ends at the weights of an uninterrupted run bit for bit; a
changed config is refused before anything is written; raising the epochs continues a finished run."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.logs import read_metrics
from implant_dims import train_classifier, train_dual

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# 5 epochs, unfreezing after epoch 1 (0-based 1) and 3 (0-based 3): stages 0, 1, 1, 2, 2. A kill after epoch 1, 2
# or 3 leaves a resume that starts in stage 1 and crosses into stage 2 (after epoch 1 it also starts on a boundary).
DUAL = ("regression.epochs=5", "regression.unfreeze_half_epoch=1", "regression.unfreeze_all_epoch=3",
        "regression.mc_samples=0", "data.test_json=", "data.unseen_json=", "visual.frozen_in_stage0=true")
CLASSIFIER = ("classifier.epochs=3", "data.test_json=", "data.unseen_json=")


def weights(stage_dir: Path, which: str = "latest") -> dict[str, np.ndarray]:
    return load_file(str(stage_dir / "checkpoints" / which / "model.safetensors"))


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str = "") -> None:
    assert a.keys() == b.keys()
    # bit-exact: a killed-and-resumed run against the uninterrupted one (the same ops on the same inputs, same machine)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


def latest_epoch(stage_dir: Path) -> int:
    meta = stage_dir / "checkpoints" / "latest" / "meta.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_after_first_checkpoint(argv: list[str], stage_dir: Path, max_epochs: float) -> float:
    """Start `python -m <stage> argv`, SIGKILL it at a random moment within `max_epochs` epoch durations (epoch 1's
    `seconds` in metrics.jsonl) after checkpoints/latest first appears: mid-epoch, mid-checkpoint-write or between
    epochs. Returns the delay in seconds."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while latest_epoch(stage_dir) < 1:
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.002)
        delay = random.uniform(0.0, max_epochs * read_metrics(stage_dir / "metrics.jsonl")[0]["seconds"])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return delay


def resumed_after(stage_dir: Path) -> int:
    """The last complete epoch the resumed run continued from (a kill between the two renames of a checkpoint swap
    leaves `latest` under .old-latest-<pid> until the resume puts it back, so ask the resumed run's log)."""
    found = re.findall(r"resumed from (\S+) at epoch (\d+)", (stage_dir / "train.log").read_text())
    assert len(found) == 1, found
    assert found[0][0] == str(stage_dir / "checkpoints" / "latest")
    return int(found[0][1]) - 1


def run_listing(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file and folder under `root`."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def dual_reference(trained_run, implant_data, stage_args, tmp_path_factory):
    """(argv builder, uninterrupted 5-epoch dual run dir) on trained_run's classifiers."""
    runs = tmp_path_factory.mktemp("implant_resume")

    def args(name: str, *extra: str) -> list[str]:
        return stage_args(implant_data, runs, name,
                          f"regression.company_checkpoint={trained_run / 'classifier_company/checkpoints/best'}",
                          f"regression.model_checkpoint={trained_run / 'classifier_model_type/checkpoints/best'}",
                          *DUAL, *extra)

    assert train_dual.main(args("a")) == 0
    return args, runs / "a" / "dual"


def test_sigkill_train_dual_then_resume_crosses_unfreezing_and_is_bit_identical(dual_reference):
    args, reference = dual_reference
    assert [(m["epoch"], m["stage"]) for m in read_metrics(reference / "metrics.jsonl")] == \
        [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    argv = ["-m", "implant_dims.train_dual", *args("b")]
    out = Path(args("b")[2].split("=", 1)[1]) / "b" / "dual"
    delay = kill_after_first_checkpoint(argv, out, max_epochs=1.5)
    assert train_dual.main(args("b")) == 0  # resume=auto (in-process: the killed one was a real process)
    epoch = resumed_after(out)
    assert 1 <= epoch <= 3, f"killed after epoch {epoch}: the resume would not cross the last unfreezing step"
    assert_same_weights(weights(reference), weights(out), f"killed {delay:.3f} s after epoch 1's checkpoint")
    assert_same_weights(weights(reference, "best"), weights(out, "best"), "best")
    resumed, straight = read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [m["epoch"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed, straight, strict=True):  # bit-exact: resume against the uninterrupted run
        assert (a["stage"], a["train_loss"], a["val_mean_mae"], a["best"]) == \
            (b["stage"], b["train_loss"], b["val_mean_mae"], b["best"])


def test_sigkill_train_classifier_then_resume_is_bit_identical(implant_data, stage_args, tmp_path):
    runs = tmp_path / "runs"

    def args(name: str) -> list[str]:
        return stage_args(implant_data, runs, name, *CLASSIFIER)

    assert train_classifier.main(args("a")) == 0
    reference = runs / "a" / "classifier_company"
    out = runs / "b" / "classifier_company"
    argv = ["-m", "implant_dims.train_classifier", *args("b")]
    delay = kill_after_first_checkpoint(argv, out, max_epochs=0.9)
    assert train_classifier.main(args("b")) == 0
    assert resumed_after(out) in (1, 2)
    assert_same_weights(weights(reference), weights(out), f"killed {delay:.3f} s after epoch 1's checkpoint")
    assert_same_weights(weights(reference, "best"), weights(out, "best"), "best")
    resumed, straight = read_metrics(out / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    # bit-exact: resume against the uninterrupted run
    assert [(m["train_loss"], m["val_accuracy"]) for m in resumed] == \
        [(m["train_loss"], m["val_accuracy"]) for m in straight]
    assert json.loads((out / "reports" / "results_val.json").read_text())["confusion"] == \
        json.loads((reference / "reports" / "results_val.json").read_text())["confusion"]


@pytest.mark.parametrize("stage, override, named", [
    ("dual", "regression.lr=0.01", "regression.lr: 0.001 -> 0.01"),
    ("dual", "regression.dropout=0.3", "regression.dropout: 0.1 -> 0.3"),
    ("classifier", "classifier.lr=0.01", "classifier.lr: 0.001 -> 0.01"),
])
def test_changed_config_is_refused_and_nothing_is_written(dual_reference, trained_run, stage_args, implant_data,
                                                          capsys, stage, override, named):
    args, reference = dual_reference
    if stage == "dual":
        root, argv, main = reference, args("a", override), train_dual.main
    else:  # the shared tiny run's company classifier (finished: 2 epochs)
        root = trained_run / "classifier_company"
        argv = stage_args(implant_data, trained_run.parent, trained_run.name, override)
        main = train_classifier.main
    before = run_listing(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert named in err[0] and str(root / "checkpoints" / "latest") in err[0], err[0]
    assert "resume=false" in err[0] and "resume=force" in err[0]
    assert run_listing(root) == before, "a refused resume changed the run directory"


def test_raising_the_epochs_continues_a_finished_dual_run(dual_reference, tmp_path):
    args, reference = dual_reference
    runs = Path(args("a")[2].split("=", 1)[1])
    shutil.copytree(reference.parent, runs / "c")  # a copy: the other tests keep the 5-epoch run
    out = runs / "c" / "dual"
    config_before, weights_before = (out / "config.yaml").read_bytes(), weights(out)
    assert train_dual.main(args("c", "regression.epochs=6")) == 0
    metrics = read_metrics(out / "metrics.jsonl")
    assert [(m["epoch"], m["stage"]) for m in metrics] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert metrics[:5] == read_metrics(reference / "metrics.jsonl")  # exact: lines copied with the run
    assert json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())["epoch"] == 6
    changed = weights(out)
    assert any(not np.array_equal(changed[k], weights_before[k]) for k in changed)
    assert (out / "config.yaml").read_bytes() == config_before
    assert "resumed from" in (out / "train.log").read_text()
