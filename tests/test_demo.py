"""The README's demo command, end to end: every built package's chain on its sample data, one table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILT = ("price_fusion", "ehr_embedded", "cnc_gcode")


@pytest.mark.slow
def test_demo_runs_every_package_and_prints_one_table(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("package"))
    rows = [line.split() for line in lines[header + 2:] if line.strip()]
    for package in BUILT:
        package_rows = [r for r in rows if r[0] == package]
        assert package_rows, f"no demo rows for {package}"
        for row in package_rows:  # every output the table names exists
            assert Path(row[-1]).exists(), f"{package}: {row[-1]} is in the table but not on disk"
    # The demo's models learn: each package's headline metric beats its naive baseline.
    value = {(r[0], " ".join(r[2:-2])): r[-2] for r in rows}
    assert float(value[("price_fusion", "test SMAPE % (fusion)")]) < float(
        value[("price_fusion", "test SMAPE % (train median)")])
    assert float(value[("cnc_gcode", "token_acc")]) > float(value[("cnc_gcode", "majority_token_acc")])
