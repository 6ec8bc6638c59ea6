"""The 3D Street View metadata format (Zamir et al.) and the geometry of its targets and cameras.

Each JPEG in a region's tar has a same-named `.txt` whose `d` line holds 17 numbers:

    d DatasetID TargetID PatchID StreetViewID  target_lat target_lon target_height  normal_x normal_y normal_z
      camera_lat camera_lon camera_height  distance heading pitch roll

and an optional `a` line of alignment scores. Only DatasetID is unique across tars: a building target's identity is
(DatasetID, TargetID), written `"<dataset_id>_<target_id>"`.
"""

from __future__ import annotations

import math

import numpy as np

ID_FIELDS = ("dataset_id", "target_id", "patch_id", "street_view_id")
FLOAT_FIELDS = ("target_lat", "target_lon", "target_height", "normal_x", "normal_y", "normal_z",
                "camera_lat", "camera_lon", "camera_height", "distance", "heading", "pitch", "roll")
D_FIELDS = ID_FIELDS + FLOAT_FIELDS
ALIGNMENT = "alignment"

# Skip reasons of metadata files (process_tar counts each; sample_data injects some of each).
META_MISSING_D = "metadata_missing_d_line"
META_FIELD_COUNT = "metadata_wrong_field_count"
META_NON_NUMERIC = "metadata_non_numeric"
META_NON_FINITE = "metadata_non_finite"
META_NOT_TEXT = "metadata_not_text"


class MetadataError(ValueError):
    """A metadata file that cannot be used. `reason` is one of the META_* skip reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def identity_of(dataset_id: int, target_id: int) -> str:
    """The identity key of a building target (TargetID alone repeats across tars)."""
    return f"{int(dataset_id)}_{int(target_id)}"


def format_metadata(values: dict[str, float], alignment: list[float] | None = None) -> str:
    """The `.txt` text of one image: the `d` line (ids as integers, the rest with 7 decimals) and optional `a` line."""
    parts = ["d"] + [str(int(values[f])) for f in ID_FIELDS] + [f"{float(values[f]):.7f}" for f in FLOAT_FIELDS]
    text = " ".join(parts) + "\n"
    if alignment is not None:
        text += "a " + " ".join(f"{a:.4f}" for a in alignment) + "\n"
    return text


def parse_metadata(raw: bytes) -> dict[str, object]:
    """Parse a metadata file into {field: value} (ids int, the rest float, `alignment` a list or None).

    Raises MetadataError with the skip reason: not UTF-8 text, no `d` line, a `d` line without exactly 17 values,
    a value that is not a number (or an id that is not an integer), a NaN / inf value.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MetadataError(META_NOT_TEXT, f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    d_line = a_line = None
    for line in text.splitlines():
        tokens = line.split()
        if tokens and tokens[0] == "d" and d_line is None:
            d_line = tokens[1:]
        elif tokens and tokens[0] == "a" and a_line is None:
            a_line = tokens[1:]
    if d_line is None:
        raise MetadataError(META_MISSING_D, "no line starting with 'd'")
    if len(d_line) != len(D_FIELDS):
        raise MetadataError(META_FIELD_COUNT, f"'d' line has {len(d_line)} values, expected {len(D_FIELDS)}")
    out: dict[str, object] = {}
    for name, token in zip(D_FIELDS, d_line):
        try:
            value = float(token)
        except ValueError:
            raise MetadataError(META_NON_NUMERIC, f"{name}={token!r} is not a number") from None
        if not math.isfinite(value):
            raise MetadataError(META_NON_FINITE, f"{name}={token!r}")
        if name in ID_FIELDS:
            if value != int(value):
                raise MetadataError(META_NON_NUMERIC, f"{name}={token!r} is not an integer id")
            out[name] = int(value)
        else:
            out[name] = value
    alignment = None
    if a_line is not None:
        try:
            alignment = [float(t) for t in a_line]
        except ValueError:
            raise MetadataError(META_NON_NUMERIC, f"'a' line {' '.join(a_line)!r} holds a non-number") from None
        if not all(math.isfinite(a) for a in alignment):
            raise MetadataError(META_NON_FINITE, f"'a' line {' '.join(a_line)!r}")
    out[ALIGNMENT] = alignment
    return out


EARTH_RADIUS_M = 6_371_008.8


def to_ecef(lat_deg: np.ndarray, lon_deg: np.ndarray, height_m: np.ndarray) -> np.ndarray:
    """[N] latitudes, longitudes (degrees), heights (m) -> [N, 3] Earth-centred cartesian metres (spherical Earth:
    the straight-line distance between two nearby points is their ground distance to well under 1 %)."""
    lat, lon = np.radians(np.asarray(lat_deg, float)), np.radians(np.asarray(lon_deg, float))
    r = EARTH_RADIUS_M + np.asarray(height_m, float)
    return np.stack([r * np.cos(lat) * np.cos(lon), r * np.cos(lat) * np.sin(lon), r * np.sin(lat)], axis=1)


def offset_latlon(lat0: float, lon0: float, east_m: float, north_m: float) -> tuple[float, float]:
    """The point `east_m`, `north_m` metres from (lat0, lon0) on a local flat patch."""
    lat = lat0 + math.degrees(north_m / EARTH_RADIUS_M)
    lon = lon0 + math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
    return lat, lon
