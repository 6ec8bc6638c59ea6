"""common.images: EXIF orientation applied, large JPEGs decoded small (draft) and downscaled rather than skipped, the
decompression-bomb guard, metadata stripped losslessly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from common.images import (
    ORIENTATION,
    ImageRefused,
    declared_size,
    open_photo,
    orientation_of,
    strip_jpeg_metadata,
    strip_metadata,
)

GPS_IFD = 0x8825


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric RGB picture (JPEG keeps it closely): coarse random blocks, bilinearly upsampled."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def phone_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "PhoneMaker"
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)})
    return exif


def sideways(upright: Image.Image) -> bytes:
    """As a phone stores a portrait photo: the sensor's landscape pixels plus EXIF orientation 6 (rotate 90 CW)."""
    return jpeg(upright.transpose(Image.ROTATE_90), exif=phone_exif(6))


def test_exif_orientation_is_applied():
    upright = scene(60, 90)
    stored = sideways(upright)
    with Image.open(io.BytesIO(stored)) as raw:
        assert raw.size == (90, 60)  # what a reader that ignores EXIF sees: lying on its side
    photo = open_photo(stored)
    assert photo.image.size == (60, 90) and not photo.downscaled
    expected = np.asarray(Image.open(io.BytesIO(jpeg(upright))), np.float32)
    # two JPEG encodes of the same picture: within a few grey levels on average; a wrong turn differs by ~60
    assert np.abs(np.asarray(photo.image, np.float32) - expected).mean() < 4


def test_large_jpeg_is_decoded_small_and_downscaled_not_refused(monkeypatch):
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        scales.append(result)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = jpeg(scene(6000, 4000))  # 24 MP, as a phone takes it
    photo = open_photo(data, 256, max_pixels=50_000_000)
    assert photo.size == (6000, 4000) and photo.downscaled
    assert photo.image.size == (384, 256)  # short side 256, aspect ratio kept
    assert scales and scales[0] is not None and scales[0][1][2:] == (750, 500)  # the decoder scaled it by 1/8
    reference = scene(6000, 4000).resize((384, 256), Image.BICUBIC)
    assert np.abs(np.asarray(photo.image, np.float32) - np.asarray(reference, np.float32)).mean() < 4


def test_declared_size_beyond_the_limit_is_refused_undecoded():
    data = jpeg(scene(300, 200))
    for call in (lambda: open_photo(data, 64, max_pixels=50_000), lambda: declared_size(data, max_pixels=50_000)):
        with pytest.raises(ImageRefused, match="300 x 200 pixels declared") as info:
            call()
        assert info.value.reason == "oversized_image"
    assert declared_size(data, max_pixels=60_000) == (300, 200)
    assert open_photo(data, 64, max_pixels=60_000).image.size == (96, 64)


def test_bomb_beyond_pillows_own_limit_is_our_reason_code():
    """A PNG whose header declares 40000 x 40000 (1.6 gigapixels) in a 70-byte file: refused before decoding."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 40000, 40000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR chunk's CRC
    for call in (lambda: open_photo(bytes(data), 256), lambda: declared_size(bytes(data))):
        with pytest.raises(ImageRefused, match="40000 x 40000|exceeds limit") as info:
            call()
        assert info.value.reason == "oversized_image"


def test_garbage_and_truncated_bytes_are_corrupt_image():
    data = jpeg(scene(200, 100))
    for bad in (b"not an image", data[: len(data) // 2]):
        with pytest.raises(ImageRefused) as info:
            open_photo(bad, 64)
        assert info.value.reason == "corrupt_image"


def test_strip_metadata_drops_gps_and_keeps_pixels_and_orientation():
    data = jpeg(scene(90, 60), exif=phone_exif(6), comment=b"home address", xmp=b"<x:xmpmeta>gps</x:xmpmeta>")
    with Image.open(io.BytesIO(data)) as before:
        assert before.getexif().get_ifd(GPS_IFD) and "comment" in before.info and "xmp" in before.info
        pixels = np.asarray(before).copy()
    clean = strip_metadata(data)
    with Image.open(io.BytesIO(clean)) as after:
        exif = after.getexif()
        assert not exif.get_ifd(GPS_IFD) and dict(exif) == {ORIENTATION: 6}  # only the orientation left
        assert "comment" not in after.info and "xmp" not in after.info
        np.testing.assert_array_equal(np.asarray(after), pixels)  # lossless: the scan data is copied untouched
    assert open_photo(clean).image.size == open_photo(data).image.size == (60, 90)
    assert b"PhoneMaker" not in clean and b"home address" not in clean and len(clean) < len(data)


def test_strip_metadata_upright_jpeg_has_no_exif_left_and_is_idempotent():
    data = jpeg(scene(40, 30), exif=phone_exif(1))
    clean = strip_jpeg_metadata(data)
    with Image.open(io.BytesIO(clean)) as after:
        assert not dict(after.getexif())
    assert strip_metadata(clean) == clean and orientation_of(clean) == 1


def test_strip_metadata_png_resaved_losslessly_and_other_bytes_unchanged():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("GPS", "52.37,4.89")
    buffer = io.BytesIO()
    scene(30, 20).save(buffer, "PNG", pnginfo=info)
    clean = strip_metadata(buffer.getvalue())
    with Image.open(io.BytesIO(clean)) as after:
        assert "GPS" not in after.info
        np.testing.assert_array_equal(np.asarray(after), np.asarray(scene(30, 20)))
    assert strip_metadata(b"GIF89a not really") == b"GIF89a not really"
