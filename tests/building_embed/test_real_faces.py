"""The ORL faces (40 people x 10 views, ../shared/data/faces_orl_att) packed into tars, through stages 1-4."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import read_json, read_parquets

from building_embed.difficulty import compute_visual_neighbors
from building_embed.generate import generate_embeddings
from building_embed.preprocess import merge_and_split, process_tar
from building_embed.preprocess.merge_and_split import SPLITS, read_split
from studies.building_embed.pack_faces import pack_faces

pytestmark = pytest.mark.real_data


def test_faces_run_through_the_built_stages(real_data_dir, tmp_path, stage_args):
    faces = real_data_dir / "faces_orl_att"
    if not faces.is_dir():
        pytest.skip(f"{faces} not found")
    manifest = pack_faces(faces, tmp_path, n_tars=2)
    assert manifest["images"] == 400 and manifest["identities"] == 40
    args = stage_args(tmp_path)
    assert process_tar.main(args) == 0
    report = read_json(tmp_path / "inter" / "process_report.json")
    assert report["rows"] == 400 and report["skipped"] == {}
    rows = read_parquets(tmp_path / "inter", ["identity", "width", "height", "street_view_id"])
    assert rows.identity.nunique() == 40 and set(zip(rows.width, rows.height)) == {(92, 112)}
    assert (rows.groupby("identity").size() == 10).all()
    for stage in (generate_embeddings, merge_and_split, compute_visual_neighbors):
        assert stage.main(args) == 0, stage.__name__
    split_report = read_json(tmp_path / "merged" / "split_report.json")
    merged = pd.concat([read_split(tmp_path / "merged" / f"{s}.parquet")[0] for s in SPLITS], ignore_index=True)
    dropped = split_report["dedup"]["exact_duplicates_dropped"] + split_report["dedup"]["near_duplicates_dropped"]
    assert len(merged) == 400 - dropped and merged.identity.nunique() == 40
    assert merged.groupby("identity")["split"].nunique().max() == 1
    assert split_report["audit"]["cross_split_near_duplicate_pairs"] == 0
    assert all(split_report["splits"][s]["identities"] >= 4 for s in SPLITS)
