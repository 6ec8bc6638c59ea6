"""The UMich phase table of studies/cnc_gcode/umich_phase_seeds.sh: encoder accuracy and macro F1 (mean +- sample sd
over the seeds) beside the boosted trees and the majority on the same held-out test windows.

    python -m studies.cnc_gcode.umich_phase_table --runs runs/cnc_gcode --seeds 0 1 2

Reads <runs>/umich_phase_seed<N>/reports/encoder_results_test.json, <runs>/umich_phase/reports/baseline_umich.json
and, where the ablation ran, <runs>/umich_phase_oldinputs_seed0/... and <runs>/umich_phase_relative/...; writes
<runs>/umich_phase/umich_phase_seeds.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file from the repository root
    sys.path.insert(0, str(ROOT))

from common.io import atomic_write_text, write_json  # noqa: E402


def read(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run studies/cnc_gcode/umich_phase_seeds.sh first")
    return json.loads(path.read_text(encoding="utf-8"))


def spread(values: list[float]) -> dict:
    """Mean and sample sd (0 for one value) of `values`, and the values themselves."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def trees_and_majority(report: dict, inputs: str) -> list[dict]:
    rows = []
    for row in report["rows"]:
        if row["model"] == "majority":
            rows.append({"model": f"majority ({inputs})", "accuracy": spread([row["accuracy"]]),
                         "macro_f1": spread([row["macro_f1"]])})
        elif row["features"] == "measured_window":
            rows.append({"model": f"gradient-boosted trees, flattened measured window ({inputs})",
                         "accuracy": spread([row["accuracy"]]), "macro_f1": spread([row["macro_f1"]])})
    return rows


def cell(stats: dict, percent: bool) -> str:
    scale, unit, digits = (100.0, " %", 1) if percent else (1.0, "", 3)
    if len(stats["values"]) == 1:
        return f"{stats['mean'] * scale:.{digits}f}{unit}"
    return f"{stats['mean'] * scale:.{digits}f} +- {stats['sd'] * scale:.{digits}f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/cnc_gcode")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    encoders = [read(runs / f"umich_phase_seed{s}" / "reports" / "encoder_results_test.json") for s in args.seeds]
    windows = {e["n_windows"] for e in encoders}
    rows = [{"model": f"MMDTAELSTM encoder, physical inputs, seeds {' / '.join(map(str, args.seeds))}",
             "accuracy": spread([e["operation_acc"] for e in encoders]),
             "macro_f1": spread([e["macro_f1"] for e in encoders])}]
    baseline = read(runs / "umich_phase" / "reports" / "baseline_umich.json")
    rows += trees_and_majority(baseline, "machine coordinates")
    old = runs / "umich_phase_oldinputs_seed0" / "reports" / "encoder_results_test.json"
    if old.is_file():
        report = read(old)
        rows.append({"model": "ablation, seed 0 only: encoder on the old inputs (z-score, positions relative to each "
                              "run's minimum, no depth channel), same training",
                     "accuracy": spread([report["operation_acc"]]), "macro_f1": spread([report["macro_f1"]])})
        windows.add(report["n_windows"])
    relative = runs / "umich_phase_relative" / "reports" / "baseline_umich.json"
    if relative.is_file():
        rows += [r for r in trees_and_majority(read(relative), "relative positions") if "trees" in r["model"]]
    trees = next(r for r in rows if "trees" in r["model"])
    result = {"test_windows": sorted(windows | {baseline["test_windows"]}),
              "test_experiments": baseline["test_experiments"], "channel_groups": encoders[0]["channel_groups"],
              "seeds": args.seeds, "surface_z": [e.get("surface_z") for e in encoders],
              "goal_encoder_mean_at_least_trees": rows[0]["accuracy"]["mean"] >= trees["accuracy"]["mean"],
              "rows": rows}
    lines = [f"| test ({', '.join(map(str, result['test_windows']))} windows of runs "
             f"{' '.join(map(str, result['test_experiments']))}, measured channels) | accuracy | macro F1 |",
             "|---|---|---|"]
    lines += [f"| {r['model']} | {cell(r['accuracy'], True)} | {cell(r['macro_f1'], False)} |" for r in rows]
    table = "\n".join(lines) + "\n"
    out = runs / "umich_phase"
    write_json(out / "umich_phase_seeds.json", result)
    atomic_write_text(out / "umich_phase_seeds.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
