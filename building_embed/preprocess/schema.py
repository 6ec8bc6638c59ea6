"""The schema of the parquet intermediates written by process_tar (one row per image), and a reader that turns a
garbage or wrong-schema parquet file into one clear error (exit 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from building_embed.streetview import ALIGNMENT, FLOAT_FIELDS, ID_FIELDS
from common.errors import UserError

IMAGE_KEY = "image_key"
"""`<tar file name>:<member name>`: unique across tars, the id every later file joins on."""
IDENTITY = "identity"
IMAGE_BYTES = "image_bytes"

INTERMEDIATE_SCHEMA = pa.schema(
    [pa.field(IMAGE_KEY, pa.string(), nullable=False), pa.field("tar", pa.string()), pa.field("member", pa.string()),
     pa.field(IDENTITY, pa.string(), nullable=False)]
    + [pa.field(name, pa.int64(), nullable=False) for name in ID_FIELDS]
    + [pa.field(name, pa.float64(), nullable=False) for name in FLOAT_FIELDS]
    + [pa.field(ALIGNMENT, pa.list_(pa.float64())), pa.field("width", pa.int32()), pa.field("height", pa.int32()),
       pa.field(IMAGE_BYTES, pa.binary(), nullable=False)]
)
METADATA_COLUMNS = [f.name for f in INTERMEDIATE_SCHEMA if f.name != IMAGE_BYTES]


def read_parquet_checked(path: str | Path, required_columns: Sequence[str], key: str,
                         columns: Sequence[str] | None = None, types: pa.Schema | None = INTERMEDIATE_SCHEMA) -> pa.Table:
    """`columns` (default: `required_columns`; [] reads every column) of a parquet file, or a UserError of one line
    naming the file and what is wrong: not parquet / cut short, a required column missing, or a column whose type
    differs from its field in `types` (None: types unchecked). `key` names the config key of the folder it was read
    from (part of the fix)."""
    path = Path(path)
    fix = f"regenerate it or remove it from {key}"
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: not a readable parquet file ({_first_line(exc)}); {fix}") from exc
    missing = [c for c in required_columns if c not in schema.names]
    if missing:
        raise UserError(f"{path}: column(s) {missing} missing (it has {schema.names[:12]}); {fix}, or run python -m "
                        "building_embed.preprocess.fix_intermediate_schema on older intermediates")
    if types is not None:
        for name in required_columns:
            if name in types.names and _kind(schema.field(name).type) not in _accepted(types.field(name).type):
                raise UserError(f"{path}: column {name!r} is {schema.field(name).type}, expected "
                                f"{types.field(name).type}; run python -m building_embed.preprocess."
                                f"fix_intermediate_schema (or {fix})")
    wanted = list(required_columns) if columns is None else list(columns)
    try:
        return pq.read_table(path, columns=wanted or None)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: unreadable parquet data ({_first_line(exc)}); {fix}") from exc


def _kind(t: pa.DataType) -> str:
    for kind, test in (("integer", pa.types.is_integer), ("float", pa.types.is_floating),
                       ("string", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)),
                       ("binary", lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x)),
                       ("list", lambda x: pa.types.is_list(x) or pa.types.is_large_list(x)
                        or pa.types.is_fixed_size_list(x))):
        if test(t):
            return kind
    return str(t)


def _accepted(t: pa.DataType) -> set[str]:
    """Kinds of stored type that read as `t` downstream (an int32 id or an integer latitude is fine, text is not)."""
    kind = _kind(t)
    return {"integer", "float"} if kind == "float" else {kind}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
