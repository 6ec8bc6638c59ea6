"""implant_dims.predict: a records JSON (PNG and DICOM), a folder with unreadable files, input errors, progress lines,
the interval columns against the validation fit, interval coverage against an oracle with known noise, and real data
(YOLO crops of panoramic X-rays, a JPEG-2000 DICOM)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from implant_dims import predict
from implant_dims.crop_yolo import crop_folder
from implant_dims.data import load_records
from implant_dims.regression import (
    fit_std_scale,
    interval_coverage,
    interval_half_width,
    make_dataset,
    regressor_from_checkpoint,
)
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
    model, meta = regressor_from_checkpoint(trained_run / "dual" / "checkpoints" / "best")
    catalogue = catalogue_rows(implant_data)
    everything = np.array(sorted(set().union(*catalogue.values())))
    unit = model.target_std.numpy().astype(np.float64)
    for row in rows:
        # the default rule (regression.snap=catalogue): the nearest size of the whole catalogue in training-std
        # units, whatever class the heads read; exact: a catalogue size is copied from catalogue.csv, not computed
        pair = (float(row["length_catalogue_mm"]), float(row["diameter_catalogue_mm"]))
        mean = np.array([float(row["length_mm"]), float(row["diameter_mm"])])
        nearest = everything[np.argmin((((everything - mean) / unit) ** 2).sum(1))]
        assert pair == tuple(nearest), row

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
                                     "predict.mc_samples=3", "data.assume_scale=0.2")) == 0
    rows = read_csv(out)
    assert sorted(Path(r["image_path"]).name for r in rows) == ["a.png", "b.png"]
    assert {(r["scale_source"], r["assumed_mm_per_pixel"]) for r in rows} == {("assumed", "0.2")}
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


def test_predict_logs_progress_and_writes_the_validation_scaled_interval(trained_run, implant_data, stage_args,
                                                                       tmp_path, capsys):
    """A progress line per batch (log_every_s=0) with the count and a rate; each interval column is mean ± z(0.9) *
    std * the std factor the run fitted on val (z = 1.6449, the two-sided 90 % normal quantile)."""
    source = implant_data / "test.json"
    n = len(load_records(source)[0])
    out = tmp_path / "pred.csv"
    capsys.readouterr()
    assert predict.main(predict_args(stage_args, implant_data, trained_run, source, out, "predict.mc_samples=4",
                                     "predict.batch_size=8", "predict.log_every_s=0", "predict.interval=0.9")) == 0
    progress = re.findall(r"predicted (\d+)/(\d+) images \(([0-9.]+) images/s\)", capsys.readouterr().err)
    assert [(int(done), int(total)) for done, total, _ in progress] == [(min(k, n), n) for k in range(8, n + 8, 8)]
    assert all(float(rate) > 0 for _, _, rate in progress)

    scale = json.loads((trained_run / "dual" / "reports" / "results_val.json").read_text())["std_scale_fitted_on_val"]
    rows = read_csv(out)
    for k, dim in enumerate(DIMS):
        mean, std = column(rows, f"{dim}_mm"), column(rows, f"{dim}_std_mm")
        assert (std > 0).all()
        # each column is rounded to 4 decimals: the std's rounding is multiplied by z * scale
        tol = 5e-5 * (2 + 1.6449 * scale[k]) + 1e-6
        np.testing.assert_allclose(column(rows, f"{dim}_high_mm") - mean, 1.6449 * std * scale[k], atol=tol, rtol=0)
        np.testing.assert_allclose(mean - column(rows, f"{dim}_low_mm"), 1.6449 * std * scale[k], atol=tol, rtol=0)


def test_interval_coverage_against_an_oracle_with_known_noise():
    """Targets = prediction + sigma * N(0, 1) with a known sigma per row and dimension. With a Monte Carlo spread equal
    to sigma the nominal interval covers its nominal share; with the spread understated 2.5x the raw 90 % interval
    covers 2 * Phi(1.6449 / 2.5) - 1 = 0.4895, and the factor fitted on one draw (val) is 2.5 and restores 90 % on an
    independent draw (test). Tolerances: 4 binomial standard deviations (n = 20000 rows per draw)."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    n = 20_000

    def draw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sigma = rng.uniform(0.05, 0.6, size=(n, 2))  # heteroscedastic: a spread per row, as MC dropout gives
        mean = rng.uniform([6.0, 3.0], [16.0, 6.0], size=(n, 2))
        return mean + sigma * rng.standard_normal((n, 2)), mean, sigma

    true, mean, sigma = draw()
    for coverage in (0.5, 0.9, 0.95):
        tol = 4 * math.sqrt(coverage * (1 - coverage) / n)  # 0.0141, 0.0085, 0.0062
        got = interval_coverage(true, mean, interval_half_width(sigma, coverage))
        assert np.abs(got - coverage).max() < tol, (coverage, got)

    understated = 2.5
    tol = 4 * math.sqrt(0.9 * 0.1 / n)
    raw = interval_coverage(true, mean, interval_half_width(sigma / understated, 0.9))
    expected = 2 * norm.cdf(norm.ppf(0.95) / understated) - 1
    assert abs(expected - 0.4895) < 1e-3 and np.abs(raw - expected).max() < 4 * math.sqrt(0.25 / n), raw

    scale = fit_std_scale(true, mean, sigma / understated, 0.9)
    # the fitted factor is a sample quantile of |Z| / z: its relative sd is about 0.6 % at n = 20000
    np.testing.assert_allclose(scale, understated, rtol=0.03)
    test_true, test_mean, test_sigma = draw()
    calibrated = interval_coverage(test_true, test_mean, interval_half_width(test_sigma / understated, 0.9, scale))
    # binomial spread of the test draw plus about as much again from the factor's own sampling error
    assert np.abs(calibrated - 0.9).max() < math.sqrt(2) * tol, calibrated


@pytest.mark.real_data
def test_predict_real_crops_and_a_jpeg2000_dicom(real_data_dir, trained_run, implant_data, stage_args, tmp_path):
    folder = real_data_dir / "dental_panoramic_yolo_dicle"
    dicom = real_data_dir / "radiographs_nema_cr" / "RG3_J2KR.dcm"
    if not (folder / "images").is_dir() or not dicom.is_file():
        pytest.skip("dental_panoramic_yolo_dicle or radiographs_nema_cr/RG3_J2KR.dcm not present")
    crop_folder(folder / "images", folder / "labels", tmp_path / "crops", class_id=2, context=0.15, size=128)
    out = tmp_path / "crops.csv"
    # neither the JPEG panoramics nor this CR states a pixel scale: each is read at an assumed one
    assert predict.main(predict_args(stage_args, implant_data, trained_run, tmp_path / "crops" / "records.json",
                                     out, "predict.mc_samples=3", "predict.snap_to_catalogue=true",
                                     "data.assume_scale=0.25")) == 0
    rows = read_csv(out)
    assert len(rows) == 6
    check_rows(rows)
    assert all(r["length_true_mm"] == "" and r["company_pred"] for r in rows)
    out = tmp_path / "dicom.csv"
    assert predict.main(predict_args(stage_args, implant_data, trained_run, dicom, out, "predict.mc_samples=0",
                                     "data.assume_scale=0.15")) == 0
    rows = read_csv(out)
    assert len(rows) == 1 and Path(rows[0]["image_path"]).name == "RG3_J2KR.dcm"
    check_rows(rows)
