"""Atomic file writes: write a temporary sibling, flush it to disk, then `os.replace`.

A process killed at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Call `write_fn(tmp_path)`, fsync, then rename onto `path`. The temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def to_jsonable(obj: Any) -> Any:
    """Numpy / torch scalars and arrays, Paths, dataclasses, sets and tuples -> plain JSON types.

    Non-finite floats become None, since JSON has no NaN.
    """
    import dataclasses
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Atomically write `obj` (after `to_jsonable`) as JSON."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent) + "\n")


def require_finite(values: Any, source: str | Path, what: str = "row", row_ids: Any = None, fix: str = "") -> None:
    """Raise UserError naming `source` and the first row holding NaN or inf, if any.

    values: an array-like (numpy or torch) whose first axis is the row; row_ids (optional) names rows by id rather
    than by index. `fix` is appended to the message (default: how to find and repair the row).
    """
    import numpy as np

    from common.errors import UserError

    array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1) if array.ndim else np.isfinite(array)[None]
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    first = int(bad[0])
    row_id = row_ids[first] if row_ids is not None else None
    row_id = row_id.item() if hasattr(row_id, "item") else row_id  # numpy scalars print as np.str_('...') otherwise
    name = f"{what} {first}" + (f" (id {row_id!r})" if row_ids is not None else "")
    raise UserError(f"{source}: {name} holds NaN or inf ({len(bad)} bad {what}s in all); "
                    f"{fix or 'repair or drop those rows and regenerate the file'}")
