"""Bring parquet intermediates written by older code (or other tools) to the current schema.

    python -m building_embed.preprocess.fix_intermediate_schema --config configs/building_embed/config.toml

For every `paths.intermediates_dir/*.parquet`: numbers stored as text are cast (a value that is not a number stops
the stage with exit 2 naming the file, column, row and value), integer ids stored as floats are cast when whole,
a missing `alignment` column becomes null, a missing `identity` / `image_key` / `tar` / `member` is derived from the
other columns, extra columns are dropped. A file already in the schema is left untouched (same bytes); a fixed file
is replaced atomically. Writes `schema_fix_report.json` (per file: changed columns, dropped columns).
Embeddings made from a fixed shard no longer match its SHA-256, so generate_embeddings will refuse to resume them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from building_embed.config import BuildingEmbedConfig
from building_embed.preprocess.compute_fingerprints import intermediate_shards
from building_embed.preprocess.schema import IDENTITY, IMAGE_KEY, INTERMEDIATE_SCHEMA, read_parquet_checked
from common.cli import config_main
from common.errors import UserError
from common.io import atomic_write, write_json
from common.logs import setup_logging

log = logging.getLogger(__name__)
REPORT_FILE = "schema_fix_report.json"


def _cast_column(column: pa.ChunkedArray, field: pa.Field, path: Path) -> pa.ChunkedArray:
    try:
        return pc.cast(column, field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values = column.to_pylist()
    for row, value in enumerate(values):  # find the first value that does not convert, for the message
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{path}: column {field.name!r} row {row} holds {value!r}, expected a number; fix or "
                            "drop that row (or rerun process_tar on the source tar)") from None
        if pa.types.is_integer(field.type) and number != int(number):
            raise UserError(f"{path}: column {field.name!r} row {row} holds {value!r}, expected an integer id")
    as_float = pc.cast(pc.cast(column, pa.string()), pa.float64()) if pa.types.is_string(column.type) else column
    return pc.cast(as_float, field.type, safe=False)


def conform(table: pa.Table, path: Path) -> tuple[pa.Table, list[str], list[str]]:
    """(table in INTERMEDIATE_SCHEMA, changed columns, dropped columns)."""
    names = set(table.column_names)
    if IMAGE_KEY not in names and {"tar", "member"} <= names:
        table = table.append_column(IMAGE_KEY, pc.binary_join_element_wise(table["tar"], table["member"], ":"))
    if {"tar", "member"} - names and IMAGE_KEY in table.column_names:
        parts = pc.split_pattern(table[IMAGE_KEY], ":", max_splits=1)
        for i, name in enumerate(("tar", "member")):
            if name not in names:
                table = table.append_column(name, pc.list_element(parts, i))
    changed, columns = [], []
    for field in INTERMEDIATE_SCHEMA:
        if field.name in table.column_names:
            column = table[field.name]
            if column.type != field.type:
                column = _cast_column(column, field, path)
                changed.append(field.name)
        elif field.name == IDENTITY:
            continue  # derived below, once the ids are integers
        elif field.nullable:
            column = pa.chunked_array([pa.nulls(len(table), field.type)])
            changed.append(field.name)
        else:
            raise UserError(f"{path}: required column {field.name!r} is missing and cannot be derived; rerun "
                            "process_tar on the source tar")
        columns.append((field.name, column))
    by_name = dict(columns)
    if IDENTITY not in by_name:
        identity = pc.binary_join_element_wise(pc.cast(by_name["dataset_id"], pa.string()),
                                               pc.cast(by_name["target_id"], pa.string()), "_")
        by_name[IDENTITY] = identity
        changed.append(IDENTITY)
    changed += [n for n in (IMAGE_KEY, "tar", "member") if n not in names]
    dropped = sorted(names - set(INTERMEDIATE_SCHEMA.names))
    fixed = pa.Table.from_arrays([by_name[f.name] for f in INTERMEDIATE_SCHEMA], schema=INTERMEDIATE_SCHEMA)
    return fixed, sorted(set(changed)), dropped


def fix_directory(intermediates_dir: str | Path) -> dict:
    """Conform every shard; rewrite only those that change. Returns the report."""
    report = {}
    for path in intermediate_shards(intermediates_dir):
        table = read_parquet_checked(path, [], "paths.intermediates_dir", types=None)  # garbage: exit 2
        if table.schema.remove_metadata().equals(INTERMEDIATE_SCHEMA):
            report[path.name] = {"changed": [], "dropped": [], "rewritten": False}
            continue
        fixed, changed, dropped = conform(table, path)
        atomic_write(path, lambda tmp, t=fixed: pq.write_table(t, tmp))
        report[path.name] = {"changed": changed, "dropped": dropped, "rewritten": True}
        log.info("%s: fixed columns %s, dropped %s", path.name, changed, dropped)
    return report


def run(cfg: BuildingEmbedConfig) -> int:
    setup_logging(level=getattr(logging, cfg.logging.level.upper(), logging.INFO))
    report = fix_directory(cfg.paths.intermediates_dir)
    write_json(Path(cfg.paths.intermediates_dir) / REPORT_FILE, report)
    log.info("%d of %d shards rewritten", sum(r["rewritten"] for r in report.values()), len(report))
    return 0


main = config_main(BuildingEmbedConfig, run, __doc__, prog="python -m building_embed.preprocess.fix_intermediate_schema")

if __name__ == "__main__":
    raise SystemExit(main())
