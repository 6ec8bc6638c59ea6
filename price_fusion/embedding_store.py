"""The embedding store: one folder per split, memory-mappable ``.npy`` files plus ``manifest.json``.

    <embeddings_dir>/<split>/
        sample_ids.npy   [N] unicode        row order of every other file
        image.npy        [N, D_img] float32 CLIP image embeddings (zeros where the image is missing)
        has_image.npy    [N] bool           True where the product had a readable image (format 1: image_mask.npy)
        text.npy         [N, D_txt] float32 sentence embeddings of catalog_content
        struct.npy       [N, S] float32     structural features of data.structural (names in the manifest)
        manifest.json    ids count, dims, encoder names and versions, struct feature names

``np.load(..., mmap_mode="r")`` opens a 75k x 1795 float32 split (~540 MB) in milliseconds; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.io import require_finite

MANIFEST = "manifest.json"
PARTS = ("image", "has_image", "text", "struct")
FORMAT_VERSION = 2  # 2: image_mask.npy renamed has_image.npy (it is True where the image is present); 1 still loads
LEGACY_NAMES = {"has_image": "image_mask"}
MAX_IDS_IN_ERROR = 5


@dataclass
class EmbeddingSet:
    """Arrays of one split, rows in `sample_ids` order (possibly memory-mapped, read-only)."""

    sample_ids: np.ndarray  # [N] str
    image: np.ndarray  # [N, D_img] float32
    has_image: np.ndarray  # [N] bool
    text: np.ndarray  # [N, D_txt] float32
    struct: np.ndarray  # [N, S] float32
    manifest: dict

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])


def write_embeddings(out_dir: Path, sample_ids: np.ndarray, image: np.ndarray, has_image: np.ndarray,
                     text: np.ndarray, struct: np.ndarray, info: dict) -> Path:
    """Write one split atomically: a temporary sibling folder is renamed over `out_dir` when complete."""
    n = len(sample_ids)
    arrays = {"sample_ids": np.asarray(sample_ids, dtype=str), "image": np.asarray(image, dtype=np.float32),
              "has_image": np.asarray(has_image, dtype=bool), "text": np.asarray(text, dtype=np.float32),
              "struct": np.asarray(struct, dtype=np.float32)}
    for name, arr in arrays.items():
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows, sample_ids has {n}")
    id_digest = hashlib.sha256("\n".join(arrays["sample_ids"].tolist()).encode()).hexdigest()
    manifest = {"format_version": FORMAT_VERSION, "n": n, "row_order": "sample_ids.npy",
                "sample_ids_sha256": id_digest, "first_ids": arrays["sample_ids"][:3].tolist(),
                "image_dim": int(arrays["image"].shape[1]),
                "text_dim": int(arrays["text"].shape[1]), "struct_dim": int(arrays["struct"].shape[1]),
                "n_missing_images": int(n - arrays["has_image"].sum()), **info}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_embeddings(split_dir: Path, mmap: bool = True) -> EmbeddingSet:
    """Open one split; raises `UserError` naming the file when one is missing, row counts disagree, or a row of
    image / text / struct holds NaN or inf (the first such row by index and sample id)."""
    split_dir = Path(split_dir)
    if not (split_dir / MANIFEST).is_file():
        raise UserError(f"{split_dir}: no {MANIFEST}; create the embeddings with `python -m price_fusion.embed` "
                        "(or point data.embeddings_dir at the folder that holds <split>/manifest.json)")
    manifest = json.loads((split_dir / MANIFEST).read_text())
    mode = "r" if mmap else None
    arrays = {}
    for name in ("sample_ids", *PARTS):
        path = split_dir / f"{name}.npy"
        if not path.is_file() and name in LEGACY_NAMES:
            path = split_dir / f"{LEGACY_NAMES[name]}.npy"  # a store written before the rename
        if not path.is_file():
            raise UserError(f"{path}: missing; the embedding folder is incomplete, re-run python -m price_fusion.embed")
        arrays[name] = np.load(path, mmap_mode=mode if name != "sample_ids" else None, allow_pickle=False)
        if len(arrays[name]) != manifest["n"]:
            raise UserError(f"{path}: {len(arrays[name])} rows but {MANIFEST} says {manifest['n']}; "
                            "re-run python -m price_fusion.embed")
    for name in ("image", "text", "struct"):
        # one pass over the (memory-mapped) file: ~0.3 s for a 75k x 1795 split, before any training
        require_finite(arrays[name], split_dir / f"{name}.npy", row_ids=arrays["sample_ids"].tolist(),
                       fix="re-run python -m price_fusion.embed (or repair the imported vectors of that product)")
    return EmbeddingSet(arrays["sample_ids"], arrays["image"], arrays["has_image"], arrays["text"],
                        arrays["struct"], manifest)


def align_to_ids(emb: EmbeddingSet, sample_ids: np.ndarray, source: str) -> np.ndarray:
    """Row index into `emb` for each id of `sample_ids` (the CSV order).

    Raises `UserError` naming the first ids that the CSV has and the embeddings lack (the original asserted
    "CLIP and Qwen sample IDs don't match!" without saying which).
    """
    position = {sid: i for i, sid in enumerate(emb.sample_ids.tolist())}
    missing = [sid for sid in sample_ids.tolist() if sid not in position]
    if missing:
        extra = sorted(set(position) - set(sample_ids.tolist()))[:MAX_IDS_IN_ERROR]
        raise UserError(
            f"embeddings not aligned with {source}: {len(missing)} of {len(sample_ids)} sample ids have no embedding, "
            f"first {missing[:MAX_IDS_IN_ERROR]}; ids only in the embeddings: {extra}; re-run python -m "
            f"price_fusion.embed on this CSV")
    return np.fromiter((position[sid] for sid in sample_ids.tolist()), dtype=np.int64, count=len(sample_ids))


# ------------------------------------------------------------------------------------- the original's input formats
def import_clip_dir(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a directory of CLIP embeddings: ``embeddings.npy`` + ``sample_ids.npy`` (or ``.txt``), or one
    ``<sample_id>.npy`` vector per product. Returns (sample_ids [N] str, vectors [N, D] float32)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: CLIP embedding directory not found (embed.import_clip_dir)")
    if (folder / "embeddings.npy").is_file():
        vectors = np.load(folder / "embeddings.npy", allow_pickle=False)
        if (folder / "sample_ids.npy").is_file():
            ids = np.load(folder / "sample_ids.npy", allow_pickle=False).astype(str)
        elif (folder / "sample_ids.txt").is_file():
            ids = np.array((folder / "sample_ids.txt").read_text().split(), dtype=str)
        else:
            raise UserError(f"{folder}: embeddings.npy needs sample_ids.npy or sample_ids.txt beside it")
    else:
        files = sorted(folder.glob("*.npy"))
        if not files:
            raise UserError(f"{folder}: no .npy files; expected embeddings.npy + sample_ids.npy or <sample_id>.npy")
        ids = np.array([f.stem for f in files], dtype=str)
        vectors = np.stack([np.load(f, allow_pickle=False).reshape(-1) for f in files])
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise UserError(f"{folder}: {vectors.shape} embeddings for {len(ids)} sample ids; expected [N, D] with N ids")
    source = folder / "embeddings.npy" if (folder / "embeddings.npy").is_file() else folder
    require_finite(vectors, source, row_ids=ids.tolist(), fix="a product without an image takes an all-zero vector (masked)")
    return ids, vectors.astype(np.float32)


def import_qwen_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the original's Qwen embedding pickle: {sample_id: vector}, {"sample_ids": [...], "embeddings": [N, D]},
    or a DataFrame with ``sample_id`` and ``embedding`` columns. Pickles execute code when loaded: trusted files only.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Qwen embedding pickle not found (embed.import_qwen_pickle)")
    obj = pd.read_pickle(path)
    if isinstance(obj, pd.DataFrame):
        if not {"sample_id", "embedding"} <= set(obj.columns):
            raise UserError(f"{path}: DataFrame needs columns sample_id, embedding; found {list(obj.columns)}")
        ids, vectors = obj["sample_id"].astype(str).to_numpy(), np.stack(obj["embedding"].to_numpy())
    elif isinstance(obj, dict) and "embeddings" in obj and "sample_ids" in obj:
        ids, vectors = np.asarray(obj["sample_ids"]).astype(str), np.asarray(obj["embeddings"])
    elif isinstance(obj, dict):
        ids = np.array([str(k) for k in obj], dtype=str)
        vectors = np.stack([np.asarray(v).reshape(-1) for v in obj.values()])
    else:
        raise UserError(f"{path}: unsupported pickle content {type(obj).__name__}; expected a dict or DataFrame")
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise UserError(f"{path}: {vectors.shape} embeddings for {len(ids)} sample ids; expected [N, D]")
    require_finite(vectors.astype(np.float32), path, row_ids=ids.astype(str).tolist())
    return ids.astype(str), vectors.astype(np.float32)
