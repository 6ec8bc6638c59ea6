"""Progress lines for logs: where stderr is not a terminal (SLURM logs, CI), a long loop logs every N steps how far
it is, its rate and an ETA; on a terminal tqdm (common.logs.progress) draws the bar and these lines stay off.

    steps = ProgressLog(f"{shard.name}", total=len(loader), every=cfg.logging.progress_every)
    for batch in loader:
        ...
        steps.step()     # -> "r-00003.parquet: 400/1250 batches (32%), 18.5 batches/s, ETA 0:00:46"
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """Counts steps and logs (INFO) a line each time another `every` steps are done: position, mean rate since the
    start and, with a known `total`, the time left at that rate. Off when `every` is 0, on ranks other than 0, and
    (unless `enabled` says otherwise) when stderr is a terminal."""

    def __init__(self, desc: str, total: int | None = None, every: int = 50, unit: str = "batches",
                 logger: logging.Logger | None = None, enabled: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if enabled is None:
            enabled = os.environ.get("RANK", "0") == "0" and not sys.stderr.isatty()
        self.desc, self.total, self.every, self.unit = desc, total, every, unit
        self.enabled = enabled and every > 0
        self.log = logger or logging.getLogger(__name__)
        self.clock = clock
        self.start = clock()
        self.done = 0

    def step(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.enabled and self.done // self.every > before // self.every:
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        where = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)" if self.total else \
            f"{self.done} {self.unit}"
        eta = f", ETA {_format_seconds((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        return f"{self.desc}: {where}, {rate:.3g} {self.unit}/s{eta}"
