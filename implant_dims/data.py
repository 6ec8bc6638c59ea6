"""Records and images for implant_dims: the JSON record layout, image decoding (Pillow and DICOM), pixel scales
and resampling to the model's input, and the torch Dataset the training stages read.

Record layout (the original's `augmented_train.json` / `augmented_val.json`): a JSON list of objects

    {"image_path": "images/000123.png", "company": "Apexa", "model_type": "tapered",
     "length": 11.5, "diameter": 4.1, "thread_type": "v", "group": "imp000123"}

with lengths and diameters in mm. `thread_type` and `group` are optional; extra keys are ignored. Relative image
paths resolve against `image_root`, else the folder of the JSON file.

Images are read as 2-D uint8 grayscale. Millimetres are read off pixels, so every image reaches the model at one
physical scale (the config's data.mm_per_pixel): `model_input` resamples it from its own scale, taken in this order
from the DICOM header (PixelSpacing, else ImagerPixelSpacing), the record's `mm_per_pixel` field, or a scale the
user assumes (data.assume_scale), then centre-crops / pads it to the input side. An image with none of the three is
refused (`require_scale`). The training augmentations are limited to small rotations, flips and intensity changes,
which keep the scale.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from implant_dims.config import SAMPLE_FIELD_MM

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
WINDOW_PERCENTILES = (0.5, 99.5)
ROWS_SHOWN = 5  # how many row indices each skip reason lists in the summary and in errors
SCALE_SOURCES = ("dicom", "record", "assumed")  # where a record's pixel scale came from, in order of precedence
SCALE_HELP = ("give it a scale one of three ways: DICOM PixelSpacing / ImagerPixelSpacing in the file, a "
              "\"mm_per_pixel\" field in its record (records JSON), or data.assume_scale=<mm per pixel> on the "
              "command line (then written beside every prediction)")


@dataclass(frozen=True)
class ImplantRecord:
    """One implant image and what is known about it; None marks an unknown value."""

    image_path: Path  # resolved absolute path
    company: str | None  # manufacturer; None = unknown
    model_type: str | None
    length: float | None  # mm; None = unknown (real crops)
    diameter: float | None  # mm
    thread_type: str | None = None
    group: str | None = None  # e.g. patient / implant id (for grouped splits, bootstrap)
    index: int = 0  # position in the source JSON list
    mm_per_pixel: tuple[float, float] | None = None  # (row, column) pixel spacing in mm; None = unknown
    scale_source: str | None = None  # one of SCALE_SOURCES, None while the scale is unknown


class ImageError(Exception):
    """A file that cannot be read as an image; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------- images


def is_dicom(path: str | Path) -> bool:
    """True for a `.dcm`/`.dicom` file or any file carrying the DICM preamble (bytes 128-131)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def window_to_uint8(values: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Map an array linearly to uint8 so that the given low/high percentiles become 0 and 255 (clipped beyond).
    A constant image becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # InvalidDicomError, truncated files, ...
        raise ImageError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise ImageError(f"{path}: DICOM file has no pixel data (no PixelData element)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, corrupt stream, inconsistent Rows/Columns
        raise ImageError(f"{path}: cannot decode the DICOM pixel data "
                         f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}; "
                         f"{type(exc).__name__}: {exc})") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    if samples > 1 and pixels.ndim == 3:  # colour DICOM: luminance-like mean of the channels
        pixels = pixels[..., :3].mean(axis=-1)
    if pixels.ndim != 2:
        raise ImageError(f"{path}: DICOM pixel data has shape {pixels.shape}, expected a 2-D image")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    if pixels.dtype == np.uint8 and slope == 1 and intercept == 0:
        # Already display values (e.g. an 8-bit export): keep them, only undo MONOCHROME1's inversion.
        return (255 - pixels) if monochrome1 else pixels.copy()
    values = pixels.astype(np.float64) * slope + intercept
    if monochrome1:  # MONOCHROME1: low values are bright; flip so that radiopaque = bright like everywhere else
        values = -values
    return window_to_uint8(values)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    from common.images import ImageRefused, open_photo

    # common.images reads it as a photo is read everywhere: upright by its EXIF orientation tag (a lossless 90 / 180
    # degree turn or flip that keeps the pixel scale, never a resample), with the decompression-bomb guard
    try:
        im = open_photo(path).image
    except ImageRefused as exc:
        raise ImageError(str(exc)) from exc
    mode = im.mode
    if mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "PA", "RGBX"):
        if mode in ("RGBA", "LA", "PA"):  # composite onto black so transparent areas read as background
            im = im.convert("RGBA")
            black = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(black, im)
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    # 16-bit / 32-bit integer and float images: window like a DICOM
    array = np.asarray(im)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float64).mean(axis=-1)
    if array.ndim != 2:
        raise ImageError(f"{path}: image has shape {array.shape}, expected a 2-D image")
    return window_to_uint8(array)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as a 2-D uint8 grayscale array (radiopaque = bright).

    PNG / JPEG / BMP / TIFF go through Pillow, upright by their EXIF orientation tag (a lossless turn / flip; the pixel
    scale is kept): 8-bit gray is returned as is, RGB(A) is converted to gray (alpha
    composited onto black), 16-bit / 32-bit / float images are windowed by the 0.5 / 99.5 percentiles.
    DICOM (`.dcm`, or any file with the DICM preamble) goes through pydicom: the first frame of a multi-frame file,
    RescaleSlope / RescaleIntercept applied, MONOCHROME1 inverted, then windowed to uint8 by the 0.5 / 99.5
    percentiles. Exception: 8-bit pixel data without a rescale is already display values and is returned unchanged
    (inverted for MONOCHROME1), so an 8-bit image written with `sample_data.write_dicom` round-trips exactly.

    Raises ImageError (message: the file and the reason) for a missing file, a file that is not an image, a DICOM
    without pixel data, or pixel data that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return _read_dicom(path) if is_dicom(path) else _read_pillow(path)


def check_image(path: str | Path) -> str | None:
    """Cheap readability check without decoding the pixels. Returns None when the file looks like a usable image,
    else the skip reason: "missing image", "unreadable image" or "no pixel data" (a DICOM without PixelData)."""
    path = Path(path)
    if not path.is_file():
        return "missing image"
    if is_dicom(path):
        import pydicom

        try:  # defer_size: every tag is parsed but large values (the pixel data) are not read
            ds = pydicom.dcmread(path, defer_size="1 KB")
        except Exception:
            return "unreadable image"
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return "no pixel data"
        if "Rows" not in ds or "Columns" not in ds:
            return "unreadable image"
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception:
        return "unreadable image"
    return None


def parse_spacing(value: Any) -> tuple[float, float] | None:
    """A pixel spacing as (row, column) mm: one positive number (square pixels) or a pair of them (a JSON list, a
    DICOM multi-value); None when unusable (missing, empty, non-numeric, zero, negative, not finite)."""
    if value is None or isinstance(value, (bool, dict)) or (isinstance(value, str) and not value.strip()):
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value, value]
    if len(items) != 2 or any(isinstance(v, bool) for v in items):
        return None
    try:
        row, col = float(items[0]), float(items[1])
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (row, col)):
        return None
    return row, col


def dicom_spacing(path: str | Path) -> tuple[float, float] | None:
    """(row, column) mm per pixel from a DICOM header: PixelSpacing (calibrated to the patient where the modality
    does so), else ImagerPixelSpacing (at the detector); None when neither holds two positive numbers (a zero
    spacing, as some exports write, counts as none) or the header cannot be read."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = parse_spacing(ds.get(keyword))
        if spacing is not None:
            return spacing
    return None


def model_input(image: np.ndarray, mm_per_pixel: tuple[float, float] | float, target_mm_per_pixel: float,
                size: int) -> np.ndarray:
    """Resample a 2-D uint8 image from its pixel spacing (mm, (row, column) or one number) to target_mm_per_pixel
    on both axes (Pillow BILINEAR, which averages over the footprint when shrinking), centred on a size x size
    black canvas: cropped where it is larger, padded where it is smaller. An implant of L mm then always spans
    L / target_mm_per_pixel input pixels, whatever the file's resolution: the scale is what carries the
    millimetres. Black is the padding because it is the radiolucent end of the scale, never mistaken for metal.

    Only the part of the image that lands on the canvas is resampled (Pillow's source box), so a large radiograph
    or a wildly assumed scale costs no more than the canvas."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"model_input expects a 2-D image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    row_mm, col_mm = (mm_per_pixel, mm_per_pixel) if np.isscalar(mm_per_pixel) else mm_per_pixel
    spans = []  # per axis: (source start, source end, output length, canvas offset)
    for n, spacing in zip(image.shape, (row_mm, col_mm), strict=True):
        zoom = float(spacing) / target_mm_per_pixel  # output pixels per source pixel
        length = max(1, int(round(n * zoom)))
        if length <= size:  # the whole axis fits: resample it all, pad around it
            spans.append((0.0, float(n), length, (size - length) // 2))
        else:  # only the central `size` output pixels: their footprint in the source
            half = size / (2.0 * zoom)
            spans.append((n / 2.0 - half, n / 2.0 + half, size, 0))
    (top, bottom, out_h, dst_top), (left, right, out_w, dst_left) = spans
    if (top, bottom, left, right, out_h, out_w) == (0.0, image.shape[0], 0.0, image.shape[1], *image.shape):
        resampled = image
    else:
        resampled = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR,
                                                             box=(left, top, right, bottom)), dtype=np.uint8)
    out = np.zeros((size, size), dtype=np.uint8)
    out[dst_top:dst_top + out_h, dst_left:dst_left + out_w] = resampled
    return out


def default_mm_per_pixel(img_size: int) -> float:
    """The input scale when data.mm_per_pixel is 0: the sample renderer's field of view over img_size."""
    return SAMPLE_FIELD_MM / img_size


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Pad a 2-D uint8 image to a square with black (0) borders, centred, then resize the square to size x size
    (Pillow BILINEAR). Both axes are scaled by the same factor, so the image is never stretched: crops of one data
    set that share a pixel size keep sharing a pixel scale, and that scale is what encodes millimetres. Black is
    the padding because it is the radiolucent end of the scale, never mistaken for metal."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    h, w = image.shape
    side = max(h, w)
    if h != w:
        square = np.zeros((side, side), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = image
        image = square
    if side == size:
        return image.copy()
    return np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


# -------------------------------------------------------------------------------------------------- records


def _text(value: Any) -> str | None:
    """A label value as a stripped string, None for missing / empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _size(value: Any, name: str) -> tuple[float | None, str | None]:
    """Parse a size in mm. Returns (value, None) or (None, skip reason)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f"empty {name}"
    if isinstance(value, bool):
        return None, f"non-numeric {name}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"non-numeric {name}"
    if not math.isfinite(number):
        return None, f"non-finite {name}"
    if number <= 0:
        return None, f"non-positive {name}"
    return number, None


def _summarise(reasons: Mapping[str, Sequence[int]]) -> str:
    parts = []
    for reason, rows in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(str(r) for r in rows[:ROWS_SHOWN]) + (", ..." if len(rows) > ROWS_SHOWN else "")
        parts.append(f"{reason} x{len(rows)} (rows {shown})")
    return "; ".join(parts)


def load_records(json_path: str | Path, image_root: str | Path | None = None, *, require_labels: bool = True,
                 check_images: bool = True) -> tuple[list[ImplantRecord], collections.Counter]:
    """Load a JSON list of implant records, skipping unusable rows.

    Returns (records, skipped) where `skipped` counts the skipped rows by reason. Each row is skipped for its first
    problem, checked in this order:
      - "missing image_path" (no or empty image_path);
      - require_labels=True only: "empty company", "empty model_type", then for length and diameter "empty length"
        (missing, None, ""), "non-numeric length" ("abc"), "non-finite length" ("nan", inf), "non-positive length"
        (0, -3); numeric strings such as "10.5" are accepted;
      - check_images=True only: "missing image", "unreadable image" (not an image), "no pixel data" (DICOM without
        PixelData). Only headers are opened (Pillow verify; pydicom without reading the pixel values);
      - "invalid mm_per_pixel": the row has a `mm_per_pixel` that is not one positive number or a [row, column] pair
        of them (an absent or null one is no scale, not an error).
    Each record's pixel scale comes from its DICOM header (PixelSpacing, else ImagerPixelSpacing; source "dicom"),
    else from its `mm_per_pixel` (source "record"); a record with neither has mm_per_pixel None, which
    `require_scale` fills with an assumed scale or refuses.
    With require_labels=False (prediction, real crops) unknown or unparseable classes and sizes become None and only
    image problems skip a row. The skips are logged once, as a summary naming the first rows of each reason.

    Raises UserError when the file is missing, is not JSON, is not a list, holds a non-object element, or when no
    row is left after skipping.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise UserError(f"{json_path}: record file not found; pass the JSON list written by the data preparation "
                        "(e.g. python -m implant_dims.sample_data OUT writes OUT/augmented_train.json)")
    try:
        rows = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{json_path}: not valid JSON ({exc}); expected a list of image records") from exc
    if not isinstance(rows, list):
        raise UserError(f"{json_path}: expected a JSON list of image records, got a {type(rows).__name__}; "
                        "wrap the records in [ ... ]")
    root = Path(image_root) if image_root is not None else json_path.parent
    records: list[ImplantRecord] = []
    reasons: dict[str, list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{json_path}: row {i} is a {type(row).__name__}, not an object with image_path, "
                            "company, model_type, length, diameter; fix or remove that row")
        reason = None
        raw_path = _text(row.get("image_path"))
        if raw_path is None:
            reason = "missing image_path"
        company, model_type = _text(row.get("company")), _text(row.get("model_type"))
        length, length_reason = _size(row.get("length"), "length")
        diameter, diameter_reason = _size(row.get("diameter"), "diameter")
        if reason is None and require_labels:
            if company is None:
                reason = "empty company"
            elif model_type is None:
                reason = "empty model_type"
            else:
                reason = length_reason or diameter_reason
        image_path = None
        if reason is None:
            image_path = Path(raw_path).expanduser()
            if not image_path.is_absolute():
                image_path = root / image_path
            image_path = image_path.resolve()
            if check_images:
                reason = check_image(image_path)
        scale, source = None, None
        if reason is None:
            scale = dicom_spacing(image_path) if is_dicom(image_path) else None
            source = "dicom" if scale is not None else None
            if scale is None and row.get("mm_per_pixel") is not None:
                scale = parse_spacing(row.get("mm_per_pixel"))
                source = "record"
                if scale is None:
                    reason = "invalid mm_per_pixel"
        if reason is not None:
            reasons[reason].append(i)
            continue
        records.append(ImplantRecord(image_path=image_path, company=company, model_type=model_type, length=length,
                                     diameter=diameter, thread_type=_text(row.get("thread_type")),
                                     group=_text(row.get("group")), index=i, mm_per_pixel=scale,
                                     scale_source=source))
    skipped = collections.Counter({reason: len(idx) for reason, idx in reasons.items()})
    if not records:
        detail = _summarise(reasons) if reasons else "the list is empty"
        raise UserError(f"{json_path}: no usable records: all {len(rows)} rows were skipped ({detail}); "
                        "fix the labels / image paths (relative paths resolve against the JSON file's folder "
                        "unless an image root is given)")
    if reasons:
        log.warning("%s: skipped %d of %d rows: %s", json_path, sum(skipped.values()), len(rows), _summarise(reasons))
    return records, skipped


def require_scale(records: Sequence[ImplantRecord], assume_scale: float = 0.0, source: str | Path | None = None
                  ) -> list[ImplantRecord]:
    """The records with a pixel scale each: those without one get `assume_scale` (mm per pixel, source "assumed")
    when it is > 0; otherwise the first such record is refused with a UserError naming its file (and its row in
    `source`, the records file) and the three ways to give a scale."""
    if assume_scale > 0:
        return [r if r.mm_per_pixel is not None else
                dataclasses.replace(r, mm_per_pixel=(float(assume_scale), float(assume_scale)),
                                    scale_source="assumed") for r in records]
    missing = [r for r in records if r.mm_per_pixel is None]
    if missing:
        first = missing[0]
        where = f" (row {first.index} of {source})" if source is not None and Path(source).suffix == ".json" else ""
        others = f"; {len(missing) - 1} more of the {len(records)} images have none either" if len(missing) > 1 else ""
        raise UserError(f"{first.image_path}{where}: no pixel scale, so its millimetres would mean nothing{others}; "
                        f"{SCALE_HELP}")
    return list(records)


def class_list(records: Sequence[ImplantRecord], attr: str) -> list[str]:
    """Sorted unique non-None values of `attr` ("company", "model_type", "thread_type") over the records."""
    return sorted({getattr(r, attr) for r in records} - {None})


def check_class_lists(expected: Sequence[str], found: Sequence[str], what: str, checkpoint: str | Path,
                      rows: Mapping[str, Sequence[int]] | None = None) -> None:
    """Raise UserError when the data holds labels (`found`) that a classifier checkpoint does not know (`expected`).

    what: the plural noun for the message ("companies", "model types"). rows (optional): label -> row indices, to
    name where the unknown labels occur."""
    missing = sorted(set(found) - set(expected))
    if not missing:
        return
    where = ""
    if rows:
        listed = {m: list(rows.get(m, []))[:ROWS_SHOWN] for m in missing}
        where = " (rows " + "; ".join(f"{m!r}: {', '.join(map(str, r))}" for m, r in listed.items() if r) + ")"
    raise UserError(f"classifier checkpoint {checkpoint} knows {what} {sorted(expected)}; the data also has "
                    f"{missing}{where}; retrain the classifier on data that includes them or drop those rows")


# -------------------------------------------------------------------------------------------------- dataset


class ImplantDataset(torch.utils.data.Dataset):
    """Grayscale implant images at one pixel scale with class indices and (length, diameter) targets.

    Each image is resampled from its record's mm_per_pixel to `mm_per_pixel` (0 = default_mm_per_pixel(img_size))
    and centre-cropped / padded to img_size (`model_input`); a record without a scale is refused (UserError, see
    `require_scale`: callers fill in data.assume_scale before).

    __getitem__(i) returns a dict:
      image       float32 [1, H, W], normalised as (x / 255 - 0.5) / 0.5 (so in [-1, 1])
      company     int64, index into company_classes; -1 when unknown or not in the list
      model_type  int64, likewise into model_classes
      thread_type int64, likewise into thread_classes (-1 always when thread_classes is None)
      target      float32 [2], (length, diameter) in mm; nan when unknown
      index       int64, the position i in this dataset

    cache=True decodes and resamples every image once at construction into a uint8 tensor [N, H, W] (meant for
    small data sets); cache=False decodes on each access.

    augment=True applies, in this order: a rotation of up to +-5 degrees about the centre (reflection padding),
    a horizontal flip with probability 0.5, contrast (x0.8-1.2 about the mean) and brightness (+-0.08) jitter, and
    Gaussian noise (sigma up to 0.03 of full scale). Never any scaling, cropping or zoom: the pixel scale encodes
    the size. The randomness is drawn from (seed, epoch, i) alone, so the same epoch always sees the same
    augmentations, whichever worker or process loads it, and a resumed run repeats them; call set_epoch(epoch)
    before iterating each epoch (DataLoader workers copy the dataset when an iterator starts, so with
    persistent_workers=True the epoch would not reach them).
    """

    def __init__(self, records: Sequence[ImplantRecord], img_size: int, company_classes: Sequence[str],
                 model_classes: Sequence[str], thread_classes: Sequence[str] | None = None, augment: bool = False,
                 seed: int = 0, cache: bool = True, mm_per_pixel: float = 0.0) -> None:
        self.records = require_scale(records)
        self.img_size = int(img_size)
        self.mm_per_pixel = float(mm_per_pixel) if mm_per_pixel > 0 else default_mm_per_pixel(self.img_size)
        self.company_classes = list(company_classes)
        self.model_classes = list(model_classes)
        self.thread_classes = list(thread_classes) if thread_classes is not None else None
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

        def lookup(classes: Sequence[str] | None, attr: str) -> torch.Tensor:
            index = {c: k for k, c in enumerate(classes or [])}
            return torch.tensor([index.get(getattr(r, attr), -1) if classes is not None else -1
                                 for r in self.records], dtype=torch.int64)

        self._company = lookup(self.company_classes, "company")
        self._model = lookup(self.model_classes, "model_type")
        self._thread = lookup(self.thread_classes, "thread_type")
        self._targets = np.asarray([[np.nan if r.length is None else r.length,
                                     np.nan if r.diameter is None else r.diameter] for r in self.records],
                                   dtype=np.float64).reshape(len(self.records), 2)
        self._cache: torch.Tensor | None = None
        if cache:
            self._cache = torch.empty((len(self.records), self.img_size, self.img_size), dtype=torch.uint8)
            for i in range(len(self.records)):
                self._cache[i] = torch.from_numpy(self._load(i))

    def _load(self, i: int) -> np.ndarray:
        record = self.records[i]
        return model_input(read_image(record.image_path), record.mm_per_pixel, self.mm_per_pixel, self.img_size)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (no effect without augment)."""
        self.epoch = int(epoch)

    @property
    def targets(self) -> np.ndarray:
        """[N, 2] float64 (length, diameter) in mm, nan where unknown."""
        return self._targets.copy()

    def _augment(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x: float32 [1, H, W] in [0, 1]. Deterministic in (seed, epoch, i)."""
        import torch.nn.functional as F

        rng = np.random.default_rng([self.seed, self.epoch, i])
        angle = math.radians(rng.uniform(-5.0, 5.0))
        flip = rng.random() < 0.5
        contrast = rng.uniform(0.8, 1.2)
        brightness = rng.uniform(-0.08, 0.08)
        noise_sigma = rng.uniform(0.0, 0.03)
        noise_seed = int(rng.integers(0, 2**31 - 1))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
        if flip:
            x = torch.flip(x, dims=[-1])
        mean = x.mean()
        x = (x - mean) * contrast + mean + brightness
        generator = torch.Generator().manual_seed(noise_seed)
        x = x + noise_sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x.clamp(0.0, 1.0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        pixels = self._cache[i] if self._cache is not None else torch.from_numpy(self._load(i))
        x = pixels.to(torch.float32)[None] / 255.0
        if self.augment:
            x = self._augment(x, i)
        return {
            "image": (x - 0.5) / 0.5,
            "company": self._company[i],
            "model_type": self._model[i],
            "thread_type": self._thread[i],
            "target": torch.from_numpy(self._targets[i].astype(np.float32)),
            "index": torch.tensor(i, dtype=torch.int64),
        }
