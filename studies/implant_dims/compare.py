"""One table of every model a run trained, on each split: the classifiers' accuracy, then each regressor's length,
diameter and mean MAE beside the simple baselines (implant_dims.baselines), with catalogue exact-size accuracy and
the Monte Carlo dropout interval coverage.

    python -m studies.implant_dims.compare --config configs/implant_dims/sample.yaml

Reads <run_dir>/classifier_*/reports, <run_dir>/single_*/reports, <run_dir>/dual*/reports and
<run_dir>/baselines, and pairs each regressor's per-image errors, and the caliper's and mean predictor's
(baselines/predictions_<split>.csv), with the main dual regressor's (dual/, triple attention) on the same images,
resampling implants for a 95% interval of the difference, per dimension and snapped. Snapped rows are shown under one
rule, regression.snap, for the models and the caliper alike. Writes <run_dir>/comparison.md (the tables
studies/implant_dims/RESULTS.md quotes) and comparison.json.

The per-image pairing and the group bootstrap here (per_image, aligned, abs_errors, group_draws, group_draw_means,
group_interval) are also what studies/implant_dims/recipe_table.py builds its table over seeds from.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np

from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig
from implant_dims.regression import DIMS

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


def per_image(run_dir: Path, split: str) -> dict[str, dict]:
    """name -> {"path": [N] image paths, "group": [N], "true": [N, 2], "pred": [N, 2] and, where written, "snapped":
    [N, 2]} for each regressor folder and each baseline ("baseline: <name>") with per-image predictions of `split`."""
    import pandas as pd

    out: dict[str, dict] = {}
    for folder in sorted([*run_dir.glob("single_*"), *run_dir.glob("dual*")]):
        path = folder / "reports" / f"predictions_{split}.csv"
        if path.is_file():
            frame = pd.read_csv(path)
            entry = {"path": frame["image_path"].astype(str).to_numpy(), "group": frame["group"].astype(str).to_numpy(),
                     "true": frame[["length_true", "diameter_true"]].to_numpy(np.float64),
                     "pred": frame[["length_pred", "diameter_pred"]].to_numpy(np.float64)}
            rule = (_read(folder / "reports" / f"results_{split}.json") or {}).get("snap_rule")
            if "length_snapped" in frame and rule is not None:
                entry["snapped"] = frame[["length_snapped", "diameter_snapped"]].to_numpy(np.float64)
                entry["snap_mode"] = rule["mode"]
            out[folder.name] = entry
    path = run_dir / "baselines" / f"predictions_{split}.csv"
    if path.is_file():
        frame = pd.read_csv(path)
        common = {"path": frame["image_path"].astype(str).to_numpy(), "group": frame["group"].astype(str).to_numpy(),
                  "true": frame[["length_true", "diameter_true"]].to_numpy(np.float64)}
        for name in [c.removesuffix("_length") for c in frame.columns if c.endswith("_length")
                     and c != "length_true" and f"{c.removesuffix('_length')}_diameter" in frame]:
            out[f"baseline: {name}"] = {**common, "pred": frame[[f"{name}_length", f"{name}_diameter"]]
                                        .to_numpy(np.float64)}
    return out


def aligned(entry: dict, order: np.ndarray, key: str, who: str = "compare") -> np.ndarray:
    """entry[key] rows in the image order `order` (pairing by path, never by position). Raises UserError (naming
    `who`, the study) when an image of `order` has no row in entry."""
    position = {p: i for i, p in enumerate(entry["path"])}
    missing = [p for p in order if p not in position]
    if missing:
        raise UserError(f"{who}: {len(missing)} image(s) of the reference, e.g. {missing[0]}, lack a prediction "
                        f"of the other model; re-run its report on the same split file")
    return entry[key][[position[p] for p in order]]


def abs_errors(entry: dict, order: np.ndarray, key: str = "pred", who: str = "compare") -> np.ndarray:
    """[N, 2] absolute (length, diameter) errors in mm of entry[key] (pred or snapped) against entry's own truth, in
    the image order `order`."""
    return np.abs(aligned(entry, order, "true", who) - aligned(entry, order, key, who))


def group_draws(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws of whole groups (implants): each image's group index [N] and `n_boot` draws of G group
    indices with replacement [B, G]."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    return inverse, rng.integers(0, len(uniq), size=(n_boot, len(uniq)))


def group_draw_means(diff: np.ndarray, inverse: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The mean of per-image `diff` [..., N] in each bootstrap draw [B, G] of whole groups (`inverse` [N]: each
    image's group index) -> [..., B]; every draw's mean weighs each drawn group by its image count."""
    n_groups = draws.shape[1]
    rows = diff.reshape(-1, diff.shape[-1])
    sums = np.stack([np.bincount(inverse, weights=row, minlength=n_groups) for row in rows])
    sums = sums.reshape(*diff.shape[:-1], n_groups)
    counts = np.bincount(inverse, minlength=n_groups)
    return sums[..., draws].sum(-1) / counts[draws].sum(1)


def group_interval(diff: np.ndarray, inverse: np.ndarray, draws: np.ndarray) -> list[float]:
    """95% interval of the mean of per-image `diff` [N] over bootstrap draws [B, G] of whole groups."""
    return [float(q) for q in np.quantile(group_draw_means(diff, inverse, draws), [0.025, 0.975])]


def paired_differences(run_dir: Path, reference: str = "dual", n_boot: int = 2000, seed: int = 0,
                       snap_mode: str = "catalogue") -> dict:
    """MAE of each regressor and of the caliper and mean baselines minus the reference's on the same images, per
    dimension (length, diameter) and averaged (mean), each with a 95% interval from resampling whole groups
    (implants) — the honest way to say whether one model beats another on one split. Where both sides carry
    sizes snapped under regression.snap=`snap_mode` (for the caliper, caliper_catalogue: it reads no class, so the
    whole catalogue is its snap under either rule), also the snapped difference."""
    out: dict = {}
    for split in SPLITS:
        entries = per_image(run_dir, split)
        ref = entries.get(reference)
        if ref is None:
            continue
        inverse, draws = group_draws(ref["group"], n_boot, np.random.default_rng(seed))
        interval = functools.partial(group_interval, inverse=inverse, draws=draws)
        ref_err = np.abs(ref["true"] - ref["pred"])
        others = [n for n in entries if n != reference and not n.startswith("baseline: ")]
        others += [n for n in ("baseline: caliper", "baseline: mean") if n in entries]
        for name in others:
            diff = abs_errors(entries[name], ref["path"]) - ref_err
            row: dict = {"minus": reference}
            for k, dim in enumerate(DIMS):
                row[f"{dim}_mae_difference"] = float(diff[:, k].mean())
                row[f"{dim}_ci95"] = interval(diff[:, k])
            row["mean_mae_difference"] = float(diff.mean())
            row["ci95"] = interval(diff.mean(1))
            snapped_other = entries.get("baseline: caliper_catalogue") if name == "baseline: caliper" \
                else entries[name] if entries[name].get("snap_mode") == snap_mode else None
            if snapped_other is not None and ref.get("snap_mode") == snap_mode:
                key = "pred" if name == "baseline: caliper" else "snapped"
                snapped_diff = (abs_errors(snapped_other, ref["path"], key).mean(1)
                                - np.abs(ref["true"] - ref["snapped"]).mean(1))
                row["snapped_mean_mae_difference"] = float(snapped_diff.mean())
                row["snapped_ci95"] = interval(snapped_diff)
            out.setdefault(split, {})[name] = row
    return out


def snap_rule_text(rule: dict | None) -> str:
    """How a report snapped (its snap_rule; a report without one predates the rule and snapped inside the class
    its heads read, whatever their probability)."""
    if rule is None:
        return "predicted class always (a report from before regression.snap)"
    if rule["mode"] == "catalogue":
        return "whole catalogue"
    return f"predicted class where its probability is above {rule['min_prob']:.3g} ({rule['min_prob_from']}), " \
           f"else whole catalogue"


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
        lines += snapped_table(split, reg, base, tables.get("snap_mode", "catalogue"))
        diffs = tables.get("paired", {}).get(split, {})
        if diffs:
            lines += [f"MAE minus `{next(iter(diffs.values()))['minus']}`'s on the same {split} images (95% interval "
                      "over implants; an interval above 0 means that model is worse; snapped: both under the rule "
                      "above):", "",
                      "| model | length (mm) | 95% interval | diameter (mm) | 95% interval | mean (mm) | 95% interval "
                      "| snapped mean (mm) | 95% interval |", "|---|---|---|---|---|---|---|---|---|"]
            for name, d in diffs.items():
                cells = [f"{d[f'{dim}_mae_difference']:+.3f} | {ci_text(d[f'{dim}_ci95'])}" for dim in DIMS]
                cells.append(f"{d['mean_mae_difference']:+.3f} | {ci_text(d['ci95'])}")
                cells.append(f"{d['snapped_mean_mae_difference']:+.3f} | {ci_text(d['snapped_ci95'])}"
                             if "snapped_mean_mae_difference" in d else "- | -")
                lines.append(f"| {name} | {' | '.join(cells)} |")
            lines.append("")
    return "\n".join(lines)


def ci_text(bounds: list[float]) -> str:
    """A 95% interval as `[+lo, +hi]` (3 decimals, signed)."""
    return f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def snapped_table(split: str, reg: dict, base: dict, mode: str) -> list[str]:
    """Snapped MAE of the caliper and of every regressor snapped under regression.snap=`mode` (a regressor
    snapped under another rule is named, not mixed in: comparing two rules says nothing about the models)."""
    caliper = base.get("caliper_catalogue")
    rows = {name: r for name, r in reg.items() if "snapped" in r}
    same = {n: r for n, r in rows.items() if (r.get("snap_rule") or {}).get("mode") == mode}
    if not same and caliper is None:
        return []
    lines = [f"Snapped to the nearest catalogue size ({split}), one rule for every row: regression.snap={mode} (the "
             "caliper reads no class, so under either rule it snaps to the whole catalogue):", "",
             "| model | snapped length MAE | snapped diameter MAE | snapped mean MAE | exact size | rule |",
             "|---|---|---|---|---|---|"]
    if caliper is not None:
        lines.append(f"| baseline: caliper | {_fmt(caliper['length_mae'])} | {_fmt(caliper['diameter_mae'])} | "
                     f"{_fmt(caliper['mean_mae'])} | - | whole catalogue |")
    for name, r in same.items():
        sn = r["snapped"]
        lines.append(f"| {name} | {_fmt(sn['length_mae'])} | {_fmt(sn['diameter_mae'])} | {_fmt(sn['mean_mae'])} | "
                     f"{_fmt(r.get('exact_size_accuracy'))} | {snap_rule_text(r['snap_rule'])} |")
    other = [f"{n} ({snap_rule_text(r.get('snap_rule'))})" for n, r in rows.items() if n not in same]
    if other:
        lines += ["", f"Left out, snapped under another rule (re-run their reports with regression.snap={mode}): "
                  + "; ".join(other)]
    return [*lines, ""]


def compare(cfg: ImplantConfig) -> Path:
    setup_logging(None)
    run_dir = cfg.run.run_dir
    tables = collect(run_dir)
    if not any(tables.values()):
        raise UserError(f"{run_dir}: no reports to compare; train the classifiers and regressors first "
                        f"(studies/implant_dims/sample_experiment.sh)")
    for reports in tables["regressors"].values():  # the attention type each regressor dir used
        for name, rep in reports.items():
            summary = _read(run_dir / name / "reports" / "results.json") or {}
            rep["attention_type"] = summary.get("attention_type", "")
    tables["paired"] = paired_differences(run_dir, snap_mode=cfg.regression.snap)
    tables["snap_mode"] = cfg.regression.snap
    text = markdown(tables)
    atomic_write_text(run_dir / "comparison.md", text)
    write_json(run_dir / "comparison.json", tables)
    print(text)
    log.info("wrote %s", run_dir / "comparison.md")
    return run_dir / "comparison.md"


def _main(cfg: ImplantConfig) -> int:
    compare(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m studies.implant_dims.compare")

if __name__ == "__main__":
    raise SystemExit(main())
