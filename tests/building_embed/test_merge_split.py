"""merge_and_split: dedup counts against the manifest, identity / place / duplicate groups never straddle splits,
the audit catches a leak, bad embeddings are exit 2; fix_intermediate_schema; summarize_ids."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_json, read_parquets

from building_embed.generate.generate_embeddings import embeddings_table, read_embeddings
from building_embed.preprocess import fix_intermediate_schema, merge_and_split
from building_embed.preprocess.compute_fingerprints import hamming, near_pairs
from building_embed.preprocess.merge_and_split import SPLITS, audit, place_groups, read_split


def _merged(pipeline) -> pd.DataFrame:
    return pd.concat([read_split(pipeline / "merged" / f"{s}.parquet")[0] for s in SPLITS], ignore_index=True)


def test_dedup_drops_exactly_the_injected_duplicates(pipeline, sample):
    _, manifest = sample
    dropped = pd.read_csv(pipeline / "merged" / "dedup_dropped.csv")
    tar_of = {101: "region_0.tar", 102: "region_1.tar", 103: "region_2.tar"}

    def key(member: str) -> str:
        return f"{tar_of[int(member[:4])]}:{member}"

    expected = {key(b): (key(a), "exact") for a, b in manifest["exact_duplicates"]}
    expected |= {key(b): (key(a), "near") for a, b in manifest["near_duplicates"]}
    got = {r.image_key: (r.duplicate_of, r.kind) for r in dropped.itertuples()}
    assert got == expected
    report = read_json(pipeline / "merged" / "split_report.json")
    assert report["dedup"]["exact_duplicates_dropped"] == 12 and report["dedup"]["near_duplicates_dropped"] == 12
    merged = _merged(pipeline)
    assert len(merged) == manifest["n_valid_images"] - 24 == sum(v["images"] for v in report["splits"].values())
    assert not merged.image_key.isin(dropped.image_key).any()


def test_identities_places_and_copies_never_straddle_splits(pipeline, sample):
    _, manifest = sample
    merged = _merged(pipeline)
    split_of = merged.groupby("identity")["split"].agg(lambda s: set(s))
    assert all(len(s) == 1 for s in split_of)
    for a, b in manifest["close_pairs"] + manifest["cross_identity_copies"]:
        assert split_of[a] == split_of[b], (a, b)
    assert merged.groupby("place_group")["split"].nunique().max() == 1
    report = read_json(pipeline / "merged" / "split_report.json")
    assert report["audit"]["cross_split_near_duplicate_pairs"] == 0
    assert report["audit"]["near_duplicate_pairs_checked"] >= 2  # the two cross-identity copies at least
    assert report["dedup"]["cross_identity_pairs_grouped"] >= 2
    assert {s: v["images"] > 0 for s, v in report["splits"].items()} == {s: True for s in SPLITS}
    assert report["inputs"]["embedding_dim"] == 24


def test_audit_catches_a_copy_moved_to_another_split(pipeline, sample):
    merged = _merged(pipeline)
    a, b = sample[1]["cross_identity_copies"][0]
    row = merged.index[merged.identity == b][0]
    other = next(s for s in SPLITS if s != merged.at[row, "split"])
    broken = merged.copy()
    broken.loc[broken.identity == b, "split"] = other
    result = audit(broken, 6)
    assert result["cross_split_near_duplicate_pairs"] >= 1 and result["place_groups_in_several_splits"] >= 1
    assert audit(merged, 6)["cross_split_near_duplicate_pairs"] == 0


def test_place_groups_join_targets_within_the_radius_only():
    from building_embed.streetview import offset_latlon

    lat0, lon0 = 40.0, -73.0
    spots = {"1_1": (0, 0), "1_2": (20, 0), "2_1": (60, 0), "2_2": (200, 0)}  # metres east
    rows = []
    for identity, (east, north) in spots.items():
        lat, lon = offset_latlon(lat0, lon0, east, north)
        cam_lat, cam_lon = offset_latlon(lat0, lon0, east, north - 15)
        rows.append({"identity": identity, "target_lat": lat, "target_lon": lon, "camera_lat": cam_lat,
                     "camera_lon": cam_lon})
    frame = pd.DataFrame(rows)
    empty = np.zeros((0, 3), np.int64)
    groups, _ = place_groups(frame, 25.0, empty)
    assert groups[0] == groups[1] and len(set(groups)) == 3
    assert len(set(place_groups(frame, 19.0, empty)[0])) == 4  # 20 m apart: not within 19 m
    joined, cross = place_groups(frame, 0.0, np.asarray([[2, 3, 5]]))  # a hash pair joins far targets
    assert cross == 1 and joined[2] == joined[3] and len(set(joined)) == 3


def test_near_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400).astype(
        np.uint64)
    flips = rng.integers(0, 64, size=(60, 5))
    for k in range(60):  # plant near copies at 1 to 5 flipped bits
        value = int(hashes[k])
        for bit in flips[k, : 1 + k % 5]:
            value ^= 1 << int(bit)
        hashes[200 + k] = value
    for max_distance in (0, 3, 6):
        dist = hamming(hashes[:, None], hashes[None, :])
        ii, jj = np.nonzero(np.triu(dist <= max_distance, 1))
        expected = np.stack([ii, jj, dist[ii, jj]], axis=1)
        np.testing.assert_array_equal(near_pairs(hashes, max_distance), expected)
    assert len(near_pairs(hashes, 6)) >= 60


def _copy(pipeline, tmp_path):
    root = tmp_path / "w"
    for name in ("inter", "emb"):
        shutil.copytree(pipeline / name, root / name)
    return root


def test_non_finite_embedding_is_exit_2_naming_file_and_row(pipeline, tmp_path, stage_args, capsys):
    root = _copy(pipeline, tmp_path)
    path = root / "emb" / "region_1-00002.parquet"
    ids, values = read_embeddings(path)
    values[5, 3] = np.inf
    meta = pq.read_schema(path).metadata
    table = embeddings_table({n: ids.column(n).to_pylist() for n in ids.column_names}, values, {})
    pq.write_table(table.replace_schema_metadata(meta), path)
    assert merge_and_split.main(stage_args(root)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "row 5" in err and ids.column("image_key")[5].as_py() in err
    assert not (root / "merged").exists()


def test_embedding_width_mismatch_and_missing_embeddings_are_exit_2(pipeline, tmp_path, stage_args, capsys):
    root = _copy(pipeline, tmp_path)
    path = root / "emb" / "region_2-00000.parquet"
    ids, values = read_embeddings(path)
    pq.write_table(embeddings_table({n: ids.column(n).to_pylist() for n in ids.column_names}, values[:, :16], {}),
                   path)
    assert merge_and_split.main(stage_args(root)) == 2
    err = capsys.readouterr().err
    assert "region_2-00000.parquet" in err and "width 16" in err and "24" in err
    path.unlink()
    assert merge_and_split.main(stage_args(root)) == 2
    assert "40 images have no embedding" in capsys.readouterr().err


def test_fix_intermediate_schema_casts_text_numbers_and_fills_columns(pipeline, tmp_path, stage_args, capsys):
    root = _copy(pipeline, tmp_path)
    good = root / "inter" / "region_0-00000.parquet"
    untouched = root / "inter" / "region_0-00001.parquet"
    original = pq.read_table(good)
    untouched_bytes = untouched.read_bytes()
    old = (original.drop_columns(["alignment", "identity", "image_key"])
           .set_column(original.schema.get_field_index("target_lat") - 2, "target_lat",
                       pa.array([f"{v:.17g}" for v in original.column("target_lat").to_pylist()]))
           .append_column("legacy_note", pa.array(["x"] * len(original))))
    pq.write_table(old, good)
    assert fix_intermediate_schema.main(stage_args(root)) == 0
    fixed = pq.read_table(good)
    assert fixed.schema.equals(original.schema.remove_metadata()) or fixed.schema.equals(original.schema)
    # bit-exact: the floats went through "%.17g" text, which round-trips a float64 exactly
    assert fixed.drop_columns(["alignment"]).equals(original.drop_columns(["alignment"]))
    assert fixed.column("alignment").null_count == len(fixed)
    assert untouched.read_bytes() == untouched_bytes
    report = read_json(root / "inter" / "schema_fix_report.json")
    assert report[good.name]["dropped"] == ["legacy_note"] and "target_lat" in report[good.name]["changed"]
    words = old.set_column(old.schema.get_field_index("target_lat"), "target_lat",
                           pa.array(["40.1"] * 7 + ["north"] + ["40.1"] * (len(old) - 8)))
    pq.write_table(words, good)
    assert fix_intermediate_schema.main(stage_args(root)) == 2
    err = capsys.readouterr().err
    assert str(good) in err and "'target_lat' row 7" in err and "'north'" in err


def test_id_summary_counts(pipeline):
    summary = read_json(pipeline / "merged" / "id_summary.json")
    merged = _merged(pipeline)
    for split in SPLITS:
        part = merged[merged.split == split]
        assert summary[split]["images"] == len(part)
        assert summary[split]["identities"] == part.identity.nunique()
        assert summary[split]["images_per_identity"]["max"] == part.groupby("identity").size().max()
    per_identity = pd.read_csv(pipeline / "merged" / "id_summary.csv")
    assert len(per_identity) == 42 and per_identity.images.sum() == len(merged)


@pytest.mark.parametrize("bad, key", [("data.leak_audit_distance=2", "data.leak_audit_distance"),
                                      ("data.val_fraction=0.9", "data.val_fraction")])
def test_bad_split_settings_are_exit_2_naming_the_key(bad, key, tmp_path, stage_args, capsys):
    assert merge_and_split.main(stage_args(tmp_path, bad)) == 2
    assert key in capsys.readouterr().err


def test_merged_rows_keep_their_embeddings(pipeline):
    merged_train, train_values = read_split(pipeline / "merged" / "train.parquet")
    emb = read_parquets(pipeline / "emb", ["image_key"])
    values = np.concatenate([read_embeddings(p)[1] for p in sorted((pipeline / "emb").glob("*.parquet"))])
    position = pd.Index(emb.image_key).get_indexer(merged_train.image_key)
    np.testing.assert_array_equal(train_values, values[position])  # bit-exact: merging copies the stored values
