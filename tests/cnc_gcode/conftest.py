"""Session fixtures: a small simulated dataset and a tiny trained pipeline shared by the slower tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from learning_seed import seed_args

from cnc_gcode import train_decoder, train_encoder
from cnc_gcode.sample_data import make_dataset

TINY = Path(__file__).resolve().parents[2] / "configs" / "cnc_gcode" / "tiny.yaml"


def stage_args(data: Path, runs: Path, name: str = "t", *extra: str) -> list[str]:
    return ["--config", str(TINY), f"run.out_dir={runs}", f"run.name={name}", f"data.train_path={data / 'train.npz'}",
            f"data.val_path={data / 'val.npz'}", f"data.test_path={data / 'test.npz'}", *extra]


@pytest.fixture(name="stage_args", scope="session")
def stage_args_fixture():
    """The argv builder, for tests: stage_args(data_dir, runs_dir, name, *overrides)."""
    return stage_args


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cnc_sample")
    make_dataset(out, n_programs=14, seed=3)
    return out


@pytest.fixture(scope="session")
def trained_run(sample_dir, tmp_path_factory, learning_seed) -> tuple[Path, list[str]]:
    """(runs dir, common argv) of a tiny encoder + decoder trained on the sample data: long enough to learn (test
    token accuracy 0.40-0.49 over four seeds against 0.25 for the majority token per position, exact value tokens),
    one thread (about 15 s). Trained with the learning seed when one is given (run.seed of both stages)."""
    runs = tmp_path_factory.mktemp("cnc_runs")
    args = stage_args(sample_dir, runs, "t", "encoder_train.epochs=3", "train.epochs=8", "train.patience=8",
                      "run.num_threads=1", *seed_args("run.seed", learning_seed))
    assert train_encoder.main(args) == 0
    assert train_decoder.main(args) == 0
    return runs, args
