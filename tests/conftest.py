"""Shared test setup: offline hubs, the real-data location, and small-CPU defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Without these each hub lookup spends ~47 s retrying before it fails (ENVIRONMENT.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path | None:
    """`REAL_DATA_DIR`, else `../shared/data` beside the repository, else None."""
    env = os.environ.get("REAL_DATA_DIR")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    root = real_data_root()
    if root is None:
        reason = "real data not found: set REAL_DATA_DIR or place ../shared/data beside the repository"
        if os.environ.get("REQUIRE_REAL_DATA") == "1":  # CI: a missing data set is a failure, never a silent skip
            pytest.fail(f"REQUIRE_REAL_DATA=1 but {reason}")
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
