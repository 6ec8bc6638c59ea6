"""The simplest honest baselines of implant length and diameter, fitted on the regressors' training split and scored
on the same val / test / unseen records, so the regressors' MAE has something to beat.

    python -m implant_dims.baselines --config configs/implant_dims/sample.yaml

  mean, median    the training targets' mean / median, whatever the image (what report_regressor also lists);
  ridge_pixels    RidgeCV (alpha by leave-one-out on train) on the standardised pixels of the image letterboxed to
                  data.img_size (the regressors' input) and then to 16 x 16;
  knn_pixels      k = 5 nearest training images (Euclidean, pixels / 255 of the same 16 x 16 images), mean target;
  caliper         measure the bright blob like a radiologist's caliper, on the regressors' input (data.img_size):
                  threshold by Otsu's method over the brighter half of the pixels (the implant is the brightest
                  class; Otsu over all pixels splits soft tissue from bone instead), keep the largest 8-connected
                  bright component (holes filled), take its extent along its principal axis (length) and across
                  it (diameter) in px, then a straight line px -> mm per dimension fitted on train;
  caliper_native  the same on the image as stored (no letterbox resize: more pixels per mm where images are large);
  caliper_catalogue  (with data.catalogue_csv) the caliper snapped to the nearest size in the whole catalogue.
A caliper image without any bright component gets the training median measurement (counted in the report).

Writes <run_dir>/baselines/results_<split>.json ({"split", "n", "baselines": {name: {length_mae, diameter_mae,
mean_mae}}, "details"}) for val and each configured held-out split (test, unseen), results.md (one table per split,
also printed), predictions_<split>.csv (every baseline's per-image prediction) and fit.json (ridge alpha, caliper line
coefficients). The study studies/implant_dims/compare.py puts them beside the regressors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from common.cli import config_main
from common.io import atomic_write_text, write_json
from common.logs import setup_logging
from implant_dims.config import ImplantConfig
from implant_dims.data import ImplantRecord, letterbox, model_input, read_image
from implant_dims.regression import load_catalogue, mae_report, snap
from implant_dims.stage_setup import load_split, optional_splits

log = logging.getLogger(__name__)
PIXELS = 16
K_NEIGHBOURS = 5
RIDGE_ALPHAS = np.logspace(-2, 5, 29)


# ------------------------------------------------------------------------------------------------------ features


def load_images(records: list[ImplantRecord], img_size: int, mm_per_pixel: float) -> tuple[list[np.ndarray], np.ndarray]:
    """(native uint8 images, [N, img_size, img_size] at mm_per_pixel as the regressors see them)."""
    native = [read_image(r.image_path) for r in records]
    return native, np.stack([model_input(img, r.mm_per_pixel, mm_per_pixel, img_size)
                             for img, r in zip(native, records, strict=True)])


def pixel_features(boxed: np.ndarray, side: int = PIXELS) -> np.ndarray:
    """[N, side * side] float pixels in [0, 1] of the letterboxed images resized (Pillow bilinear) to side x side."""
    return np.stack([letterbox(img, side).reshape(-1) for img in boxed]).astype(np.float64) / 255.0


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-range values: the level maximising the between-class variance (numpy only)."""
    hist = np.bincount(np.clip(np.rint(values), 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w - mu) ** 2 / (w * (1.0 - w))
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def measure_blob(image: np.ndarray) -> tuple[float, float]:
    """(extent along the principal axis, extent across it) in px of the largest bright component; nan without one.

    Bright = above Otsu's threshold of the pixels brighter than the median (letterbox padding, exactly 0, left
    out); components 8-connected, holes filled; extents are max - min of the pixel centres' projections + 1."""
    x = np.asarray(image, dtype=np.float64)
    content = x[x > 0] if (x > 0).any() else x.ravel()
    upper = content[content > np.median(content)]
    if upper.size == 0:
        return float("nan"), float("nan")
    mask = x > otsu_threshold(upper)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return float("nan"), float("nan")
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    blob = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(blob)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    pts -= pts.mean(axis=0)
    if len(pts) < 2:
        return 1.0, 1.0
    _, _, axes = np.linalg.svd(pts, full_matrices=False)
    along, across = pts @ axes[0], pts @ axes[1]
    return float(np.ptp(along) + 1.0), float(np.ptp(across) + 1.0)


def measure_all(images) -> np.ndarray:
    return np.array([measure_blob(img) for img in images], dtype=np.float64).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------------- fitting


class Caliper:
    """px -> mm, one straight line per dimension (least squares on train); a missing measurement takes the train
    median measurement."""

    def fit(self, px: np.ndarray, mm: np.ndarray) -> Caliper:
        ok = np.isfinite(px).all(1)
        self.fill = np.median(px[ok], axis=0)
        self.coef = [np.polyfit(px[ok, d], mm[ok, d], 1) for d in range(2)]
        return self

    def predict(self, px: np.ndarray) -> np.ndarray:
        px = np.where(np.isfinite(px), px, self.fill)
        return np.stack([np.polyval(self.coef[d], px[:, d]) for d in range(2)], axis=1)


def fit_baselines(train_y: np.ndarray, train_pix: np.ndarray, train_px: np.ndarray, train_native_px: np.ndarray,
                  catalogue: dict | None = None) -> tuple[dict[str, Callable[[dict], np.ndarray]], dict]:
    """Each baseline as predict(features of a split) -> [N, 2] mm, and what was fitted. With a catalogue, also
    `caliper_catalogue`: the caliper's measurement snapped to the nearest catalogue size of any company / model
    (the caliper reads no class, so this is its snap under either regression.snap rule)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mean, median = train_y.mean(0), np.median(train_y, 0)
    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(train_pix, train_y)
    knn = KNeighborsRegressor(n_neighbors=min(K_NEIGHBOURS, len(train_y))).fit(train_pix, train_y)
    caliper = Caliper().fit(train_px, train_y)
    native = Caliper().fit(train_native_px, train_y)
    models = {
        "mean": lambda f: np.tile(mean, (len(f["pix"]), 1)),
        "median": lambda f: np.tile(median, (len(f["pix"]), 1)),
        "ridge_pixels": lambda f: ridge.predict(f["pix"]),
        "knn_pixels": lambda f: knn.predict(f["pix"]),
        "caliper": lambda f: caliper.predict(f["px"]),
        "caliper_native": lambda f: native.predict(f["native_px"]),
    }
    if catalogue is not None:  # the caliper snapped to the nearest size anyone sells: catalogue knowledge, no classes
        scale = train_y.std(0)
        models["caliper_catalogue"] = lambda f: snap(caliper.predict(f["px"]), [(None, None)] * len(f["pix"]),
                                                     catalogue, scale)
    fit = {"train_mean": mean.tolist(), "train_median": median.tolist(),
           "ridge_alpha": float(ridge[-1].alpha_), "ridge_alphas": [float(RIDGE_ALPHAS[0]), float(RIDGE_ALPHAS[-1])],
           "knn_k": int(knn.n_neighbors), "pixels": PIXELS,
           "caliper_mm_per_px": {"length": caliper.coef[0].tolist(), "diameter": caliper.coef[1].tolist()},
           "caliper_native_mm_per_px": {"length": native.coef[0].tolist(), "diameter": native.coef[1].tolist()}}
    return models, fit


def split_features(cfg: ImplantConfig, split: str) -> tuple[list[ImplantRecord], dict]:
    records, _ = load_split(cfg, split)
    native, boxed = load_images(records, cfg.data.img_size, cfg.data.input_mm_per_pixel())
    feats = {"y": np.array([[r.length, r.diameter] for r in records], dtype=np.float64),
             "pix": pixel_features(boxed), "px": measure_all(boxed), "native_px": measure_all(native)}
    return records, feats


def table(split: str, n: int, results: dict[str, dict]) -> str:
    lines = [f"### {split} (n={n})", "", "| baseline | length MAE | diameter MAE | mean MAE |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['length_mae']:.3f} | {r['diameter_mae']:.3f} | {r['mean_mae']:.3f} |"
              for name, r in results.items()]
    return "\n".join(lines) + "\n"


def write_predictions(path, records: list[ImplantRecord], true: np.ndarray, preds: dict[str, np.ndarray]) -> None:
    """Per-image predictions of every baseline (<name>_length, <name>_diameter), which the compare study
    (studies/implant_dims/compare.py) pairs with the regressors' on the same images."""
    names = list(preds)
    lines = [",".join(["image_path", "group", "length_true", "diameter_true",
                       *[f"{n}_{d}" for n in names for d in ("length", "diameter")]])]
    for i, r in enumerate(records):
        cells = [str(r.image_path), str(r.group if r.group is not None else r.index), f"{true[i, 0]:.4f}",
                 f"{true[i, 1]:.4f}", *[f"{preds[n][i, d]:.4f}" for n in names for d in range(2)]]
        lines.append(",".join(cells))
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_baselines(cfg: ImplantConfig) -> dict[str, dict]:
    """Fit on train, score val and the held-out splits; returns {split: report} (also written, see the module)."""
    out = cfg.run.run_dir / "baselines"
    _, train = split_features(cfg, "train")
    catalogue = load_catalogue(cfg.data.catalogue_csv) if cfg.data.catalogue_csv else None
    models, fit = fit_baselines(train["y"], train["pix"], train["px"], train["native_px"], catalogue)
    fit["caliper_missing_train"] = int((~np.isfinite(train["px"]).all(1)).sum())
    reports, texts = {}, []
    for split in ["val", *optional_splits(cfg)]:
        records, feats = split_features(cfg, split)
        preds = {name: predict(feats) for name, predict in models.items()}
        results = {name: mae_report(feats["y"], pred) for name, pred in preds.items()}
        write_predictions(out / f"predictions_{split}.csv", records, feats["y"], preds)
        for name, r in results.items():
            if not all(np.isfinite(v) for v in r.values()):
                raise RuntimeError(f"baseline {name} on {split}: non-finite MAE {r}")
        details = {"caliper_missing": int((~np.isfinite(feats["px"]).all(1)).sum()),
                   "caliper_native_missing": int((~np.isfinite(feats["native_px"]).all(1)).sum())}
        reports[split] = {"split": split, "n": len(records), "baselines": results, "details": details}
        write_json(out / f"results_{split}.json", reports[split])
        texts.append(table(split, len(records), results))
        log.info("%s: %s", split, ", ".join(f"{k} {v['mean_mae']:.3f}" for k, v in results.items()))
    write_json(out / "fit.json", fit)
    text = "\n".join(texts)
    atomic_write_text(out / "results.md", text)
    print(text)
    log.info("wrote %s", out)
    return reports


def _main(cfg: ImplantConfig) -> int:
    setup_logging(None)
    run_baselines(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.baselines")

if __name__ == "__main__":
    raise SystemExit(main())
