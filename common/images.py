"""Photos as people take them: EXIF orientation applied, large JPEGs decoded at reduced size, metadata dropped.

    photo = open_photo(data_or_path, short_side=256)       # PIL image upright, short side <= 256 px
    photo.image, photo.downscaled                          # callers count `downscaled` for their report
    clean = strip_metadata(jpeg_bytes)                     # EXIF / GPS / XMP / IPTC / comments gone, pixels kept

A phone photo of 12-50 MP is decoded once: for JPEG with `Image.draft` (the decoder's DCT scaling by 1/2, 1/4 or
1/8, so the short side stays at least `short_side`), then resized so its short side is `short_side`. The aspect
ratio is kept; cropping to a square is the backbone transform's job (common.backbones.EvalPreprocess).
A file whose header declares more than `max_pixels` pixels (default 200 MP, beyond any camera) is refused undecoded
with reason `oversized_image`: the guard against decompression bombs. A file that does not decode is refused with
reason `corrupt_image`.
"""

from __future__ import annotations

import io
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 200_000_000
"""Declared pixels beyond which an image is refused undecoded (the largest phone sensors give ~200 MP)."""

ORIENTATION = 0x0112  # the EXIF / TIFF orientation tag


class ImageRefused(ValueError):
    """An image that is not decoded. `reason` is a short code for skip counters: oversized_image or corrupt_image."""

    def __init__(self, message: str, reason: str = "corrupt_image") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Photo:
    """An opened photo: `image` upright (EXIF orientation applied); `size` as declared in the file; `downscaled`
    when it was decoded or resized below its declared size."""

    image: Image.Image
    size: tuple[int, int]
    downscaled: bool


# timm / config names of Pillow's resampling filters
INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                 "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side` and the aspect ratio kept, the long side truncated as
    torchvision's Resize(int) truncates it (so the pixels match timm's eval transform)."""
    long = int(short_side * max(width, height) / min(width, height))
    return (short_side, long) if width <= height else (long, short_side)


@contextmanager
def _pixel_limit(max_pixels: int):
    """Pillow's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that) off while the header is
    read: the one limit in force is `max_pixels`, checked on the declared size before anything is decoded."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextmanager
def _opened(source: bytes | str | Path, max_pixels: int, name: str, action: str):
    """Pillow's image of `source` with its declared size checked against `max_pixels`; every way it can fail to
    open or `action` (read the header / decode) becomes ImageRefused naming `name` (or the path)."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image bytes")
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with _pixel_limit(max_pixels), Image.open(stream) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRefused(f"{label}: {width} x {height} pixels declared, more than the limit of "
                                   f"{max_pixels}; refused undecoded (a decompression bomb?)", "oversized_image")
            yield image
    except ImageRefused:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"{label}: {exc}", "oversized_image") from exc
    except UnidentifiedImageError as exc:
        raise ImageRefused(f"{label}: not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageRefused(f"{label}: cannot {action} ({type(exc).__name__}: {exc})") from exc


def declared_size(source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  name: str = "") -> tuple[int, int]:
    """(width, height) from the header alone, nothing decoded; ImageRefused when unreadable or above `max_pixels`."""
    with _opened(source, max_pixels, name, "read the header") as image:
        return image.size


def open_photo(source: bytes | str | Path, short_side: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               mode: str | None = None, interpolation: str = "bicubic", name: str = "") -> Photo:
    """Open `source` (encoded bytes or a path) upright and, when `short_side` is given and the photo is larger,
    with its short side reduced to `short_side` (aspect ratio kept). `mode` converts the result ("RGB", "L").
    Raises ImageRefused (reason oversized_image / corrupt_image); `name` labels the source in its message."""
    with _opened(source, max_pixels, name, "decode") as image:
        size = image.size
        if short_side and image.format == "JPEG" and min(size) >= 2 * short_side:
            # DCT scaling while decoding: both sides stay >= short_side (Pillow picks a scale of 1/2 .. 1/8)
            image.draft(image.mode if image.mode in ("RGB", "L") else None,
                        (short_side * size[0] // min(size), short_side * size[1] // min(size)))
        image.load()
        upright = ImageOps.exif_transpose(image)
    if mode is not None and upright.mode != mode:
        upright = upright.convert(mode)
    width, height = upright.size
    if short_side and min(width, height) > short_side:
        upright = upright.resize(short_side_size(width, height, short_side), INTERPOLATION[interpolation])
    downscaled = upright.size[0] * upright.size[1] < size[0] * size[1]
    return Photo(upright, size, downscaled)


# ------------------------------------------------------------------------------------------------- metadata

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# APP0 (JFIF), APP2 (ICC colour profile) and APP14 (Adobe colour transform) change how pixels read: kept.
# APP1 (EXIF with GPS, XMP), APP13 (IPTC / Photoshop), the other APPn (vendor data) and COM (comments): dropped.
_KEPT_APP = {0xE0, 0xE2, 0xEE}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def orientation_of(data: bytes) -> int:
    """The EXIF orientation (1-8) of encoded image bytes; 1 when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - no readable EXIF means upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orientation_segment(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    payload = exif.tobytes()
    if not payload.startswith(b"Exif\x00\x00"):
        payload = b"Exif\x00\x00" + payload
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def strip_jpeg_metadata(data: bytes) -> bytes:
    """JPEG bytes without EXIF / GPS / XMP / IPTC / comments, losslessly: the marker segments before the scan are
    walked and copied except APP1, APP3-APP13, APP15 and COM; the compressed scan data is copied byte for byte, so
    the pixels decode identically. An EXIF orientation other than 1 is kept as a minimal EXIF holding only that
    tag. Raises ValueError for bytes that are not a well-formed JPEG header."""
    if not is_jpeg(data):
        raise ValueError("not a JPEG (no SOI marker)")
    orientation = orientation_of(data)
    out = [data[:2]]
    pos = 2
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            out.append(data[pos:pos + 2])
            pos += 2
            continue
        if marker == _EOI:
            out.append(data[pos:])
            break
        if pos + 4 > len(data):
            raise ValueError(f"JPEG segment length cut short at byte {pos}")
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise ValueError(f"JPEG segment 0x{marker:02X} at byte {pos} runs past the end")
        if marker == _SOS:
            out.append(data[pos:])  # scan header + entropy-coded data + everything after: unchanged
            break
        dropped = marker == 0xFE or (0xE0 <= marker <= 0xEF and marker not in _KEPT_APP)
        if not dropped:
            out.append(data[pos:end])
        pos = end
    if orientation != 1:
        first = 2 + (len(out[1]) if len(out) > 1 and out[1][:2] == b"\xff\xe0" else 0)  # after JFIF APP0 if any
        joined = b"".join(out)
        return joined[:first] + _orientation_segment(orientation) + joined[first:]
    return b"".join(out)


def strip_metadata(data: bytes) -> bytes:
    """Encoded image bytes without EXIF / GPS / XMP / IPTC / comments. JPEG: losslessly (strip_jpeg_metadata,
    orientation kept). PNG: re-saved losslessly without its text / EXIF chunks, the EXIF orientation applied to the
    pixels. Any other format, or bytes that do not parse: returned unchanged (check with `is_jpeg`)."""
    if is_jpeg(data):
        try:
            return strip_jpeg_metadata(data)
        except ValueError:
            return data
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                upright = ImageOps.exif_transpose(image)
                buffer = io.BytesIO()
                upright.save(buffer, "PNG")  # no pnginfo / exif passed: none written
            return buffer.getvalue()
        except (OSError, SyntaxError, ValueError):
            return data
    return data
