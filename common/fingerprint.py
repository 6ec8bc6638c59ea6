"""Fingerprints: what decides a run's weights, recorded in each checkpoint and compared on resume.

A fingerprint is the resolved config (less the keys that may change across a resume: epochs, device, threads,
logging, output paths, resume itself; `VOLATILE_KEYS`) and the identity of the data (size and SHA-256 of each input
file, or a digest the package already keeps, e.g. of the id order). `CheckpointManager` writes it into `meta.json`
under `FINGERPRINT_KEY`; `check_fingerprint` refuses (exit 2, naming each key that differs, old -> new, or the data
file that changed) to continue a checkpoint whose fingerprint is not today's, unless `resume=force`.

    fingerprint = make_fingerprint({"model": to_dict(cfg.model), "train": to_dict(cfg.train)},
                                   data={"train_embeddings": path})
    changes = fingerprint_changes(recorded, fingerprint)  # [] when they agree

Imports only `common.errors` and `common.io`: `common.checkpoint` and `common.runs` both build on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.io import sha256_file

FINGERPRINT_KEY = "fingerprint"
FORCE = "force"
# Leaf names of config keys that may change across a resume without changing what the finished weights mean:
# how long to train, where and how fast to run, what to log, where to write, and the resume switch itself.
VOLATILE_KEYS = frozenset({
    "epochs", "max_epochs", "num_epochs", "max_steps", "max_epochs_this_run", "max_steps_this_run",
    "device", "num_threads", "threads", "num_workers", "pin_memory", "prefetch_factor",
    "resume", "debug", "log_every", "log_interval", "logging", "progress", "tensorboard",
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
