"""Pixel scale through predict: every row says where its scale came from, an input without one is refused (exit 2,
one line naming the file and the three ways to give a scale), and data.assume_scale is written beside every
prediction made under it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from implant_dims import predict, train_dual
from implant_dims.data import load_records


def _args(stage_args, implant_data: Path, trained_run: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return stage_args(implant_data, trained_run.parent, trained_run.name, f"predict.input={source}",
                      f"predict.out={out}", "predict.mc_samples=0", *extra)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_rows_name_their_scale_source(trained_run, implant_data, stage_args, tmp_path):
    source = implant_data / "test.json"  # PNGs with mm_per_pixel in the record, every 8th a DICOM with PixelSpacing
    records, _ = load_records(source)
    out = tmp_path / "pred.csv"
    assert predict.main(_args(stage_args, implant_data, trained_run, source, out)) == 0
    rows = _rows(out)
    expected = ["dicom" if r.image_path.suffix == ".dcm" else "record" for r in records]
    assert [r["scale_source"] for r in rows] == expected and "dicom" in expected
    # the sample's 64 px renders are at 3 px / mm
    assert all(abs(float(r["mm_per_pixel"]) - 1 / 3) < 1e-5 for r in rows)
    assert "assumed_mm_per_pixel" not in rows[0]  # nothing was assumed


def test_predict_refuses_an_image_without_scale(trained_run, implant_data, stage_args, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, size=(40, 30), dtype=np.uint8)).save(folder / name)
    capsys.readouterr()
    out = tmp_path / "p.csv"
    assert predict.main(_args(stage_args, implant_data, trained_run, folder, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "WARNING" not in line and line.strip()]
    assert len(err) == 1, err
    assert str(folder / "a.png") in err[0] and "no pixel scale" in err[0]
    for way in ("PixelSpacing", "mm_per_pixel", "data.assume_scale="):
        assert way in err[0], err[0]
    assert not out.exists()
    # a records JSON: the row is named too; the other rows' scales are kept when a scale is assumed
    rows = [{"image_path": str(folder / "a.png"), "mm_per_pixel": 0.1}, {"image_path": str(folder / "b.png")}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    assert predict.main(_args(stage_args, implant_data, trained_run, tmp_path / "r.json", out)) == 2
    assert f"b.png (row 1 of {tmp_path / 'r.json'}): no pixel scale" in capsys.readouterr().err
    assert predict.main(_args(stage_args, implant_data, trained_run, tmp_path / "r.json", out,
                              "data.assume_scale=0.3")) == 0
    got = [(r["scale_source"], float(r["mm_per_pixel"]), float(r["assumed_mm_per_pixel"])) for r in _rows(out)]
    assert got == [("record", 0.1, 0.3), ("assumed", 0.3, 0.3)]


def test_negative_scales_are_refused_by_key(trained_run, implant_data, stage_args, tmp_path, capsys):
    for key in ("data.assume_scale", "data.mm_per_pixel"):
        capsys.readouterr()
        assert predict.main(_args(stage_args, implant_data, trained_run, implant_data / "test.json",
                                  tmp_path / "p.csv", f"{key}=-0.1")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err


def test_regressor_refuses_classifiers_trained_at_another_scale(trained_run, implant_data, stage_args, capsys):
    """The classifiers of trained_run saw 32 px inputs at the default 21.33 / 32 mm per pixel; a regressor at
    another scale would feed their frozen embeddings images they were not trained on."""
    capsys.readouterr()
    argv = stage_args(implant_data, trained_run.parent, trained_run.name, "data.mm_per_pixel=0.5",
                      "regression.out_subdir=dual_other_scale")
    assert train_dual.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.mm_per_pixel" in err[0] and "0.666667" in err[0], err
    assert not (trained_run / "dual_other_scale" / "checkpoints").exists()
