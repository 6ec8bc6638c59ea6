"""Session fixtures: the sample tars, and every built stage run once on them with a tiny random ViT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from building_embed.sample_data import make_dataset
from common.logs import read_metrics

torch.set_num_threads(1)

TINY_MODEL = ["embedding_model.random_init=true", "embedding_model.name=vit_small_patch14_dinov2",
              "embedding_model.img_size=28", "embedding_model.batch_size=16", "embedding_model.global_pool=avg",
              "embedding_model.model_kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
              "infrastructure.num_workers=0", "infrastructure.num_threads=1"]


def stage_args(root: Path, *extra: str) -> list[str]:
    """argv for any stage with every path under `root` (tars read from root/tars)."""
    return [f"paths.tar_dir={root / 'tars'}", f"paths.intermediates_dir={root / 'inter'}",
            f"paths.embeddings_dir={root / 'emb'}", f"paths.merged_dir={root / 'merged'}",
            f"paths.difficulty_dir={root / 'difficulty'}", "data.rows_per_shard=40", "data.neighbors_k=20", *TINY_MODEL,
            *extra]


@pytest.fixture(name="stage_args", scope="session")
def stage_args_fixture():
    return stage_args


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> tuple[Path, dict]:
    """(folder holding tars/ and manifest.json, manifest). Read-only for tests: copy before changing."""
    out = tmp_path_factory.mktemp("be_sample")
    manifest = make_dataset(out, n_regions=3, targets_per_region=14, views_per_target=6, image_size=64, seed=0)
    return out, manifest


@pytest.fixture(scope="session")
def pipeline(sample, tmp_path_factory) -> Path:
    """A root folder where process_tar, generate_embeddings, merge_and_split and compute_visual_neighbors have run."""
    from building_embed.difficulty import compute_visual_neighbors
    from building_embed.generate import generate_embeddings
    from building_embed.preprocess import merge_and_split, process_tar

    root = tmp_path_factory.mktemp("be_pipeline")
    shutil.copytree(sample[0] / "tars", root / "tars")
    args = stage_args(root)
    for stage in (process_tar, generate_embeddings, merge_and_split, compute_visual_neighbors):
        assert stage.main(args) == 0, stage.__name__
    return root


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def assert_fewer_mined_triplets(run: Path, drop: float) -> list[dict]:
    """The head learned its training identities: the semihard triplets mined per batch in the last epoch are below
    `drop` x the first epoch's (an untrained head stays near 1x). Returns the run's metrics records."""
    records = read_metrics(run / "metrics.jsonl")
    first, last = records[0]["mined_triplets"], records[-1]["mined_triplets"]
    print(f"mined triplets per batch: first epoch {first:.1f}, last {last:.1f}")
    assert last < drop * first, (first, last)
    return records


def read_parquets(folder: Path, columns: list[str] | None = None):
    """All *.parquet of a folder as one pandas frame (in file-name order)."""
    import pandas as pd
    import pyarrow.parquet as pq

    return pd.concat([pq.read_table(p, columns=columns).to_pandas() for p in sorted(folder.glob("*.parquet"))],
                     ignore_index=True)
