"""Repository-level contracts: every package lists its stages; CI runs the README's test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["price_fusion", "ehr_embedded", "cnc_gcode", "implant_dims", "building_embed"]


@pytest.mark.parametrize("package", PACKAGES)
def test_python_dash_m_package_lists_stages(package: str) -> None:
    proc = subprocess.run([sys.executable, "-m", package], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert package in proc.stdout
    if (ROOT / package / "train.py").exists():
        assert f"python -m {package}.train" in proc.stdout


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in readme and "./scripts/test.sh" in ci
