"""compute_visual_neighbors: exact neighbours identical to a BallTree oracle, hand-checked bands, the stage output."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import read_json
from sklearn.neighbors import BallTree

from building_embed.config import DataConfig
from building_embed.difficulty import compute_visual_neighbors
from building_embed.difficulty.compute_visual_neighbors import (
    SAME_IDENTITY_BAND,
    assign_bands,
    exact_knn,
    l2_normalize,
)
from building_embed.preprocess.merge_and_split import read_split


@pytest.mark.parametrize("method", ["faiss", "torch"])
def test_neighbours_identical_to_balltree(method):
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.5, 3, size=(300, 1))
    sims, idx = exact_knn(embeddings, 10, method)
    unit = l2_normalize(embeddings).astype(np.float64)
    dist, oracle = BallTree(unit).query(unit, k=11)
    np.testing.assert_array_equal(idx, oracle[:, 1:])  # BallTree's first hit is the point itself
    np.testing.assert_allclose(sims, 1 - dist[:, 1:] ** 2 / 2, atol=1e-5)  # |a-b|^2 = 2 - 2 cos on unit vectors
    assert (np.diff(sims, axis=1) <= 1e-7).all()


def test_self_is_removed_even_when_a_duplicate_ties():
    base = np.eye(4, dtype=np.float32)
    embeddings = np.concatenate([base, base[:1]])  # rows 0 and 4 identical
    for method in ("faiss", "torch"):
        sims, idx = exact_knn(embeddings, 2, method)
        assert idx[0, 0] == 4 and idx[4, 0] == 0 and sims[0, 0] == pytest.approx(1.0)
        assert all(i not in row for i, row in enumerate(idx))


def test_bands_by_rank_and_by_cosine_hand_checked():
    sims = np.asarray([[0.95, 0.9, 0.8, 0.7, 0.5, 0.2]])
    same = np.asarray([[False, True, False, False, False, False]])
    rank = assign_bands(sims, same, DataConfig(band_by="rank", band_edges=[1.0, 3.0]))
    # negatives ranks 1, 2, 3, 4, 5 -> bands 0 | 1, 1 | 2, 2 ; the same identity -> -1
    assert rank.tolist() == [[0, SAME_IDENTITY_BAND, 1, 1, 2, 2]]
    cosine = assign_bands(sims, same, DataConfig(band_by="cosine", band_edges=[0.85, 0.6]))
    assert cosine.tolist() == [[0, SAME_IDENTITY_BAND, 1, 1, 2, 2]]


def test_stage_output_matches_its_inputs(pipeline):
    out = pq.read_table(pipeline / "difficulty" / "difficulty_metadata.parquet").to_pandas()
    train, embeddings = read_split(pipeline / "merged" / "train.parquet")
    assert len(out) == len(train) and (out.image_key.to_numpy() == train.image_key.to_numpy()).all()
    assert set(out.split) == {"train"}
    sims, idx = exact_knn(embeddings, 20, "torch")  # the other exact method agrees, up to the order of exact ties
    got = np.stack(out.neighbor_rows.to_numpy())
    unit = l2_normalize(embeddings).astype(np.float64)
    np.testing.assert_allclose(np.take_along_axis(unit @ unit.T, got, axis=1), sims, atol=1e-5)
    differs = got != idx
    assert differs.mean() < 0.02  # only the tied pairs (identical images under two identities) swap
    assert np.allclose(np.take_along_axis(unit @ unit.T, idx, axis=1)[differs], sims[differs], atol=1e-6)
    identity = train.identity.to_numpy()
    bands = np.stack(out.neighbor_band.to_numpy())
    assert ((bands == SAME_IDENTITY_BAND) == (identity[got] == identity[:, None])).all()
    np.testing.assert_array_equal(np.stack(out.neighbor_keys.to_numpy()), train.image_key.to_numpy()[got])
    negative = np.where(identity[idx] == identity[:, None], -np.inf, sims)
    np.testing.assert_allclose(out.hardest_negative_cosine, negative.max(axis=1), atol=1e-6)
    report = read_json(pipeline / "difficulty" / "difficulty_report.json")
    assert sum(report["neighbors_per_band"].values()) == len(train) * 20
    assert report["neighbors_per_band"]["0"] == len(train) * 5  # the 5 nearest negatives of every image


def test_missing_split_is_exit_2(tmp_path, stage_args, capsys):
    assert compute_visual_neighbors.main(stage_args(tmp_path)) == 2
    assert "train.parquet" in capsys.readouterr().err


def test_decreasing_rank_edges_are_refused():
    with pytest.raises(ValueError, match="band_edges"):
        DataConfig(band_edges=[20.0, 5.0])
