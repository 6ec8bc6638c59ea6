"""Stored backbone embeddings through a published head: parquet in, parquet out, ids kept.

    python -m building_embed.publish.generate_embeddings_from_parquet published/ data/building_embed/merged \
        data/building_embed/building_embeddings

INPUT is an embeddings parquet (generate_embeddings output, a merged split) or a folder of them (files without an
`embedding` column, e.g. fingerprints.parquet, are skipped). OUT_DIR gets one parquet per input file, same name:
every input column but `embedding` unchanged and in order, and `embedding` replaced by the head's float32 [N,
output_dim] unit-length output; the schema metadata `building_embed_publish` records the model and source.

Refused (exit 2, nothing written): an embedding width other than the model's input_dim (both named), a row holding
NaN or inf (file, row and image_key named).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import pyarrow.parquet as pq

from building_embed.generate.generate_embeddings import read_embeddings
from building_embed.preprocess.schema import IMAGE_KEY
from building_embed.publish.hub import EMBEDDING, IntermixedParser, apply_head, embeddings_table, load_published
from common.cli import guarded_main
from common.errors import UserError
from common.io import atomic_write, require_finite
from common.logs import setup_logging

log = logging.getLogger(__name__)


def embedding_files(path: str | Path) -> list[Path]:
    """The parquet files of INPUT that hold an `embedding` column; UserError when there are none."""
    path = Path(path)
    if path.is_file():
        if EMBEDDING not in pq.read_schema(path).names:
            raise UserError(f"{path}: no {EMBEDDING!r} column; pass a generate_embeddings or merged split parquet")
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if EMBEDDING in pq.read_schema(p).names) if path.is_dir() else []
    if not files:
        raise UserError(f"{path}: no parquet file with an {EMBEDDING!r} column; pass paths.embeddings_dir or "
                        "paths.merged_dir of a finished run")
    return files


def model_fingerprint(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def run(model_dir: str | Path, input_path: str | Path, out_dir: str | Path, batch_size: int = 4096) -> list[Path]:
    """Write one output parquet per input file; returns their paths."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_published(model_dir)
    files = embedding_files(input_path)
    for path in files:  # every width checked before anything is written
        width = pq.read_schema(path).field(EMBEDDING).type.list_size
        if width != model.config.input_dim:
            raise UserError(f"{path}: embeddings of width {width}, but the model in {model_dir} expects input_dim "
                            f"{model.config.input_dim}; embed with the backbone the head was trained on "
                            f"({model.config.backbone_name}, {model.config.img_size} px)")
    base = {"model_dir": str(model_dir), "model_sha256": model_fingerprint(model_dir),
            "output_dim": model.config.output_dim}
    written = []
    for path in files:
        ids, embeddings = read_embeddings(path)
        keys = ids.column(IMAGE_KEY).to_pylist() if IMAGE_KEY in ids.column_names else None
        require_finite(embeddings, path, what="row", row_ids=keys,
                       fix="regenerate those embeddings (generate_embeddings) or drop the rows")
        table = embeddings_table(ids, apply_head(model, embeddings, batch_size), {**base, "source": str(path)})
        target = out_dir / path.name
        atomic_write(target, lambda tmp, t=table: pq.write_table(t, tmp))
        written.append(target)
        log.info("%s: %d rows -> %s (width %d)", path.name, len(table), target, model.config.output_dim)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="python -m building_embed.publish.generate_embeddings_from_parquet",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a directory written by convert_to_hf")
    parser.add_argument("input", help="an embeddings parquet or a folder of them")
    parser.add_argument("out_dir", help="folder for the output parquet files")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass")
    return parser


def _run(args: argparse.Namespace) -> int:
    setup_logging()
    run(args.model_dir, args.input, args.out_dir, args.batch_size)
    return 0


main = guarded_main(_run, build_parser())

if __name__ == "__main__":
    raise SystemExit(main())
