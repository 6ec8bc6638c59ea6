"""Session fixtures: one synthetic catalogue embedded once (tiny random CLIP + packaged MiniLM), one trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from learning_seed import seed_args

from price_fusion import embed, sample_data, train

N_TRAIN, N_TEST = 240, 60
# Small network and few epochs: the suite must stay within a few minutes on 2 shared cores.
MODEL_OVERRIDES = ["model.image_dim=16", "model.text_dim=384", "model.branch_dim=32", "model.head_dims=[32,16,8]",
                   "model.num_heads=4", "model.dropout=0.1", "train.batch_size=32", "train.lr=0.003",
                   "train.num_threads=1", "embed.num_threads=1", "gbt.num_threads=1", "train.resume=false"]


@pytest.fixture(scope="session")
def sample_env(tmp_path_factory) -> dict:
    """Sample data + embeddings; `args(tmp)` gives CLI overrides pointing a stage at them with runs under tmp."""
    root = tmp_path_factory.mktemp("pf_sample")
    paths = sample_data.write_sample_data(root / "data", N_TRAIN, N_TEST, seed=0, tiny_clip=True)
    base = [f"data.train_csv={paths['train_csv']}", f"data.test_csv={paths['test_csv']}",
            f"data.image_dir={paths['image_dir']}", f"data.embeddings_dir={root / 'embeddings'}",
            f"embed.clip_model={paths['clip_model']}", *MODEL_OVERRIDES]
    assert embed.main(base) == 0
    return {**paths, "root": root, "embeddings": root / "embeddings",
            "args": lambda runs, *extra: [f"runs_dir={runs}", *base, *extra]}


@pytest.fixture(scope="session")
def trained_run(sample_env, tmp_path_factory, learning_seed) -> dict:
    """A finished single-split training run (30 epochs) on the sample data, seeded by the learning seed if given."""
    runs = tmp_path_factory.mktemp("pf_runs")
    args = sample_env["args"](runs, "run_name=fit", "train.epochs=30", *seed_args("train.seed", learning_seed))
    assert train.main(args) == 0
    return {"runs": runs, "run_dir": runs / "fit", "args": args}


@pytest.fixture
def copy_of(tmp_path):
    """Copy a file or folder into tmp_path (to corrupt it without touching the session fixtures)."""
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, dst)
        return dst
    return _copy
