"""Checkpoints: safetensors weights + a `weights_only` training state, written atomically.

Layout (DESIGN.md section 4)::

    checkpoints/latest/   model.safetensors  train_state.pt  meta.json
    checkpoints/best/     same layout
    checkpoints/epoch_N/  periodic, the last `keep_last_n` kept

A checkpoint directory is complete when `meta.json` exists and lists every file with its size and SHA-256;
`meta.json` is written last, inside a temporary sibling directory that is renamed into place only when whole.
Replacing an existing directory takes two renames (old aside, new in); a kill between them leaves the old
one under `.old-<name>-*`, which `resolve_resume` puts back. So a kill at any moment leaves the old checkpoint or the
new one, never a torn one, and a torn one never loads (the hashes would not match).

    manager = CheckpointManager(run_dir / "checkpoints", keep_last_n=3, every_n_epochs=100)
    manager.save(model, {"optimizer": opt.state_dict(), "epoch": epoch, "rng": get_rng_state()}, epoch, is_best)
    state, meta = load_checkpoint(manager.resolve_resume("auto"), model)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from common.fingerprint import FINGERPRINT_KEY, FORCE, check_fingerprint, resume_mode
from common.io import fsync_dir, sha256_file

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
LATEST = "latest"
BEST = "best"
FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` / `_orig_mod.` key prefixes left by wrapped models."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on CPU, unwrapped and with shared storage copied (safetensors refuses aliases)."""
    seen: set[int] = set()
    tensors = {}
    for key, value in strip_wrapper_prefixes(unwrap_model(model).state_dict()).items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    return tensors


def _pid_alive(pid_text: str) -> bool:
    """Whether the process that named a temporary directory still runs (then its files are not ours to clean)."""
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """The `meta.json` of `ckpt_dir` when it exists and every file it lists has the recorded size and hash, else
    None. One hash pass: callers that need both the check and the metadata use this rather than twice over."""
    meta_path = Path(ckpt_dir) / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        for name, info in meta["files"].items():
            path = Path(ckpt_dir) / name
            if not path.is_file() or path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def effective_meta(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, meta) of the checkpoint `ckpt_dir` stands for once an interrupted swap is undone: itself when complete,
    else the complete `.old-<name>-<pid>` copy of a dead writer (a kill between the two renames of a save), which is
    what `CheckpointManager` puts back when it opens. Reads only: the resume guard checks it before anything moves."""
    ckpt_dir = Path(ckpt_dir)
    meta = complete_meta(ckpt_dir)
    if meta is not None:
        return ckpt_dir, meta
    for old in sorted(ckpt_dir.parent.glob(f".old-{ckpt_dir.name}-*")):
        if not _pid_alive(old.name.rsplit("-", 1)[-1]) and (meta := complete_meta(old)) is not None:
            return old, meta
    return None


def is_complete(ckpt_dir: Path) -> bool:
    """True when `ckpt_dir/meta.json` exists and every file it lists has the recorded size and hash."""
    return complete_meta(ckpt_dir) is not None


class CheckpointManager:
    """Writes latest / best / every-N checkpoints under `ckpt_dir`; only the main process writes."""

    def __init__(self, ckpt_dir: str | Path, keep_last_n: int = 3, every_n_epochs: int = 0,
                 fingerprint: dict[str, Any] | None = None) -> None:
        """`fingerprint` (from `common.fingerprint.make_fingerprint`) goes into every `meta.json` written, and
        `resume=auto` refuses a `latest` whose recorded fingerprint differs (see `common.fingerprint`)."""
        from common.distributed import is_main_process

        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last_n = keep_last_n
        self.every_n_epochs = every_n_epochs
        self.fingerprint = fingerprint
        self.is_writer = is_main_process()
        if self.is_writer:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._recover()

    def _recover(self) -> None:
        """Finish or undo a swap interrupted by a kill, and drop half-written temporary directories."""
        for tmp in self.ckpt_dir.glob(".tmp-*"):
            if not _pid_alive(tmp.name.rsplit("-", 1)[-1]):
                shutil.rmtree(tmp, ignore_errors=True)
        for old in sorted(self.ckpt_dir.glob(".old-*")):
            if _pid_alive(old.name.rsplit("-", 1)[-1]):
                continue  # another live process is mid-swap
            name = old.name[len(".old-"):].rsplit("-", 1)[0]
            target = self.ckpt_dir / name
            if not is_complete(target) and is_complete(old):
                if target.exists():
                    shutil.rmtree(target)
                os.replace(old, target)
            else:
                shutil.rmtree(old, ignore_errors=True)

    def _write(self, name: str, tensors: dict[str, torch.Tensor], train_state: dict[str, Any],
               meta: dict[str, Any], same_as: tuple[Path, dict[str, Any]] | None = None) -> tuple[Path, dict]:
        """Write checkpoint `name` atomically; returns its folder and its files' sizes and hashes. `same_as` (a
        folder written this step and its files) hard-links those files instead of serialising, hashing and syncing
        the same bytes again: checkpoint files are never modified in place (a newer checkpoint replaces the folder),
        so the link keeps its content when either name moves on. Falls back to a copy where links are refused."""
        target = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if same_as is not None:
            source, files = same_as
            for fname in (WEIGHTS_FILE, STATE_FILE):
                try:
                    os.link(source / fname, tmp / fname)
                except OSError:
                    shutil.copy2(source / fname, tmp / fname)
                    _fsync_file(tmp / fname)
        else:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            torch.save(train_state, tmp / STATE_FILE)
            files = {}
            for fname in (WEIGHTS_FILE, STATE_FILE):
                _fsync_file(tmp / fname)
                files[fname] = {"size": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
        full_meta = {"format_version": FORMAT_VERSION, "name": name, "files": files,
                     "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, default=str), encoding="utf-8")
        _fsync_file(tmp / META_FILE)
        fsync_dir(tmp)
        if target.exists():
            old = self.ckpt_dir / f".old-{name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(self.ckpt_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
            fsync_dir(self.ckpt_dir)
        return target, files

    def save(self, model: nn.Module, train_state: dict[str, Any], epoch: int, is_best: bool = False,
             meta: dict[str, Any] | None = None) -> None:
        """Write `latest` (always), `best` (when `is_best`) and `epoch_N` (every `every_n_epochs`).

        `train_state` holds only tensors, python scalars, strings, lists and dicts, so it loads with
        `torch.load(weights_only=True)`. No-op on non-main ranks.
        """
        if not self.is_writer:
            return
        tensors = model_tensors(model)
        meta = {"epoch": epoch, **(meta or {})}
        if self.fingerprint is not None:
            meta[FINGERPRINT_KEY] = self.fingerprint
        # `best` first: if a kill lands after it, `latest` still names the previous epoch and the resumed
        # run redoes this epoch, rewriting `best` with the same content.
        # The same step's bytes are serialised once; further names of this step link to them.
        written = None
        if is_best:
            written = self._write(BEST, tensors, train_state, meta)
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            written = self._write(f"epoch_{epoch}", tensors, train_state, meta, same_as=written)
            self._prune()
        self._write(LATEST, tensors, train_state, meta, same_as=written)

    def _prune(self) -> None:
        periodic = sorted(self.ckpt_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
        for stale in periodic[:-self.keep_last_n] if self.keep_last_n > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)

    def resolve_resume(self, resume: str | bool | Path | None) -> Path | None:
        """`auto`: `latest` if it is complete, else None (a fresh start); `force`: the same, whatever the fingerprint;
        `false`/None: None; a path: that checkpoint.

        Raises UserError when an explicit path does not hold a complete checkpoint, and (for `auto`, when this manager
        has a fingerprint) when `latest` was written by a run whose config or data differ from today's.
        """
        mode = resume_mode(resume)
        if mode == "off":
            return None
        if mode in ("auto", FORCE):
            latest = self.ckpt_dir / LATEST
            meta = complete_meta(latest)
            if meta is None:
                return None
            if self.fingerprint is not None:
                check_fingerprint(latest, meta.get(FINGERPRINT_KEY), self.fingerprint, mode)
            return latest
        return find_checkpoint(resume)

    @property
    def latest(self) -> Path:
        return self.ckpt_dir / LATEST

    @property
    def best(self) -> Path:
        return self.ckpt_dir / BEST


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory from a checkpoint dir, its `meta.json`, a run dir or a checkpoints dir."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    for candidate in (path, path / LATEST, path / "checkpoints" / LATEST):
        if is_complete(candidate):
            return candidate
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a checkpoint directory "
                        f"(holding {WEIGHTS_FILE}, {STATE_FILE}, {META_FILE}) or resume=auto")
    raise UserError(f"checkpoint {path} is incomplete or corrupt (meta.json missing or hashes differ); "
                    f"use another checkpoint, e.g. checkpoints/best or an epoch_N directory")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `meta.json` of a complete checkpoint (to check compatibility before loading anything heavier)."""
    return json.loads((find_checkpoint(path) / META_FILE).read_text(encoding="utf-8"))


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> None:
    """Load `model.safetensors` (a file, or a checkpoint directory) into `model` (unwrapped first)."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else find_checkpoint(path) / WEIGHTS_FILE
    tensors = strip_wrapper_prefixes(load_file(str(weights)))
    target = unwrap_model(model)
    try:
        target.load_state_dict(tensors, strict=strict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{weights}: weights do not fit this model ({' '.join(first[:3])[:400]}); "
                        f"build the model with the config the checkpoint was trained with") from exc


def load_checkpoint(path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu",
                    strict: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model` (when given) and return `(train_state, meta)`.

    The training state is read with `weights_only=True`. Raises UserError for a missing or torn checkpoint.
    """
    ckpt = find_checkpoint(path)
    if model is not None:
        load_weights(ckpt, model, strict=strict)
    state = torch.load(ckpt / STATE_FILE, map_location=map_location, weights_only=True)
    return state, read_meta(ckpt)


def capture_train_state(epoch: int, optimizer: Any = None, scheduler: Any = None, early_stopping: Any = None,
                        scaler: Any = None, **extra: Any) -> dict[str, Any]:
    """The training state a resume needs: counters, RNG streams and the `state_dict()` of each object given.

    `extra` holds anything else the loop keeps (history lists, sampler position, best metric); it must be made of
    tensors, python scalars, strings, lists and dicts so it loads with `weights_only=True`.
    """
    from common.seed import get_rng_state

    state: dict[str, Any] = {"epoch": epoch, "rng": get_rng_state(), **extra}
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("early_stopping", early_stopping),
                     ("scaler", scaler)):
        if obj is not None:
            state[key] = obj.state_dict()
    return state


def resume_from_checkpoint(manager: CheckpointManager, resume: str | bool | Path | None, model: nn.Module,
                           optimizer: Any = None, scheduler: Any = None, early_stopping: Any = None,
                           scaler: Any = None) -> dict[str, Any] | None:
    """Resolve `resume` (auto | path | false); if a checkpoint is found, restore the model, each object given and
    the RNG streams, and return its training state (`state["epoch"]` is the last completed epoch). None: fresh start.
    """
    from common.seed import set_rng_state

    path = manager.resolve_resume(resume)
    if path is None:
        return None
    state, meta = load_checkpoint(path, model)
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("early_stopping", early_stopping),
                     ("scaler", scaler)):
        if obj is not None:
            if key not in state:
                raise UserError(f"checkpoint {path} has no {key} state; resume=false starts a fresh run")
            obj.load_state_dict(state[key])
    set_rng_state(state["rng"])
    state["_resumed_from"] = str(path)
    return state
