"""Optional experiment trackers behind one interface: W&B offline (TensorBoard is common.logs.MetricsWriter's).

    require_trackers(cfg.logging)                                 # before anything is written
    trackers = open_trackers(cfg.logging, run_dir, config_dict)
    trackers.log(record, step=epoch)                              # numeric values only
    trackers.close()

metrics.jsonl is always written (common.logs.MetricsWriter), and so is <run>/tensorboard/ unless
logging.tensorboard=false (common.tensorboard: on by default when the package is installed). W&B is an extra sink the
user turns on in [logging]. `require_trackers` runs before anything is written and refuses (exit 2) a tracker that is
on but not installed, logging.tensorboard=true included.
"""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path
from typing import Any

from building_embed.config import LoggingConfig
from common.errors import UserError
from common.tensorboard import tensorboard_wanted

_PACKAGES = {"wandb": "wandb"}


def require_trackers(cfg: LoggingConfig) -> None:
    tensorboard_wanted(cfg.tensorboard, "logging.tensorboard")
    for key, package in _PACKAGES.items():
        if getattr(cfg, key) and importlib.util.find_spec(package) is None:
            raise UserError(f"logging.{key}=true but the '{package}' package is not installed; `pip install "
                            f"{package}` or set logging.{key}=false (metrics.jsonl is written either way)")


class Trackers:
    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        for sink in self.sinks:
            sink(scalars, step)

    def close(self) -> None:
        for sink in self.sinks:
            getattr(sink, "close", lambda: None)()


class _WandbOffline:
    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, dir=str(run_dir), mode="offline", name=run_dir.name, config=config)

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: LoggingConfig, run_dir: Path, config: dict[str, Any]) -> Trackers:
    require_trackers(cfg)
    sinks: list[Any] = []
    if cfg.wandb:
        sinks.append(_WandbOffline(run_dir, cfg.wandb_project, config))
    return Trackers(sinks)
