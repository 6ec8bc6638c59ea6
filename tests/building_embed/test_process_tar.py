"""process_tar: counted skips against what sample_data injected, hostile members, nothing written outside."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import read_json, read_parquets
from PIL import Image

from building_embed.preprocess import process_tar
from building_embed.sample_data import jpeg_bytes
from building_embed.streetview import (
    META_FIELD_COUNT,
    META_MISSING_D,
    META_NON_FINITE,
    META_NON_NUMERIC,
    META_NOT_TEXT,
    MetadataError,
    format_metadata,
    parse_metadata,
)

META = {"dataset_id": 7, "target_id": 3, "patch_id": 11, "street_view_id": 2, "target_lat": 40.0, "target_lon": -73.0,
        "target_height": 10.0, "normal_x": 0.0, "normal_y": -1.0, "normal_z": 0.0, "camera_lat": 40.0001,
        "camera_lon": -73.0001, "camera_height": 2.5, "distance": 12.0, "heading": 10.0, "pitch": 1.0, "roll": 0.5}


def test_sample_tars_give_exactly_the_injected_skips(pipeline, sample):
    _, manifest = sample
    report = read_json(pipeline / "inter" / "process_report.json")
    assert report["skipped"] == manifest["expected_skips"]
    assert report["rows"] == manifest["n_valid_images"] == 278
    rows = read_parquets(pipeline / "inter", ["identity", "target_id", "dataset_id"])
    # TargetIDs restart in every tar: 14 TargetIDs, 42 identities (DatasetID, TargetID)
    assert rows.target_id.nunique() == 14 and rows.identity.nunique() == 42
    assert (rows.identity == rows.dataset_id.astype(str) + "_" + rows.target_id.astype(str)).all()
    assert len(report["shards"]) == 9  # 92, 92, 94 rows per tar at 40 rows per shard: 3 shards each


def test_intermediate_rows_hold_the_image_and_its_parsed_metadata(pipeline):
    table = pq.read_table(pipeline / "inter" / "region_0-00000.parquet").to_pylist()
    row = next(r for r in table if r["member"] == "0101_0000002_0000201_001.jpg")
    with tarfile.open(pipeline / "tars" / "region_0.tar") as tar:
        assert row["image_bytes"] == tar.extractfile(row["member"]).read()
        expected = parse_metadata(tar.extractfile("0101_0000002_0000201_001.txt").read())
    assert {k: row[k] for k in expected} == expected and row["alignment"] is not None and len(row["alignment"]) == 2
    assert row["image_key"] == "region_0.tar:0101_0000002_0000201_001.jpg" and row["identity"] == "101_2"
    assert (row["width"], row["height"]) == (64, 64)


@pytest.mark.parametrize("text, reason", [
    (b"a 0.1 0.2\n", META_MISSING_D),
    (format_metadata(META).rsplit(" ", 1)[0].encode(), META_FIELD_COUNT),
    (format_metadata(META).replace("40.0000000", "north", 1).encode(), META_NON_NUMERIC),
    (format_metadata(META).replace("12.0000000", "nan", 1).encode(), META_NON_FINITE),
    (format_metadata(META).replace("d 7 3", "d 7.5 3", 1).encode(), META_NON_NUMERIC),
    (b"\xff\xfe d 1", META_NOT_TEXT),
])
def test_bad_metadata_reasons(text, reason):
    with pytest.raises(MetadataError) as info:
        parse_metadata(text)
    assert info.value.reason == reason


def test_metadata_round_trip():
    parsed = parse_metadata(format_metadata(META, [0.25, 0.5]).encode())
    assert parsed == {**META, "alignment": [0.25, 0.5]}
    assert isinstance(parsed["dataset_id"], int) and parsed["alignment"] is not None


def _hostile_tar(path: Path, outside: Path) -> None:
    image = jpeg_bytes(Image.new("RGB", (32, 24), (200, 10, 10)))
    big = jpeg_bytes(Image.new("RGB", (300, 300), (0, 0, 200)))
    meta = format_metadata(META).encode()
    members = [
        ("good_a.jpg", image), ("good_a.txt", meta),
        ("dir/good_b.txt", meta), ("dir/good_b.jpg", image),  # metadata before the image: still paired
        ("../escape.jpg", image), ("../escape.txt", meta),
        (str(outside / "absolute.jpg"), image),
        ("trunc.jpg", image[: len(image) // 2]), ("trunc.txt", meta),
        ("short.jpg", image), ("short.txt", format_metadata(META).rsplit(" ", 1)[0].encode()),
        ("word.jpg", image), ("word.txt", format_metadata(META).replace("12.0000000", "twelve").encode()),
        ("huge.jpg", big), ("huge.txt", meta),
        ("notes.md", b"hello"),
        ("good_a.jpg", image),  # the same name again: never overwrites the first
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for kind, name in ((tarfile.SYMTYPE, "sym.jpg"), (tarfile.LNKTYPE, "hard.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, str(outside / "target.jpg")
            tar.addfile(info)
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)


def test_hostile_tar_members_are_refused_and_nothing_lands_outside(tmp_path, stage_args):
    root = tmp_path / "work"
    (root / "tars").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    _hostile_tar(root / "tars" / "hostile.tar", outside)
    before = {p for p in tmp_path.rglob("*")}
    code = process_tar.main(stage_args(root, "data.max_image_pixels=10000"))
    assert code == 0
    report = read_json(root / "inter" / "process_report.json")
    assert report["skipped"] == {"corrupt_image": 1, "duplicate_member": 1, "link": 2, META_FIELD_COUNT: 1,
                                 META_NON_NUMERIC: 1, "other_file": 1, "oversized_image": 1, "unsafe_path": 3}
    rows = read_parquets(root / "inter")
    assert sorted(rows.member) == ["dir/good_b.jpg", "good_a.jpg"]
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(root / "inter" in p.parents or p == root / "inter" for p in new), new
    assert not (tmp_path / "escape.jpg").exists() and not any(outside.iterdir())


def test_oversized_members_are_skipped_unread(tmp_path, sample, stage_args):
    root = tmp_path / "w"
    (root / "tars").mkdir(parents=True)
    shutil.copy(sample[0] / "tars" / "region_2.tar", root / "tars")
    with tarfile.open(root / "tars" / "region_2.tar") as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
    limit = sorted(s for n, s in sizes.items() if n.endswith(".jpg"))[len(sizes) // 4]  # about half the images
    assert process_tar.main(stage_args(root, f"data.max_member_bytes={limit}")) == 0
    report = read_json(root / "inter" / "process_report.json")
    assert report["skipped"]["oversized_member"] == sum(s > limit for s in sizes.values())
    kept = read_parquets(root / "inter", ["member"]).member
    assert len(kept) > 0 and all(sizes[m] <= limit for m in kept)


def test_truncated_tar_keeps_the_pairs_read_before_the_cut(tmp_path, sample, stage_args):
    full, cut = tmp_path / "full", tmp_path / "cut"
    for root in (full, cut):
        (root / "tars").mkdir(parents=True)
    data = (sample[0] / "tars" / "region_2.tar").read_bytes()
    (full / "tars" / "r.tar").write_bytes(data)
    (cut / "tars" / "r.tar").write_bytes(data[: len(data) // 2])
    for root in (full, cut):
        assert process_tar.main(stage_args(root)) == 0
    assert read_json(cut / "inter" / "process_report.json")["skipped"]["corrupt_tar"] == 1
    kept = read_parquets(cut / "inter", ["member"]).member.tolist()
    reference = read_parquets(full / "inter", ["member"]).member.tolist()
    assert 20 < len(kept) < len(reference) == 94 and kept == reference[: len(kept)]  # the same first rows


def test_second_run_reuses_finished_tars(tmp_path, sample, stage_args):
    root = tmp_path / "w"
    (root / "tars").mkdir(parents=True)
    (root / "tars" / "r.tar").write_bytes((sample[0] / "tars" / "region_1.tar").read_bytes())
    assert process_tar.main(stage_args(root)) == 0
    shard = root / "inter" / "r-00000.parquet"
    stamp = shard.stat().st_mtime_ns
    assert process_tar.main(stage_args(root)) == 0
    assert shard.stat().st_mtime_ns == stamp  # not rewritten
    assert process_tar.main(stage_args(root, "data.rows_per_shard=1000")) == 0  # other settings: redone
    assert shard.stat().st_mtime_ns != stamp and not (root / "inter" / "r-00002.parquet").exists()
    assert read_json(root / "inter" / "process_report.json")["rows"] == 92


def test_no_tars_is_exit_2_naming_the_folder(tmp_path, stage_args, capsys):
    assert process_tar.main(stage_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "tars") in err and "paths.tar_dir" in err and os.linesep not in err.strip()
