"""What every implant_dims training stage shares: devices and mixed precision, record splits, the data part of
the resume fingerprint, building ViTs from config, and reading the classifiers back as embedding models."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import find_checkpoint, load_weights, read_meta
from common.config import to_dict
from common.errors import UserError
from common.fingerprint import make_fingerprint
from implant_dims.config import ImplantConfig, VitConfig
from implant_dims.data import ImplantRecord, load_records, require_scale
from implant_dims.models import EmbeddingClassifier, VitSpec

log = logging.getLogger(__name__)

# Paths name where things are, not what they are: a moved file with the same content resumes (its bytes are in the
# fingerprint's data part).
PATH_KEYS = ("data.train_json", "data.val_json", "data.test_json", "data.unseen_json", "data.calibration_json",
             "data.image_root", "data.catalogue_csv", "regression.company_checkpoint", "regression.model_checkpoint",
             "regression.out_subdir", "regression.mc_samples", "regression.interval", "regression.snap",
             "regression.snap_min_prob", "classifier.top_k",
             "visual.vit.weights", "classifier.vit.weights", "hpo", "predict", "run.amp")


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` is CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"run.device={name!r} but CUDA is not available; use run.device=cpu")
        if local_rank is not None and name == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for run.amp on this device (None: full precision). auto = bf16 on CUDA, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def set_threads(cfg: ImplantConfig) -> None:
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)


def vit_spec(vit: VitConfig, img_size: int) -> VitSpec:
    """The model layer's spec of a config `vit` section (same fields) at the data's image size."""
    return VitSpec(img_size=img_size, **dataclasses.asdict(vit))


def split_path(cfg: ImplantConfig, split: str) -> str:
    return {"train": cfg.data.train_json, "val": cfg.data.val_json, "test": cfg.data.test_json,
            "unseen": cfg.data.unseen_json, "calibration": cfg.data.calibration_json}[split]


def load_split(cfg: ImplantConfig, split: str, require_labels: bool = True) -> tuple[list[ImplantRecord], Counter]:
    """Records of one split (skipped rows counted by reason and logged by data.load_records), each with a pixel
    scale (data.assume_scale filling in where the file has none; none at all is refused, exit 2)."""
    path = split_path(cfg, split)
    if not path:
        raise UserError(f"data.{split}_json is empty; set it to a records JSON file")
    records, skipped = load_records(path, cfg.data.image_root or None, require_labels=require_labels)
    return require_scale(records, cfg.data.assume_scale, path), skipped


def log_skipped(cfg: ImplantConfig, splits: dict[str, tuple[list[ImplantRecord], Counter]]) -> None:
    """Repeat each split's skip counts by reason once the run's train.log exists (load_records logs them before
    open_run, i.e. to stderr only)."""
    for split, (records, skipped) in splits.items():
        if skipped:
            n_skipped = sum(skipped.values())
            counts = "; ".join(f"{reason} x{n}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
            log.warning("data.%s_json %s: skipped %d of %d rows: %s", split, split_path(cfg, split), n_skipped,
                        len(records) + n_skipped, counts)


def optional_splits(cfg: ImplantConfig) -> list[str]:
    """The held-out splits this config names and that exist (test, unseen)."""
    return [s for s in ("test", "unseen") if split_path(cfg, s) and Path(split_path(cfg, s)).is_file()]


def records_digest(records: list[ImplantRecord]) -> str:
    """SHA-256 over every record's labels and its image's bytes: the data part of a resume fingerprint (an image
    rewritten in place changes it; moving the data set does not)."""
    h = hashlib.sha256()
    for r in records:
        h.update(repr((r.company, r.model_type, r.length, r.diameter, r.thread_type, r.group,
                       r.mm_per_pixel)).encode())
        h.update(Path(r.image_path).read_bytes())
    return h.hexdigest()


def stage_fingerprint(cfg: ImplantConfig, sections: tuple[str, ...], splits: dict[str, list[ImplantRecord]],
                      digests: dict[str, str] | None = None) -> dict:
    """What decides a stage's weights: the config `sections` plus run.seed and data.img_size, the content of each
    split it trains or selects on, and `digests` (the weights of the classifiers a regressor starts from)."""
    full = to_dict(cfg)
    config = {"run": {"seed": cfg.run.seed},
              "data": {"img_size": cfg.data.img_size, "mm_per_pixel": cfg.data.input_mm_per_pixel()},
              **{name: full[name] for name in sections}}
    data_digests = {f"split_{name}": records_digest(records) for name, records in splits.items()}
    return make_fingerprint(config, digests={**data_digests, **(digests or {})}, volatile=PATH_KEYS)


def classifier_dir(cfg: ImplantConfig, target: str) -> Path:
    return cfg.run.run_dir / f"classifier_{target}"


def classifier_checkpoint(cfg: ImplantConfig, target: str) -> Path:
    """The classifier checkpoint a regressor reads: the configured path, else this run's best."""
    configured = cfg.regression.company_checkpoint if target == "company" else cfg.regression.model_checkpoint
    path = Path(configured) if configured else classifier_dir(cfg, target) / "checkpoints" / "best"
    key = "regression.company_checkpoint" if target == "company" else "regression.model_checkpoint"
    if not path.exists():
        raise UserError(f"{key}: no {target} classifier checkpoint at {path}; run `python -m "
                        f"implant_dims.train_classifier classifier.target={target}` first or set {key}")
    return find_checkpoint(path)


def classifier_meta(spec: VitSpec, target: str, classes: list[str], embedding_dim: int, dropout: float) -> dict:
    return {"kind": "classifier", "target": target, "classes": list(classes), "vit": dataclasses.asdict(spec),
            "embedding_dim": embedding_dim, "dropout": dropout}


def build_classifier_from_meta(meta: dict) -> EmbeddingClassifier:
    return EmbeddingClassifier(VitSpec(**{**meta["vit"], "weights": ""}), len(meta["classes"]),
                               embedding_dim=int(meta["embedding_dim"]), dropout=float(meta["dropout"]))


def read_classifier(path: str | Path, target: str) -> tuple[Path, dict, str]:
    """(checkpoint dir, meta, SHA-256 of its weights) of a `target` classifier checkpoint, without loading weights:
    what the resume fingerprint and the class-list check need."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("kind") != "classifier" or meta.get("target") != target:
        raise UserError(f"{ckpt}: not a {target} classifier checkpoint (kind={meta.get('kind')!r}, "
                        f"target={meta.get('target')!r}); point the regression.*_checkpoint key at "
                        f"<run>/classifier_{target}/checkpoints/best")
    weights_sha = next((v["sha256"] for k, v in meta.get("files", {}).items() if k.endswith(".safetensors")), "")
    return ckpt, meta, weights_sha


def load_classifier(path: str | Path, target: str) -> EmbeddingClassifier:
    """A classifier with its trained weights, from a checkpoint (checked by read_classifier)."""
    ckpt, meta, _ = read_classifier(path, target)
    model = build_classifier_from_meta(meta)
    load_weights(ckpt, model)
    return model


def class_indices(records: list[ImplantRecord], attr: str, classes: list[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(getattr(r, attr), -1) for r in records], dtype=np.int64)

