"""Write an NPZ whose arrays arrive in chunks of rows, holding one chunk in memory at a time.

    with NpzChunkWriter(Path("out.npz")) as writer:
        for chunk in chunks:                       # dicts of arrays, the same keys, stacked along axis 0
            writer.append(chunk)
        writer.close(extra={"channel_names": names})  # small arrays written whole

Each key's rows go to a raw file in a temporary folder beside the output; `close` writes every array as a `.npy`
member (header with the final shape, then the raw bytes copied in 16 MiB blocks) into an uncompressed zip, as
`np.savez` does, through a temporary file renamed into place, so `np.load` reads it like any NPZ and a kill never
leaves a torn file. Leaving the `with` block without `close` (an error) removes the temporary files.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from common.io import atomic_write

COPY_BLOCK_BYTES = 16 << 20


class NpzChunkWriter:
    """Appends row chunks per key to disk; `close` assembles the NPZ at `path` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".parts", dir=self.path.parent))
        self.handles: dict = {}
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.rows: dict[str, int] = {}

    def __enter__(self) -> NpzChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        """One chunk: every array [n, ...] with the dtype and trailing shape of the first chunk of its key."""
        for key, array in arrays.items():
            array = np.ascontiguousarray(array)
            layout = (array.dtype, array.shape[1:])
            if key not in self.layout:
                self.layout[key], self.rows[key] = layout, 0
                self.handles[key] = open(self.tmp_dir / f"{len(self.handles)}.raw", "wb")
            elif self.layout[key] != layout:
                raise ValueError(f"NpzChunkWriter: chunk of {key!r} is {layout}, earlier chunks {self.layout[key]}")
            self.handles[key].write(array.tobytes())
            self.rows[key] += len(array)

    @property
    def total_rows(self) -> int:
        return max(self.rows.values(), default=0)

    def close(self, extra: dict[str, np.ndarray] | None = None) -> Path:
        """Write the NPZ (the appended arrays, then `extra` written whole) and remove the temporary files."""
        for handle in self.handles.values():
            handle.close()

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, handle in self.handles.items():
                    dtype, row_shape = self.layout[key]
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": (self.rows[key], *row_shape)}
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member, open(handle.name, "rb") as raw:
                        np.lib.format.write_array_header_1_0(member, header)
                        shutil.copyfileobj(raw, member, COPY_BLOCK_BYTES)
                for key, array in (extra or {}).items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

        try:
            return atomic_write(self.path, write)
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary files (nothing at `path` is touched)."""
        for handle in self.handles.values():
            handle.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
