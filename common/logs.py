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

__all__ = ["setup_logging", "MetricsWriter", "progress", "read_metrics", "to_jsonable", "write_json"]

T = TypeVar("T")

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
    """Append one JSON object per line to `metrics.jsonl` (rank 0 only), flushed at once.

    On resume pass `resume_epoch`: records of later epochs (written after the checkpoint the run resumed from)
    are dropped first, so the file matches an uninterrupted run.
    """

    def __init__(self, path: str | Path, resume_epoch: int | None = None, epoch_key: str = "epoch") -> None:
        self.path = Path(path)
        self._enabled = _rank() == 0
        if not self._enabled:
            self._fh = None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write
                if record.get(epoch_key, -1) <= resume_epoch:
                    kept.append(line)
            from common.io import atomic_write_text

            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(to_jsonable(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl` file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """A tqdm bar on rank 0 when stderr is a terminal; the plain iterable otherwise (logs and CI stay clean)."""
    if _rank() != 0 or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kwargs)
