"""Write 3D Street View style tar shards of rendered building facades, with known traps.

    python -m building_embed.sample_data data/building_embed/sample --seed 0

Writes OUT/tars/region_<k>.tar (one region and DatasetID each, 96 px JPEGs + same-named .txt metadata) and
OUT/manifest.json (what was written and every trap injected, with counts that process_tar must reproduce).

What a correct pipeline can learn and a broken one cannot:
- Each identity (DatasetID, TargetID) is a facade drawn from its own parameters (wall and window colours, window
  grid, roof shape, door, sign stripe), seen from several camera positions (shift and zoom follow the camera's
  distance and heading), under different lighting, sometimes partly hidden by a tree or a car.
- TargetIDs restart at 1 in every tar, so keying on TargetID alone merges unrelated buildings.
- Some targets stand within a few metres of each other (one pair across two tars): a place split keeps them together.
- Exact duplicates (same bytes, another file name) and near duplicates (re-encoded, slightly brighter) of some views;
  two views copied under a far-away identity of another tar (a mislabelled copy): dedup and the leak audit must
  keep every such pair inside one split.
- Corrupt members: truncated JPEGs, metadata with a missing field, a non-numeric field, no `d` line, an image with
  no metadata, a `../` path, an absolute path and a symlink.
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from building_embed.streetview import (
    META_FIELD_COUNT,
    META_MISSING_D,
    META_NON_NUMERIC,
    format_metadata,
    identity_of,
    offset_latlon,
)
from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write, write_json

# Skip reasons process_tar reports for members it refuses; sample_data injects some of each.
UNSAFE_PATH = "unsafe_path"
LINK = "link"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_WITHOUT_METADATA = "image_without_metadata"
METADATA_WITHOUT_IMAGE = "metadata_without_image"

REGION_ORIGINS = ((40.7410, -73.9897), (40.7420, -73.9880), (48.8566, 2.3522))
"""Region centres: regions 0 and 1 overlap (a target of region 1 stands next to one of region 0), region 2 is far."""
TARGET_SPACING_M = 90.0
CLOSE_PAIR_M = 12.0


def _facade_params(rng: np.random.Generator) -> dict:
    wall = rng.integers(60, 230, size=3)
    return {
        "wall": tuple(int(v) for v in wall),
        "window": tuple(int(v) for v in rng.integers(0, 255, size=3)),
        "frame": tuple(int(v) for v in 255 - wall // 2),
        "rows": int(rng.integers(2, 6)),
        "cols": int(rng.integers(2, 7)),
        "roof": str(rng.choice(["flat", "gable", "stepped"])),
        "roof_colour": tuple(int(v) for v in rng.integers(20, 160, size=3)),
        "door_col": float(rng.uniform(0.2, 0.8)),
        "stripe": tuple(int(v) for v in rng.integers(0, 255, size=3)),
        "stripe_row": int(rng.integers(0, 3)),
        "height_frac": float(rng.uniform(0.55, 0.85)),
    }


def render_facade(params: dict, view: dict, size: int = 96) -> Image.Image:
    """Draw one view of a facade. `view`: shift (fraction of width), zoom, brightness, tint, occluder, roll."""
    big = size * 2
    sky = tuple(int(c) for c in np.clip(np.array([150, 190, 235]) * view["brightness"], 0, 255))
    img = Image.new("RGB", (big, big), sky)
    draw = ImageDraw.Draw(img)
    zoom, cx = view["zoom"], big * (0.5 + view["shift"])
    width, height = big * 0.7 * zoom, big * params["height_frac"] * zoom
    left, right, ground = cx - width / 2, cx + width / 2, big * 0.92
    top = ground - height
    draw.rectangle([0, ground, big, big], fill=(90, 90, 90))
    draw.rectangle([left, top, right, ground], fill=params["wall"])
    if params["roof"] == "gable":
        draw.polygon([(left - 4, top), (right + 4, top), (cx, top - height * 0.3)], fill=params["roof_colour"])
    elif params["roof"] == "stepped":
        draw.rectangle([left + width * 0.2, top - height * 0.15, right - width * 0.2, top], fill=params["roof_colour"])
    else:
        draw.rectangle([left - 3, top - 5, right + 3, top], fill=params["roof_colour"])
    rows, cols = params["rows"], params["cols"]
    cell_w, cell_h = width / cols, (height * 0.8) / rows
    for r in range(rows):
        for c in range(cols):
            x0, y0 = left + c * cell_w + cell_w * 0.2, top + r * cell_h + cell_h * 0.2
            draw.rectangle([x0 - 2, y0 - 2, x0 + cell_w * 0.6 + 2, y0 + cell_h * 0.55 + 2], fill=params["frame"])
            draw.rectangle([x0, y0, x0 + cell_w * 0.6, y0 + cell_h * 0.55], fill=params["window"])
        if r == params["stripe_row"]:
            y = top + r * cell_h + cell_h * 0.85
            draw.rectangle([left, y, right, y + cell_h * 0.12], fill=params["stripe"])
    door_x = left + width * params["door_col"]
    draw.rectangle([door_x - width * 0.06, ground - height * 0.18, door_x + width * 0.06, ground], fill=(60, 35, 20))
    kind = view["occluder"]
    if kind == "tree":
        ox = big * view["occluder_x"]
        draw.rectangle([ox - 4, ground - big * 0.25, ox + 4, ground], fill=(80, 50, 20))
        draw.ellipse([ox - big * 0.16, ground - big * 0.55, ox + big * 0.16, ground - big * 0.2], fill=(40, 110, 40))
    elif kind == "car":
        ox = big * view["occluder_x"]
        draw.rectangle([ox - big * 0.18, ground - big * 0.14, ox + big * 0.18, ground], fill=view["car_colour"])
    img = img.rotate(view["roll"], resample=Image.BILINEAR, fillcolor=sky)
    img = ImageEnhance.Brightness(img).enhance(view["brightness"])
    tint = Image.new("RGB", img.size, view["tint"])
    img = Image.blend(img, tint, 0.12)
    return img.resize((size, size), Image.LANCZOS)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_600_000_000  # fixed: the same seed gives byte-identical tars
    tar.addfile(info, io.BytesIO(data))


def make_dataset(out_dir: str | Path, n_regions: int = 3, targets_per_region: int = 14, views_per_target: int = 6,
                 image_size: int = 96, seed: int = 0) -> dict:
    """Write the tars and the manifest. Returns the manifest (also OUT/manifest.json)."""
    if not 1 <= n_regions <= len(REGION_ORIGINS):
        raise UserError(f"--regions {n_regions}: expected 1 to {len(REGION_ORIGINS)}")
    # The traps of one region use targets up to 6 and 3 views; the cross-region copies take view index 3 of region
    # 0's targets 6 and 7 and file them under targets 8 and 9 of the other regions.
    need_targets, need_views = (9, 4) if n_regions > 1 else (6, 3)
    if targets_per_region < need_targets or views_per_target < need_views:
        raise UserError(f"--targets {targets_per_region} --views {views_per_target}: {n_regions} region(s) need at least "
                        f"{need_targets} targets per region and {need_views} views per target (the injected traps use "
                        f"them)")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    skips: Counter[str] = Counter()
    near_duplicates, exact_duplicates, cross_identity_copies, close_pairs = [], [], [], []
    n_valid = 0
    region0_views: dict = {}
    identities: dict[str, dict] = {}
    for region in range(n_regions):
        dataset_id = 101 + region
        lat0, lon0 = REGION_ORIGINS[region]
        members: list[tuple[str, bytes]] = []
        rendered: dict[tuple[int, int], tuple[bytes, dict]] = {}
        for target_id in range(1, targets_per_region + 1):
            params = _facade_params(rng)
            east = (target_id - 1) * TARGET_SPACING_M
            if target_id % 5 == 0:  # a neighbour building a few metres from the previous target: one place
                east = (target_id - 2) * TARGET_SPACING_M + CLOSE_PAIR_M
                close_pairs.append([identity_of(dataset_id, target_id - 1), identity_of(dataset_id, target_id)])
            north = 0.0
            if region == 1 and target_id == 1:  # stands 10 m from region 0's target 3 (the regions overlap)
                t_lat, t_lon = offset_latlon(*REGION_ORIGINS[0], 2 * TARGET_SPACING_M + 10.0, 0.0)
                close_pairs.append([identity_of(101, 3), identity_of(dataset_id, 1)])
            else:
                t_lat, t_lon = offset_latlon(lat0, lon0, east, north)
            height = float(rng.uniform(5, 30))
            identities[identity_of(dataset_id, target_id)] = {"tar": f"region_{region}.tar", "lat": t_lat,
                                                              "lon": t_lon, "roof": params["roof"]}
            for view in range(views_per_target):
                distance = float(rng.uniform(8, 20))
                heading = float(rng.uniform(-60, 60))
                cam_lat, cam_lon = offset_latlon(t_lat, t_lon, distance * math.sin(math.radians(heading)),
                                                 -distance * math.cos(math.radians(heading)))
                view_params = {
                    "shift": heading / 400.0, "zoom": float(np.clip(14.0 / distance, 0.75, 1.25)),
                    "brightness": float(rng.uniform(0.6, 1.3)), "roll": float(rng.uniform(-4, 4)),
                    "tint": tuple(int(v) for v in rng.integers(0, 255, size=3)),
                    "occluder": str(rng.choice(["none", "none", "tree", "car"])),
                    "occluder_x": float(rng.uniform(0.2, 0.8)),
                    "car_colour": tuple(int(v) for v in rng.integers(0, 255, size=3)),
                }
                image = render_facade(params, view_params, image_size)
                meta = {"dataset_id": dataset_id, "target_id": target_id, "patch_id": target_id * 100 + view,
                        "street_view_id": view, "target_lat": t_lat, "target_lon": t_lon, "target_height": height,
                        "normal_x": 0.0, "normal_y": -1.0, "normal_z": 0.0, "camera_lat": cam_lat,
                        "camera_lon": cam_lon, "camera_height": 2.5, "distance": distance, "heading": heading,
                        "pitch": float(rng.uniform(-5, 10)), "roll": view_params["roll"]}
                alignment = [float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 1.0))] if view % 2 else None
                stem = f"{dataset_id:04d}_{target_id:07d}_{meta['patch_id']:07d}_{view:03d}"
                data = jpeg_bytes(image)
                rendered[(target_id, view)] = (data, meta)
                members += [(f"{stem}.jpg", data), (f"{stem}.txt", format_metadata(meta, alignment).encode())]
                n_valid += 1
                if view == 1 and target_id % 4 == 1:  # an exact duplicate under another street-view id
                    dup_meta = dict(meta, street_view_id=900 + view)
                    dup_stem = f"{stem}_dup"
                    members += [(f"{dup_stem}.jpg", data), (f"{dup_stem}.txt", format_metadata(dup_meta).encode())]
                    exact_duplicates.append([f"{stem}.jpg", f"{dup_stem}.jpg"])
                    n_valid += 1
                if view == 2 and target_id % 4 == 2:  # a near duplicate: brighter, re-encoded at lower quality
                    near = jpeg_bytes(ImageEnhance.Brightness(image).enhance(1.04), quality=70)
                    near_stem = f"{stem}_near"
                    members += [(f"{near_stem}.jpg", near),
                                (f"{near_stem}.txt", format_metadata(dict(meta, street_view_id=950)).encode())]
                    near_duplicates.append([f"{stem}.jpg", f"{near_stem}.jpg"])
                    n_valid += 1
        if region == 0:
            region0_views = rendered
        tar_path = out / "tars" / f"region_{region}.tar"
        members += _corrupt_members(dataset_id, rendered, skips, region)
        if region == n_regions - 1 and region > 0:  # views of region 0 copied under this region's identities
            members += _cross_identity_copies(dataset_id, region0_views, cross_identity_copies)
            n_valid += len(cross_identity_copies)

        def write_tar(tmp: Path, members=members, region=region) -> None:
            with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
                for name, data in members:
                    _add(tar, name, data)
                if region == 0:  # a symlink member pointing outside: never followed, never extracted
                    link = tarfile.TarInfo("0101_link.jpg")
                    link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "/etc/passwd", 1_600_000_000
                    tar.addfile(link)
                    skips[LINK] += 1
        atomic_write(tar_path, write_tar)
    manifest = {
        "seed": seed, "image_size": image_size, "n_regions": n_regions, "targets_per_region": targets_per_region,
        "views_per_target": views_per_target, "n_identities": len(identities), "n_valid_images": n_valid,
        "expected_skips": dict(sorted(skips.items())), "exact_duplicates": exact_duplicates,
        "near_duplicates": near_duplicates, "cross_identity_copies": cross_identity_copies,
        "close_pairs": close_pairs, "identities": identities,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _corrupt_members(dataset_id: int, rendered: dict, skips: Counter, region: int) -> list[tuple[str, bytes]]:
    """Members process_tar must skip, each counted under its reason in `skips`."""
    (data, meta), (data2, meta2) = rendered[(1, 0)], rendered[(2, 0)]
    members = []
    truncated = data[: len(data) // 2]
    members += [(f"bad_{dataset_id}_trunc.jpg", truncated), (f"bad_{dataset_id}_trunc.txt",
                                                              format_metadata(meta).encode())]
    skips[CORRUPT_IMAGE] += 1
    missing = format_metadata(meta).split()
    members += [(f"bad_{dataset_id}_short.jpg", data2),
                (f"bad_{dataset_id}_short.txt", (" ".join(missing[:-1]) + "\n").encode())]
    skips[META_FIELD_COUNT] += 1
    if region == 0:
        tokens = format_metadata(meta2).split()
        tokens[5] = "north"  # target_lat
        members += [(f"bad_{dataset_id}_nan.jpg", data2), (f"bad_{dataset_id}_nan.txt", (" ".join(tokens)).encode())]
        skips[META_NON_NUMERIC] += 1
        members += [(f"bad_{dataset_id}_nod.jpg", data2), (f"bad_{dataset_id}_nod.txt", b"a 0.5 0.7\n")]
        skips[META_MISSING_D] += 1
        members += [(f"bad_{dataset_id}_orphan.jpg", data2)]
        skips[IMAGE_WITHOUT_METADATA] += 1
        members += [(f"bad_{dataset_id}_lonely.txt", format_metadata(meta2).encode())]
        skips[METADATA_WITHOUT_IMAGE] += 1
        members += [("../escape.jpg", data2), ("../escape.txt", format_metadata(meta2).encode()),
                    ("/tmp/building_embed_absolute.jpg", data2)]
        skips[UNSAFE_PATH] += 3
    if region == 1:
        members += [(f"bad_{dataset_id}_trunc2.jpg", data2[:300]),
                    (f"bad_{dataset_id}_trunc2.txt", format_metadata(meta2).encode())]
        skips[CORRUPT_IMAGE] += 1
    return members


def _cross_identity_copies(dataset_id: int, source_views: dict, record: list) -> list[tuple[str, bytes]]:
    """Two views of region 0's targets 6 and 7, copied under this region's targets 8 and 9 (far away)."""
    members = []
    for source_target, target_id in ((6, 8), (7, 9)):
        data, meta = source_views[(source_target, 3)]
        copy_meta = dict(meta, dataset_id=dataset_id, target_id=target_id, street_view_id=990)
        stem = f"{dataset_id:04d}_{target_id:07d}_copy"
        members += [(f"{stem}.jpg", data), (f"{stem}.txt", format_metadata(copy_meta).encode())]
        record.append([identity_of(101, source_target), identity_of(dataset_id, target_id)])
    return members


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m building_embed.sample_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write tars/ and manifest.json into")
    parser.add_argument("--regions", type=int, default=3, help="tars (regions), 1 to 3")
    parser.add_argument("--targets", type=int, default=14, help="targets (identities) per region")
    parser.add_argument("--views", type=int, default=6, help="camera positions per target")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace) -> int:
    manifest = make_dataset(args.out_dir, args.regions, args.targets, args.views, args.size, args.seed)
    print(f"wrote {manifest['n_regions']} tars, {manifest['n_identities']} identities, "
          f"{manifest['n_valid_images']} valid images, skips injected {manifest['expected_skips']} -> {args.out_dir}")
    return 0


main = guarded_main(_run, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
