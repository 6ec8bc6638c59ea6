"""Kill-and-resume: a run killed at any moment and resumed ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import CheckpointManager, is_complete, load_checkpoint
from common.logs import read_metrics

TOY = Path(__file__).with_name("toy_train.py")
EPOCHS = 10


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TOY), f"run_dir={run_dir}", f"epochs={EPOCHS}", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "latest" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # Bit for bit on purpose: both runs make the same calls on the same batches in one environment, so any
    # difference means the resume lost state (RNG, sampler position, optimizer), not rounding.
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    subprocess.run(_cmd(run_dir, "resume=false"), check=True, env=_env(), timeout=300)
    return run_dir


def _wait_for(predicate, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_reference_run_writes_the_layout(reference_run: Path) -> None:
    ckpts = reference_run / "checkpoints"
    assert is_complete(ckpts / "latest") and is_complete(ckpts / "best")
    assert sorted(p.name for p in ckpts.glob("epoch_*")) == ["epoch_6", "epoch_9"]  # every 3, keep last 2
    state, meta = load_checkpoint(ckpts / "latest")
    assert meta["epoch"] == state["epoch"] == EPOCHS - 1
    assert [r["epoch"] for r in read_metrics(reference_run / "metrics.jsonl")] == list(range(EPOCHS))
    names = load_file(str(ckpts / "latest" / "model.safetensors")).keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in names)


def _metric_lines(run_dir: Path) -> int:
    """Epoch records written so far (a per-step record or a torn last line left out)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return sum('"step"' not in line for line in lines)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path: Path, reference_run: Path) -> None:
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    for _ in range(3):
        # Kill at a random moment shortly after the run has made progress (so each restart moves on, however
        # slow start-up is on a loaded machine): mid-epoch, mid-checkpoint or in between.
        seen = _metric_lines(run_dir)
        proc = subprocess.Popen(_cmd(run_dir, "resume=auto", "epoch_sleep=0.1"), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda seen=seen, proc=proc: _metric_lines(run_dir) > seen or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever is on disk now is whole or was set aside whole, never torn.
        latest = run_dir / "checkpoints" / "latest"
        assert is_complete(latest) or any((run_dir / "checkpoints").glob(".old-latest-*"))
    subprocess.run(_cmd(run_dir, "resume=auto"), check=True, env=_env(), timeout=300)
    _assert_identical(_final_weights(run_dir), _final_weights(reference_run))
    # every record, per-step ones included: each step once, with the uninterrupted run's loss
    assert read_metrics(run_dir / "metrics.jsonl", steps=True) == read_metrics(reference_run / "metrics.jsonl",
                                                                               steps=True)


def test_sigkill_while_checkpoint_is_written(tmp_path: Path, reference_run: Path) -> None:
    run_dir = tmp_path / "torn"
    run_dir.mkdir()
    proc = subprocess.Popen(_cmd(run_dir, "resume=auto"), env=_env(TOY_SLOW_CHECKPOINT="0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill while a `latest` (epoch 2 or later) has its weights on disk but not its state. An improving epoch's
    # `latest` links the bytes `best` just wrote, so the slow serialisation this waits for is a non-improving epoch's.
    marker = run_dir / f"writing_.tmp-latest-{proc.pid}"
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: marker.exists() and metrics.exists() and len(read_metrics(metrics)) >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = run_dir / "checkpoints"
    assert list(ckpts.glob(".tmp-latest-*")), "the kill should have left a half-written temporary directory"
    torn_epoch = read_metrics(metrics)[-1]["epoch"]  # metrics.jsonl gets an epoch's line before its checkpoint
    state, meta = load_checkpoint(ckpts / "latest")  # the previous, complete checkpoint
    assert torn_epoch >= 2 and state["epoch"] == meta["epoch"] == torn_epoch - 1
    # Resume (without the slow writes) and finish: identical to the reference run.
    subprocess.run(_cmd(run_dir, "resume=auto"), check=True, env=_env(), timeout=300)
    assert not list(ckpts.glob(".tmp-*")), "stale temporary directories are cleaned on restart"
    _assert_identical(_final_weights(run_dir), _final_weights(reference_run))


def test_kill_between_swap_renames_recovers_old_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(model, {"epoch": 4}, epoch=4)
    # Simulate a kill after `latest` was moved aside and before the new one was moved in.
    os.replace(tmp_path / "ckpt" / "latest", tmp_path / "ckpt" / ".old-latest-999999999")
    recovered = CheckpointManager(tmp_path / "ckpt")
    assert recovered.resolve_resume("auto") == tmp_path / "ckpt" / "latest"
    state, _ = load_checkpoint(recovered.resolve_resume("auto"))
    assert state["epoch"] == 4
