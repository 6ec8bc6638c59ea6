"""implant_dims.predict: a records JSON (PNG and DICOM), a folder with unreadable files, input errors, and real data
(YOLO crops of panoramic X-rays, a JPEG-2000 DICOM)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from implant_dims import predict
from implant_dims.crop_yolo import crop_folder
from implant_dims.data import load_records
from implant_dims.regression import make_dataset, regressor_from_checkpoint
from implant_dims.sample_data import write_dicom

DIMS = ("length", "diameter")


def predict_args(stage_args, implant_data: Path, trained_run: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return stage_args(implant_data, trained_run.parent, trained_run.name, f"predict.input={source}",
                      f"predict.out={out}", *extra)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows])


def catalogue_rows(implant_data: Path) -> dict[tuple[str, str], set[tuple[float, float]]]:
    out: dict[tuple[str, str], set[tuple[float, float]]] = {}
    for row in read_csv(implant_data / "catalogue.csv"):
        out.setdefault((row["company"], row["model_type"]), set()).add((float(row["length"]),
                                                                         float(row["diameter"])))
    return out


def check_rows(rows: list[dict[str, str]]) -> None:
    for dim in DIMS:
        mean, std = column(rows, f"{dim}_mm"), column(rows, f"{dim}_std_mm")
        low, high = column(rows, f"{dim}_low_mm"), column(rows, f"{dim}_high_mm")
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (mean > 0).all()
        assert (std >= 0).all() and (low <= mean).all() and (mean <= high).all()


@pytest.mark.parametrize("mc_samples", [0, 4])
def test_predict_records_json_with_dicoms_and_catalogue(trained_run, implant_data, stage_args, tmp_path, mc_samples):
    source = implant_data / "test.json"
    records, _ = load_records(source)
    assert any(r.image_path.suffix == ".dcm" for r in records)  # dicom_every=8
    out = tmp_path / "pred.csv"
    assert predict.main(predict_args(stage_args, implant_data, trained_run, source, out,
                                     f"predict.mc_samples={mc_samples}", "predict.snap_to_catalogue=true")) == 0
    rows = read_csv(out)
    assert len(rows) == len(records)
    assert [Path(r["image_path"]) for r in rows] == [r.image_path for r in records]
    check_rows(rows)
    assert column(rows, "length_true_mm").tolist() == [r.length for r in records]  # exact: copied labels
    catalogue = catalogue_rows(implant_data)
    everything = set().union(*catalogue.values())
    for row in rows:
        # exact: a catalogue size is copied from catalogue.csv, not computed
        pair = (float(row["length_catalogue_mm"]), float(row["diameter_catalogue_mm"]))
        assert pair in catalogue.get((row["company_pred"], row["model_type_pred"]), everything), row

    model, meta = regressor_from_checkpoint(trained_run / "dual" / "checkpoints" / "best")
    assert {r["company_pred"] for r in rows} <= set(meta["embedders"]["company"]["classes"])
    dataset = make_dataset(records, meta, int(meta["img_size"]))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        direct = model(images)["pred_mm"].numpy()
    got = np.stack([column(rows, "length_mm"), column(rows, "diameter_mm")], axis=1)
    if mc_samples == 0:  # one deterministic pass: exactly the regressor in eval mode
        np.testing.assert_allclose(got, direct, atol=1e-4, rtol=0)
        assert (column(rows, "length_std_mm") == 0).all()  # exact: one pass writes a literal 0
    else:  # dropout sampling moves the mean a little and gives a spread
        assert (column(rows, "length_std_mm") > 0).any() and (column(rows, "length_low_mm") < got[:, 0]).any()
        assert np.abs(got - direct).max() < 1.0


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(40, 30), dtype=np.uint8)).save(path)
    return path


def test_predict_folder_skips_unreadable_files_and_says_so(trained_run, implant_data, stage_args, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    _png(folder / "a.png", 1)
    _png(folder / "b.png", 2)
    write_dicom(folder / "empty.dcm", None, 0.1)
    (folder / "x.png").write_text("not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image suffix\n")
    out = tmp_path / "pred.csv"
    capsys.readouterr()
    assert predict.main(predict_args(stage_args, implant_data, trained_run, folder, out,
                                     "predict.mc_samples=3")) == 0
    rows = read_csv(out)
    assert sorted(Path(r["image_path"]).name for r in rows) == ["a.png", "b.png"]
    check_rows(rows)
    assert all(r["length_true_mm"] == "" for r in rows)
    err = capsys.readouterr().err
    assert "no pixel data: empty.dcm" in err and "unreadable image: x.png" in err, err
    assert "wrote 2 predictions" in err


def test_predict_folder_of_bad_files_exits_2_with_one_line(trained_run, implant_data, stage_args, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_dicom(folder / "empty.dcm", None, 0.1)
    (folder / "x.png").write_text("not an image\n")
    capsys.readouterr()
    assert predict.main(predict_args(stage_args, implant_data, trained_run, folder, tmp_path / "p.csv")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "WARNING" not in line and line.strip()]
    assert len(err) == 1, err
    assert str(folder) in err[0] and "empty.dcm" in err[0] and "x.png" in err[0], err[0]
    assert not (tmp_path / "p.csv").exists()


def test_predict_missing_input_exits_2(trained_run, implant_data, stage_args, tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    capsys.readouterr()
    assert predict.main(predict_args(stage_args, implant_data, trained_run, missing, tmp_path / "p.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "predict.input" in err[0], err


@pytest.mark.real_data
def test_predict_real_crops_and_a_jpeg2000_dicom(real_data_dir, trained_run, implant_data, stage_args, tmp_path):
    folder = real_data_dir / "dental_panoramic_yolo_dicle"
    dicom = real_data_dir / "radiographs_nema_cr" / "RG3_J2KR.dcm"
    if not (folder / "images").is_dir() or not dicom.is_file():
        pytest.skip("dental_panoramic_yolo_dicle or radiographs_nema_cr/RG3_J2KR.dcm not present")
    crop_folder(folder / "images", folder / "labels", tmp_path / "crops", class_id=2, context=0.15, size=128)
    out = tmp_path / "crops.csv"
    assert predict.main(predict_args(stage_args, implant_data, trained_run, tmp_path / "crops" / "records.json",
                                     out, "predict.mc_samples=3", "predict.snap_to_catalogue=true")) == 0
    rows = read_csv(out)
    assert len(rows) == 6
    check_rows(rows)
    assert all(r["length_true_mm"] == "" and r["company_pred"] for r in rows)
    out = tmp_path / "dicom.csv"
    assert predict.main(predict_args(stage_args, implant_data, trained_run, dicom, out, "predict.mc_samples=0")) == 0
    rows = read_csv(out)
    assert len(rows) == 1 and Path(rows[0]["image_path"]).name == "RG3_J2KR.dcm"
    check_rows(rows)
