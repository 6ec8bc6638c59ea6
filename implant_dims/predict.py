"""Stage 6: implant length and diameter (mm) with an uncertainty for each image, from a trained regressor.

    python -m implant_dims.predict --config configs/implant_dims/sample.yaml predict.input=path/to/crop.png
    python -m implant_dims.predict --config configs/implant_dims/sample.yaml predict.input=data/real_crops/records.json
    python -m implant_dims.predict --config ... predict.input=scans/ predict.snap_to_catalogue=true

Input: one image (PNG, JPEG or DICOM), a folder of them, or a JSON list of records (the training layout; unknown
sizes allowed). Output: a CSV (predict.out, default <run_dir>/predictions/<input stem>.csv) with one row per image:
length_mm, diameter_mm (the Monte Carlo dropout mean over predict.mc_samples passes), their std, the
predict.interval interval (mean ± z·std, the std scaled by the factor fitted on validation data when the run's
reports/results_val.json has one), the company and model type the embedding models' classifier heads read, the
nearest catalogue size when predict.snap_to_catalogue is set (under regression.snap: the whole catalogue, or the
predicted class above the threshold the run chose on validation), and the true sizes when the records have them; and
the out-of-domain guard's columns (implant_dims/ood.py): ood_score (Mahalanobis distance of the image's embedding
from the training images'), ood_threshold (chosen on calibration scores for predict.ood_false_alarm), out_of_domain
and ood_reason; with predict.refuse_out_of_domain=true a flagged row's millimetre cells are left empty.
Every row also says where its pixel scale came from (scale_source: dicom / record / assumed, and mm_per_pixel); each
image is resampled to the scale the regressor was trained at, and an image without a scale is refused (exit 2) unless
data.assume_scale gives one, which every row then carries as assumed_mm_per_pixel.
Images that cannot be read are skipped, counted and logged; nothing usable is an error (exit 2). While it runs, a
line every predict.log_every_s seconds says how many images are done and at what rate.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text
from common.logs import setup_logging
from implant_dims.config import ImplantConfig
from implant_dims.data import (
    ImplantDataset,
    ImplantRecord,
    check_image,
    dicom_spacing,
    is_dicom,
    load_records,
    require_scale,
)
from implant_dims.engine import Runtime, collate, epoch_batches, start_runtime
from implant_dims.models import ImplantRegressor, mc_dropout_predict
from implant_dims.ood import embed_features, load_guard, mark_rows
from implant_dims.regression import (
    DIMS,
    class_probabilities,
    concat_batches,
    interval_half_width,
    load_catalogue,
    make_dataset,
    predict_batch,
    predicted_keys,
    regressor_from_checkpoint,
    snap,
    snap_keys,
)
from implant_dims.stage_setup import autocast

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


def input_records(path: Path, assume_scale: float = 0.0) -> list[ImplantRecord]:
    """Records for predict.input: a JSON list, one image, or every image in a folder (unreadable ones skipped),
    each with its pixel scale (DICOM spacing, the record's mm_per_pixel, else assume_scale; none is refused)."""
    if not path.exists():
        raise UserError(f"predict.input: {path} does not exist; give an image, a folder of images or a records JSON")
    if path.is_file() and path.suffix.lower() == ".json":
        records, _ = load_records(path, require_labels=False)
        return require_scale(records, assume_scale, path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p)))
    records, skipped = [], {}
    for i, file in enumerate(files):
        problem = check_image(file)
        if problem is not None:
            skipped.setdefault(problem, []).append(file.name)
            continue
        spacing = dicom_spacing(file) if is_dicom(file) else None
        records.append(ImplantRecord(image_path=file.resolve(), company=None, model_type=None, length=None,
                                     diameter=None, index=i, mm_per_pixel=spacing,
                                     scale_source="dicom" if spacing is not None else None))
    for reason, names in skipped.items():
        log.warning("skipped %d image(s), %s: %s", len(names), reason, ", ".join(names[:5]))
    if not records:
        detail = "; ".join(f"{r}: {', '.join(n[:3])}" for r, n in skipped.items()) or "no image files found"
        raise UserError(f"predict.input: nothing to predict in {path} ({detail})")
    return require_scale(records, assume_scale, path)


def val_std_scale(checkpoint: Path) -> np.ndarray | None:
    """The std multiplier train_dual fitted on validation data (reports/results_val.json beside the checkpoints)."""
    report = checkpoint.resolve().parents[1] / "reports" / "results_val.json"
    if report.is_file():
        scale = json.loads(report.read_text()).get("std_scale_fitted_on_val")
        if scale is not None:
            return np.asarray(scale, dtype=np.float64)
    return None


def snap_min_prob(cfg: ImplantConfig, checkpoint: Path) -> float:
    """regression.snap_min_prob, or with -1 the value the run chose on validation (reports/results_val.json)."""
    rc = cfg.regression
    if rc.snap != "predicted_class" or rc.snap_min_prob != -1:
        return rc.snap_min_prob
    report = checkpoint.resolve().parents[1] / "reports" / "results_val.json"
    rule = json.loads(report.read_text()).get("snap_rule") if report.is_file() else None
    if not rule or rule.get("mode") != "predicted_class" or rule.get("min_prob") is None:
        raise UserError(f"regression.snap_min_prob=-1 (choose on validation) but {report} records no threshold "
                        f"chosen for regression.snap=predicted_class; set regression.snap_min_prob=<0..1> or "
                        f"regression.snap=catalogue")
    return float(rule["min_prob"])


class ProgressLine:
    """Logs "predicted k/n images (r images/s)" when `every_s` seconds passed since the last line, and at the end."""

    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.every_s, self.done = total, every_s, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every_s:
            log.info("predicted %d/%d images (%.1f images/s)", self.done, self.total,
                     self.done / max(now - self.start, 1e-9))
            self.last = now


def predict_all(model: ImplantRegressor, dataset: ImplantDataset, rt: Runtime, cfg: ImplantConfig,
                ood_space: str | None = None) -> dict[str, np.ndarray]:
    """Batches of predict.batch_size: the deterministic pass ("pred_mm" and the class logits of predict_batch), and
    "mean_mm" / "std_mm" [N, 2] over predict.mc_samples Monte Carlo dropout passes (the deterministic prediction and
    a std of 0 when mc_samples is 0). Each batch's dropout draws start from run.seed. With `ood_space`, also
    "ood_embedding" [N, D]: the out-of-domain guard's embedding (implant_dims.ood) from the same features."""
    pc = cfg.predict
    log.info("predicting %d images, %s", len(dataset), f"{pc.mc_samples} Monte Carlo dropout passes each"
             if pc.mc_samples else "one deterministic pass each")
    progress = ProgressLine(len(dataset), pc.log_every_s)
    model.eval()
    parts = []
    for idx in epoch_batches(len(dataset), pc.batch_size, 0, 0, shuffle=False):
        images = collate(dataset, idx, rt.device)["image"]
        with torch.no_grad(), autocast(rt.device, rt.amp_dtype):
            feats = model.features(images)
        feats = {k: v.float() for k, v in feats.items()}
        part = predict_batch(model, rt, feats=feats)
        if ood_space is not None:
            part["ood_embedding"] = embed_features(model, feats, ood_space).cpu().numpy().astype(np.float64)
        if pc.mc_samples > 0:
            mean, std = mc_dropout_predict(model, images, n_samples=pc.mc_samples, generator_seed=cfg.run.seed)
            part.update(mean_mm=mean.float().cpu().numpy(), std_mm=std.float().cpu().numpy())
        else:
            part.update(mean_mm=part["pred_mm"], std_mm=np.zeros_like(part["pred_mm"]))
        parts.append(part)
        progress.update(len(idx))
    return concat_batches(parts)


def predict(cfg: ImplantConfig) -> Path:
    pc = cfg.predict
    setup_logging(None)
    source = Path(pc.input)
    checkpoint = Path(pc.checkpoint) if pc.checkpoint else \
        cfg.run.run_dir / cfg.regression.out_subdir / "checkpoints" / "best"
    if not checkpoint.exists():
        raise UserError(f"predict.checkpoint: no regressor checkpoint at {checkpoint}; run `python -m "
                        f"implant_dims.train_dual` first or set predict.checkpoint")
    records = input_records(source, cfg.data.assume_scale)
    rt: Runtime = start_runtime(cfg)
    model, meta = regressor_from_checkpoint(checkpoint)
    model.to(rt.device)
    dataset = make_dataset(records, meta, int(meta["img_size"]))
    guard = load_guard(checkpoint, cfg)
    det = predict_all(model, dataset, rt, cfg, guard.stats.space)
    pred, std = det["mean_mm"], det["std_mm"]
    scale = val_std_scale(checkpoint)
    half = interval_half_width(std, pc.interval, scale if scale is not None else 1.0)
    keys = predicted_keys(det, meta, records)
    snapped = None
    if pc.snap_to_catalogue:
        if not cfg.data.catalogue_csv:
            raise UserError("predict.snap_to_catalogue=true needs data.catalogue_csv (company, model_type, length, "
                            "diameter)")
        train_std = np.asarray(model.target_std.cpu().numpy(), dtype=np.float64)
        min_prob = snap_min_prob(cfg, checkpoint)
        snap_to = snap_keys(keys, class_probabilities(det, meta), cfg.regression.snap, min_prob)
        snapped = snap(pred, snap_to, load_catalogue(cfg.data.catalogue_csv), train_std)
        log.info("snapping to the catalogue: %s", "the whole catalogue" if cfg.regression.snap == "catalogue" else
                 f"the predicted class where its probability is above {min_prob:.4g}, else the whole catalogue")
    out = Path(pc.out) if pc.out else cfg.run.run_dir / "predictions" / f"{source.stem}.csv"
    rows = []
    for i, r in enumerate(records):
        row = {"image_path": str(r.image_path), "company_pred": keys[i][0] or "", "model_type_pred": keys[i][1] or ""}
        # where the millimetres' scale came from: a row read at an assumed scale must say so
        row["scale_source"] = r.scale_source
        row["mm_per_pixel"] = round(float(np.mean(r.mm_per_pixel)), 6)
        if cfg.data.assume_scale > 0:
            row["assumed_mm_per_pixel"] = cfg.data.assume_scale
        for k, dim in enumerate(DIMS):
            row[f"{dim}_mm"] = round(float(pred[i, k]), 4)
            row[f"{dim}_std_mm"] = round(float(std[i, k]), 4)
            row[f"{dim}_low_mm"] = round(float(pred[i, k] - half[i, k]), 4)
            row[f"{dim}_high_mm"] = round(float(pred[i, k] + half[i, k]), 4)
            if snapped is not None:
                row[f"{dim}_catalogue_mm"] = float(snapped[i, k])
            true = getattr(r, dim)
            row[f"{dim}_true_mm"] = "" if true is None else float(true)
        rows.append(row)
    n_flagged = mark_rows(rows, guard.stats.score(det["ood_embedding"]), guard, pc.refuse_out_of_domain)
    if n_flagged:
        log.warning("%d of %d images flagged out of domain (embedding far from the training images)%s", n_flagged,
                    len(rows), ": no millimetres written for them" if pc.refuse_out_of_domain else
                    "; their millimetres are written but mean little (predict.refuse_out_of_domain=true blanks them)")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, _csv_text(rows))
    log.info("wrote %d predictions to %s (%s; interval %.0f%%%s)", len(rows), out,
             f"{pc.mc_samples} MC-dropout passes" if pc.mc_samples else "deterministic", 100 * pc.interval,
             ", std scaled by the validation fit" if scale is not None else "")
    return out


def _csv_text(rows: list[dict]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _main(cfg: ImplantConfig) -> int:
    predict(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.predict")

if __name__ == "__main__":
    raise SystemExit(main())
