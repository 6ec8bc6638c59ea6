"""Checkpoint manager: layout, prefixes, weights_only state, corrupt checkpoints, resume resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from common.checkpoint import CheckpointManager, find_checkpoint, is_complete, load_checkpoint, load_weights
from common.errors import UserError


class Wrapped(nn.Module):
    """Stands in for DDP: the real model sits under `.module`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def _state(model: nn.Module, epoch: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"optimizer": opt.state_dict(), "epoch": epoch, "best": 0.5, "history": [1.0, 0.5]}


def test_layout_prefixes_and_weights_only(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last_n=2, every_n_epochs=2)
    for epoch in range(1, 7):
        manager.save(Wrapped(model), _state(model, epoch), epoch=epoch,
                     is_best=epoch == 3)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["best", "epoch_4", "epoch_6", "latest"]
    weights = load_file(str(tmp_path / "ckpt" / "latest" / "model.safetensors"))
    assert set(weights) == {"weight", "bias"}  # no `module.` prefix
    state = torch.load(tmp_path / "ckpt" / "best" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 3 and state["history"] == [1.0, 0.5]
    fresh = nn.Linear(3, 2)
    loaded, meta = load_checkpoint(tmp_path / "ckpt" / "latest", fresh)
    assert meta["epoch"] == 6 and torch.equal(fresh.weight, model.weight)  # stored bytes read back: exact
    torch.optim.AdamW(fresh.parameters()).load_state_dict(loaded["optimizer"])


def test_corrupt_checkpoint_never_loads(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(model, {"epoch": 0}, epoch=0)
    latest = tmp_path / "ckpt" / "latest"
    data = bytearray((latest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    (latest / "model.safetensors").write_bytes(bytes(data))
    assert not is_complete(latest)
    with pytest.raises(UserError, match="incomplete or corrupt"):
        load_checkpoint(latest, model)
    assert manager.resolve_resume("auto") is None  # auto never picks a torn checkpoint


def test_resume_resolution(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert manager.resolve_resume("auto") is None
    assert manager.resolve_resume(False) is None and manager.resolve_resume("false") is None
    with pytest.raises(UserError, match="does not exist"):
        manager.resolve_resume(tmp_path / "missing")
    manager.save(nn.Linear(2, 2), {"epoch": 1}, epoch=1)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert manager.resolve_resume("auto") == latest
    assert find_checkpoint(tmp_path / "run") == latest  # a run dir resolves to its latest checkpoint
    assert find_checkpoint(latest / "meta.json") == latest
    assert json.loads((latest / "meta.json").read_text())["epoch"] == 1


def test_shape_mismatch_is_a_user_error(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(nn.Linear(3, 2), {"epoch": 0}, epoch=0)
    with pytest.raises(UserError, match="weights do not fit this model"):
        load_weights(tmp_path / "ckpt" / "latest", nn.Linear(4, 2))


def test_shared_tensors_are_saved(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied weights share storage
    CheckpointManager(tmp_path / "ckpt").save(model, {"epoch": 0}, epoch=0)
    fresh = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    load_weights(tmp_path / "ckpt", fresh)
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[1].weight, model[0].weight)


def test_one_step_is_serialised_once_and_best_keeps_its_bytes_when_latest_moves_on(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    manager = CheckpointManager(tmp_path / "ckpt", every_n_epochs=1)
    manager.save(model, _state(model, 1), epoch=1, is_best=True)
    ckpt = tmp_path / "ckpt"
    for fname in ("model.safetensors", "train_state.pt"):
        # best, epoch_1 and latest of one step are one file on disk (hard links), not three writes
        assert (ckpt / "best" / fname).stat().st_ino == (ckpt / "latest" / fname).stat().st_ino
        assert (ckpt / "epoch_1" / fname).stat().st_ino == (ckpt / "latest" / fname).stat().st_ino
    best_meta = json.loads((ckpt / "best" / "meta.json").read_text())
    assert best_meta["files"] == json.loads((ckpt / "latest" / "meta.json").read_text())["files"]
    assert best_meta["name"] == "best" and is_complete(ckpt / "latest")
    best_weights = {k: v.clone() for k, v in load_file(str(ckpt / "best" / "model.safetensors")).items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    manager.save(model, _state(model, 2), epoch=2, is_best=False)
    assert (ckpt / "best" / "model.safetensors").stat().st_ino != (ckpt / "latest" / "model.safetensors").stat().st_ino
    after = load_file(str(ckpt / "best" / "model.safetensors"))
    assert all(torch.equal(after[k], best_weights[k]) for k in best_weights)
    assert is_complete(ckpt / "best") and is_complete(ckpt / "latest")
    assert not torch.equal(load_file(str(ckpt / "latest" / "model.safetensors"))["weight"], best_weights["weight"])
