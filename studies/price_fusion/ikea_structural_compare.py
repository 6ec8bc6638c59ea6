"""Paired comparison of two finished IKEA benchmark runs on the same test names (e.g. data.structural legacy vs
quantities): each method's test SMAPE in both, the difference and its 95% interval over resampled test names.

    python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml run_name=ikea_legacy data.structural=legacy
    python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml run_name=ikea_quantities
    python -m studies.price_fusion.ikea_structural_compare runs/price_fusion/ikea_legacy runs/price_fusion/ikea_quantities

Writes <second run>/reports/compared_with_<first run name>.{json,md} and prints the table. Both runs must hold the
same test products (the split depends on data.split_seed, ikea.group and ikea.max_products only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from common import metrics
from common.io import atomic_write_text
from studies.price_fusion.ikea import GROUP_COL, group_bootstrap_ci

METHODS = ("median", "knn", "ridge", "gbt", "fusion", "fusion_kfold", "recommended")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) != 2:
        print("usage: python -m studies.price_fusion.ikea_structural_compare FIRST_RUN_DIR SECOND_RUN_DIR",
              file=sys.stderr)
        return 2
    first, second = (Path(a) for a in argv)
    labels = pd.read_csv(second / "data" / "test_labels.csv", dtype={"sample_id": str})
    first_ids = pd.read_csv(first / "data" / "test_labels.csv", dtype={"sample_id": str}).sample_id
    if sorted(first_ids) != sorted(labels.sample_id):
        print(f"error: {first} and {second} hold different test products; run both with the same split settings",
              file=sys.stderr)
        return 2
    results = json.loads((first / "reports" / "ikea_results.json").read_text())["results"]
    files = {r["key"]: r["file"] for r in results}
    second_files = {r["key"]: r["file"] for r in json.loads((second / "reports" / "ikea_results.json").read_text())[
        "results"]}
    truth, groups = labels.price.to_numpy(), labels[GROUP_COL].astype(str).to_numpy()
    rows, lines = {}, [f"| method | {first.name} test SMAPE (%) | {second.name} test SMAPE (%) | difference | 95% CI "
                       "(test names) |", "|---|---|---|---|---|"]
    for key in METHODS:
        pred = [pd.read_csv(f[key], dtype={"sample_id": str}).set_index("sample_id").price.loc[labels.sample_id]
                .to_numpy() for f in (files, second_files)]
        a, b = (metrics.smape(truth, p) for p in pred)
        lo, hi = group_bootstrap_ci(truth, pred[1], groups, reference=pred[0])
        rows[key] = {"first": a, "second": b, "difference": b - a, "ci95": [lo, hi]}
        lines.append(f"| {key} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {lo:+.1f} to {hi:+.1f} |")
    out = second / "reports" / f"compared_with_{first.name}"
    atomic_write_text(out.with_suffix(".json"), json.dumps({"first": str(first), "second": str(second),
                                                            "test_smape": rows}, indent=2))
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
