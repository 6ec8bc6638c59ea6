"""The resume guard: `resume=auto` never continues a run whose config or data changed (common.runs)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import CheckpointManager, read_meta
from common.errors import UserError
from common.fingerprint import check_fingerprint, fingerprint_changes, make_fingerprint
from common.logs import read_metrics
from common.runs import open_run

TOY = Path(__file__).with_name("toy_train.py")


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOY), f"run_dir={run_dir}", *overrides], capture_output=True,
                          text=True, timeout=300)


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by relative path (to prove a refused resume wrote nothing)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("guard") / "run"
    proc = _run(run_dir, "epochs=4", "resume=false")
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_checkpoint_records_the_fingerprint(finished_run: Path) -> None:
    fingerprint = read_meta(finished_run / "checkpoints" / "latest")["fingerprint"]
    assert fingerprint["config"]["lr"] == 0.01 and fingerprint["config"]["seed"] == 7
    # What may change across a resume is not part of it.
    for volatile in ("epochs", "run_dir", "resume", "epoch_sleep"):
        assert volatile not in fingerprint["config"]


def test_changed_key_is_refused_and_nothing_is_written(tmp_path: Path, finished_run: Path) -> None:
    before = tree_digest(finished_run)
    proc = _run(finished_run, "epochs=4", "lr=0.1", "seed=3")
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "lr: 0.01 -> 0.1" in message and "seed: 7 -> 3" in message
    assert "resume=false" in message and "resume=force" in message
    assert tree_digest(finished_run) == before


def test_raising_epochs_continues_a_finished_run(tmp_path: Path, finished_run: Path) -> None:
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    config_before = (run_dir / "config.yaml").read_bytes()
    weights_before = load_file(str(run_dir / "checkpoints" / "latest" / "model.safetensors"))
    proc = _run(run_dir, "epochs=6")
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(6))
    weights_after = load_file(str(run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert any(not torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
    assert (run_dir / "config.yaml").read_bytes() == config_before  # never rewritten under a resumed run


def test_force_continues_and_says_so(tmp_path: Path, finished_run: Path) -> None:
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    proc = _run(run_dir, "epochs=5", "lr=0.05", "resume=force")
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(5))
    log = (run_dir / "train.log").read_text()
    assert "resume=force" in log and "lr: 0.01 -> 0.05" in log


def test_changed_data_file_is_named(tmp_path: Path) -> None:
    data = tmp_path / "train.npy"
    data.write_bytes(b"\x00" * 64)
    old = make_fingerprint({"train": {"lr": 0.1}}, data={"train_rows": data})
    data.write_bytes(b"\x00" * 63 + b"\x01")  # same size, one byte changed
    new = make_fingerprint({"train": {"lr": 0.1}}, data={"train_rows": data})
    with pytest.raises(UserError, match=r"data 'train_rows' changed: .*train\.npy"):
        check_fingerprint(tmp_path / "ckpt", old, new, "auto")
    assert check_fingerprint(tmp_path / "ckpt", old, new, "force")  # forced: the changes are returned


def test_directory_identity_sees_a_renamed_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    old = make_fingerprint({}, data={"dir": tmp_path / "d"})
    (tmp_path / "d" / "a.txt").rename(tmp_path / "d" / "b.txt")
    assert fingerprint_changes(old, make_fingerprint({}, data={"dir": tmp_path / "d"}))


def test_volatile_keys_and_sections_are_ignored() -> None:
    base = {"train": {"lr": 0.1, "epochs": 3, "device": "cpu"}, "logging": {"every": 5}}
    changed = {"train": {"lr": 0.1, "epochs": 30, "device": "cuda"}, "logging": {"every": 50}}
    assert fingerprint_changes(make_fingerprint(base), make_fingerprint(changed)) == []
    assert fingerprint_changes(make_fingerprint(base, volatile=["train.lr"]),
                               make_fingerprint({"train": {"lr": 9.0}}, volatile=["train.lr"])) == []


def test_manager_refuses_a_checkpoint_without_fingerprint(tmp_path: Path) -> None:
    CheckpointManager(tmp_path / "ckpt").save(torch.nn.Linear(2, 2), {"epoch": 0}, epoch=0)
    guarded = CheckpointManager(tmp_path / "ckpt", fingerprint=make_fingerprint({"lr": 1.0}))
    with pytest.raises(UserError, match="records no fingerprint"):
        guarded.resolve_resume("auto")
    assert guarded.resolve_resume("force") == tmp_path / "ckpt" / "latest"


def test_open_run_refuses_before_writing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir / "checkpoints", fingerprint=make_fingerprint({"lr": 1.0}))
    manager.save(torch.nn.Linear(2, 2), {"epoch": 0}, epoch=0)
    before = tree_digest(run_dir)
    with pytest.raises(UserError, match=r"lr: 1\.0 -> 2\.0"):
        open_run(run_dir, {"lr": 2.0}, resume="auto", checkpoint_dirs=[run_dir / "checkpoints"],
                 fingerprint=make_fingerprint({"lr": 2.0}))
    assert tree_digest(run_dir) == before and not (run_dir / "train.log").exists()
    fresh = open_run(tmp_path / "fresh", {"lr": 2.0}, resume="auto", checkpoint_dirs=[tmp_path / "fresh" / "ck"],
                     fingerprint=make_fingerprint({"lr": 2.0}), write_config=False)
    assert not fresh.resuming
    json.dumps(fresh.fingerprint)  # JSON-serialisable, as meta.json needs


def test_a_kill_between_the_two_renames_of_a_save_is_still_guarded(tmp_path: Path, finished_run: Path) -> None:
    """A kill after `latest` moved aside and before its replacement moved in leaves only `.old-latest-<pid>`: the
    run resumes from that copy (CheckpointManager puts it back), so the guard must check that copy's fingerprint
    instead of taking the run for a fresh one (which would skip the check and rewrite config.yaml)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpts = run / "checkpoints"
    (ckpts / "latest").rename(ckpts / ".old-latest-999999999")  # no such process: a dead writer
    before = tree_digest(run)
    proc = _run(run, "epochs=4", "lr=0.1")
    assert proc.returncode == 2, proc.stderr
    assert "lr: 0.01 -> 0.1" in proc.stderr.strip().splitlines()[-1]
    assert tree_digest(run) == before  # refused before anything moved or was written
    config_before = (run / "config.yaml").read_bytes()
    proc = _run(run, "epochs=5")  # same settings: resumes from the restored copy, config.yaml kept
    assert proc.returncode == 0, proc.stderr
    assert (ckpts / "latest").is_dir() and not list(ckpts.glob(".old-*"))
    assert (run / "config.yaml").read_bytes() == config_before
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == list(range(5))
