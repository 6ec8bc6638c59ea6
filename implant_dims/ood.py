"""Out-of-domain guard: how far each input lies from the images a regressor was trained on.

A regressor answers with millimetres whatever it is shown (a tibia, a black frame, noise), and its Monte Carlo
dropout intervals do not widen for such inputs: dropout variance measures the head's indecision, not distance from
the training data. So `predict` also scores each image by the Mahalanobis distance of its embedding from the
training images' embeddings and flags rows beyond a threshold chosen on calibration data.

- Space: the concatenated feature extractors' outputs the head reads (visual ViT, company and model-type embedding
  layers; `ImplantRegressor.features`), computed in eval mode. Tried once against the fused vector after the
  attention fusion (space="fused", kept selectable) on one sample run at a 2 % validation rate: the fused vector
  flagged every negative (this space missed one root-canal crop) but 3-4x more held-out in-domain crops (test 0.050
  vs 0.015, unseen combinations 0.13 vs 0.033).
- Statistics: mean and a Ledoit-Wolf shrinkage covariance of the training set's embeddings (some hundred images in a
  few hundred dimensions: the plain sample covariance would be near singular), fitted at the end of train_dual /
  train_regression and stored beside the checkpoints as `<out>/ood_stats.npz`, together with every calibration
  image's score and the SHA-256 of the weights they belong to.
- Calibration images: `data.calibration_json`, in-domain records that neither training nor model selection saw
  (the sample data's calibration.json, 400 images); '' = data.val_json. Validation images are a worse choice: the
  checkpoint was picked on them, and 200 of them leave the 2 % quantile noisy (on the sample recipe the test share
  flagged at a 2 % validation threshold ranged 1.5-6 % over seeds and machines).
- Threshold: chosen at predict time from the stored calibration scores for `predict.ood_false_alarm` (the share of
  in-domain images one accepts to flag), so changing the rate needs no retraining, by the split-conformal rule:
  the ceil((n + 1)(1 - rate))-th smallest of n calibration scores. A new in-domain image (exchangeable with the
  calibration ones) is then flagged with probability at most `rate`, whatever the score's distribution. The
  threshold, the rate asked for and the share of calibration images it flags are logged and written in every row.

    stats = fit_stats(model, train_set, val_set, rt, weights_sha)
    stats.save(out / STATS_NAME)
    stats = OodStats.load(out / STATS_NAME)
    threshold, calibration_rate = stats.threshold(0.02)
    flagged = stats.score(embeddings(model, dataset, rt)) > threshold
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import read_meta
from common.distributed import DistInfo
from common.errors import UserError
from common.io import atomic_write, write_json
from implant_dims.config import ImplantConfig
from implant_dims.data import ImplantDataset
from implant_dims.engine import Runtime, collate, epoch_batches
from implant_dims.models import ImplantRegressor
from implant_dims.regression import make_dataset, regressor_from_checkpoint
from implant_dims.stage_setup import autocast, autocast_dtype, load_split, optional_splits, pick_device

log = logging.getLogger(__name__)

STATS_NAME = "ood_stats.npz"
SPACES = ("features", "fused")
DEFAULT_SPACE = "features"
FORMAT_VERSION = 2


def check_false_alarm(value: float, key: str) -> None:
    """A false-alarm rate is a share of in-domain images flagged: strictly between 0 and 1."""
    if not 0 < value < 1:
        raise ValueError(f"{key} is the share of in-domain images the out-of-domain guard may flag, a "
                         f"fraction strictly between 0 and 1 (e.g. 0.02), got {value}")


def conformal_rank(n: int, false_alarm: float) -> int:
    """The 1-based rank, among n calibration scores sorted ascending, of the split-conformal threshold for a
    false-alarm rate: ceil((n + 1)(1 - rate)). With exchangeable scores a new in-domain score exceeds it with
    probability at most `rate`. A rank above n means n images are too few to promise that rate."""
    return int(np.ceil((n + 1) * (1.0 - false_alarm) - 1e-9))


def choose_threshold(calibration_scores: np.ndarray, false_alarm: float) -> tuple[float, float]:
    """(threshold, share of the calibration scores above it): the split-conformal threshold (conformal_rank);
    flagging is `score > threshold`. Where the calibration set is too small for the rate (n + 1 < 1 / rate), the
    largest calibration score, with a warning: no calibration image is flagged, and the promise is 1 / (n + 1)."""
    check_false_alarm(false_alarm, "false_alarm")
    scores = np.sort(np.asarray(calibration_scores, dtype=np.float64).reshape(-1))
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("choose_threshold needs at least one calibration score, all finite")
    rank = conformal_rank(scores.size, false_alarm)
    if rank > scores.size:
        log.warning("%d calibration images cannot bound a false-alarm rate of %g (that needs at least %d): the "
                    "threshold is their largest score, a bound of %.3f", scores.size, false_alarm,
                    int(np.ceil(1 / false_alarm - 1 - 1e-9)), 1 / (scores.size + 1))
        rank = scores.size
    threshold = float(scores[rank - 1])
    return threshold, float((scores > threshold).mean())


@torch.no_grad()
def embed_features(model: ImplantRegressor, feats: dict[str, torch.Tensor], space: str = DEFAULT_SPACE
                   ) -> torch.Tensor:
    """[B, D] embedding of `space` from `model.features()` output (the model must be in eval mode: the fusion's
    dropout would otherwise make the score random)."""
    if space == "features":
        return torch.cat([feats["visual"], *(feats[n] for n in model.embedder_names)], dim=-1).float()
    if space == "fused":
        parts = [feats[n] for n in model.embedder_names]
        fused, _ = model.fusion(feats["visual"], parts[0], parts[1] if len(parts) > 1 else None)
        return fused.float()
    raise ValueError(f"space must be one of {list(SPACES)}, got {space!r}")


@torch.no_grad()
def embeddings(model: ImplantRegressor, dataset: ImplantDataset, rt: Runtime, space: str = DEFAULT_SPACE,
               batch_size: int = 128) -> np.ndarray:
    """[N, D] float64 embeddings of every image of `dataset`, in order, with the model in eval mode (restored)."""
    was_training = model.training
    model.eval()
    parts = []
    for idx in epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False):
        images = collate(dataset, idx, rt.device)["image"]
        with autocast(rt.device, rt.amp_dtype):
            feats = model.features(images)
        feats = {k: v.float() for k, v in feats.items()}
        parts.append(embed_features(model, feats, space).cpu().numpy().astype(np.float64))
    model.train(was_training)
    return np.concatenate(parts)


@dataclass
class OodStats:
    """What the guard needs at predict time; see the module docstring."""

    mean: np.ndarray
    """[D] mean training embedding."""
    precision: np.ndarray
    """[D, D] inverse of the Ledoit-Wolf covariance of the training embeddings."""
    calibration_scores: np.ndarray
    """[N_cal] scores of the calibration images (the threshold is an order statistic of these)."""
    space: str = DEFAULT_SPACE
    """Which embedding (SPACES)."""
    weights_sha256: str = ""
    """SHA-256 of the regressor weights the embeddings came from ('' = unknown): stale statistics are refused."""
    n_train: int = 0
    """Training images the mean and covariance were fitted on."""
    shrinkage: float = 0.0
    """The Ledoit-Wolf shrinkage intensity (0 = sample covariance, 1 = scaled identity)."""
    calibration: str = "calibration"
    """Which records the calibration scores come from: "calibration" (data.calibration_json) or "val"."""

    def score(self, emb: np.ndarray) -> np.ndarray:
        """Mahalanobis distance [N] of embeddings [N, D] from the training mean."""
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embeddings must be [N, {self.mean.shape[0]}], got shape {emb.shape}")
        centred = emb - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, self.precision, centred), 0.0))

    def threshold(self, false_alarm: float) -> tuple[float, float]:
        """(threshold, share of calibration images it flags) for `false_alarm` (choose_threshold)."""
        return choose_threshold(self.calibration_scores, false_alarm)

    def save(self, path: str | Path) -> None:
        info = {"format": FORMAT_VERSION, "space": self.space, "weights_sha256": self.weights_sha256,
                "n_train": self.n_train, "shrinkage": self.shrinkage, "calibration": self.calibration}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, precision=self.precision, calibration_scores=self.calibration_scores,
                         info=np.array(json.dumps(info)))

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> OodStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                info = json.loads(str(data["info"]))
                # format 1 stored the validation images' scores (the calibration set of that time) as val_scores
                scores_key = "val_scores" if info.get("format") == 1 else "calibration_scores"
                arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("mean", "precision")}
                arrays["calibration_scores"] = np.asarray(data[scores_key], dtype=np.float64)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: unreadable out-of-domain statistics ({exc}); delete it and rerun "
                            f"`python -m implant_dims.predict` (which refits missing ones) or the training stage") from exc
        if info.get("format") not in (1, FORMAT_VERSION) or info.get("space") not in SPACES:
            raise UserError(f"{path}: out-of-domain statistics of an unknown format ({info}); delete it to refit")
        return cls(**arrays, space=info["space"], weights_sha256=info.get("weights_sha256", ""),
                   n_train=int(info.get("n_train", 0)), shrinkage=float(info.get("shrinkage", 0.0)),
                   calibration=str(info.get("calibration", "val")))


def fit_gaussian(train_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, precision, shrinkage) of a Ledoit-Wolf fit to [N, D] embeddings (N >= 2)."""
    from sklearn.covariance import LedoitWolf

    train_emb = np.asarray(train_emb, dtype=np.float64)
    if train_emb.ndim != 2 or train_emb.shape[0] < 2:
        raise ValueError(f"need at least 2 training embeddings [N, D], got shape {train_emb.shape}")
    lw = LedoitWolf().fit(train_emb)
    return lw.location_, lw.precision_, float(lw.shrinkage_)


def fit_stats(model: ImplantRegressor, train_set: ImplantDataset, calibration_set: ImplantDataset, rt: Runtime,
              weights_sha256: str = "", space: str = DEFAULT_SPACE, calibration: str = "calibration") -> OodStats:
    """Fit the guard on the training images (no augmentation: the dataset as given) and score the calibration ones
    (`calibration` names where they come from)."""
    train_emb = embeddings(model, train_set, rt, space)
    mean, precision, shrinkage = fit_gaussian(train_emb)
    stats = OodStats(mean, precision, np.zeros(0), space, weights_sha256, len(train_set), shrinkage, calibration)
    stats.calibration_scores = stats.score(embeddings(model, calibration_set, rt, space))
    return stats


def weights_digest(meta: dict) -> str:
    """SHA-256 of a checkpoint's weights file, from its meta.json (what the stats are tied to)."""
    return next((v["sha256"] for k, v in meta.get("files", {}).items() if k.endswith(".safetensors")), "")


def calibration_split(cfg: ImplantConfig) -> str:
    """The split the threshold is calibrated on: "calibration" where data.calibration_json is set, else "val"."""
    return "calibration" if cfg.data.calibration_json else "val"


def require_calibration(cfg: ImplantConfig) -> None:
    """Refuse (exit 2) a data.calibration_json that names no file, before hours of training end in a fit that
    cannot run."""
    path = cfg.data.calibration_json
    if path and not Path(path).is_file():
        raise UserError(f"data.calibration_json={path}: file not found; regenerate the sample data (`python -m "
                        f"implant_dims.sample_data data/implant_dims/sample` writes calibration.json), point it at "
                        f"in-domain records the model never sees, or set data.calibration_json='' to calibrate the "
                        f"out-of-domain guard on data.val_json")


def stats_path(checkpoint: str | Path) -> Path:
    """<out>/ood_stats.npz for a checkpoint <out>/checkpoints/<name>."""
    return Path(checkpoint).resolve().parents[1] / STATS_NAME


def fit_for_run(cfg: ImplantConfig, out: Path) -> OodStats | None:
    """Fit the guard of the regressor trained into `out` (its best checkpoint) on cfg's train records, score its
    calibration records (calibration_split) and store it as <out>/ood_stats.npz; also write <out>/reports/ood.json:
    the threshold for predict.ood_false_alarm and the share of the calibration images and of each other in-domain
    split (val, test, unseen) it flags. Rank 0 only under torchrun (None elsewhere);
    runs after training, when the process group is gone, so it builds a one-process runtime of its own."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    require_calibration(cfg)
    best = out / "checkpoints" / "best"
    model, meta = regressor_from_checkpoint(best)
    device = pick_device(cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))
    rt = Runtime(DistInfo(0, 0, 1, device), device, autocast_dtype(cfg.run.amp, device))
    model.to(device)
    img_size = int(meta["img_size"])
    calibration = calibration_split(cfg)
    held_out = ["val", *optional_splits(cfg)] if calibration == "calibration" else optional_splits(cfg)
    sets = {split: make_dataset(load_split(cfg, split)[0], meta, img_size)
            for split in ("train", calibration, *held_out)}
    stats = fit_stats(model, sets["train"], sets[calibration], rt, weights_digest(read_meta(best)),
                      calibration=calibration)
    stats.save(out / STATS_NAME)
    threshold, calibration_rate = stats.threshold(cfg.predict.ood_false_alarm)
    report = {"space": stats.space, "n_train": stats.n_train, "shrinkage": stats.shrinkage,
              "calibration": calibration, "false_alarm_asked": cfg.predict.ood_false_alarm, "threshold": threshold,
              "flagged_share": {calibration: calibration_rate}, "n": {calibration: len(sets[calibration])}}
    for split in held_out:
        scores = stats.score(embeddings(model, sets[split], rt, stats.space))
        report["flagged_share"][split] = float((scores > threshold).mean())
        report["n"][split] = len(scores)
    write_json(out / "reports" / "ood.json", report)
    log.info("out-of-domain guard: Mahalanobis on %s (%d-d, Ledoit-Wolf shrinkage %.3f) from %d training images; "
             "threshold %.2f flags %s of the in-domain images (asked %.3f) -> %s", stats.space,
             stats.mean.shape[0], stats.shrinkage, stats.n_train, threshold,
             ", ".join(f"{k} {v:.3f}" for k, v in report["flagged_share"].items()), cfg.predict.ood_false_alarm,
             out / STATS_NAME)
    return stats


@dataclass
class Guard:
    """The guard as predict applies it: stored statistics and the threshold for the configured false-alarm rate."""

    stats: OodStats
    threshold: float
    false_alarm: float
    """The rate asked for (predict.ood_false_alarm)."""
    calibration_rate: float
    """The share of calibration images the threshold flags."""

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


def load_guard(checkpoint: Path, cfg: ImplantConfig) -> Guard:
    """The guard of a regressor checkpoint: <out>/ood_stats.npz when it belongs to these weights; otherwise (a run
    trained before the guard existed, weights changed since, or calibrated on other records than the config names)
    refitted from the config's train and calibration records and stored, which needs those records (exit 2 naming
    the fix when they cannot be read)."""
    path = stats_path(checkpoint)
    digest = weights_digest(read_meta(checkpoint))
    stats = OodStats.load(path) if path.is_file() else None
    if stats is not None and stats.weights_sha256 and digest and stats.weights_sha256 != digest:
        log.warning("%s belongs to other weights than %s (trained further since?): refitting", path, checkpoint)
        stats = None
    if stats is not None and stats.calibration != calibration_split(cfg):
        log.warning("%s is calibrated on %s, the config names %s: refitting", path, stats.calibration,
                    calibration_split(cfg))
        stats = None
    if stats is None:
        log.warning("no out-of-domain statistics for %s: fitting them on data.train_json and data.%s_json",
                    checkpoint, calibration_split(cfg))
        try:
            stats = fit_for_run(cfg, path.parent)
        except UserError as exc:
            raise UserError(f"{path} is missing and cannot be fitted from the config's records ({exc}); retrain "
                            f"(train_dual writes it) or point data.train_json / data.calibration_json at the "
                            f"regressor's training data and in-domain records it never saw") from exc
        if stats is None:  # a non-zero RANK in the environment
            raise UserError(f"{path} is missing; run predict outside torchrun to fit it")
    threshold, calibration_rate = stats.threshold(cfg.predict.ood_false_alarm)
    log.info("out-of-domain guard: Mahalanobis on %s, threshold %.3f = %.3f of the %d %s images flagged "
             "(predict.ood_false_alarm=%g)", stats.space, threshold, calibration_rate, stats.calibration_scores.size,
             stats.calibration, cfg.predict.ood_false_alarm)
    return Guard(stats, threshold, cfg.predict.ood_false_alarm, calibration_rate)


def mark_rows(rows: list[dict], scores: np.ndarray, guard: Guard, refuse: bool) -> int:
    """Write the guard's columns into each prediction row (ood_score, ood_threshold, out_of_domain, ood_reason) and,
    when `refuse`, blank every predicted millimetre cell of a flagged row (the *_mm columns but the *_true_mm
    labels). Returns the number flagged."""
    flagged = guard.flag(scores)
    for row, score, bad in zip(rows, scores, flagged):
        row["ood_score"] = round(float(score), 4)
        row["ood_threshold"] = round(guard.threshold, 4)
        row["out_of_domain"] = bool(bad)
        row["ood_reason"] = (f"embedding distance {score:.1f} > {guard.threshold:.1f} (the threshold that flags "
                             f"{guard.calibration_rate:.1%} of in-domain calibration images): not like the "
                             f"training images"
                             if bad else "")
        if bad and refuse:
            for key in list(row):
                if key.endswith("_mm") and not key.endswith("_true_mm"):
                    row[key] = ""
    return int(flagged.sum())
