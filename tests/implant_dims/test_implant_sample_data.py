"""implant_dims.sample_data: determinism, held-out combinations, DICOM copies, and that the pictures carry the
sizes (a physics check a broken renderer fails), and that magnification enlarges the thread as well as the outline."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from implant_dims.data import class_list, load_records, read_image
from implant_dims.sample_data import (
    COMPANIES,
    HELD_OUT,
    MODEL_TYPES,
    SPLIT_FILES,
    catalogue,
    main,
    make_dataset,
    px_per_mm,
    render,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("implant_sample")
    meta = make_dataset(out, n_train=80, n_val=10, n_test=10, n_unseen=12, size=128, seed=3, dicom_every=4,
                        n_calibration=6)
    return out, meta


def _rows(out: Path, split: str) -> list[dict]:
    return json.loads((out / SPLIT_FILES[split]).read_text())


def test_layout_and_meta(sample: tuple[Path, dict]) -> None:
    out, meta = sample
    for name in [*SPLIT_FILES.values(), "catalogue.csv", "README.txt", "meta.json"]:
        assert (out / name).is_file(), name
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["px_per_mm"] == pytest.approx(6.0, rel=1e-12) and meta["counts"] == {"train": 80, "val": 10, "test": 10, "unseen": 12,
                                                                                     "calibration": 6}
    assert sorted(map(tuple, meta["held_out_combinations"])) == sorted(HELD_OUT)
    rows = _rows(out, "train")
    assert set(rows[0]) == {"image_path", "company", "model_type", "length", "diameter", "thread_type", "group",
                            "mm_per_pixel", "magnification"}
    all_rows = [r for split in SPLIT_FILES for r in _rows(out, split)]
    # the pixel spacing each image was rendered at, in every record and in meta.json (1 / 6 mm at 128 px)
    assert meta["mm_per_pixel"] == pytest.approx(1 / 6, rel=1e-12)
    assert all(r["mm_per_pixel"] == pytest.approx(1 / 6, rel=1e-12) for r in all_rows)
    mags = np.asarray([r["magnification"] for r in all_rows])
    assert 0.9 < mags.min() and mags.max() < 1.1 and mags.std() > 0.005  # 1 + N(0, 0.02)
    assert len({r["group"] for r in all_rows}) == len(all_rows)  # one implant id per image
    assert all(r["thread_type"] == COMPANIES[r["company"]].thread_type for r in all_rows)
    sizes = catalogue()
    assert all(len(v) >= 4 for v in sizes.values())
    # exact: each label is copied from the catalogue
    assert all((r["length"], r["diameter"]) in sizes[(r["company"], r["model_type"])] for r in all_rows)
    lines = (out / "catalogue.csv").read_text().splitlines()
    assert lines[0] == "company,model_type,length,diameter" and len(lines) == 1 + sum(map(len, sizes.values()))
    # every record loads with all labels, images included
    for split in SPLIT_FILES:
        records, skipped = load_records(out / SPLIT_FILES[split])
        assert len(records) == meta["counts"][split] and not skipped
        # PNGs take the record's scale, the DICOM copies their PixelSpacing: the same scale either way
        assert all(r.mm_per_pixel == pytest.approx((1 / 6, 1 / 6), rel=1e-5) for r in records)
        assert {r.scale_source for r in records} <= {"record", "dicom"}


def test_held_out_combinations(sample: tuple[Path, dict]) -> None:
    out, _ = sample
    held = set(HELD_OUT)
    for split in ("train", "val", "test"):
        assert not {(r["company"], r["model_type"]) for r in _rows(out, split)} & held, split
    unseen = {(r["company"], r["model_type"]) for r in _rows(out, "unseen")}
    assert unseen == held
    train, _ = load_records(out / SPLIT_FILES["train"])
    assert class_list(train, "company") == sorted(COMPANIES)
    assert class_list(train, "model_type") == sorted(MODEL_TYPES)


def test_dicom_copies(sample: tuple[Path, dict]) -> None:
    out, meta = sample
    test_rows = _rows(out, "test")
    dicoms = [r for r in test_rows if r["image_path"].endswith(".dcm")]
    assert len(dicoms) == meta["n_dicom"] == 2
    for r in dicoms:
        png = out / r["image_path"].replace(".dcm", ".png")
        assert np.array_equal(read_image(out / r["image_path"]), read_image(png))
        import pydicom

        ds = pydicom.dcmread(out / r["image_path"])
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert float(ds.PixelSpacing[0]) == pytest.approx(1 / 6.0, rel=1e-4)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    kwargs = dict(n_train=6, n_val=2, n_test=3, n_unseen=2, size=96, dicom_every=2, n_calibration=2)
    make_dataset(tmp_path / "a", seed=11, **kwargs)
    make_dataset(tmp_path / "b", seed=11, **kwargs)
    make_dataset(tmp_path / "c", seed=12, **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 15
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    png = Path("images/000000.png")
    assert (tmp_path / "a" / png).read_bytes() != (tmp_path / "c" / png).read_bytes()
    # a rerun into the same folder replaces what it owns, leaving no stale images
    make_dataset(tmp_path / "a", seed=11, n_train=2, n_val=1, n_test=1, n_unseen=1, size=96, n_calibration=0)
    assert len(list((tmp_path / "a" / "images").iterdir())) == 5


def test_the_calibration_split_is_drawn_last_and_changes_no_other_split(tmp_path: Path) -> None:
    """Adding calibration images (the out-of-domain guard's threshold) leaves every other split's records and images
    byte for byte as they were, so runs trained before it still match their data; its images show seen
    combinations only and share no implant with the other splits."""
    kwargs = dict(n_train=5, n_val=2, n_test=2, n_unseen=2, size=96, seed=4)
    make_dataset(tmp_path / "without", n_calibration=0, **kwargs)
    make_dataset(tmp_path / "with", n_calibration=7, **kwargs)
    for split in ("train", "val", "test", "unseen"):
        rows = _rows(tmp_path / "without", split)
        assert rows == _rows(tmp_path / "with", split), split
        for r in rows:
            assert (tmp_path / "without" / r["image_path"]).read_bytes() == \
                (tmp_path / "with" / r["image_path"]).read_bytes()
    calibration = _rows(tmp_path / "with", "calibration")
    assert len(calibration) == 7 and _rows(tmp_path / "without", "calibration") == []
    assert not {(r["company"], r["model_type"]) for r in calibration} & set(HELD_OUT)
    others = {r["group"] for split in ("train", "val", "test", "unseen") for r in _rows(tmp_path / "with", split)}
    assert not others & {r["group"] for r in calibration}


def _extents(image: np.ndarray) -> tuple[float, float]:
    """(extent along, extent across the principal axis) in px of the bright (metal) blob: the caliper baseline's
    measurement (an Otsu threshold over the brighter half copes with the dimmer, less radiopaque companies)."""
    from implant_dims.baselines import measure_blob

    return measure_blob(image)


def test_drawn_size_follows_the_label(sample: tuple[Path, dict]) -> None:
    out, meta = sample
    rows = _rows(out, "train")[:60]
    extents = np.asarray([_extents(read_image(out / r["image_path"])) for r in rows])
    lengths = np.asarray([r["length"] for r in rows])
    diameters = np.asarray([r["diameter"] for r in rows])
    assert np.corrcoef(lengths, extents[:, 0])[0, 1] > 0.9
    assert np.corrcoef(diameters, extents[:, 1])[0, 1] > 0.8
    # and at the stated scale: vertical extent ~ length * px_per_mm (rotation <= 6 degrees, blur)
    ratio = extents[:, 0] / (lengths * meta["px_per_mm"])
    assert 0.9 < np.median(ratio) < 1.15


def test_company_not_predictable_from_size_alone(sample: tuple[Path, dict]) -> None:
    out, _ = sample
    rows = _rows(out, "train")
    for key in ("length", "diameter"):
        by_value: dict[float, collections.Counter] = collections.defaultdict(collections.Counter)
        for r in rows:
            by_value[r[key]][r["company"]] += 1
        best = sum(max(c.values()) for c in by_value.values()) / len(rows)  # in-sample majority per value
        assert best < 0.5, key
    # several sizes per combination: neither size is a function of the class
    for combo, sizes in catalogue().items():
        assert len({s[0] for s in sizes}) >= 3 and len({s[1] for s in sizes}) >= 2, combo


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "cli"), "--n-train", "3", "--n-val", "1", "--n-test", "1", "--n-unseen", "1",
            "--size", "64"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["train"] == 3 and printed["px_per_mm"] == pytest.approx(3.0, rel=1e-12)
    assert main([str(tmp_path / "bad"), "--n-train", "0"]) == 2
    assert "--n-train 0" in capsys.readouterr().err
    with pytest.raises(UserError):
        make_dataset(tmp_path / "small", size=16)


def _groove_period(magnification: float, seed: int, size: int = 256, company: str = "Apexa") -> float:
    """The thread's period in pixels along the implant, read off a rendered image: the grey values sampled on a
    line parallel to the axis through the middle of the thread depth (left flank), detrended, and the period of the
    strongest sinusoid between 4 and 40 px (a periodogram on a 0.01 px grid)."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    pixels, drawn = render(rng, size, company, "parallel", 13.0, 5.5, magnification_sd=0.0,
                           magnification=magnification)
    assert drawn["magnification"] == magnification
    drawn_ppm = px_per_mm(size) * magnification  # px per mm of the implant itself
    cx, cy = drawn["center"]
    angle = math.radians(drawn["angle_deg"])
    offset = 0.5 * drawn["diameter_px"] - 0.5 * COMPANIES[company].depth_mm * drawn_ppm
    u = np.arange(-0.25, 0.40, 0.002) * drawn["length_px"]  # from below the collar to above the apex
    x = cx + u * math.sin(angle) - offset * math.cos(angle)
    y = cy + u * math.cos(angle) + offset * math.sin(angle)
    grey = map_coordinates(pixels.astype(np.float64), [y - 0.5, x - 0.5], order=1)
    grey = grey - np.polyval(np.polyfit(u, grey, 2), u)
    periods = np.arange(4.0, 40.0, 0.01)
    power = np.abs(np.exp(-2j * np.pi * u[None, :] / periods[:, None]) @ grey)
    return float(periods[int(np.argmax(power))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magnification_scales_the_thread_pitch(seed: int) -> None:
    """Magnification is a projection's enlargement of the whole implant: at 1.2 the groove period in pixels is
    1.2x that at 1.0 (the earlier renderer drew 13.2 px at both, only the outline grew).
    Measured (seeds 0-2, 256 px, Apexa pitch 1.1 mm -> 13.2 px): 13.21 / 15.81, 13.19 / 15.84, 13.26 / 15.87 px,
    ratios 1.197, 1.201, 1.197; the old renderer 0.998 and 1.001. Tolerance 0.02 on the ratio, 2 % on the period."""
    at_1 = _groove_period(1.0, seed)
    at_12 = _groove_period(1.2, seed)
    expected = COMPANIES["Apexa"].pitch_mm * px_per_mm(256)
    assert at_1 == pytest.approx(expected, rel=0.02)
    assert at_12 / at_1 == pytest.approx(1.2, abs=0.02)
