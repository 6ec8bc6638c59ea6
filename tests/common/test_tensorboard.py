"""TensorBoard mirror of metrics.jsonl (common.tensorboard through common.logs.MetricsWriter), read back with
TensorBoard's own event reader: tags, steps and values equal the jsonl; a resume shows each epoch once; the key off
writes no event file; the key on without the package is a one-line UserError naming the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

import common.tensorboard as tb_mod
from common.errors import UserError
from common.logs import STEP_RECORDS_PER_EPOCH, MetricsWriter, read_metrics, step_interval

pytest.importorskip("tensorboard", reason="tensorboard is a dependency of the project (pyproject.toml)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402


@dataclasses.dataclass
class _Model:
    dim: int = 16
    dropout: float = 0.25


@dataclasses.dataclass
class _Config:
    name: str = "toy"
    checkpoint: Path | None = None
    widths: list[int] = dataclasses.field(default_factory=lambda: [4, 8])
    amp: bool = False
    model: _Model = dataclasses.field(default_factory=_Model)


def _epoch_record(epoch: int, offset: float = 0.0) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch + offset, "val_length_mae": 0.5 + epoch / 10 + offset,
            "tuning_auroc": 0.6 + epoch / 100, "best_val_smape": 30.0 - epoch, "lr": 1e-3 * epoch,
            "best": epoch % 2 == 0, "note": "text stays in the jsonl"}


def _events(run_dir: Path) -> EventAccumulator:
    # purge_orphaned_data=False: show every event the files hold, so a step written twice would show twice
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0},
                           purge_orphaned_data=False)
    acc.Reload()
    return acc


def _curve(acc: EventAccumulator, tag: str) -> list[float]:
    """The curve as flat [step, value, step, value, ...] (pytest.approx compares flat lists only)."""
    return [x for e in acc.Scalars(tag) for x in (e.step, e.value)]


EPOCH_TAGS = {"train_loss": "train/loss", "val_length_mae": "val/length_mae", "tuning_auroc": "tuning/auroc",
              "best_val_smape": "best/val_smape", "lr": "run/lr"}


def test_every_record_reads_back_with_its_tag_step_and_value(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)
    assert writer.tensorboard_dir == tmp_path / "tensorboard"
    for epoch in (1, 2, 3):
        writer.write({"epoch": epoch, "step": epoch * 10, "train_loss": 2.0 / epoch})  # a per-step record
        writer.write(_epoch_record(epoch))
    # each record is flushed: the curves are readable while the run is still going
    assert _curve(_events(tmp_path), "train/loss") == pytest.approx([1, 1.0, 2, 0.5, 3, 1 / 3])
    writer.close(hparams=_Config())

    records = read_metrics(tmp_path / "metrics.jsonl")
    acc = _events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {*EPOCH_TAGS.values(), "steps/train/loss"}  # no bool, str or axis key
    for key, tag in EPOCH_TAGS.items():
        expected = [x for r in records if "step" not in r for x in (r["epoch"], r[key])]
        got = _curve(acc, tag)
        assert got[::2] == expected[::2]  # the steps, exactly
        assert got == pytest.approx(expected, rel=1e-6)  # the values are stored as float32
    assert _curve(acc, "steps/train/loss") == pytest.approx([10, 2.0, 20, 1.0, 30, 2 / 3])

    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["name"].string_value == "toy"
    assert start["model.dim"].number_value == 16 and start["model.dropout"].number_value == 0.25
    assert start["widths"].string_value == "[4, 8]" and start["checkpoint"].string_value == "null"
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(EPOCH_TAGS.values())  # the last epoch's curves


def test_resume_replaces_the_dropped_epochs_and_shows_each_epoch_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path, tensorboard=True) as writer:  # killed after epoch 5; its checkpoint is from epoch 3
        for epoch in range(1, 6):
            writer.write(_epoch_record(epoch))
    with MetricsWriter(path, resume_epoch=3, tensorboard=True) as writer:
        for epoch in range(4, 8):
            writer.write(_epoch_record(epoch, offset=100.0))

    records = read_metrics(path)
    assert [r["epoch"] for r in records] == list(range(1, 8))
    acc = _events(tmp_path)
    for key, tag in EPOCH_TAGS.items():
        got = _curve(acc, tag)
        assert got[::2] == list(range(1, 8)), tag  # no step twice, none missing
        assert got[1::2] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert _curve(acc, "train/loss")[6:8] == pytest.approx([4, 100.25])  # epoch 4 of the resumed run, not the first
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_fresh_run_in_the_same_folder_starts_the_curves_over(tmp_path):
    with MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True) as writer:
        for epoch in range(1, 5):
            writer.write(_epoch_record(epoch))
    with MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True) as writer:
        writer.write(_epoch_record(1, offset=7.0))
    assert _curve(_events(tmp_path), "train/loss") == pytest.approx([1, 8.0])


def test_key_off_writes_the_jsonl_and_no_event_file(tmp_path):
    with MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False) as writer:
        assert writer.tensorboard_dir is None
        writer.write(_epoch_record(1))
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["epoch"] == 1
    assert not list(tmp_path.rglob("events.out.tfevents.*")) and not (tmp_path / "tensorboard").exists()


def test_default_follows_whether_the_package_is_installed(tmp_path, monkeypatch):
    with MetricsWriter(tmp_path / "on" / "metrics.jsonl") as writer:
        writer.write(_epoch_record(1))
    assert list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(tb_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with MetricsWriter(tmp_path / "off" / "metrics.jsonl") as writer:  # not installed, not asked for: silently off
        writer.write(_epoch_record(1))
    assert not (tmp_path / "off" / "tensorboard").exists()
    with pytest.raises(UserError, match=r"^run\.tensorboard=true but the 'tensorboard' package is not installed.*"
                                        r"set run\.tensorboard=false"):
        MetricsWriter(tmp_path / "asked" / "metrics.jsonl", tensorboard=True, tensorboard_key="run.tensorboard")
    assert not (tmp_path / "asked").exists()  # refused before anything is written


def test_tags_group_by_split():
    assert [tb_mod.scalar_tag(k) for k in ("train_token_ce", "val_map@r", "tuning_top5_accuracy", "lr", "band0_pulls",
                                           "validation_x")] == \
        ["train/token_ce", "val/map@r", "tuning/top5_accuracy", "run/lr", "run/band0_pulls", "run/validation_x"]


def test_step_records_follow_the_cadence_and_draw_under_steps(tmp_path):
    """MetricsWriter.step writes one step in step_interval(steps_per_epoch), at the global optimizer step, each
    epoch's before its epoch record; TensorBoard draws them under steps/ at that step."""
    assert [step_interval(n) for n in (1, 7, 50, 51, 100, 120, 1000)] == [1, 1, 1, 2, 2, 3, 20]
    assert STEP_RECORDS_PER_EPOCH == 50
    steps_per_epoch = 120  # one record every 3 optimizer steps: 40 per epoch
    with MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True) as writer:
        for epoch in (1, 2):
            written = [writer.step(epoch, b, steps_per_epoch, {"train_loss": epoch + b / 1000, "lr": 0.5})
                       for b in range(steps_per_epoch)]
            assert sum(written) == 40 and written[:3] == [False, False, True]
            writer.write(_epoch_record(epoch))
    records = read_metrics(tmp_path / "metrics.jsonl", steps=True)
    assert [r.get("step") for r in records] == [*range(3, 121, 3), None, *range(123, 241, 3), None]
    assert records[0] == {"epoch": 1, "step": 3, "train_loss": 1.002, "lr": 0.5}
    assert records[41] == {"epoch": 2, "step": 123, "train_loss": 2.002, "lr": 0.5}  # batch 2 of epoch 2
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # the default: epochs only

    acc = _events(tmp_path)
    expected = [x for r in records if "step" in r for x in (r["step"], r["train_loss"])]
    assert _curve(acc, "steps/train/loss") == pytest.approx(expected, rel=1e-6)
    assert _curve(acc, "steps/run/lr")[::2] == list(range(3, 241, 3))
    assert _curve(acc, "train/loss")[::2] == [1, 2]  # the epoch curve keeps its own axis


def _toy_main():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from toy_train import main

    return main


def test_a_resumed_toy_run_shows_each_step_once(tmp_path):
    """tests/common/toy_train.py (4 epochs of 16 steps, all logged) killed in its last epoch after some of that epoch's
    step records and a torn line, resumed from the epoch-2 checkpoint: metrics.jsonl and the steps/ curves equal the
    uninterrupted run's, each step exactly once."""
    import shutil

    main = _toy_main()
    assert main([f"run_dir={tmp_path / 'straight'}", "epochs=4", "resume=false"]) == 0
    killed = tmp_path / "killed"
    assert main([f"run_dir={killed}", "epochs=4", "resume=false", "every_n_epochs=1"]) == 0
    # what a kill in epoch 3 (epochs count from 0) leaves: latest = epoch 2, epoch 3's first step records (stale
    # values here, so a kept one would show) and a torn line
    shutil.rmtree(killed / "checkpoints" / "latest")
    shutil.copytree(killed / "checkpoints" / "epoch_2", killed / "checkpoints" / "latest")
    path = killed / "metrics.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= 2]
    kept[0] = kept[0][:-1] + ', "first_process": 1}'  # a line only a resume keeps (a fresh start rewrites it)
    stale = [json.dumps({"epoch": 3, "step": s, "train_loss": 99.0, "lr": 1.0}) for s in range(49, 56)]
    path.write_text("\n".join(kept + stale) + '\n{"epoch": 3, "st')
    assert main([f"run_dir={killed}", "epochs=4"]) == 0  # resume=auto

    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl", steps=True)
    resumed = read_metrics(path, steps=True)
    assert resumed[0].pop("first_process") == 1  # it resumed rather than started over
    assert resumed == straight  # bit-exact on CPU, as the weights
    assert [r["step"] for r in resumed if "step" in r] == list(range(1, 65))
    assert [r["epoch"] for r in resumed if "step" not in r] == [0, 1, 2, 3]
    acc = _events(killed)
    expected = [x for r in resumed if "step" in r for x in (r["step"], r["train_loss"])]
    assert _curve(acc, "steps/train/loss") == pytest.approx(expected, rel=1e-6)  # 1..64, each once, no 99.0
    assert _curve(acc, "run/loss")[::2] == [0, 1, 2, 3]
