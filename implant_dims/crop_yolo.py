"""Cut square implant crops out of panoramic X-rays annotated with YOLO boxes.

    python -m implant_dims.crop_yolo --images DIR --labels DIR --out OUT [--class-id 2] [--context 0.15] [--size 128]

Each image in --images pairs with --labels/<stem>.txt holding one box per line, `class cx cy w h` normalised to
[0, 1] (an image without a label file has no boxes). Every box of --class-id becomes one crop: a square centred on
the box with side max(w, h) * (1 + context) in pixels, padded with black where it runs past the image border,
resized to size x size (Pillow BILINEAR), saved as OUT/images/<stem>_<line>.png. OUT/records.json lists them in the
implant_dims JSON layout with company, model_type, length and diameter null (unknown), group = the source image's
stem (one panoramic = one patient), plus "source_image", "line" (1-based) and "box" (the normalised YOLO box).
`load_records(OUT/records.json, require_labels=False)` reads it.

Pixel scale: where the panoramic has one, each crop's record carries it as "mm_per_pixel" ([row, column] mm per
crop pixel: the source spacing times side / size, since the crop is resized) and "scale_source" says where it came
from: "dicom" (the file's PixelSpacing, else ImagerPixelSpacing) or "sidecar" (a JSON file beside the image,
<image stem>.json, holding {"mm_per_pixel": x} or [row, column]). Without either the crop's mm_per_pixel is null,
a warning names the images, and predict refuses those crops unless data.assume_scale is given.

The real data set in /work/shared/data/dental_panoramic_yolo_dicle (6 panoramic JPEGs from a Dicle University
project, Roboflow export) uses class 2 = implant: checked by eye, the class-2 boxes are screw implants with
abutments. Class 1 boxes are fillings, class 3 root canal fillings, and class 0 (2 boxes) something else.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path

import numpy as np

from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write, write_json
from implant_dims.data import ImageError, dicom_spacing, is_dicom, parse_spacing, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def parse_yolo_labels(path: str | Path) -> list[tuple[int, int, float, float, float, float]]:
    """Read a YOLO label file: a list of (line number, class, cx, cy, w, h). Blank lines are ignored.
    Raises UserError naming the file and line for a malformed line."""
    path = Path(path)
    boxes = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {line_no} ({line.strip()!r})"
        if len(fields) != 5:
            raise UserError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}; fix or delete the line")
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(f) for f in fields[1:])
        except ValueError as exc:
            raise UserError(f"{where}: expected an integer class and four numbers; fix or delete the line") from exc
        if cls < 0 or not all(np.isfinite([cx, cy, w, h])) or not (0 <= cx <= 1 and 0 <= cy <= 1) \
                or not (0 < w <= 1 and 0 < h <= 1):
            raise UserError(f"{where}: values out of range (need class >= 0, cx, cy in [0, 1], w, h in (0, 1], "
                            "normalised by the image size); fix or delete the line")
        boxes.append((line_no, cls, cx, cy, w, h))
    return boxes


def source_scale(image_path: Path) -> tuple[tuple[float, float] | None, str | None]:
    """((row, column) mm per pixel, source) of a panoramic: its DICOM spacing, else its sidecar JSON
    (<stem>.json beside it, {"mm_per_pixel": ...}); (None, None) when it has neither. A sidecar that is not such
    a JSON object is a UserError naming it."""
    if is_dicom(image_path):
        spacing = dicom_spacing(image_path)
        if spacing is not None:
            return spacing, "dicom"
    sidecar = image_path.with_suffix(".json")
    if not sidecar.is_file():
        return None, None
    try:
        value = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{sidecar}: not valid JSON ({exc}); write {{\"mm_per_pixel\": <mm per pixel>}}") from exc
    spacing = parse_spacing(value.get("mm_per_pixel")) if isinstance(value, dict) else None
    if spacing is None:
        raise UserError(f"{sidecar}: expected {{\"mm_per_pixel\": <positive mm per pixel, or [row, column]>}}, "
                        f"got {json.dumps(value)[:80]}; fix it or remove the sidecar")
    return spacing, "sidecar"


def crop_side(image_shape: tuple[int, int], w: float, h: float, context: float) -> int:
    """The side in source pixels of the square crop around a normalised box."""
    rows, cols = image_shape
    return max(1, int(round(max(w * cols, h * rows) * (1.0 + context))))


def square_crop(image: np.ndarray, cx: float, cy: float, w: float, h: float, context: float, size: int) -> np.ndarray:
    """The square crop around a normalised YOLO box (see the module docstring), as uint8 [size, size]."""
    from PIL import Image

    rows, cols = image.shape
    side = crop_side(image.shape, w, h, context)
    x0 = int(round(cx * cols - side / 2))
    y0 = int(round(cy * rows - side / 2))
    crop = np.zeros((side, side), dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, cols), min(y0 + side, rows)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    if side == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def crop_folder(images_dir: str | Path, labels_dir: str | Path, out: str | Path, class_id: int = 2,
                context: float = 0.15, size: int = 128) -> dict:
    """Crop every box of `class_id`; write OUT/images/*.png and OUT/records.json. Returns a summary dict
    (boxes per class over all label files, number of crops, images without a label file)."""
    from PIL import Image

    images_dir, labels_dir, out = Path(images_dir), Path(labels_dir), Path(out)
    for what, folder in (("--images", images_dir), ("--labels", labels_dir)):
        if not folder.is_dir():
            raise UserError(f"{what} {folder}: not a folder")
    if context < 0:
        raise UserError(f"--context {context}: must be >= 0 (0.15 = 15 % margin around the box)")
    if size < 8:
        raise UserError(f"--size {size}: too small; use e.g. 128")
    image_files = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not image_files:
        raise UserError(f"--images {images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    per_class: collections.Counter = collections.Counter()
    records, unlabelled, unscaled = [], [], []
    stems = {p.stem for p in image_files}
    orphans = sorted(p.name for p in labels_dir.glob("*.txt") if p.stem not in stems)
    for image_path in image_files:
        label_path = labels_dir / f"{image_path.stem}.txt"
        if not label_path.is_file():
            unlabelled.append(image_path.name)
            continue
        boxes = parse_yolo_labels(label_path)
        per_class.update(cls for _, cls, *_ in boxes)
        wanted = [b for b in boxes if b[1] == class_id]
        if not wanted:
            continue
        try:
            image = read_image(image_path)
        except ImageError as exc:
            raise UserError(f"{exc}; fix or remove the image") from exc
        spacing, scale_source = source_scale(image_path)
        if spacing is None:
            unscaled.append(image_path.name)
        for line_no, _, cx, cy, w, h in wanted:
            crop = square_crop(image, cx, cy, w, h, context, size)
            name = f"{image_path.stem}_l{line_no:03d}.png"

            def save(tmp: Path, crop: np.ndarray = crop) -> None:
                Image.fromarray(crop).save(tmp, format="PNG")

            atomic_write(out / "images" / name, save)
            # the crop is resized from side to size pixels: each crop pixel spans side / size source pixels
            zoom = crop_side(image.shape, w, h, context) / size
            scale = None if spacing is None else [round(spacing[0] * zoom, 9), round(spacing[1] * zoom, 9)]
            records.append({"image_path": f"images/{name}", "company": None, "model_type": None, "length": None,
                            "diameter": None, "thread_type": None, "group": image_path.stem,
                            "source_image": str(image_path.resolve()), "line": line_no,
                            "box": [cx, cy, w, h], "mm_per_pixel": scale, "scale_source": scale_source})
    if not records:
        raise UserError(f"--labels {labels_dir}: no boxes of class {class_id} (boxes per class: "
                        f"{dict(sorted(per_class.items()))}); pass the implant class with --class-id")
    write_json(out / "records.json", records)
    summary = {"boxes_per_class": {str(k): v for k, v in sorted(per_class.items())}, "class_id": class_id,
               "crops": len(records), "images": len(image_files), "images_without_labels": unlabelled,
               "labels_without_images": orphans, "context": context, "size": size,
               "images_without_scale": unscaled}
    log.info("%d crops of class %d from %d images; boxes per class %s", len(records), class_id, len(image_files),
             summary["boxes_per_class"])
    if unscaled:
        log.warning("%d images have no pixel scale (no DICOM spacing, no <stem>.json sidecar), their crops' "
                    "mm_per_pixel is null: %s", len(unscaled), ", ".join(unscaled[:5]))
    if orphans:
        log.warning("%d label files have no image: %s", len(orphans), ", ".join(orphans[:5]))
    return summary


def _body(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = crop_folder(args.images, args.labels, args.out, args.class_id, args.context, args.size)
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m implant_dims.crop_yolo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of X-ray images")
    parser.add_argument("--labels", type=Path, required=True, help="folder of YOLO .txt files (same stems)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/ and records.json)")
    parser.add_argument("--class-id", type=int, default=2, help="YOLO class of the implants (2 in the Dicle set)")
    parser.add_argument("--context", type=float, default=0.15, help="margin around the box, as a fraction")
    parser.add_argument("--size", type=int, default=128, help="crop side in px")
    return parser


main = guarded_main(_body, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
