"""Opening a run directory safely: a fingerprint of what decides the weights, and a resume guard.

A checkpoint records the fingerprint of the run that wrote it: the resolved config (less the keys that may change
across a resume: epochs, device, threads, logging, output paths, resume itself) and the identity of the data (size and
SHA-256 of each input file, or a digest the package already keeps, e.g. of the id order). `resume=auto` continues a
run only when today's fingerprint is the same; otherwise it stops with exit 2 *before anything is written*, naming
each key that differs (old -> new) or the data file that changed. `resume=force` continues anyway and logs it.

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

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cli import UserError
from common.io import sha256_file

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "fingerprint"
FORCE = "force"
# Leaf names of config keys that may change across a resume without changing what the finished weights mean:
# how long to train, where and how fast to run, what to log, where to write, and the resume switch itself.
VOLATILE_KEYS = frozenset({
    "epochs", "max_epochs", "num_epochs", "max_steps", "max_epochs_this_run", "max_steps_this_run",
    "device", "num_threads", "threads", "num_workers", "pin_memory", "prefetch_factor",
    "resume", "debug", "log_every", "log_interval", "logging", "progress",
    "runs_dir", "run_dir", "run_name", "out_dir", "output_dir",
    "checkpoint_every", "save_every", "keep_last_n",
})


def is_volatile(dotted_key: str, extra: Iterable[str] = ()) -> bool:
    """True for a key that may change across a resume: its leaf or any section on its path is volatile, or it (or a
    section above it) is listed in `extra` as a dotted key."""
    parts = dotted_key.split(".")
    if any(p in VOLATILE_KEYS for p in parts):
        return True
    return any(dotted_key == e or dotted_key.startswith(e + ".") for e in extra)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def file_identity(path: str | Path) -> dict[str, Any]:
    """`{"path", "size", "sha256"}` of a file, or of a directory (digest over relative names, sizes and contents)."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
    if path.is_dir():
        digest = hashlib.sha256()
        total = 0
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            child_id = file_identity(child)
            total += child_id["size"]
            digest.update(f"{child.relative_to(path).as_posix()}\0{child_id['size']}\0{child_id['sha256']}\n".encode())
        return {"path": str(path), "size": total, "sha256": digest.hexdigest()}
    raise UserError(f"{path}: input not found; check the data paths in the config")


def make_fingerprint(config: Mapping[str, Any], data: Mapping[str, str | Path] | None = None,
                     digests: Mapping[str, str] | None = None, volatile: Iterable[str] = ()) -> dict[str, Any]:
    """The fingerprint a checkpoint records.

    config:   the resolved config (or the sections that decide this stage's weights) as plain data.
    data:     logical name -> input file or directory; each is recorded by size and SHA-256.
    digests:  logical name -> a digest the package already keeps (e.g. of the id order of an embedding file).
    volatile: extra dotted keys (or sections) that may change across a resume, beyond `VOLATILE_KEYS`.
    """
    extra = tuple(volatile)
    flat = {k: v for k, v in flatten(config).items() if not is_volatile(k, extra)}
    return {"config": json.loads(json.dumps(flat, default=str)),
            "data": {name: file_identity(p) for name, p in sorted((data or {}).items())},
            "digests": dict(sorted((digests or {}).items()))}


def fingerprint_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a recorded fingerprint and today's; empty when they agree."""
    if not old:
        return ["the checkpoint records no fingerprint (written before fingerprints existed)"]
    changes = []
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in old_cfg:
            changes.append(f"{key}: (absent) -> {new_cfg[key]!r}")
        elif key not in new_cfg:
            changes.append(f"{key}: {old_cfg[key]!r} -> (absent)")
        elif old_cfg[key] != new_cfg[key]:
            changes.append(f"{key}: {old_cfg[key]!r} -> {new_cfg[key]!r}")
    old_data, new_data = old.get("data", {}), new.get("data", {})
    for name in sorted(set(old_data) | set(new_data)):
        before, after = old_data.get(name), new_data.get(name)
        if before is None or after is None:
            changes.append(f"data '{name}': {'added' if before is None else 'removed'}")
        elif (before["size"], before["sha256"]) != (after["size"], after["sha256"]):
            changes.append(f"data '{name}' changed: {after['path']} (size {before['size']} -> {after['size']}, "
                           f"sha256 {before['sha256'][:12]} -> {after['sha256'][:12]})")
    old_dig, new_dig = old.get("digests", {}), new.get("digests", {})
    for name in sorted(set(old_dig) | set(new_dig)):
        if old_dig.get(name) != new_dig.get(name):
            changes.append(f"data digest '{name}': {str(old_dig.get(name))[:12]} -> {str(new_dig.get(name))[:12]}")
    return changes


def resume_mode(resume: Any) -> str:
    """`off` (false / none / no / empty / None), `auto`, `force`, or `path` (anything else names a checkpoint)."""
    if resume is None or resume is False:
        return "off"
    text = str(resume).lower()
    if text in ("false", "none", "no", ""):
        return "off"
    return text if text in ("auto", FORCE) else "path"


def is_force(resume: Any) -> bool:
    return resume_mode(resume) == FORCE


def check_fingerprint(checkpoint: Path, recorded: Mapping[str, Any] | None, current: Mapping[str, Any],
                      resume: Any, resume_key: str = "resume") -> list[str]:
    """Refuse (UserError, exit 2) to continue `checkpoint` when `current` differs from `recorded`, unless
    `resume=force`. Returns the differences (empty when they agree). `resume_key`: the dotted config key the user
    sets (e.g. `train.resume`), named in the message."""
    changes = fingerprint_changes(recorded, current)
    if changes and not is_force(resume):
        raise UserError(
            f"{checkpoint}: {resume_key}=auto refused, this run's inputs changed since the checkpoint was written: "
            f"{'; '.join(changes)}. Nothing was written. To go on: pick a new run name for a new run, or set "
            f"{resume_key}=false to start this run over, or {resume_key}=force to continue these weights anyway "
            f"(logged)")
    return changes


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
    from common.checkpoint import LATEST, effective_meta, read_meta
    from common.config import save_resolved_config
    from common.distributed import is_main_process
    from common.logs import setup_logging

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
