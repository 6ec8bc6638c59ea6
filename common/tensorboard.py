"""TensorBoard mirror of `metrics.jsonl`: every record's numbers as scalars, the config as hyper-parameters.

`common.logs.MetricsWriter` owns one `TensorBoardSink` (rank 0, when the config's `tensorboard` key allows it), so
each trainer gets event files in `<run_dir>/tensorboard/` beside its `metrics.jsonl` and `tensorboard --logdir runs/`
shows every run:

    writer = MetricsWriter(out / "metrics.jsonl", resume_epoch=..., tensorboard=cfg.run.tensorboard,
                           tensorboard_key="run.tensorboard")
    writer.step(3, batch, steps_per_epoch, {"train_loss": 0.39, "lr": 1e-3})  # after each optimizer step
    writer.write({"epoch": 3, "train_loss": 0.41, "val_length_mae": 1.2, "lr": 1e-3, "best": True})
    writer.close(hparams=cfg)   # when training finished: the flat config beside the final metrics

Tags group by split: `train_loss` -> `train/loss`, `val_length_mae` -> `val/length_mae`, `tuning_auroc` ->
`tuning/auroc`, `best_val_smape` -> `best/val_smape`; anything else sits under `run/` (`run/lr`, `run/seconds`).
A per-epoch record is drawn at its epoch; a per-step record (one carrying the step key, written by MetricsWriter.step
at most common.logs.STEP_RECORDS_PER_EPOCH times an epoch) at that global optimizer step under `steps/`
(`steps/train/loss`), so the two x-axes never share a curve. Booleans and non-numbers stay in the jsonl only.

The jsonl is the source of truth: opening the sink removes the directory's old event files and replays the records
the jsonl kept (all of them on resume, none on a fresh run), so a resumed run shows each epoch exactly once, whatever
order or second the event files were written in.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.config import to_dict
from common.errors import UserError
from common.fingerprint import flatten

__all__ = ["EVENTS_DIR", "TensorBoardSink", "hparam_values", "scalar_tag", "tensorboard_wanted"]

EVENTS_DIR = "tensorboard"
EVENT_FILE_PREFIX = "events.out.tfevents."
SPLIT_GROUPS = ("train", "val", "tuning", "test", "best")
OTHER_GROUP = "run"
STEP_GROUP = "steps"


def tensorboard_wanted(setting: bool | None, key: str = "tensorboard") -> bool:
    """Resolve a config's `tensorboard` key: None (the default) = on when the package is installed; True = on, and
    raises UserError (exit 2) when it is not installed; False = off."""
    if setting is False:
        return False
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting and not installed:
        raise UserError(f"{key}=true but the 'tensorboard' package is not installed; `pip install tensorboard` or set "
                        f"{key}=false (metrics.jsonl is written either way)")
    return installed


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: `val_length_mae` -> `val/length_mae`, `lr` -> `run/lr`."""
    group, sep, name = key.partition("_")
    if sep and name and group in SPLIT_GROUPS:
        return f"{group}/{name}"
    return f"{OTHER_GROUP}/{key}"


def hparam_values(config: Any) -> dict[str, bool | int | float | str]:
    """A config (dataclass or nested mapping) as flat dotted keys whose values TensorBoard's hparams plugin takes:
    numbers, booleans and strings as they are; None, lists and paths as their JSON text (`null`, `[0.5, 1.0]`)."""
    if not isinstance(config, Mapping):
        config = to_dict(config)
    out: dict[str, bool | int | float | str] = {}
    for key, value in flatten(config).items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, default=str)
    return out


def _scalars(record: Mapping[str, Any], skip: Iterable[str]) -> dict[str, float]:
    skipped = set(skip)
    return {scalar_tag(k): float(v) for k, v in record.items()
            if k not in skipped and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardSink:
    """One SummaryWriter on `log_dir`, fed the records of a metrics.jsonl.

    log_dir:   `<run_dir>/tensorboard`; its old event files are removed first (see the module docstring).
    epoch_key: the record key of the epoch, the x-axis of per-epoch records.
    step_key:  the record key of the global step; a record carrying it is a per-step record.
    replay:    the records metrics.jsonl still holds (a resumed run's kept epochs), written again first.
    """

    def __init__(self, log_dir: str | Path, epoch_key: str = "epoch", step_key: str = "step",
                 replay: Iterable[Mapping[str, Any]] = ()) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.epoch_key, self.step_key = epoch_key, step_key
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob(f"{EVENT_FILE_PREFIX}*"):
            if old.is_file():
                old.unlink()
        # flush_secs is only the background writer's upper bound: write() flushes each record itself
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)
        self.last_epoch = 0
        self.last_epoch_scalars: dict[str, float] = {}
        for record in replay:
            self.add(record, flush=False)
        self.writer.flush()

    def add(self, record: Mapping[str, Any], flush: bool = True) -> None:
        """Write a record's numeric values (JSON-ready: plain numbers, see common.io.to_jsonable) as scalars."""
        if record.get(self.step_key) is not None:
            step = int(record[self.step_key])
            for tag, value in _scalars(record, (self.step_key, self.epoch_key)).items():
                self.writer.add_scalar(f"{STEP_GROUP}/{tag}", value, step)
        else:
            # a record without an epoch (a closing summary, say) belongs to the latest epoch
            if record.get(self.epoch_key) is not None:
                self.last_epoch = int(record[self.epoch_key])
            scalars = _scalars(record, (self.epoch_key,))
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, self.last_epoch)
            if scalars:
                self.last_epoch_scalars = scalars
        if flush:
            self.writer.flush()

    def add_hparams(self, config: Any) -> None:
        """Record the flat config (a config dataclass or its common.config.to_dict) as this run's hyper-parameters,
        with the last epoch's scalar tags as its metrics.

        Written into this run's own event file (torch's `SummaryWriter.add_hparams` would open a second run in a
        timestamped subfolder); the hparams dashboard reads each metric's value from the scalar curve of that tag.
        """
        from torch.utils.tensorboard.summary import hparams

        metrics = {tag: value for tag, value in self.last_epoch_scalars.items() if math.isfinite(value)}
        for summary in hparams(hparam_values(config), metrics):
            self.writer.file_writer.add_summary(summary, self.last_epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
