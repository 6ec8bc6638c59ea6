"""Run every package's end-to-end pipeline on its generated sample data and print one summary table.

    ./scripts/demo.sh                          # sets up .venv, then runs this
    python scripts/demo.py --out demo_output --packages price_fusion,cnc_gcode
    python scripts/demo.py --seed 1            # every training stage seeded with 1 instead of its config's seed

Each package exposes `<pkg>.demo.run_demo(out_dir, seed=None) -> list[dict]` with rows
`{"package", "stage", "metric", "value", "output"}`; all rows also go to `<out>/demo_table.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

PACKAGES = ("price_fusion", "ehr_embedded", "cnc_gcode", "implant_dims", "building_embed")


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="where each package writes its run")
    parser.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of every training stage (default: each config's own); the sample data stay the same")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    failed: list[str] = []
    for package in [p.strip() for p in args.packages.split(",") if p.strip()]:
        try:
            demo = importlib.import_module(f"{package}.demo")
        except ModuleNotFoundError as exc:
            if exc.name in (f"{package}.demo", package):
                print(f"[demo] {package}: not built yet, skipped", file=sys.stderr)
                continue
            raise
        print(f"[demo] {package}: running ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            package_rows = demo.run_demo(args.out.resolve() / package, seed=args.seed)
        except Exception:  # noqa: BLE001 - report every package, then fail at the end
            traceback.print_exc()
            failed.append(package)
            continue
        print(f"[demo] {package}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows.extend(package_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_table.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    headers = ("package", "stage", "metric", "value", "output")
    table = [[_fmt(row.get(h, "")) for h in headers] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if failed:
        print(f"demo failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
