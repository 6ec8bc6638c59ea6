"""One table of every model a run trained, on each split: the classifiers' accuracy, then each regressor's length,
diameter and mean MAE beside the simple baselines (implant_dims.baselines), with catalogue exact-size accuracy and
the Monte Carlo dropout interval coverage.

    python -m implant_dims.compare --config configs/implant_dims/sample.yaml

Reads <run_dir>/classifier_*/reports, <run_dir>/single_*/reports, <run_dir>/dual*/reports and
<run_dir>/baselines, and pairs each regressor's per-image errors with the main dual regressor's (dual/, triple
attention) on the same images, resampling implants for a 95% interval of the difference; writes <run_dir>/comparison.md (the tables the README quotes) and comparison.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.cli import UserError, config_main
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig

log = logging.getLogger(__name__)
SPLITS = ("val", "test", "unseen")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def collect(run_dir: Path) -> dict:
    """Every report under run_dir, keyed by split."""
    out: dict = {"classifiers": {}, "regressors": {}, "baselines": {}}
    for folder in sorted(run_dir.glob("classifier_*")):
        for split in SPLITS:
            rep = _read(folder / "reports" / f"results_{split}.json")
            if rep:
                out["classifiers"].setdefault(split, {})[folder.name.removeprefix("classifier_")] = rep
    for folder in sorted([*run_dir.glob("single_*"), *run_dir.glob("dual*")]):
        for split in SPLITS:
            rep = _read(folder / "reports" / f"results_{split}.json")
            if rep:
                out["regressors"].setdefault(split, {})[folder.name] = rep
    for split in SPLITS:
        rep = _read(run_dir / "baselines" / f"results_{split}.json")
        if rep:
            out["baselines"][split] = rep.get("baselines", rep)
    return out


def paired_differences(run_dir: Path, reference: str = "dual", n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean MAE of each regressor minus the reference's on the same images, with a 95% interval from resampling
    whole groups (implants) — the honest way to say whether one model beats another on one split."""
    import numpy as np
    import pandas as pd

    out: dict = {}
    for split in SPLITS:
        ref_path = run_dir / reference / "reports" / f"predictions_{split}.csv"
        if not ref_path.is_file():
            continue
        ref = pd.read_csv(ref_path)
        ref_err = (ref[["length_true", "diameter_true"]].to_numpy() - ref[["length_pred", "diameter_pred"]].to_numpy())
        ref_err = np.abs(ref_err).mean(1)
        groups = ref["group"].astype(str).to_numpy()
        uniq, inverse = np.unique(groups, return_inverse=True)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
        counts = np.bincount(inverse, minlength=len(uniq))
        for folder in sorted([*run_dir.glob("single_*"), *run_dir.glob("dual*")]):
            path = folder / "reports" / f"predictions_{split}.csv"
            if folder.name == reference or not path.is_file():
                continue
            other = pd.read_csv(path).set_index("image_path").loc[ref["image_path"]]
            err = np.abs(other[["length_true", "diameter_true"]].to_numpy()
                         - other[["length_pred", "diameter_pred"]].to_numpy()).mean(1)
            diff = err - ref_err
            sums = np.bincount(inverse, weights=diff, minlength=len(uniq))
            stats = sums[draws].sum(1) / counts[draws].sum(1)
            low, high = np.quantile(stats, [0.025, 0.975])
            out.setdefault(split, {})[folder.name] = {"minus": reference, "mean_mae_difference": float(diff.mean()),
                                                      "ci95": [float(low), float(high)]}
    return out


def markdown(tables: dict) -> str:
    lines = []
    for split in SPLITS:
        clf = tables["classifiers"].get(split, {})
        reg = tables["regressors"].get(split, {})
        base = tables["baselines"].get(split, {})
        if not (clf or reg or base):
            continue
        lines.append(f"### {split}\n")
        if clf:
            lines += ["| classifier | n | accuracy | top-3 | macro F1 | majority | chance |", "|---|---|---|---|---|---|---|"]
            for name, r in clf.items():
                top = next((v for k, v in r.items() if k.startswith("top") and k.endswith("_accuracy")), None)
                lines.append(f"| {name} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(top)} | {_fmt(r['macro_f1'])} | "
                             f"{_fmt(r['majority_accuracy'])} | {_fmt(r['chance_accuracy'])} |")
            lines.append("")
        lines += ["| model | length MAE | diameter MAE | mean MAE | / mean-predictor | exact size | "
                  "interval coverage (length, diameter) |", "|---|---|---|---|---|---|---|"]
        for name, r in base.items():
            if isinstance(r, dict) and "length_mae" in r:
                lines.append(f"| baseline: {name} | {_fmt(r['length_mae'])} | {_fmt(r['diameter_mae'])} | "
                             f"{_fmt(r['mean_mae'])} | - | - | - |")
        for name, r in reg.items():
            cov = r.get("interval_coverage_calibrated")
            cov_text = f"{cov[0]:.2f}, {cov[1]:.2f}" if cov else "-"
            lines.append(f"| {name} ({r.get('attention_type', '')}) | {_fmt(r['length_mae'])} | "
                         f"{_fmt(r['diameter_mae'])} | {_fmt(r['mean_mae'])} | "
                         f"{_fmt(r['mae_ratio_to_mean_baseline'], 2)} | {_fmt(r.get('exact_size_accuracy'))} | "
                         f"{cov_text} |")
        lines.append("")
        diffs = tables.get("paired", {}).get(split, {})
        if diffs:
            lines += [f"Mean MAE minus `{next(iter(diffs.values()))['minus']}`'s on the same {split} images "
                      "(95% interval over implants; an interval above 0 means that model is worse):", "",
                      "| model | difference (mm) | 95% interval |", "|---|---|---|"]
            for name, d in diffs.items():
                lines.append(f"| {name} | {d['mean_mae_difference']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
            lines.append("")
    return "\n".join(lines)


def compare(cfg: ImplantConfig) -> Path:
    setup_logging(None)
    run_dir = cfg.run.run_dir
    tables = collect(run_dir)
    if not any(tables.values()):
        raise UserError(f"{run_dir}: no reports to compare; train the classifiers and regressors first "
                        f"(scripts/implant_dims/sample_experiment.sh)")
    for reports in tables["regressors"].values():  # the attention type each regressor dir used
        for name, rep in reports.items():
            summary = _read(run_dir / name / "reports" / "results.json") or {}
            rep["attention_type"] = summary.get("attention_type", "")
    tables["paired"] = paired_differences(run_dir)
    text = markdown(tables)
    atomic_write_text(run_dir / "comparison.md", text)
    write_json(run_dir / "comparison.json", tables)
    print(text)
    log.info("wrote %s", run_dir / "comparison.md")
    return run_dir / "comparison.md"


def _main(cfg: ImplantConfig) -> int:
    compare(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.compare")

if __name__ == "__main__":
    raise SystemExit(main())
