"""The schema of the parquet intermediates written by process_tar (one row per image)."""

from __future__ import annotations

import pyarrow as pa

from building_embed.streetview import ALIGNMENT, FLOAT_FIELDS, ID_FIELDS

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
