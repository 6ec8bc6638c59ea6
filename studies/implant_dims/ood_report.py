"""The out-of-domain guard measured: what it flags among inputs that are not sample implant crops, and among the
held-out in-domain crops (the false alarms).

    python -m studies.implant_dims.ood_report --config configs/implant_dims/sample.yaml
    studies/implant_dims/ood_report.sh        # trains the sample run first where it is missing, then this

Needs a trained dual regressor (<run_dir>/<regression.out_subdir>/); writes <run_dir>/ood_report/: the negative
inputs (negatives/), each set's predict CSV (predictions/), ood_report.md and ood_report.json. Every set goes
through `implant_dims.predict` itself (one deterministic pass, predict.mc_samples=0: the guard does not depend on
dropout sampling), so the table measures what a user of predict gets.

Negative sets (none of them an implant crop like the training ones):
  nema_cr        the CR radiographs (DICOM) in --cr: a tibia and a chest;
  fillings       crops of the class-1 boxes (fillings) of the panoramic X-rays in --panoramic (crop_yolo);
  root_canals    crops of the class-3 boxes (root canal fillings) of the same X-rays;
  other_box      crops of the class-0 boxes of the same X-rays (neither implant, filling nor root canal);
  synthetic      black, white and mid-grey constant images, a grey ramp, Gaussian, uniform, RGB and RGBA noise
                 (three seeds each) and two 1 x 1 pixel images.
Also reported, outside the goal: real_implants, the class-2 boxes (real implants with crowns and abutments: real
radiographs, not the synthetic domain the sample model learned, so flagging them is right for this model).
In-domain: data.calibration_json (where the threshold was chosen; data.val_json when it is ''), data.val_json,
data.test_json and data.unseen_json.

Images without a pixel scale (the PNG crops and the synthetic images) are given data.assume_scale when the config
has that key and it is 0: NEGATIVE_MM_PER_PIXEL, the sample crops' own scale, so each negative fills the model's
field of view as a sample crop does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.cli import guarded_main, stage_parser
from common.errors import UserError
from common.io import atomic_write, atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig
from implant_dims.crop_yolo import crop_folder
from implant_dims.stage_setup import split_path

log = logging.getLogger(__name__)

NEGATIVE_MM_PER_PIXEL = 1 / 6.0  # the sample renderer's 6 px/mm at 128 px
NEGATIVE_SIDE = 128
GOAL_FALSE_ALARM = 0.05  # the guard's goal: at most 5 % of the in-domain test crops flagged
PANORAMIC_CLASSES = {"fillings": 1, "root_canals": 3, "other_box": 0, "real_implants": 2}
GOAL_SETS = ("nema_cr", "fillings", "root_canals", "other_box", "synthetic")
SWEEP_RATES = (0.01, 0.02, 0.03, 0.05)  # other predict.ood_false_alarm values, reported beside the configured one


def synthetic_images(side: int = NEGATIVE_SIDE, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, np.ndarray]:
    """name -> uint8 array ([H, W] gray, [H, W, 3] RGB or [H, W, 4] RGBA) of inputs no radiograph looks like."""
    ramp = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    images = {"black": np.zeros((side, side), np.uint8), "white": np.full((side, side), 255, np.uint8),
              "grey": np.full((side, side), 128, np.uint8), "ramp": ramp,
              "pixel_grey_1x1": np.full((1, 1), 128, np.uint8), "pixel_white_1x1": np.full((1, 1), 255, np.uint8)}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        images[f"gauss_noise_{seed}"] = np.clip(rng.normal(128, 40, (side, side)), 0, 255).astype(np.uint8)
        images[f"uniform_noise_{seed}"] = rng.integers(0, 256, (side, side), dtype=np.uint8)
        images[f"rgb_noise_{seed}"] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        images[f"rgba_noise_{seed}"] = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
    return images


def write_synthetic(folder: Path) -> Path:
    """The synthetic negatives as PNGs in `folder` (returned)."""
    from PIL import Image

    for name, array in synthetic_images().items():
        mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[2]]

        def save(tmp: Path, array: np.ndarray = array, mode: str = mode) -> None:
            Image.fromarray(array, mode=mode).save(tmp, format="PNG")

        atomic_write(folder / f"{name}.png", save)
    return folder


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_predict(cfg: ImplantConfig, source: Path, out: Path, assume_scale: bool) -> list[dict[str, str]]:
    """predict on `source` into `out` (deterministic pass), with the negatives' assumed scale when asked and the
    config has the key; the CSV rows."""
    from implant_dims.predict import predict

    data = cfg.data
    if assume_scale and hasattr(data, "assume_scale") and not data.assume_scale:
        data = dataclasses.replace(data, assume_scale=NEGATIVE_MM_PER_PIXEL)
    run_cfg = dataclasses.replace(cfg, data=data, predict=dataclasses.replace(
        cfg.predict, input=str(source), out=str(out), mc_samples=0, snap_to_catalogue=False,
        refuse_out_of_domain=False))
    predict(run_cfg)
    return _read_csv(out)


def summarise(rows: list[dict[str, str]]) -> dict:
    scores = np.array([float(r["ood_score"]) for r in rows])
    flagged = np.array([r["out_of_domain"] == "True" for r in rows])
    return {"n": len(rows), "flagged": int(flagged.sum()), "share": float(flagged.mean()) if rows else 0.0,
            "scores": scores.tolist(),
            "score_min": float(scores.min()), "score_median": float(np.median(scores)),
            "score_max": float(scores.max()),
            "missed": [Path(r["image_path"]).name for r, f in zip(rows, flagged) if not f]}


def markdown(report: dict) -> str:
    lines = [f"Out-of-domain guard of `{report['checkpoint']}`: Mahalanobis distance on `{report['space']}` "
             f"embeddings, threshold {report['threshold']:.2f} for predict.ood_false_alarm="
             f"{report['false_alarm_asked']:g} ({report['calibration_rate']:.3f} of the {report['n_calibration']} "
             f"{report['calibration']} images flagged; split-conformal: an in-domain image is flagged with "
             f"probability at most {report['false_alarm_asked']:g}).", "",
             "| input set | kind | n | flagged | share | score min / median / max |", "|---|---|---|---|---|---|"]
    for name, s in report["sets"].items():
        lines.append(f"| {name} | {s['kind']} | {s['n']} | {s['flagged']} | {s['share']:.3f} | "
                     f"{s['score_min']:.1f} / {s['score_median']:.1f} / {s['score_max']:.1f} |")
    goal = report["goal"]
    lines += ["", f"Goal: every negative flagged ({goal['negatives_flagged']} of {goal['negatives_total']}: "
              f"{'met' if goal['all_negatives_flagged'] else 'NOT met'}), at most {GOAL_FALSE_ALARM:.0%} of the "
              f"test crops flagged ({goal['test_share']:.3f}: {'met' if goal['test_ok'] else 'NOT met'})."]
    missed = {n: s["missed"] for n, s in report["sets"].items() if s["kind"] == "negative" and s["missed"]}
    if missed:
        lines.append("Negatives not flagged: " + "; ".join(f"{n}: {', '.join(m)}" for n, m in missed.items()))
    names = list(report["sets"])
    lines += ["", f"Flagged share at other predict.ood_false_alarm values (thresholds from the same "
              f"{report['calibration']} scores):", "", "| ood_false_alarm | threshold | " + " | ".join(names) + " |",
              "|---" * (len(names) + 2) + "|"]
    for rate, row in report["sweep"].items():
        lines.append(f"| {rate} | {row['threshold']:.2f} | " + " | ".join(f"{row['share'][n]:.3f}" for n in names)
                     + " |")
    return "\n".join(lines) + "\n"


def ood_report(cfg: ImplantConfig, panoramic: Path, cr: Path) -> dict:
    from implant_dims.ood import stats_path

    setup_logging(None)
    checkpoint = Path(cfg.predict.checkpoint) if cfg.predict.checkpoint else \
        cfg.run.run_dir / cfg.regression.out_subdir / "checkpoints" / "best"
    if not checkpoint.exists():
        raise UserError(f"no regressor at {checkpoint}: train it first (studies/implant_dims/ood_report.sh does) or "
                        f"set predict.checkpoint")
    for flag, folder in (("--panoramic", panoramic), ("--cr", cr)):
        if not folder.is_dir():
            raise UserError(f"{flag} {folder}: not a folder (the shared data sets, see implant_dims/README.md)")
    out = cfg.run.run_dir / "ood_report"
    negatives, preds = out / "negatives", out / "predictions"
    sources: dict[str, tuple[Path, str, bool]] = {}  # name -> (predict input, kind, needs an assumed scale)
    for split in ("calibration", "val", "test", "unseen"):
        path = split_path(cfg, split)
        if path and Path(path).is_file():
            sources[split] = (Path(path), "in-domain", False)
    sources["nema_cr"] = (cr, "negative", True)
    for name, class_id in PANORAMIC_CLASSES.items():
        crop_folder(panoramic / "images", panoramic / "labels", negatives / name, class_id=class_id,
                    size=NEGATIVE_SIDE)
        sources[name] = (negatives / name / "records.json", "negative" if name in GOAL_SETS else "real implant",
                         True)
    sources["synthetic"] = (write_synthetic(negatives / "synthetic"), "negative", True)
    sets = {}
    for name, (source, kind, assume) in sources.items():
        log.info("ood_report: %s (%s) from %s", name, kind, source)
        sets[name] = {"kind": kind, "source": str(source),
                      **summarise(run_predict(cfg, source, preds / f"{name}.csv", assume))}
    from implant_dims.ood import OodStats

    stats = OodStats.load(stats_path(checkpoint))
    threshold, calibration_rate = stats.threshold(cfg.predict.ood_false_alarm)
    neg = [s for s in sets.values() if s["kind"] == "negative"]
    sweep = {}
    for rate in SWEEP_RATES:
        thr, _ = stats.threshold(rate)
        # the CSV holds scores rounded to 4 decimals: round the threshold alike (it is itself a calibration score)
        sweep[str(rate)] = {"threshold": thr, "share": {n: float((np.array(s["scores"]) > round(thr, 4)).mean())
                                                         for n, s in sets.items()}}
    test_share = sets["test"]["share"] if "test" in sets else float("nan")
    report = {"checkpoint": str(checkpoint), "space": stats.space, "dim": int(stats.mean.shape[0]),
              "n_train": stats.n_train, "shrinkage": stats.shrinkage,
              "false_alarm_asked": cfg.predict.ood_false_alarm, "threshold": threshold,
              "calibration": stats.calibration, "n_calibration": int(stats.calibration_scores.size),
              "calibration_rate": calibration_rate,
              "negative_mm_per_pixel_assumed": NEGATIVE_MM_PER_PIXEL, "sets": sets, "sweep": sweep,
              "goal": {"negatives_total": sum(s["n"] for s in neg), "negatives_flagged": sum(s["flagged"] for s in neg),
                       "all_negatives_flagged": all(s["flagged"] == s["n"] for s in neg), "test_share": test_share,
                       "test_ok": bool(test_share <= GOAL_FALSE_ALARM)}}
    write_json(out / "ood_report.json", report)
    text = markdown(report)
    atomic_write_text(out / "ood_report.md", text)
    print(text, end="")
    log.info("wrote %s and %s", out / "ood_report.md", out / "ood_report.json")
    return report


def _parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__, "python -m studies.implant_dims.ood_report", ImplantConfig)
    parser.add_argument("--panoramic", type=Path, default=Path("../shared/data/dental_panoramic_yolo_dicle"),
                        help="panoramic X-rays with YOLO boxes (images/, labels/)")
    parser.add_argument("--cr", type=Path, default=Path("../shared/data/radiographs_nema_cr"),
                        help="folder of CR radiographs (DICOM)")
    return parser


def _body(args: argparse.Namespace) -> int:
    from common.config import load_config

    cfg = load_config(ImplantConfig, args.config, args.overrides)
    ood_report(cfg, args.panoramic, args.cr)
    return 0


main = guarded_main(_body, _parser())
main.config_class = ImplantConfig  # type: ignore[attr-defined]  # what --help documents (tests/test_repo.py)

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
