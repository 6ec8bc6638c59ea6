"""Opening a run directory safely: the resume guard runs before anything is written.

`open_run` checks `resume` against the `latest` checkpoint of each checkpoint folder: `resume=auto` continues a run
only when today's fingerprint (`common.fingerprint.make_fingerprint`) is the one the checkpoint recorded; otherwise
it stops with exit 2 *before anything is written*, naming each key that differs (old -> new) or the data file that
changed. `resume=force` continues anyway and logs it.

    fingerprint = make_fingerprint({"model": to_dict(cfg.model), "train": to_dict(cfg.train)},
                                   data={"train_embeddings": path})
    start = open_run(run_dir, cfg, resume=cfg.train.resume, checkpoint_dirs=[run_dir / "checkpoints"],
                     fingerprint=fingerprint, resume_key="train.resume")
    manager = CheckpointManager(run_dir / "checkpoints", fingerprint=start.fingerprint)
    resumed = resume_from_checkpoint(manager, start.resume, model, optimizer, ...)
    if not start.resuming: write split files ...

`open_run` writes `config.yaml` only for a fresh run: a resumed run keeps the config it was started with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.checkpoint import LATEST, effective_meta, read_meta
from common.config import save_resolved_config
from common.distributed import is_main_process
from common.fingerprint import FINGERPRINT_KEY, FORCE, check_fingerprint, fingerprint_changes, resume_mode
from common.logs import setup_logging

log = logging.getLogger(__name__)


@dataclass
class RunStart:
    """What `open_run` decided. `resume` is what to hand to `resume_from_checkpoint` (auto, force or false)."""

    run_dir: Path
    fingerprint: dict[str, Any]
    resuming: bool
    resume: str | bool
    forced_changes: list[str] = field(default_factory=list)


def open_run(run_dir: str | Path, cfg: Any, *, resume: str | bool | None, checkpoint_dirs: Sequence[str | Path],
             fingerprint: dict[str, Any], write_config: bool = True, is_main: bool | None = None,
             resume_key: str = "resume") -> RunStart:
    """Check `resume` against the checkpoints in `checkpoint_dirs`, then set up logging and write `config.yaml`.

    Order matters: the check comes first and raises UserError before anything is written (no log file, no
    config.yaml), so a refused resume leaves the run directory byte-identical. `config.yaml` is written only for a
    fresh run. `resume`: auto (continue when a complete `latest` exists and the fingerprint agrees), force (continue
    whatever changed; logged), false (start over), or an explicit checkpoint path (its differences are logged).
    `resume_key` is the dotted key users set (e.g. `train.resume`), named in the refusal.
    """
    run_dir = Path(run_dir)
    setup_logging(None)  # stderr only until the check passes: a refused resume must not touch any log file
    mode = resume_mode(resume)
    found = []
    if mode in ("auto", FORCE):
        # a kill between the two renames of a save leaves `latest` missing and its previous copy in .old-latest-*:
        # that copy is what the run resumes from, so it is what the fingerprint is checked against
        found = [found_latest for found_latest in (effective_meta(Path(d) / LATEST) for d in checkpoint_dirs)
                 if found_latest is not None]
    forced: list[str] = []
    for path, meta in found:
        forced += check_fingerprint(path, meta.get(FINGERPRINT_KEY), fingerprint, mode, resume_key)
    explicit_changes: list[str] = []
    if mode == "path":  # the user named a checkpoint: continue it, but say what differs from today's run
        explicit_changes = fingerprint_changes(read_meta(str(resume)).get(FINGERPRINT_KEY), fingerprint)
    setup_logging(run_dir)
    if forced:
        log.warning("%s=force: continuing %s although its inputs changed: %s", resume_key, run_dir, "; ".join(forced))
    if explicit_changes:
        log.warning("%s=%s: that checkpoint was written with other inputs: %s", resume_key, resume,
                    "; ".join(explicit_changes))
    main = is_main_process() if is_main is None else is_main
    resuming = bool(found) or mode == "path"
    if write_config and main and not resuming:
        save_resolved_config(cfg, run_dir)
    return RunStart(run_dir, fingerprint, resuming, resume if resume is not None else False, forced)
