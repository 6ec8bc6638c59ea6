"""Write a synthetic implant radiograph data set in the original JSON layout.

    python -m implant_dims.sample_data data/implant_dims/sample --seed 0

Each image is an independent render of one screw implant seen side-on in bone, as a size x size grayscale PNG at
a known pixel scale (default 6.0 px/mm at 128 px, so a 16 mm implant spans 96 px). The factors:
  company     decides the thread profile (thread_type), thread pitch and depth, the collar shape, the radiopacity
              of its material and the depth / width of its internal connection (the darker screw channel);
  model_type  decides the body taper, the apex shape and the neck width;
  length / diameter come from a fixed catalogue (each company/model combination sells 12 sizes), and the implant
              is drawn at label * px_per_mm * magnification, magnification ~ 1 + N(0, 0.02) per image. The
              magnification enlarges the whole implant, as a projection does: outline, thread pitch and depth,
              collar and connection alike.
Every record carries the image's pixel spacing, "mm_per_pixel" = 1 / px_per_mm (what a detector's PixelSpacing
says: it does not know the projection's magnification), and its "magnification" (the truth, for analysis only).
Nuisances: position jitter, rotation +-6 degrees, textured bone background with a crest line and sometimes a
neighbouring root, blur, contrast / gamma and Gaussian noise.

Writes under OUT: images/NNNNNN.png, augmented_train.json, augmented_val.json, test.json (seen combinations),
unseen_test.json (three held-out company/model combinations that appear only there), catalogue.csv, README.txt and
meta.json (written last). With --dicom-every K every K-th test image is also written as an uncompressed DICOM and
its record points to the .dcm.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

LENGTHS_MM = (6.0, 8.0, 10.0, 11.5, 13.0, 16.0)
DIAMETERS_MM = (3.3, 3.75, 4.1, 4.8, 5.5)
PX_PER_MM_AT_128 = 6.0  # px/mm at size 128; scales with --size
CATALOGUE_SEED = 20240611  # the product world (catalogue) is fixed; --seed only drives the sampling and rendering
SPLIT_FILES = {"train": "augmented_train.json", "val": "augmented_val.json", "test": "test.json",
               "unseen": "unseen_test.json", "calibration": "calibration.json"}
_OWNED_IMAGE = re.compile(r"^\d{6}\.(png|dcm)$")


@dataclass(frozen=True)
class Company:
    thread_type: str  # v / square / buttress / reverse_buttress
    pitch_mm: float
    depth_mm: float  # thread depth (crest to root)
    collar: str  # polished / flared / microthread / platform_switch
    collar_mm: float  # collar height
    metal: float = 0.80  # radiopacity of the alloy / ceramic (implant brightness over bone)
    bore_frac: float = 0.38  # depth of the internal connection (the darker screw channel) as a fraction of length
    bore_width: float = 0.32  # its half-width relative to the core radius


@dataclass(frozen=True)
class ModelType:
    taper: float  # body radius shrinks by this fraction from neck to apex
    apex: str  # rounded / flat / pointed / dome
    apex_frac: float  # fraction of the length taken by the apex shape
    neck: float  # neck radius relative to the crest radius
    neck_frac: float  # fraction of the length the wider / narrower neck covers (0 = none)


COMPANIES = {
    # coarse cues too (radiopacity, connection depth), so a 64 px model can tell companies apart, not only threads
    "Apexa": Company("v", 1.1, 0.50, "polished", 2.4, metal=0.80, bore_frac=0.40, bore_width=0.30),
    "Boneline": Company("square", 1.5, 0.55, "flared", 0.9, metal=0.92, bore_frac=0.18, bore_width=0.50),
    "Corticon": Company("buttress", 2.4, 0.75, "microthread", 2.2, metal=0.66, bore_frac=0.58, bore_width=0.22),
    "Dentafix": Company("reverse_buttress", 2.0, 0.70, "platform_switch", 1.2, metal=0.86, bore_frac=0.28,
                        bore_width=0.40),
}
MODEL_TYPES = {
    "tapered": ModelType(0.35, "rounded", 0.10, 1.0, 0.0),
    "parallel": ModelType(0.0, "flat", 0.03, 1.0, 0.0),
    "conical_apex": ModelType(0.0, "pointed", 0.40, 1.0, 0.0),
    "wide_neck": ModelType(0.08, "dome", 0.0, 1.22, 0.16),
}
HELD_OUT = (("Apexa", "conical_apex"), ("Boneline", "wide_neck"), ("Corticon", "tapered"))


def px_per_mm(size: int) -> float:
    """The pixel scale of a data set rendered at `size` px."""
    return PX_PER_MM_AT_128 * size / 128.0


def combinations() -> list[tuple[str, str]]:
    return [(c, m) for c in COMPANIES for m in MODEL_TYPES]


def catalogue() -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Sizes (length, diameter) in mm each company/model combination is sold in: 4 of the 6 lengths x 3 of the 5
    diameters, drawn once from a fixed seed (the same for every data set)."""
    rng = np.random.default_rng(CATALOGUE_SEED)
    sizes = {}
    for combo in combinations():
        lengths = sorted(rng.choice(LENGTHS_MM, size=4, replace=False).tolist())
        diameters = sorted(rng.choice(DIAMETERS_MM, size=3, replace=False).tolist())
        sizes[combo] = [(float(length), float(d)) for length in lengths for d in diameters]
    return sizes


# ------------------------------------------------------------------------------------------------ rendering


def _thread_wave(phase: np.ndarray, kind: str) -> np.ndarray:
    """Thread height in [0, 1] (1 = crest) as a function of the phase in [0, 1) along one pitch."""
    if kind == "v":
        return 1.0 - np.abs(2.0 * phase - 1.0)
    if kind == "square":
        return (np.abs(phase - 0.5) < 0.25).astype(np.float32)
    if kind == "buttress":  # flat load face on top, long slope below
        return np.where(phase < 0.15, phase / 0.15, np.clip((1.0 - phase) / 0.85, 0.0, 1.0) ** 0.7)
    if kind == "reverse_buttress":
        return _thread_wave(1.0 - phase, "buttress")
    raise ValueError(kind)


def _profile(t: np.ndarray, side: np.ndarray, length_px: float, radius: float, company: Company, model: ModelType,
             ppm: float) -> tuple[np.ndarray, np.ndarray]:
    """Half-width of the implant (px) at axial position t in [0, 1] (0 = coronal top, 1 = apex tip), on the
    left (side 0) or right (side 1) edge. Returns (outer half-width with threads, core half-width)."""
    body = radius * (1.0 - model.taper * t)
    apex_start = 1.0 - model.apex_frac
    s = np.clip((t - apex_start) / max(model.apex_frac, 1e-6), 0.0, 1.0)  # 0 -> 1 through the apex region
    r_start = radius * (1.0 - model.taper * apex_start)
    if model.apex == "rounded":
        apex = r_start * np.sqrt(np.clip(1.0 - s**2, 0.0, 1.0)) * 0.6 + r_start * 0.4 * (1.0 - s)
    elif model.apex == "flat":
        apex = r_start * (1.0 - 0.25 * s)
    elif model.apex == "pointed":
        apex = r_start * (1.0 - s) + radius * 0.05
    else:  # dome: a hemisphere of the body radius
        dome_len = min(r_start / length_px, 0.4)
        sd = np.clip((t - (1.0 - dome_len)) / dome_len, 0.0, 1.0)
        apex = r_start * np.sqrt(np.clip(1.0 - sd**2, 0.0, 1.0))
    core = np.where(t > apex_start, apex, body) if model.apex != "dome" else np.minimum(body, apex)
    if model.neck_frac > 0:
        neck = (t < model.neck_frac).astype(np.float32)
        flare = radius * model.neck * (1.0 - 0.5 * np.clip(t / model.neck_frac, 0, 1) ** 3)
        core = np.where(neck > 0, np.maximum(core, flare), core)
    u_mm = t * length_px / ppm  # mm along the implant itself: ppm is the drawn px per implant mm (x magnification)
    collar_t = company.collar_mm * ppm / length_px
    in_collar = t < collar_t
    # threads: the right edge is half a pitch behind the left one (a helix seen side-on)
    phase = np.mod(u_mm / company.pitch_mm + 0.5 * side, 1.0)
    depth = company.depth_mm * ppm
    threaded = core - depth * (1.0 - _thread_wave(phase, company.thread_type))
    threaded = np.where(t > 0.985, core, threaded)  # the very tip is smooth
    if company.collar == "polished":
        collar = core * 1.0
    elif company.collar == "flared":
        collar = core * (1.0 + 0.12 * np.clip(1.0 - t / max(collar_t, 1e-6), 0, 1))
    elif company.collar == "microthread":
        micro = np.mod(u_mm / 0.3 + 0.5 * side, 1.0)
        collar = core - 0.15 * ppm * (1.0 - _thread_wave(micro, "v"))
    else:  # platform_switch: a narrower step at the top
        collar = np.where(t < collar_t * 0.6, core * 0.78, core)
    outer = np.where(in_collar, collar, threaded)
    if model.neck_frac > 0:  # a wide neck stays smooth
        outer = np.where(t < model.neck_frac, core, outer)
    return np.maximum(outer, 0.0), np.maximum(core, 1e-3)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32 [size, size] each."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance noise smooth over ~8 px at 128 px: blurred coarse noise upsampled (cheaper than a wide blur)."""
    coarse = gaussian_filter(rng.standard_normal((size // 8 + 4, size // 8 + 4), dtype=np.float32), 1.0,
                             mode="wrap")
    from PIL import Image

    side = coarse.shape[0] * 8
    fine = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR))[16:16 + size,
                                                                                             16:16 + size]
    return fine / (fine.std() + 1e-6)


def render(rng: np.random.Generator, size: int, company: str, model_type: str, length_mm: float,
           diameter_mm: float, magnification_sd: float = 0.02, magnification: float | None = None
           ) -> tuple[np.ndarray, dict]:
    """Render one implant crop; returns (uint8 [size, size], drawn geometry in px). The implant is drawn at
    label x px_per_mm x magnification, magnification ~ 1 + N(0, magnification_sd) (the draw is made either way, so
    passing `magnification` to fix it leaves the rest of the render as it would have been). Every part of the
    implant is enlarged by the magnification; the bone around it is not (it is not the object being measured)."""
    ppm = px_per_mm(size)
    scale = size / 128.0
    comp, model = COMPANIES[company], MODEL_TYPES[model_type]
    drawn = 1.0 + magnification_sd * rng.standard_normal()
    magnification = drawn if magnification is None else float(magnification)
    length_px = length_mm * ppm * magnification
    radius = 0.5 * diameter_mm * ppm * magnification
    angle = math.radians(rng.uniform(-6.0, 6.0))
    cx = size / 2 + rng.uniform(-4.0, 4.0) * scale
    cy = size / 2 + rng.uniform(-4.0, 4.0) * scale

    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u = dx * sin + dy * cos  # along the axis, towards the apex
    v = dx * cos - dy * sin  # across the axis
    t = u / length_px + 0.5
    side = (v > 0).astype(np.float32)
    # the profile's millimetre geometry (pitch, thread depth, collar, microthreads) at the magnified scale
    outer, core = _profile(np.clip(t, 0.0, 1.0), side, length_px, radius, comp, model, ppm * magnification)
    inside_axis = np.clip(np.minimum(t * length_px, (1.0 - t) * length_px) + 0.5, 0.0, 1.0)
    alpha = np.clip(outer - np.abs(v) + 0.5, 0.0, 1.0) * inside_axis

    # bone-like background: smooth density variations, trabecular texture, a gradient and the crest line
    base = rng.uniform(0.28, 0.45)
    smooth = _smooth_noise(rng, size)
    trabecular = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 1.2 * scale)
    trabecular /= trabecular.std() + 1e-8
    g_angle = rng.uniform(0, 2 * math.pi)
    gradient = ((xx - size / 2) * math.cos(g_angle) + (yy - size / 2) * math.sin(g_angle)) / size
    background = base + 0.06 * smooth + 0.035 * trabecular + rng.uniform(0.0, 0.15) * gradient
    crest = cy - 0.5 * length_px + rng.uniform(0.0, 2.0) * ppm + 2.0 * scale * np.sin(xx / (9.0 * scale))
    background = background - 0.14 * np.clip((crest - yy) / (3.0 * scale), 0.0, 1.0)
    if rng.random() < 0.6:  # a neighbouring root, partly in view at one side
        side_x = rng.choice([-1.0, 1.0])
        root_x = cx + side_x * (radius + rng.uniform(10.0, 16.0) * scale + 6.0 * scale)
        root_w = rng.uniform(5.0, 8.0) * scale
        root = np.clip(1.0 - ((xx - root_x) / root_w) ** 2, 0.0, 1.0) * np.clip((yy - crest + 4) / 6.0, 0.0, 1.0)
        background = background + rng.uniform(0.08, 0.16) * root
    # radiopaque titanium: brighter where the ray crosses more metal, a less dense internal screw channel
    chord = np.sqrt(np.clip(1.0 - (v / core) ** 2, 0.0, 1.0))
    metal = comp.metal + 0.17 * chord
    bore = (np.abs(v) < comp.bore_width * core) & (t > 0.0) & (t < comp.bore_frac)
    metal = metal - 0.14 * bore
    image = background * (1.0 - alpha) + metal * alpha
    image = gaussian_filter(image, rng.uniform(0.5, 1.0) * scale)
    gamma = rng.uniform(0.8, 1.25)
    lo, hi = rng.uniform(0.0, 0.08), rng.uniform(0.88, 1.0)
    image = lo + (hi - lo) * np.clip(image, 0.0, 1.0) ** gamma
    image = image + rng.uniform(0.01, 0.035) * rng.standard_normal((size, size))
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return pixels, {"length_px": length_px, "diameter_px": 2 * radius, "angle_deg": math.degrees(angle),
                    "center": (cx, cy), "magnification": magnification}


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_dicom(path: str | Path, array_uint8: np.ndarray | None, pixel_spacing_mm: float,
                monochrome1: bool = False) -> Path:
    """Write an 8-bit grayscale image as an uncompressed (explicit VR little endian) secondary-capture DICOM.

    array_uint8: 2-D uint8, as it should be displayed (bright = radiopaque). With monochrome1=True the file says
    MONOCHROME1 and stores 255 - array, so a reader that honours the photometric interpretation sees the same
    picture. array_uint8=None writes a header-only file without a PixelData element (for tests). PixelSpacing is
    set to pixel_spacing_mm in both directions. UIDs are derived from the file name, so the bytes are
    deterministic."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    key = path.name
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["implant_dims", key, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["implant_dims", key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["implant_dims", key, "series"])
    ds.Modality = "IO"
    ds.PatientName = "Synthetic^Implant"
    ds.PatientID = key
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    if array_uint8 is not None:
        array = np.asarray(array_uint8)
        if array.ndim != 2 or array.dtype != np.uint8:
            raise ValueError(f"write_dicom expects a 2-D uint8 array, got {array.dtype} {array.shape}")
        stored = (255 - array) if monochrome1 else array
        ds.Rows, ds.Columns = array.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------------- data set


def _assign_combos(rng: np.random.Generator, combos: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n combinations, as balanced as possible, in random order."""
    repeated = [combos[k % len(combos)] for k in range(n)]
    order = rng.permutation(n)
    return [repeated[k] for k in order]


def make_dataset(out: str | Path, n_train: int = 800, n_val: int = 200, n_test: int = 200, n_unseen: int = 150,
                 size: int = 128, seed: int = 0, dicom_every: int = 0, magnification_sd: float = 0.02,
                 n_calibration: int = 400) -> dict:
    """Render and write the data set under `out`; returns the meta (also written to out/meta.json).

    The calibration split is drawn last, so adding or resizing it leaves every image and record of the other
    splits as they were."""
    counts = {"train": n_train, "val": n_val, "test": n_test, "unseen": n_unseen, "calibration": n_calibration}
    for split, n in counts.items():
        if n < 0:
            raise UserError(f"--n-{split} {n}: must be >= 0")
    if n_train < 1:
        raise UserError(f"--n-train {n_train}: need at least one training image")
    if size < 48:
        raise UserError(f"--size {size}: too small to draw an implant; use 48 or more (default 128)")
    if not 0 <= magnification_sd <= 0.2:
        raise UserError(f"--magnification-sd {magnification_sd}: use a value in [0, 0.2] (default 0.02)")
    if dicom_every < 0:
        raise UserError(f"--dicom-every {dicom_every}: must be >= 0 (0 = no DICOM files)")
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.iterdir():  # files of a previous run that this run may not overwrite
        if _OWNED_IMAGE.match(stale.name):
            stale.unlink()
    ppm = px_per_mm(size)
    sizes = catalogue()
    seen = [c for c in combinations() if c not in HELD_OUT]
    plan_rng = np.random.default_rng([seed, 0])
    image_id = 0
    splits: dict[str, list[dict]] = {}
    n_dicom = 0
    for split, n in counts.items():
        combos = _assign_combos(plan_rng, list(HELD_OUT) if split == "unseen" else seen, n)
        rows = []
        for j, (company, model_type) in enumerate(combos):
            length, diameter = sizes[(company, model_type)][int(plan_rng.integers(len(sizes[(company, model_type)])))]
            rng = np.random.default_rng([seed, 1, image_id])
            pixels, drawn = render(rng, size, company, model_type, length, diameter, magnification_sd)
            name = f"{image_id:06d}"
            (images / f"{name}.png").write_bytes(png_bytes(pixels))
            image_path = f"images/{name}.png"
            if split == "test" and dicom_every > 0 and (j + 1) % dicom_every == 0:
                write_dicom(images / f"{name}.dcm", pixels, 1.0 / ppm)
                image_path = f"images/{name}.dcm"
                n_dicom += 1
            rows.append({"image_path": image_path, "company": company, "model_type": model_type, "length": length,
                         "diameter": diameter, "thread_type": COMPANIES[company].thread_type,
                         "group": f"imp{image_id:06d}", "mm_per_pixel": 1.0 / ppm,
                         "magnification": round(float(drawn["magnification"]), 6)})
            image_id += 1
        splits[split] = rows
        atomic_write_text(out / SPLIT_FILES[split], json.dumps(rows, indent=1) + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["company", "model_type", "length", "diameter"])
    for (company, model_type), combo_sizes in sizes.items():
        for length, diameter in combo_sizes:
            writer.writerow([company, model_type, length, diameter])
    atomic_write_text(out / "catalogue.csv", buf.getvalue())
    atomic_write_text(out / "README.txt", _readme(size, ppm, magnification_sd))
    meta = {
        "seed": seed, "size": size, "px_per_mm": ppm, "mm_per_px": 1.0 / ppm, "mm_per_pixel": 1.0 / ppm,
        "magnification_sd": magnification_sd,
        "companies": {name: asdict(c) for name, c in COMPANIES.items()},
        "model_types": {name: asdict(m) for name, m in MODEL_TYPES.items()},
        "lengths_mm": list(LENGTHS_MM), "diameters_mm": list(DIAMETERS_MM),
        "held_out_combinations": [list(c) for c in HELD_OUT],
        "seen_combinations": [list(c) for c in seen],
        "files": dict(SPLIT_FILES),
        "counts": {split: len(rows) for split, rows in splits.items()},
        "dicom_every": dicom_every, "n_dicom": n_dicom,
    }
    write_json(out / "meta.json", meta)
    return meta


def _readme(size: int, ppm: float, magnification_sd: float = 0.02) -> str:
    held = ", ".join(f"{c}/{m}" for c, m in HELD_OUT)
    return (
        f"Synthetic dental implant radiograph crops ({size}x{size} px grayscale PNG, {ppm:g} px/mm, so 1 px = "
        f"{1 / ppm:.4g} mm; written by python -m implant_dims.sample_data). Each image shows one screw implant "
        "side-on in a bone-like background. The manufacturer (company: Apexa, Boneline, Corticon, Dentafix) sets "
        "the thread profile (thread_type v / square / buttress / reverse_buttress), the thread pitch and depth and "
        "the collar (polished / flared / microthread / platform switch); the model type (tapered, parallel, "
        "conical_apex, wide_neck) sets the body taper, the apex (rounded / flat / pointed / dome) and the neck. "
        "Length and diameter labels (mm) are catalogue sizes (catalogue.csv); the implant is drawn at label x "
        f"px_per_mm x a per-image magnification 1 + N(0, {magnification_sd:g}) that enlarges all of it (outline, "
        "thread pitch and depth, collar, connection), with position jitter, rotation up to 6 degrees, "
        "blur, contrast changes and noise. Every record holds mm_per_pixel (the image's pixel spacing, as a "
        "detector would state it, without the magnification) and magnification (the truth, for analysis). "
        "augmented_train.json, augmented_val.json and test.json hold the seen "
        f"company/model combinations; unseen_test.json holds only the held-out combinations ({held}). "
        "meta.json lists the factors, counts and seed.\n"
    )


def _body(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = make_dataset(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                        n_unseen=args.n_unseen, size=args.size, seed=args.seed, dicom_every=args.dicom_every,
                        magnification_sd=args.magnification_sd, n_calibration=args.n_calibration)
    print(json.dumps({"out": str(args.out), "counts": meta["counts"], "px_per_mm": meta["px_per_mm"],
                      "held_out": meta["held_out_combinations"], "n_dicom": meta["n_dicom"]}))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m implant_dims.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-unseen", type=int, default=150, help="images of the held-out combinations")
    parser.add_argument("--n-calibration", type=int, default=400,
                        help="seen-combination images used by nothing but the out-of-domain guard's threshold "
                             "(calibration.json; 0 = none)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (pixel scale 6 px/mm at 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magnification-sd", type=float, default=0.02,
                        help="per-image magnification spread (radiographic projection): 0.02 near-fixed scale, "
                             "~0.08 like panoramic radiographs, where a caliper needs a reference of known size")
    parser.add_argument("--dicom-every", type=int, default=0,
                        help="K > 0: every K-th test image is also written as DICOM and its record points to it")
    return parser


main = guarded_main(_body, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
