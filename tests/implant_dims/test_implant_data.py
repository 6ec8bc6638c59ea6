"""implant_dims.data: record loading and skip reasons, image decoding (Pillow, DICOM), pixel scales and the model
input's resampling, letterbox, the Dataset."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from implant_dims.data import (
    ImageError,
    ImplantDataset,
    ImplantRecord,
    check_class_lists,
    class_list,
    default_mm_per_pixel,
    dicom_spacing,
    letterbox,
    load_records,
    model_input,
    read_image,
    require_scale,
    window_to_uint8,
)
from implant_dims.sample_data import write_dicom


def _png(path: Path, value: int = 128, shape: tuple[int, int] = (32, 32)) -> Path:
    rng = np.random.default_rng(value)
    array = np.clip(rng.normal(value, 20, size=shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _row(image: str, company="Apexa", model_type="tapered", length=10.0, diameter=4.1, **extra) -> dict:
    return {"image_path": image, "company": company, "model_type": model_type, "length": length,
            "diameter": diameter, **extra}


@pytest.fixture()
def bad_rows_json(tmp_path: Path) -> Path:
    _png(tmp_path / "images" / "good0.png", 100)
    _png(tmp_path / "images" / "good1.png", 150)
    (tmp_path / "images" / "text.png").write_text("this is not an image\n")
    write_dicom(tmp_path / "images" / "empty.dcm", None, 0.1)
    rows = [
        _row("images/good0.png", thread_type="v", group="p1"),
        _row("images/good1.png", length="10.5", diameter=" 4.8 "),  # numeric strings are accepted
        _row("images/good0.png", company=""),
        _row("images/good0.png", length="abc"),
        _row("images/good0.png", diameter=-3),
        _row("images/good0.png", length=0),
        _row("images/good0.png", length="nan"),
        _row("images/missing.png"),
        _row("images/text.png"),
        _row("images/empty.dcm"),
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(rows))
    return path


def test_load_records_skips_each_bad_row_for_its_reason(bad_rows_json: Path) -> None:
    records, skipped = load_records(bad_rows_json)
    assert [r.index for r in records] == [0, 1]
    assert skipped == collections.Counter({
        "empty company": 1, "non-numeric length": 1, "non-positive diameter": 1, "non-positive length": 1,
        "non-finite length": 1, "missing image": 1, "unreadable image": 1, "no pixel data": 1})
    first, second = records
    assert first.image_path == (bad_rows_json.parent / "images" / "good0.png").resolve()
    assert first.image_path.is_absolute()
    # exact: numbers parsed from the JSON / strings, not computed
    assert (first.company, first.model_type, first.length, first.diameter) == ("Apexa", "tapered", 10.0, 4.1)
    assert (first.thread_type, first.group) == ("v", "p1")
    assert (second.length, second.diameter) == (10.5, 4.8)
    assert second.thread_type is None and second.group is None


def test_load_records_without_labels_keeps_unknowns_and_checks_only_images(bad_rows_json: Path) -> None:
    records, skipped = load_records(bad_rows_json, require_labels=False)
    assert skipped == collections.Counter({"missing image": 1, "unreadable image": 1, "no pixel data": 1})
    assert len(records) == 7
    by_index = {r.index: r for r in records}
    assert by_index[2].company is None
    assert by_index[3].length is None and by_index[4].diameter is None and by_index[6].length is None


def test_load_records_image_root_and_no_image_check(tmp_path: Path) -> None:
    _png(tmp_path / "elsewhere" / "a.png")
    path = tmp_path / "r.json"
    path.write_text(json.dumps([_row("a.png"), _row("not_there.png")]))
    records, skipped = load_records(path, image_root=tmp_path / "elsewhere")
    assert len(records) == 1 and skipped == collections.Counter({"missing image": 1})
    records, skipped = load_records(path, check_images=False)
    assert len(records) == 2 and not skipped


def test_load_records_errors_name_the_file(tmp_path: Path) -> None:
    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps([_row("x.png", company=""), _row("x.png", length="abc")]))
    with pytest.raises(UserError, match="only_bad.json.*all 2 rows were skipped.*empty company"):
        load_records(only_bad)
    not_list = tmp_path / "not_list.json"
    not_list.write_text(json.dumps({"image_path": "x.png"}))
    with pytest.raises(UserError, match="not_list.json.*JSON list"):
        load_records(not_list)
    not_object = tmp_path / "not_object.json"
    not_object.write_text(json.dumps([_row("x.png"), "oops"]))
    with pytest.raises(UserError, match="not_object.json: row 1"):
        load_records(not_object, check_images=False)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        load_records(bad_json)
    with pytest.raises(UserError, match="missing.json: record file not found"):
        load_records(tmp_path / "missing.json")


def test_read_image_modes_and_errors(tmp_path: Path) -> None:
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = read_image(tmp_path / "rgb.png")
    assert out.shape == (10, 12) and out.dtype == np.uint8 and 50 < out.mean() < 70  # luminance of red
    wide = (np.arange(100, dtype=np.uint16)[None].repeat(5, 0) * 600)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    write_dicom(tmp_path / "empty.dcm", None, 0.1)
    with pytest.raises(ImageError, match="empty.dcm.*no pixel data"):
        read_image(tmp_path / "empty.dcm")
    with pytest.raises(ImageError, match="nothing.png: no such file"):
        read_image(tmp_path / "nothing.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_read_image_applies_exif_orientation_without_resampling(tmp_path: Path, fmt: str) -> None:
    """A radiograph photographed or exported sideways with EXIF orientation 6 reads upright, at its own pixel
    scale (only turned, never resized)."""
    rng = np.random.default_rng(5)
    upright = np.kron(rng.integers(0, 256, (6, 4), dtype=np.uint8), np.ones((8, 8), np.uint8))  # 48 x 32, portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise; the viewer turns it back clockwise
    path = tmp_path / f"sideways.{fmt.lower()}"
    Image.fromarray(upright).transpose(Image.ROTATE_90).save(path, fmt, exif=exif, **({"quality": 95}
                                                                                      if fmt == "JPEG" else {}))
    out = read_image(path)
    assert out.shape == upright.shape
    if fmt == "PNG":
        np.testing.assert_array_equal(out, upright)  # lossless: the very pixels
    else:  # JPEG: blocks of 8 px keep their grey within a few levels (a wrong turn is off by ~80 on average)
        assert np.abs(out.astype(int) - upright.astype(int)).mean() < 3


@pytest.mark.parametrize("monochrome1", [False, True])
def test_write_dicom_round_trips(tmp_path: Path, monochrome1: bool) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(20, 230, size=(40, 56), dtype=np.uint8)
    # no .dcm suffix: detected by the DICM preamble
    path = write_dicom(tmp_path / "img.bin", pixels, 0.1667, monochrome1=monochrome1)
    out = read_image(path)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels.astype(int)).max() <= 1


@pytest.mark.real_data
@pytest.mark.parametrize("name, shape", [("RG3_J2KR.dcm", (1760, 1760)), ("RG1_J2KI.dcm", (1955, 1841))])
def test_read_real_monochrome1_jpeg2000_dicom(real_data_dir: Path, name: str, shape: tuple[int, int]) -> None:
    import pydicom

    path = real_data_dir / "radiographs_nema_cr" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ours = read_image(path)
    assert ours.shape == shape and ours.dtype == np.uint8
    assert ours.std() > 20
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = window_to_uint8(ds.pixel_array.astype(np.float64))  # the same window, without the inversion
    assert np.abs(ours.astype(int) - (255 - raw.astype(int))).max() <= 1
    assert abs(ours.mean() - (255 - raw.mean())) < 1.0
    assert abs(ours.mean() - raw.mean()) > 5  # the inversion is visible (not a symmetric image)


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    image = np.zeros((100, 60), dtype=np.uint8)
    image[10:90, 10:50] = 255  # 80 tall x 40 wide
    out = letterbox(image, 50)
    assert out.shape == (50, 50) and out.dtype == np.uint8
    ys, xs = np.nonzero(out > 128)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert height == pytest.approx(2 * width, rel=0.1)
    assert height == pytest.approx(40, abs=1)  # scaled by 50 / 100, like the width
    assert out[:, :5].max() == 0 and out[:, -5:].max() == 0  # padding is black
    square = np.arange(64 * 64, dtype=np.int64).reshape(64, 64).astype(np.uint8)
    assert np.array_equal(letterbox(square, 64), square)


def _records(tmp_path: Path) -> list[ImplantRecord]:
    specs = [("Apexa", "tapered", 10.0, 4.1, "v"), ("Boneline", "parallel", 8.0, 3.3, "square"),
             ("Zeta", "tapered", None, None, None), ("Apexa", None, 13.0, 5.5, "v")]
    records = []
    for i, (company, model, length, diameter, thread) in enumerate(specs):
        path = _png(tmp_path / f"{i}.png", 60 + 40 * i, shape=(30 + 4 * i, 24))
        records.append(ImplantRecord(path, company, model, length, diameter, thread, f"g{i}", i,
                                     mm_per_pixel=(1.0, 1.0), scale_source="record"))
    return records


def test_dataset_items(tmp_path: Path) -> None:
    records = _records(tmp_path)
    ds = ImplantDataset(records, 32, ["Apexa", "Boneline"], ["parallel", "tapered"], ["square", "v"])
    assert len(ds) == 4
    item = ds[1]
    assert set(item) == {"image", "company", "model_type", "thread_type", "target", "index"}
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    # records at 1 mm / px, the input at the default 21.33 / 32 mm / px: each image is enlarged 1.5x, then cropped
    expected = model_input(read_image(records[1].image_path), 1.0, default_mm_per_pixel(32), 32).astype(np.float32)
    assert ds.mm_per_pixel == pytest.approx(128 / 6 / 32, rel=1e-12)
    # the same normalisation, possibly by other float32 ops: rounding only
    torch.testing.assert_close(item["image"][0], torch.from_numpy((expected / 255 - 0.5) / 0.5), rtol=1e-5, atol=1e-6)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert [int(ds[i]["company"]) for i in range(4)] == [0, 1, -1, 0]
    assert [int(ds[i]["model_type"]) for i in range(4)] == [1, 0, 1, -1]
    assert [int(ds[i]["thread_type"]) for i in range(4)] == [1, 0, -1, 1]
    assert all(ds[i]["company"].dtype == torch.int64 and ds[i]["index"].dtype == torch.int64 for i in range(4))
    assert int(ds[3]["index"]) == 3
    assert item["target"].dtype == torch.float32 and item["target"].tolist() == pytest.approx([8.0, 3.3])
    assert torch.isnan(ds[2]["target"]).all()
    targets = ds.targets
    # exact: the record's values copied
    assert targets.shape == (4, 2) and np.isnan(targets[2]).all() and targets[0].tolist() == [10.0, 4.1]
    no_threads = ImplantDataset(records, 32, ["Apexa"], ["tapered"], cache=False)
    assert int(no_threads[0]["thread_type"]) == -1 and int(no_threads[1]["company"]) == -1
    # bit-exact below: the same decode + letterbox + normalisation of the same file (cache or not, repeated access)
    assert torch.equal(no_threads[1]["image"], item["image"])  # cache or not, the same pixels
    assert torch.equal(ds[1]["image"], item["image"])  # no augmentation: repeated access is identical
    ds.set_epoch(5)
    assert torch.equal(ds[1]["image"], item["image"])
    assert class_list(records, "company") == ["Apexa", "Boneline", "Zeta"]
    assert class_list(records, "model_type") == ["parallel", "tapered"]


def test_dataset_augmentation_is_reproducible(tmp_path: Path) -> None:
    records = _records(tmp_path)
    plain = ImplantDataset(records, 32, ["Apexa"], ["tapered"])
    a = ImplantDataset(records, 32, ["Apexa"], ["tapered"], augment=True, seed=7)
    b = ImplantDataset(records, 32, ["Apexa"], ["tapered"], augment=True, seed=7, cache=False)
    a.set_epoch(3)
    b.set_epoch(3)
    first = [a[i]["image"] for i in range(4)]
    # bit-exact: the same augmentation drawn from the same (seed, epoch, index), computed by the same code
    assert all(torch.equal(x, a[i]["image"]) for i, x in enumerate(first))  # same (seed, epoch, index)
    assert all(torch.equal(x, b[i]["image"]) for i, x in enumerate(first))  # another instance agrees
    assert not all(torch.equal(x, plain[i]["image"]) for i, x in enumerate(first))  # it does augment
    a.set_epoch(4)
    assert all(not torch.equal(x, a[i]["image"]) for i, x in enumerate(first))  # a new epoch differs
    c = ImplantDataset(records, 32, ["Apexa"], ["tapered"], augment=True, seed=8)
    c.set_epoch(3)
    assert not torch.equal(c[0]["image"], first[0])
    assert all(x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1 for x in first)
    # no zoom: a centred bright square keeps its area under augmentation (rotation +-5 degrees, flip)
    image = np.zeros((32, 32), dtype=np.uint8)
    image[8:24, 12:20] = 255
    Image.fromarray(image).save(tmp_path / "sq.png")
    rec = [ImplantRecord(tmp_path / "sq.png", "Apexa", "tapered", 1.0, 1.0, mm_per_pixel=(0.5, 0.5))]
    aug = ImplantDataset(rec, 32, ["Apexa"], ["tapered"], augment=True, mm_per_pixel=0.5)
    for epoch in range(5):
        aug.set_epoch(epoch)
        x = aug[0]["image"][0]
        assert abs(int((x > x.mean()).sum()) - 128) < 40


def test_check_class_lists() -> None:
    check_class_lists(["Apexa", "Boneline"], ["Apexa"], "companies", "runs/cls/best")
    with pytest.raises(UserError, match=r"runs/cls/best knows companies \['Apexa'\].*\['Foo'\].*rows 'Foo': 3, 9"):
        check_class_lists(["Apexa"], ["Apexa", "Foo"], "companies", "runs/cls/best", rows={"Foo": [3, 9]})


# ------------------------------------------------------------------------------------------------- pixel scale


def _bar(rows: int, cols: int, bar_rows: int, bar_cols: int) -> np.ndarray:
    """A black image with a centred white bar of bar_rows x bar_cols pixels."""
    image = np.zeros((rows, cols), dtype=np.uint8)
    top, left = (rows - bar_rows) // 2, (cols - bar_cols) // 2
    image[top:top + bar_rows, left:left + bar_cols] = 255
    return image


def _extent(image: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(image > 127)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def test_model_input_puts_every_image_at_one_scale() -> None:
    """A 12 x 4 mm object reaches the model at 0.25 mm / px as 48 x 16 px whatever its file's resolution, pixel
    shape or size."""
    fine = _bar(300, 200, 120, 40)  # 0.1 mm / px
    coarse = _bar(60, 40, 24, 8)  # 0.5 mm / px
    oblong = _bar(150, 200, 60, 40)  # 0.2 mm per row, 0.1 mm per column: non-square pixels
    for image, spacing in ((fine, (0.1, 0.1)), (coarse, 0.5), (oblong, (0.2, 0.1))):
        out = model_input(image, spacing, 0.25, 64)
        assert out.shape == (64, 64) and out.dtype == np.uint8
        rows, cols = _extent(out)
        assert abs(rows - 48) <= 1 and abs(cols - 16) <= 1, (spacing, rows, cols)  # +-1 px: bilinear edges
        # centred: the bar's centre within a pixel of the canvas centre
        ys, xs = np.nonzero(out > 127)
        assert abs(ys.mean() - 31.5) <= 1 and abs(xs.mean() - 31.5) <= 1
    # larger than the input after resampling: centre-cropped; smaller: padded black
    big = np.full((200, 200), 200, dtype=np.uint8)
    big[100, :] = 0  # a dark row through the middle survives the centred crop
    out = model_input(big, 0.25, 0.25, 64)
    assert out.min() == 0 and (out == 0).sum() == 64 and out[32].max() == 0
    small = model_input(np.full((10, 10), 200, dtype=np.uint8), 0.25, 0.25, 64)
    assert (small > 0).sum() == 100 and small[:27].max() == 0 and small[37:].max() == 0
    # a wildly wrong assumed scale (mm taken for px per mm) resamples only what lands on the canvas: 3000 px at
    # 100 mm / px would be a 1.2 million px square, the canvas takes its central 0.16 source px
    huge = model_input(np.full((3000, 3000), 200, dtype=np.uint8), 100.0, 0.25, 64)
    assert huge.shape == (64, 64) and (huge == 200).all()


def test_sample_crops_reach_the_model_as_before() -> None:
    """Sample crops (128 px at 6 px/mm) at the default input scale are exactly the old letterboxed input."""
    rng = np.random.default_rng(2)
    crop = rng.integers(0, 256, size=(128, 128), dtype=np.uint8)
    for size in (32, 64):
        np.testing.assert_array_equal(model_input(crop, 1 / 6, default_mm_per_pixel(size), size),
                                      letterbox(crop, size))


def _dicom_with(path: Path, pixels: np.ndarray, **tags) -> Path:
    """write_dicom, then PixelSpacing / ImagerPixelSpacing set or deleted as `tags` say (None deletes)."""
    import pydicom

    write_dicom(path, pixels, 0.1)
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def test_scale_sources_in_order(tmp_path: Path) -> None:
    pixels = np.full((20, 20), 100, dtype=np.uint8)
    images = tmp_path / "images"
    _dicom_with(images / "spacing.dcm", pixels, PixelSpacing=["0.2", "0.3"])
    _dicom_with(images / "imager.dcm", pixels, PixelSpacing=None, ImagerPixelSpacing=["0.15", "0.15"])
    _dicom_with(images / "zero.dcm", pixels, PixelSpacing=["0", "0"])  # as the NEMA CR RG1 states it: no scale
    _png(images / "a.png")
    assert dicom_spacing(images / "spacing.dcm") == (0.2, 0.3)
    assert dicom_spacing(images / "imager.dcm") == (0.15, 0.15)
    assert dicom_spacing(images / "zero.dcm") is None and dicom_spacing(images / "a.png") is None
    rows = [
        _row("images/spacing.dcm", mm_per_pixel=0.9),  # the DICOM header wins over the record
        _row("images/imager.dcm"),
        _row("images/zero.dcm", mm_per_pixel=0.12),  # no usable spacing in the header: the record's
        _row("images/a.png", mm_per_pixel=[0.1, 0.2]),
        _row("images/a.png", mm_per_pixel="0.25"),
        _row("images/a.png"),  # no scale anywhere
        _row("images/a.png", mm_per_pixel=None),
        _row("images/a.png", mm_per_pixel=0),
        _row("images/a.png", mm_per_pixel="abc"),
        _row("images/a.png", mm_per_pixel=[0.1, 0.2, 0.3]),
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(rows))
    records, skipped = load_records(path)
    assert skipped == collections.Counter({"invalid mm_per_pixel": 3})
    got = [(r.index, r.mm_per_pixel, r.scale_source) for r in records]
    assert got == [(0, (0.2, 0.3), "dicom"), (1, (0.15, 0.15), "dicom"), (2, (0.12, 0.12), "record"),
                   (3, (0.1, 0.2), "record"), (4, (0.25, 0.25), "record"), (5, None, None), (6, None, None)]
    with pytest.raises(UserError) as refused:
        require_scale(records, 0.0, path)
    message = str(refused.value)
    assert "\n" not in message and str(records[5].image_path) in message and f"row 5 of {path}" in message
    assert "1 more of the 7 images" in message
    for way in ("PixelSpacing", "ImagerPixelSpacing", '"mm_per_pixel"', "data.assume_scale="):
        assert way in message
    assumed = require_scale(records, 0.3, path)
    assert [(r.mm_per_pixel, r.scale_source) for r in assumed[4:]] == [
        ((0.25, 0.25), "record"), ((0.3, 0.3), "assumed"), ((0.3, 0.3), "assumed")]
    assert assumed[:4] == records[:4]  # an own scale is never overridden by the assumed one
    with pytest.raises(UserError, match="a.png.*no pixel scale"):  # the Dataset refuses too
        ImplantDataset(records, 32, ["Apexa"], ["tapered"])


@pytest.mark.real_data
def test_real_cr_dicoms_state_no_usable_scale(real_data_dir: Path, tmp_path: Path) -> None:
    """The NEMA CRs have no PixelSpacing (RG3) or a zero one (RG1) and no ImagerPixelSpacing: both are refused
    until a scale is assumed."""
    folder = real_data_dir / "radiographs_nema_cr"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    rows = [{"image_path": str(folder / name)} for name in ("RG3_J2KR.dcm", "RG1_J2KI.dcm")]
    path = tmp_path / "cr.json"
    path.write_text(json.dumps(rows))
    records, _ = load_records(path, require_labels=False)
    assert [r.mm_per_pixel for r in records] == [None, None]
    with pytest.raises(UserError, match="RG3_J2KR.dcm.*no pixel scale"):
        require_scale(records, 0.0, path)
    assert {r.scale_source for r in require_scale(records, 0.14, path)} == {"assumed"}
