"""Fixtures: one sample MEDS dataset and one stage-1 build (real MiniLM) shared by the whole package suite."""

from __future__ import annotations

from pathlib import Path

import pytest
from ehr_helpers import N_SUBJECTS, Built, stage1_config, stage1_overrides


@pytest.fixture(scope="session")
def sample_meds(tmp_path_factory) -> Path:
    from ehr_embedded.sample_data import write_sample

    out = tmp_path_factory.mktemp("meds")
    write_sample(out, n_subjects=N_SUBJECTS, seed=0)
    return out


@pytest.fixture(scope="session")
def built(sample_meds, tmp_path_factory) -> Built:
    """create_vocab_embeddings + create_embeddings on the sample data with the packaged MiniLM."""
    from ehr_embedded.create_embeddings import create_embeddings
    from ehr_embedded.create_vocab_embeddings import create_vocab_embeddings

    out = tmp_path_factory.mktemp("stage1")
    cfg = stage1_config(sample_meds, out)
    create_vocab_embeddings(cfg)
    create_embeddings(cfg)
    return Built(sample_meds, out / "vocab", out / "store", stage1_overrides(sample_meds, out))
