"""The table of studies/implant_dims/recipe_seeds.sh: the dual regressor against the caliper, the single-embedding
regressors and the mean predictor over several seeds' run directories, on the same test / unseen images.

    python -m studies.implant_dims.recipe_table --out runs/implant_dims/sample_seeds \
        runs/implant_dims/sample_seed0 runs/implant_dims/sample_seed1 runs/implant_dims/sample_seed2

Each run directory holds dual/, single_company/, single_model_type/ and baselines/ with per-image predictions
(reports/predictions_<split>.csv, baselines/predictions_<split>.csv). Per split: MAE per dimension as mean +- sample
sd over the seeds; dual minus each other model per image (negative = dual better) as the mean over seeds with two
95 % intervals, one resampling implants on the seed-averaged differences, one resampling seeds and implants together
(the seed-to-seed spread included); the same for snapped sizes, dual's under its report's regression.snap rule and
the caliper's to the whole catalogue (it reads no class, so that is its snap under either rule). Writes
<out>/recipe_table.md and recipe_table.json. The per-image pairing and the group bootstrap are compare's
(studies/implant_dims/compare.py); this module adds the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write_text, write_json
from studies.implant_dims.compare import abs_errors, ci_text, group_draw_means, group_draws, per_image, snap_rule_text

SPLITS = ("test", "unseen")
REFERENCE = "dual"
OTHERS = ("baseline: caliper", "single_company", "single_model_type", "baseline: mean")
N_BOOT = 4000
WHO = "recipe_table"  # names this study in its error lines


def spread(values: list[float]) -> dict:
    """Mean and sample sd (0 for one value) of `values`, and the values themselves."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def intervals(diff: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """diff [S, N] (seeds x images): the mean, the 95 % interval resampling implants on the seed-averaged diff, and
    the 95 % interval resampling seeds and implants together (each draw: S seeds and G implants with replacement,
    the drawn implants' images weighted by their count)."""
    n_seeds = diff.shape[0]
    rng = np.random.default_rng(seed)
    inverse, draw_groups = group_draws(groups, N_BOOT, rng)
    draw_seeds = rng.integers(0, n_seeds, size=(N_BOOT, n_seeds))
    per_seed = group_draw_means(diff, inverse, draw_groups)  # [S, B]
    implants = per_seed.mean(0)
    joint = np.take_along_axis(per_seed.T, draw_seeds, axis=1).mean(1)
    return {"mean": float(diff.mean()), "per_seed": diff.mean(1).tolist(),
            "ci95_implants": np.quantile(implants, [0.025, 0.975]).tolist(),
            "ci95_seeds_and_implants": np.quantile(joint, [0.025, 0.975]).tolist()}


def split_table(run_dirs: list[Path], split: str) -> dict | None:
    seeds = [per_image(run, split) for run in run_dirs]
    if any(REFERENCE not in s for s in seeds):
        return None
    order = seeds[0][REFERENCE]["path"]
    groups = seeds[0][REFERENCE]["group"]
    errors: dict[str, np.ndarray] = {}  # name -> [S, N, 2]
    for name in (REFERENCE, *OTHERS):
        if all(name in s for s in seeds):
            errors[name] = np.stack([abs_errors(s[name], order, who=WHO) for s in seeds])
    snapped: dict[str, np.ndarray] = {}
    rules = [(json.loads(p.read_text()).get("snap_rule") if p.is_file() else None)
             for p in (run / REFERENCE / "reports" / f"results_{split}.json" for run in run_dirs)]
    if all("snapped" in s[REFERENCE] for s in seeds):
        snapped[REFERENCE] = np.stack([abs_errors(s[REFERENCE], order, "snapped", WHO) for s in seeds])
    for name in OTHERS:  # a regressor counts only when snapped under the same rule as dual, in every seed
        if not name.startswith("baseline: ") and all(
                name in s and "snapped" in s[name] and s[name].get("snap_mode") == s[REFERENCE].get("snap_mode")
                for s in seeds):
            snapped[name] = np.stack([abs_errors(s[name], order, "snapped", WHO) for s in seeds])
    if all("baseline: caliper_catalogue" in s for s in seeds):
        snapped["baseline: caliper"] = np.stack([abs_errors(s["baseline: caliper_catalogue"], order, who=WHO)
                                                 for s in seeds])
    out: dict = {"n": len(order), "seeds": len(run_dirs), "mae": {}, "snapped_mae": {}, "paired": {},
                 "snap_rules": [snap_rule_text(r) if r else "-" for r in rules]}
    for name, err in errors.items():
        out["mae"][name] = {"length": spread(err[:, :, 0].mean(1).tolist()),
                            "diameter": spread(err[:, :, 1].mean(1).tolist()),
                            "mean": spread(err.mean((1, 2)).tolist())}
    for name, err in snapped.items():
        out["snapped_mae"][name] = {"length": spread(err[:, :, 0].mean(1).tolist()),
                                    "diameter": spread(err[:, :, 1].mean(1).tolist()),
                                    "mean": spread(err.mean((1, 2)).tolist())}
    ref = errors[REFERENCE]
    for name in OTHERS:
        if name not in errors:
            continue
        diff = ref - errors[name]
        row = {"length": intervals(diff[:, :, 0], groups), "diameter": intervals(diff[:, :, 1], groups),
               "mean": intervals(diff.mean(2), groups)}
        if name in snapped and REFERENCE in snapped:
            row["snapped_mean"] = intervals((snapped[REFERENCE] - snapped[name]).mean(2), groups)
        out["paired"][name] = row
    return out


def _ms(s: dict) -> str:
    return f"{s['mean']:.3f} +- {s['sd']:.3f}"


def markdown(tables: dict, run_dirs: list[Path]) -> str:
    lines = [f"Seeds: {len(run_dirs)} run directories ({', '.join(str(r) for r in run_dirs)}).", ""]
    for split, t in tables.items():
        lines += [f"### {split} (n={t['n']} images, {t['seeds']} seeds)", "",
                  "MAE in mm, mean +- sd over seeds:", "",
                  "| model | length | diameter | mean |", "|---|---|---|---|"]
        for name, m in t["mae"].items():
            lines.append(f"| {name} | {_ms(m['length'])} | {_ms(m['diameter'])} | {_ms(m['mean'])} |")
        if t["snapped_mae"]:
            lines += ["", f"Snapped to the catalogue (dual: {'; '.join(sorted(set(t['snap_rules'])))}; caliper: "
                      "whole catalogue):", "", "| model | length | diameter | mean |", "|---|---|---|---|"]
            for name, m in t["snapped_mae"].items():
                lines.append(f"| {name} | {_ms(m['length'])} | {_ms(m['diameter'])} | {_ms(m['mean'])} |")
        lines += ["", f"`{REFERENCE}` minus each model on the same images, mm (negative = dual better); 95 % "
                  "intervals over implants (seed-averaged errors) / over seeds and implants:", "",
                  "| minus | length | diameter | mean | snapped mean |", "|---|---|---|---|---|"]
        for name, row in t["paired"].items():
            cells = []
            for key in ("length", "diameter", "mean", "snapped_mean"):
                d = row.get(key)
                cells.append(f"{d['mean']:+.3f} {ci_text(d['ci95_implants'])} / {ci_text(d['ci95_seeds_and_implants'])}"
                             if d else "-")
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines.append("")
    caliper = {s: t["paired"].get("baseline: caliper", {}).get("length") for s, t in tables.items()}
    if all(caliper.get(s) for s in SPLITS):
        met = all(caliper[s]["ci95_seeds_and_implants"][1] < 0 for s in SPLITS)
        lines.append(f"Goal (dual beats the caliper on test and unseen length, interval over seeds and implants "
                     f"below 0): {'met' if met else 'not met'} (test {ci_text(caliper['test']['ci95_seeds_and_implants'])},"
                     f" unseen {ci_text(caliper['unseen']['ci95_seeds_and_implants'])}).")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studies.implant_dims.recipe_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for recipe_table.md / .json")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="one run directory per seed")
    return parser


def _body(args: argparse.Namespace) -> int:
    tables = {split: t for split in SPLITS if (t := split_table(args.run_dirs, split)) is not None}
    if not tables:
        raise UserError(f"{WHO}: no {REFERENCE}/reports/predictions_<split>.csv in "
                        f"{', '.join(map(str, args.run_dirs))}; run studies/implant_dims/recipe_seeds.sh first")
    text = markdown(tables, args.run_dirs)
    atomic_write_text(args.out / "recipe_table.md", text)
    write_json(args.out / "recipe_table.json", {"run_dirs": [str(r) for r in args.run_dirs], "splits": tables})
    print(text)
    return 0


main = guarded_main(_body, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
