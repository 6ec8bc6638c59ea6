"""Session fixtures: a small generated data set and one tiny trained run (both classifiers + a dual regressor)
that the slower implant_dims tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from implant_dims import train_classifier, train_dual
from implant_dims.sample_data import make_dataset

TINY = Path(__file__).resolve().parents[2] / "configs" / "implant_dims" / "tiny.yaml"


def stage_args(data: Path, runs: Path, name: str = "t", *extra: str) -> list[str]:
    """argv for any implant_dims stage on the tiny config and the data set in `data`."""
    return ["--config", str(TINY), f"run.out_dir={runs}", f"run.name={name}",
            f"data.train_json={data / 'augmented_train.json'}", f"data.val_json={data / 'augmented_val.json'}",
            f"data.test_json={data / 'test.json'}", f"data.unseen_json={data / 'unseen_test.json'}",
            f"data.catalogue_csv={data / 'catalogue.csv'}", *extra]


@pytest.fixture(name="stage_args", scope="session")
def stage_args_fixture():
    return stage_args


@pytest.fixture(scope="session")
def implant_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("implant_sample")
    make_dataset(out, n_train=96, n_val=48, n_test=32, n_unseen=24, size=64, seed=1, dicom_every=8, n_calibration=0)
    return out


@pytest.fixture(scope="session")
def trained_run(implant_data, tmp_path_factory) -> Path:
    """<runs>/t with classifier_company, classifier_model_type and dual (tiny sizes, a few epochs)."""
    runs = tmp_path_factory.mktemp("implant_runs")
    for target in ("company", "model_type"):
        assert train_classifier.main(stage_args(implant_data, runs, "t", f"classifier.target={target}")) == 0
    assert train_dual.main(stage_args(implant_data, runs, "t")) == 0
    return runs / "t"
