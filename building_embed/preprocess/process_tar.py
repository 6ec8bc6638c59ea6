"""Stream 3D Street View tar shards into parquet intermediates, one row per usable image.

    python -m building_embed.preprocess.process_tar --config configs/building_embed/config.toml

Reads every `paths.tar_dir/*.tar` as a stream (`tarfile` mode `r|*`: nothing is extracted, members are read once in
order), pairs each `<stem>.jpg` with `<stem>.txt`, and writes `paths.intermediates_dir/<tar stem>-<k>.parquet`
(schema: preprocess/schema.py, image bytes + parsed metadata; `data.rows_per_shard` rows each) and
`process_report.json`. Members that cannot be used are skipped and counted by reason:

    unsafe_path (absolute or `..`), link (symlink / hard link), not_regular_file, duplicate_member,
    oversized_member (> data.max_member_bytes), oversized_image (> data.max_image_pixels), corrupt_image,
    image_without_metadata, metadata_without_image, metadata_* (streetview.py), other_file, corrupt_tar (cut short or not a tar: the pairs read before stay)

Every file written lies inside `paths.intermediates_dir` and is written atomically. A tar already processed with the
same settings (recorded in `<tar stem>.done.json`: tar size and mtime, data settings) is not read again. A tar that
changed is read again into a staging folder; its new shards replace the earlier ones only when it was read to the
end or gave more rows, so a re-run never loses good rows to a tar cut short since (a WARNING names it and the counts).
A tar cut short or unreadable on its first read keeps the rows read before the error, also with a WARNING. A run whose
tars give no usable row at all stops with exit 2.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from building_embed.config import BuildingEmbedConfig, DataConfig
from building_embed.preprocess.schema import IDENTITY, IMAGE_BYTES, IMAGE_KEY, INTERMEDIATE_SCHEMA
from building_embed.streetview import MetadataError, identity_of, parse_metadata
from common.cli import config_main
from common.errors import UserError
from common.images import strip_metadata
from common.io import atomic_write, write_json
from common.logs import progress, setup_logging

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg")
METADATA_SUFFIX = ".txt"
REPORT_FILE = "process_report.json"
MAX_EXAMPLES = 5


def unsafe_reason(member: tarfile.TarInfo, seen: set[str]) -> str | None:
    """Why a member must not be read, or None. Checked before any byte of it is read."""
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts or parts[0].endswith(":"):  # absolute, escaping, C:
        return "unsafe_path"
    if member.issym() or member.islnk():
        return "link"
    if not member.isfile():
        return "not_regular_file"
    if member.name in seen:
        return "duplicate_member"
    return None


def check_image(data: bytes, max_pixels: int) -> tuple[str | None, int, int]:
    """(skip reason or None, width, height). The header is read first, so an oversized image is never decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return "oversized_image", width, height
            image.load()  # a truncated JPEG raises here ("image file is truncated")
    except Image.DecompressionBombError:
        return "oversized_image", 0, 0
    except (OSError, SyntaxError, ValueError):
        return "corrupt_image", 0, 0
    return None, width, height


class SkipCounter:
    """Counts skips by reason and keeps the first few member names of each (for the report)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def skip(self, reason: str, name: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(f"{name}: {detail}" if detail else name)


def iter_pairs(tar_path: Path, data: DataConfig, skips: SkipCounter) -> Iterator[dict]:
    """Rows (dicts in INTERMEDIATE_SCHEMA) of the usable image + metadata pairs of one tar, in member order."""
    images: dict[str, tuple[str, bytes]] = {}
    metas: dict[str, tuple[str, bytes]] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                reason = unsafe_reason(member, seen)
                if reason is not None:
                    if not member.isdir() or reason == "unsafe_path":
                        skips.skip(reason, member.name)
                    continue
                seen.add(member.name)
                suffix = PurePosixPath(member.name).suffix.lower()
                if suffix not in IMAGE_SUFFIXES + (METADATA_SUFFIX,):
                    skips.skip("other_file", member.name)
                    continue
                if member.size > data.max_member_bytes:
                    skips.skip("oversized_member", member.name, f"{member.size} bytes")
                    continue
                handle = tar.extractfile(member)
                payload = handle.read() if handle is not None else b""
                stem = member.name[: -len(suffix)]
                (metas if suffix == METADATA_SUFFIX else images)[stem] = (member.name, payload)
                if stem in images and stem in metas:
                    row = _make_row(tar_path.name, images.pop(stem), metas.pop(stem), data, skips)
                    if row is not None:
                        yield row
    except (tarfile.ReadError, EOFError, OSError) as exc:
        skips.skip("corrupt_tar", tar_path.name, str(exc))
    for name, _ in images.values():
        skips.skip("image_without_metadata", name)
    for name, _ in metas.values():
        skips.skip("metadata_without_image", name)


def _make_row(tar_name: str, image: tuple[str, bytes], meta: tuple[str, bytes], data: DataConfig,
              skips: SkipCounter) -> dict | None:
    image_name, image_bytes = image
    try:
        fields = parse_metadata(meta[1])
    except MetadataError as exc:
        skips.skip(exc.reason, meta[0], str(exc))
        return None
    reason, width, height = check_image(image_bytes, data.max_image_pixels)
    if reason is not None:
        skips.skip(reason, image_name)
        return None
    return {IMAGE_KEY: f"{tar_name}:{image_name}", "tar": tar_name, "member": image_name,
            IDENTITY: identity_of(fields["dataset_id"], fields["target_id"]), **fields,
            "width": width, "height": height,
            IMAGE_BYTES: image_bytes if data.keep_metadata else strip_metadata(image_bytes)}


def write_shard(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=INTERMEDIATE_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _settings(data: DataConfig) -> dict:
    return {"max_member_bytes": data.max_member_bytes, "max_image_pixels": data.max_image_pixels,
            "rows_per_shard": data.rows_per_shard, "keep_metadata": data.keep_metadata}


def _read_done(done_path: Path) -> dict | None:
    try:
        return json.loads(done_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def process_one(tar_path: Path, out_dir: Path, data: DataConfig) -> dict:
    """Process one tar (or reuse its earlier result). Returns its report entry.

    New shards are written into a staging folder and replace the tar's earlier shards only once the tar has been
    read to its end, or when they hold more rows than the earlier ones: a tar cut short (or unreadable) after a good
    run keeps the good rows, with a WARNING.
    """
    stat = tar_path.stat()
    source = {"tar": tar_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "settings": _settings(data)}
    done_path = out_dir / f"{tar_path.stem}.done.json"
    previous = _read_done(done_path)
    previous_ok = previous is not None and all((out_dir / s).is_file() for s in previous.get("shards", []))
    if previous_ok and previous.get("source") == source:
        log.info("%s: already processed (%d rows), skipped", tar_path.name, previous["rows"])
        return previous
    staging = out_dir / f".staging-{tar_path.stem}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        skips = SkipCounter()
        shards, buffer, rows = [], [], 0
        for row in iter_pairs(tar_path, data, skips):
            buffer.append(row)
            if len(buffer) == data.rows_per_shard:
                shards.append(f"{tar_path.stem}-{len(shards):05d}.parquet")
                write_shard(staging / shards[-1], buffer)
                rows, buffer = rows + len(buffer), []
        if buffer:
            shards.append(f"{tar_path.stem}-{len(shards):05d}.parquet")
            write_shard(staging / shards[-1], buffer)
            rows += len(buffer)
        done = {"source": source, "shards": shards, "rows": rows, "skipped": dict(sorted(skips.counts.items())),
                "skip_examples": dict(sorted(skips.examples.items()))}
        cut = skips.examples.get("corrupt_tar", [""])[0].split(": ", 1)[-1] if skips.counts["corrupt_tar"] else None
        if cut is not None and previous_ok and previous.get("rows", 0) > rows:
            log.warning("%s: cut short or unreadable (%s): read %d rows, fewer than the %d of its earlier run, whose "
                        "%d shard(s) are kept; replace the tar with a complete copy", tar_path.name, cut, rows,
                        previous["rows"], len(previous["shards"]))
            return {**previous, "warning": f"cut short or unreadable ({cut}); kept the earlier {previous['rows']} "
                                           f"rows instead of {rows}"}
        done_path.unlink(missing_ok=True)  # a kill while the shards are swapped leaves the tar to be redone
        for name in shards:
            os.replace(staging / name, out_dir / name)
        for stale in set(out_dir.glob(f"{tar_path.stem}-*.parquet")) - {out_dir / n for n in shards}:
            stale.unlink()
        write_json(done_path, done)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if cut is not None:
        log.warning("%s: cut short or unreadable (%s): kept the %d rows read before the error, skipped %s",
                    tar_path.name, cut, rows, done["skipped"])
    elif rows == 0:
        log.warning("%s: no usable image + metadata pair (skipped %s)", tar_path.name, done["skipped"])
    else:
        log.info("%s: %d rows in %d shard(s), skipped %s", tar_path.name, rows, len(shards), done["skipped"])
    return done


def process_tars(cfg: BuildingEmbedConfig) -> int:
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    tar_dir, out_dir = Path(cfg.paths.tar_dir), Path(cfg.paths.intermediates_dir)
    tars = sorted(tar_dir.glob("*.tar")) if tar_dir.is_dir() else []
    if not tars:
        raise UserError(f"{tar_dir}: no *.tar files found; set paths.tar_dir to the folder of region tars "
                        "(python -m building_embed.sample_data OUT writes some)")
    if out_dir.resolve() == tar_dir.resolve():
        raise UserError(f"paths.intermediates_dir ({out_dir}) must differ from paths.tar_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_tar = {t.name: process_one(t, out_dir, cfg.data) for t in progress(tars, desc="tars")}
    totals: Counter[str] = Counter()
    for entry in per_tar.values():
        totals.update(entry["skipped"])
    report = {"tars": len(tars), "rows": sum(e["rows"] for e in per_tar.values()),
              "shards": [s for e in per_tar.values() for s in e["shards"]],
              "skipped": dict(sorted(totals.items())), "skipped_total": sum(totals.values()), "per_tar": per_tar}
    write_json(out_dir / REPORT_FILE, report)
    if report["rows"] == 0:
        raise UserError(f"{tar_dir}: its {len(tars)} tar(s) gave no usable image + metadata pair (skipped "
                        f"{report['skipped']}, see {out_dir / REPORT_FILE}); check that paths.tar_dir holds the 3D "
                        "Street View region tars (<stem>.jpg beside <stem>.txt)")
    log.info("process_tar: %d rows from %d tars, %d members skipped %s -> %s", report["rows"], len(tars),
             report["skipped_total"], report["skipped"], out_dir)
    return 0


main = config_main(BuildingEmbedConfig, process_tars, __doc__, prog="python -m building_embed.preprocess.process_tar")

if __name__ == "__main__":
    raise SystemExit(main())
