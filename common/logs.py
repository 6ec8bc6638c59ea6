"""Rank-0 logging and the `metrics.jsonl` writer.

Named `logs` rather than `logging` so it never shadows the standard library module.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from common.io import to_jsonable, write_json

__all__ = ["STEP_RECORDS_PER_EPOCH", "setup_logging", "MetricsWriter", "progress", "read_metrics", "step_interval",
           "to_jsonable", "write_json"]

T = TypeVar("T")

# At most this many per-step records per epoch go to metrics.jsonl (MetricsWriter.step): enough for a smooth
# TensorBoard curve, few enough that a million-step run keeps a small jsonl and a cheap resume.
STEP_RECORDS_PER_EPOCH = 50

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(run_dir: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger: INFO on rank 0 (stderr and `run_dir/train.log`), WARNING elsewhere.

    Calling it again replaces the handlers it installed, so in-process tests can run several stages.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_common_logs", False):
            root.removeHandler(handler)
            handler.close()
    rank_level = level if _rank() == 0 else logging.WARNING
    root.setLevel(rank_level)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and _rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._common_logs = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    return logging.getLogger("run")


class MetricsWriter:
    """Append one JSON object per line to `metrics.jsonl` (rank 0 only), flushed at once, and mirror each record to
    TensorBoard under `<dir of the jsonl>/tensorboard/` (common.tensorboard).

    On resume pass `resume_epoch`: records of later epochs (written after the checkpoint the run resumed from)
    are dropped first, so the file matches an uninterrupted run; TensorBoard's event files are rebuilt from the
    records kept, so no epoch shows twice.

    tensorboard:     the config's `tensorboard` key: None = on when the package is installed, True = required (a
                     UserError, exit 2, on every rank when it is missing), False = off.
    tensorboard_key: its dotted name in the config, for that error (`run.tensorboard`).
    step_key:        the key that marks a per-step record (drawn at that global step rather than at its epoch).
    first_epoch:     the number of the loop's first epoch (1 in every package), where the global step starts.

    Per-step records (`step`) sit between the epoch records, each epoch's before its own epoch record; readers that
    want one record per epoch skip them (`read_metrics(path)` does; `read_metrics(path, steps=True)` keeps them).
    """

    def __init__(self, path: str | Path, resume_epoch: int | None = None, epoch_key: str = "epoch",
                 tensorboard: bool | None = None, tensorboard_key: str = "tensorboard",
                 step_key: str = "step", first_epoch: int = 1) -> None:
        from common.tensorboard import tensorboard_wanted

        self.path = Path(path)
        self.epoch_key, self.step_key, self.first_epoch = epoch_key, step_key, first_epoch
        self._enabled = _rank() == 0
        self._fh = None
        self._tensorboard = None
        use_tensorboard = tensorboard_wanted(tensorboard, tensorboard_key)  # every rank: all exit 2 together
        if not self._enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_epoch is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            lines = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write
                if record.get(epoch_key, -1) <= resume_epoch:
                    lines.append(line)
                    kept.append(record)
            from common.io import atomic_write_text

            atomic_write_text(self.path, "".join(f"{line}\n" for line in lines))
        self._fh = open(self.path, "a", encoding="utf-8")
        if use_tensorboard:
            from common.tensorboard import EVENTS_DIR, TensorBoardSink

            self._tensorboard = TensorBoardSink(self.path.parent / EVENTS_DIR, epoch_key, step_key, replay=kept)

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where the event files go; None when TensorBoard is off (or on ranks other than 0)."""
        return None if self._tensorboard is None else self._tensorboard.log_dir

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        record = to_jsonable(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tensorboard is not None:
            self._tensorboard.add(record)

    def step(self, epoch: int, batch: int, steps_per_epoch: int, values: dict[str, Any]) -> bool:
        """Called after every optimizer step; writes `{epoch, step, **values}` on one step in
        `step_interval(steps_per_epoch)` and returns whether it did.

        epoch:           the epoch, counted from `first_epoch` (1).
        batch:           this optimizer step's index within the epoch, from 0 (with gradient accumulation: the
                         micro-batch index // accumulation steps).
        steps_per_epoch: optimizer steps in one epoch.
        values:          plain numbers the loop already holds (`train_loss` = this step's loss, `lr`); a tensor is
                         read (a device sync) only on the steps that are written.

        The global step is (epoch - first_epoch) * steps_per_epoch + batch + 1, the optimizer steps taken so far: a
        function of where the loop is, so a resumed run writes the same steps as one never interrupted.
        """
        step = (epoch - self.first_epoch) * steps_per_epoch + batch + 1
        if self._fh is None or step % step_interval(steps_per_epoch):
            return False
        self.write({self.epoch_key: epoch, self.step_key: step, **values})
        return True

    def close(self, hparams: Any = None) -> None:
        """Close the files. `hparams`: the resolved config (dataclass or to_dict), given when training finished,
        is written to TensorBoard as the run's hyper-parameters beside the final metrics; a second close is a no-op."""
        if self._tensorboard is not None:
            if hparams is not None:
                self._tensorboard.add_hparams(hparams)
            self._tensorboard.close()
            self._tensorboard = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def step_interval(steps_per_epoch: int) -> int:
    """Optimizer steps between two per-step records: at most STEP_RECORDS_PER_EPOCH of them per epoch."""
    return max(1, -(-steps_per_epoch // STEP_RECORDS_PER_EPOCH))


def read_metrics(path: str | Path, steps: bool = False, step_key: str = "step") -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file in order: the per-epoch ones (and summaries), plus the per-step ones
    (those carrying `step_key`, see MetricsWriter.step) when `steps` is true."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return records if steps else [r for r in records if step_key not in r]


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """A tqdm bar on rank 0 when stderr is a terminal; the plain iterable otherwise (logs and CI stay clean)."""
    if _rank() != 0 or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)
