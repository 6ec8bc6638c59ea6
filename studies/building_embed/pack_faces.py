"""Pack the ORL / AT&T faces (40 people x 10 views) into tars of the 3D Street View layout.

    python -m studies.building_embed.pack_faces data/building_embed/faces  # faces from $REAL_DATA_DIR or ../shared/data
    python -m studies.building_embed.pack_faces OUT --faces /path/to/faces_orl_att --tars 2

A real multi-view identity set for the same stages: a person plays a building target. Writes OUT/tars/faces_<k>.tar
(people split over the tars in order; tar k has DatasetID 201 + k, TargetID = the folder number sN) with each PGM
re-encoded as a JPEG (quality 95) and a `.txt` metadata file: PatchID and StreetViewID = the view number (each view
its own "panorama"), the targets on a grid 500 m apart (so place groups are single people) with the camera 10 m in
front. OUT/manifest.json lists what was packed. The source folder is only read.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import tarfile
from pathlib import Path

from PIL import Image

from building_embed.streetview import format_metadata, identity_of, offset_latlon
from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write, write_json

ORIGIN = (47.3769, 8.5417)
SPACING_M = 500.0


def default_faces_dir() -> Path:
    """$REAL_DATA_DIR/faces_orl_att, else ../shared/data/faces_orl_att beside the repository."""
    env = os.environ.get("REAL_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    return root / "faces_orl_att"


def _people(faces_dir: Path) -> list[tuple[int, list[Path]]]:
    people = []
    for folder in faces_dir.iterdir() if faces_dir.is_dir() else []:
        match = re.fullmatch(r"s(\d+)", folder.name)
        if match and folder.is_dir():
            views = sorted(folder.glob("*.pgm"), key=lambda p: int(p.stem) if p.stem.isdigit() else 10**9)
            if views:
                people.append((int(match.group(1)), views))
    if not people:
        raise UserError(f"{faces_dir}: no s<N>/ folders of .pgm images; pass --faces (the ORL faces folder) or set "
                        "REAL_DATA_DIR")
    return sorted(people)


def pack_faces(faces_dir: str | Path, out_dir: str | Path, n_tars: int = 2) -> dict:
    """Write the tars and manifest. Returns the manifest."""
    faces_dir, out = Path(faces_dir), Path(out_dir)
    people = _people(faces_dir)
    if not 1 <= n_tars <= len(people):
        raise UserError(f"--tars {n_tars}: expected 1 to {len(people)}")
    per_tar = -(-len(people) // n_tars)
    manifest: dict = {"source": str(faces_dir), "tars": {}, "identities": 0, "images": 0}
    for k in range(n_tars):
        dataset_id, members = 201 + k, []
        chunk = people[k * per_tar:(k + 1) * per_tar]
        for person, views in chunk:
            t_lat, t_lon = offset_latlon(*ORIGIN, (person % 10) * SPACING_M, (person // 10) * SPACING_M)
            c_lat, c_lon = offset_latlon(t_lat, t_lon, 0.0, -10.0)
            for view_index, path in enumerate(views, start=1):
                buffer = io.BytesIO()
                with Image.open(path) as image:
                    image.convert("RGB").save(buffer, format="JPEG", quality=95)
                meta = {"dataset_id": dataset_id, "target_id": person, "patch_id": view_index,
                        "street_view_id": view_index, "target_lat": t_lat, "target_lon": t_lon, "target_height": 1.6,
                        "normal_x": 0.0, "normal_y": -1.0, "normal_z": 0.0, "camera_lat": c_lat, "camera_lon": c_lon,
                        "camera_height": 1.6, "distance": 10.0, "heading": 0.0, "pitch": 0.0, "roll": 0.0}
                stem = f"{dataset_id:04d}_{person:07d}_{view_index:07d}"
                members += [(f"{stem}.jpg", buffer.getvalue()), (f"{stem}.txt", format_metadata(meta).encode())]
        name = f"faces_{k}.tar"

        def write(tmp: Path, members=members) -> None:
            with tarfile.open(tmp, "w") as tar:
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(data), 1_600_000_000
                    tar.addfile(info, io.BytesIO(data))
        atomic_write(out / "tars" / name, write)
        manifest["tars"][name] = [identity_of(dataset_id, p) for p, _ in chunk]
        manifest["identities"] += len(chunk)
        manifest["images"] += len(members) // 2
    write_json(out / "manifest.json", manifest)
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studies.building_embed.pack_faces", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write tars/ and manifest.json into")
    parser.add_argument("--faces", default=None, help="the ORL faces folder (s1/ ... s40/); default: "
                        "$REAL_DATA_DIR/faces_orl_att or ../shared/data/faces_orl_att")
    parser.add_argument("--tars", type=int, default=2, help="how many tars to spread the people over")
    return parser


def _run(args: argparse.Namespace) -> int:
    manifest = pack_faces(args.faces or default_faces_dir(), args.out_dir, args.tars)
    print(f"packed {manifest['images']} images of {manifest['identities']} people into {len(manifest['tars'])} tars "
          f"-> {args.out_dir}")
    return 0


main = guarded_main(_run, _parser())

if __name__ == "__main__":
    raise SystemExit(main())
