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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--learning-seed", type=int, default=None,
        help="train every learning-marked test with this seed instead of its own (default: env LEARNING_SEED, else "
             "each test's own seed). CI reruns the learning tests with another seed under OMP_NUM_THREADS=1.")


def learning_seed_of(config: pytest.Config) -> int | None:
    """The seed the learning tests train with: --learning-seed, else $LEARNING_SEED, else None (their own)."""
    value = config.getoption("--learning-seed")
    if value is None and os.environ.get("LEARNING_SEED", "").strip():
        value = int(os.environ["LEARNING_SEED"])
    return value


@pytest.fixture(scope="session")
def learning_seed(pytestconfig: pytest.Config) -> int | None:
    """None: each learning test trains with the seed written in it; an int: every one trains with that seed.

    A test (or session fixture) that trains a model whose learning a test asserts adds
    `seed_args(key, learning_seed)` (tests/learning_seed.py) to its overrides, so `-m learning --learning-seed N`
    reruns those claims on another path of the same training.
    """
    return learning_seed_of(pytestconfig)


def pytest_report_header(config: pytest.Config) -> str:
    seed = learning_seed_of(config)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"learning seed: {'each test its own' if seed is None else seed}; OMP_NUM_THREADS={threads}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    # A learning test that ignored the learning seed would rerun its own path under --learning-seed and prove nothing.
    deaf = [item.nodeid for item in items if "learning" in item.keywords and "learning_seed" not in item.fixturenames]
    if deaf:
        raise pytest.UsageError("learning-marked tests must use the learning_seed fixture (directly or through a "
                                f"fixture): {', '.join(deaf)}")

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
