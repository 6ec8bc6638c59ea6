"""Early stopping, cosine-with-warmup, parameter groups, seeding and JSON helpers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.io import to_jsonable, write_json
from common.logs import MetricsWriter, read_metrics
from common.seed import get_rng_state, seed_everything, set_rng_state
from common.training import EarlyStopping, cosine_with_warmup, param_groups


def test_early_stopping_counts_patience_and_round_trips() -> None:
    stopper = EarlyStopping(patience=2, mode="min", min_delta=0.01)
    assert stopper.step(1.0) and stopper.best == 1.0
    assert not stopper.step(0.995)  # within min_delta: not an improvement
    assert not stopper.should_stop
    clone = EarlyStopping(patience=2)
    clone.load_state_dict(stopper.state_dict())
    assert not stopper.step(2.0) and stopper.should_stop
    assert not clone.step(2.0) and clone.should_stop
    maximise = EarlyStopping(patience=1, mode="max")
    assert maximise.step(0.5) and maximise.step(0.6) and not maximise.step(0.55)
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)


def test_cosine_with_warmup_shape() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warmup
    assert lrs[4] == pytest.approx(1.0)  # peak right after warmup
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)  # floor, then stays
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    with pytest.raises(ValueError):
        cosine_with_warmup(opt, warmup_steps=5, total_steps=3)


def test_param_groups_decay_and_multipliers() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    model.add_module("head", nn.Linear(4, 1))
    model.add_module("frozen", nn.Linear(4, 1))
    for p in model.frozen.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1, base_lr=1e-3, lr_mults={"encoder": 0.1})
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.encoder[0].weight)]["lr"] == pytest.approx(1e-4)
    assert by_id[id(model.encoder[0].weight)]["weight_decay"] == 0.1
    assert by_id[id(model.encoder[0].bias)]["weight_decay"] == 0.0
    assert by_id[id(model.encoder[1].weight)]["weight_decay"] == 0.0  # norm weight
    assert by_id[id(model.head.weight)]["lr"] == pytest.approx(1e-3)
    assert id(model.frozen.weight) not in by_id
    assert sum(len(g["params"]) for g in groups) == 6


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    seed_everything(11)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_json_helpers_and_metrics_writer(tmp_path: Path) -> None:
    obj = {"a": np.float32(1.5), "b": torch.tensor(2), "c": np.arange(3), "d": Path("x"), "e": float("nan")}
    assert to_jsonable(obj) == {"a": 1.5, "b": 2, "c": [0, 1, 2], "d": "x", "e": None}
    write_json(tmp_path / "o.json", obj)
    assert json.loads((tmp_path / "o.json").read_text())["c"] == [0, 1, 2]
    with MetricsWriter(tmp_path / "m.jsonl") as writer:
        for epoch in range(4):
            writer.write({"epoch": epoch, "loss": np.float64(epoch / 2)})
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "lo')  # a line torn by a kill
    # Resuming from epoch 1 drops the records written after that checkpoint, and the torn line.
    with MetricsWriter(tmp_path / "m.jsonl", resume_epoch=1) as writer:
        writer.write({"epoch": 2, "loss": 9.0})
    assert read_metrics(tmp_path / "m.jsonl") == [{"epoch": 0, "loss": 0.0}, {"epoch": 1, "loss": 0.5},
                                                  {"epoch": 2, "loss": 9.0}]


def test_progress_is_quiet_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.logs import progress

    items = range(3)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress(items, desc="epochs") is items  # logs and CI get no bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = progress(items, desc="epochs")
    assert bar is not items and list(bar) == [0, 1, 2]


def test_cosine_schedule_follows_the_resumed_config() -> None:
    """A scheduler restored from a state dict keeps its step but takes total_steps from the new config, so raising
    the epochs of a finished run stretches the schedule instead of continuing at the final lr."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=0, total_steps=10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    longer = cosine_with_warmup(opt2, warmup_steps=0, total_steps=20)
    longer.load_state_dict(state)
    opt2.step()
    longer.step()  # step 11 of 20
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))


def test_require_finite_names_the_first_bad_row() -> None:
    from common.errors import UserError
    from common.io import require_finite

    good = np.ones((4, 3), np.float32)
    require_finite(good, "emb.npy")
    require_finite(np.array(["a", "b"]), "ids.npy")  # non-float arrays have nothing to check
    bad = good.copy()
    bad[2, 1] = np.nan
    bad[3, 0] = np.inf
    with pytest.raises(UserError, match=r"^emb\.npy: row 2 holds NaN or inf \(2 bad rows in all\)"):
        require_finite(bad, "emb.npy")
    with pytest.raises(UserError, match=r"row 2 \(id 'c'\)"):
        require_finite(torch.from_numpy(bad), "emb.npy", row_ids=["a", "b", "c", "d"])
