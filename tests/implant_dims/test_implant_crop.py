"""implant_dims.crop_yolo: YOLO boxes -> square crops in the record layout, carrying the panoramic's pixel scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from implant_dims.crop_yolo import crop_folder, main, parse_yolo_labels, square_crop
from implant_dims.data import load_records, model_input, read_image
from implant_dims.sample_data import write_dicom


def test_square_crop_centres_the_box_and_pads_black() -> None:
    image = np.full((100, 200), 50, dtype=np.uint8)
    image[40:60, 90:100] = 255  # a 10 wide x 20 tall bright box centred at (95, 50)
    crop = square_crop(image, 95 / 200, 50 / 100, 10 / 200, 20 / 100, context=0.0, size=20)
    assert crop.shape == (20, 20)
    assert crop[:, 5:15].min() == 255 and crop[:, :5].max() == 50 and crop[:, 15:].max() == 50
    corner = square_crop(image, 0.0, 0.0, 0.1, 0.2, context=0.0, size=20)  # runs past the top-left corner
    assert corner[:10, :].max() == 0 and corner[:, :10].max() == 0 and corner[10:, 10:].min() == 50


def test_parse_and_malformed_lines(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("2 0.5 0.5 0.1 0.2\n\n1 0.1 0.1 0.05 0.05\n")
    assert parse_yolo_labels(good) == [(1, 2, 0.5, 0.5, 0.1, 0.2), (3, 1, 0.1, 0.1, 0.05, 0.05)]
    for text, line in [("2 0.5 0.5 0.1\n", 1), ("2 0.5 0.5 0.1 0.2\nx 0.5 0.5 0.1 0.2\n", 2),
                       ("2 0.5 1.5 0.1 0.2\n", 1), ("2 0.5 0.5 0 0.2\n", 1)]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(UserError, match=f"bad.txt: line {line} "):
            parse_yolo_labels(bad)


def test_crop_folder_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    image = np.full((120, 240), 40, dtype=np.uint8)
    image[30:90, 50:70] = 250
    Image.fromarray(image).save(tmp_path / "img" / "pano.png")
    Image.fromarray(image).save(tmp_path / "img" / "nolabels.png")
    (tmp_path / "lab" / "pano.txt").write_text(f"2 {60 / 240} {60 / 120} {20 / 240} {60 / 120}\n"
                                               "1 0.8 0.5 0.05 0.1\n")
    out = tmp_path / "out"
    assert main(["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--out", str(out),
                 "--size", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["boxes_per_class"] == {"1": 1, "2": 1} and summary["crops"] == 1
    assert summary["images_without_labels"] == ["nolabels.png"]
    assert summary["images_without_scale"] == ["pano.png"]  # a PNG without a sidecar states no scale
    rows = json.loads((out / "records.json").read_text())
    assert rows[0]["mm_per_pixel"] is None and rows[0]["scale_source"] is None
    assert rows[0]["box"] == pytest.approx([0.25, 0.5, 20 / 240, 0.5]) and rows[0]["line"] == 1
    crop = read_image(out / rows[0]["image_path"])
    assert crop.shape == (32, 32) and crop[10:22, 14:18].min() > 200 and crop[:, :6].max() < 60
    (tmp_path / "lab" / "pano.txt").write_text("2 0.5 0.5 0.1\n")
    assert main(["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--out", str(out)]) == 2
    assert "pano.txt: line 1" in capsys.readouterr().err
    (tmp_path / "lab" / "pano.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UserError, match="no boxes of class 2"):
        crop_folder(tmp_path / "img", tmp_path / "lab", out)


def _bar_panoramic() -> np.ndarray:
    """120 x 240 px, a bright bar 60 px tall and 20 px wide centred at column 60, row 60."""
    image = np.full((120, 240), 40, dtype=np.uint8)
    image[30:90, 50:70] = 250
    return image


@pytest.mark.parametrize("how", ["dicom", "sidecar"])
def test_crops_carry_the_panoramic_scale(tmp_path: Path, how: str) -> None:
    """A panoramic at 0.1 mm / px (DICOM PixelSpacing or a <stem>.json sidecar): its 60 px crop resized to 32 px
    has 0.1 * 60 / 32 = 0.1875 mm / px in its record, and at the model's scale the 6 mm bar is 6 mm long."""
    images, labels = tmp_path / "img", tmp_path / "lab"
    labels.mkdir()
    if how == "dicom":
        write_dicom(images / "pano.dcm", _bar_panoramic(), 0.1)
    else:
        images.mkdir()
        Image.fromarray(_bar_panoramic()).save(images / "pano.png")
        (images / "pano.json").write_text(json.dumps({"mm_per_pixel": 0.1}))
    (labels / "pano.txt").write_text(f"2 {60 / 240} {60 / 120} {20 / 240} {60 / 120}\n")
    summary = crop_folder(images, labels, tmp_path / "out", context=0.0, size=32)
    assert summary["images_without_scale"] == []
    row = json.loads((tmp_path / "out" / "records.json").read_text())[0]
    assert row["scale_source"] == how
    assert row["mm_per_pixel"] == pytest.approx([0.1875, 0.1875], rel=1e-6)  # 0.1 * 60 / 32
    [record], _ = load_records(tmp_path / "out" / "records.json", require_labels=False)
    assert record.scale_source == "record" and record.mm_per_pixel == pytest.approx((0.1875, 0.1875), rel=1e-6)
    seen = model_input(read_image(record.image_path), record.mm_per_pixel, 0.25, 64)
    rows = np.nonzero((seen > 145).any(axis=1))[0]
    assert abs(len(rows) * 0.25 - 6.0) <= 0.5  # 6 mm (60 px at 0.1 mm) within 2 input pixels (resized twice)


def test_bad_sidecar_is_refused(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(_bar_panoramic()).save(tmp_path / "img" / "pano.png")
    (tmp_path / "lab" / "pano.txt").write_text("2 0.25 0.5 0.1 0.5\n")
    for text in ('{"mm_per_pixel": -1}', '{"scale": 0.1}', "not json"):
        (tmp_path / "img" / "pano.json").write_text(text)
        with pytest.raises(UserError, match=r"pano.json: .*mm_per_pixel"):
            crop_folder(tmp_path / "img", tmp_path / "lab", tmp_path / "out")


@pytest.mark.real_data
def test_real_panoramic_crops(real_data_dir: Path, tmp_path: Path) -> None:
    folder = real_data_dir / "dental_panoramic_yolo_dicle"
    if not (folder / "images").is_dir():
        pytest.skip(f"{folder} not present")
    summary = crop_folder(folder / "images", folder / "labels", tmp_path, class_id=2, context=0.15, size=128)
    assert summary["boxes_per_class"] == {"0": 2, "1": 11, "2": 6, "3": 13}
    assert summary["crops"] == 6
    records, skipped = load_records(tmp_path / "records.json", require_labels=False)
    assert len(records) == 6 and not skipped
    assert all(r.length is None and r.diameter is None and r.company is None for r in records)
    # the Dicle panoramics are JPEGs without a stated pixel scale: their crops say so (predict then refuses them)
    assert all(r.mm_per_pixel is None for r in records)
    assert len(summary["images_without_scale"]) == len({r.group for r in records}) == 2  # the two with implants
    for record in records:
        crop = read_image(record.image_path)
        assert crop.shape == (128, 128)
        centre = crop[32:96, 48:80].mean()  # the tall radiopaque implant sits in the middle columns
        border = np.concatenate([crop[:, :16].ravel(), crop[:, -16:].ravel()]).mean()
        assert centre > border + 20, record.image_path.name
