"""Preprocessing stages: tar shards -> parquet intermediates -> merged, deduplicated, place-split parquet."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

STAGES = {
    "process_tar": "stream tar shards -> parquet intermediates (image bytes + metadata), counted skips",
    "fix_intermediate_schema": "cast intermediates written by older code to the current schema",
    "compute_fingerprints": "SHA-256 and perceptual hash of every intermediate image",
    "merge_and_split": "join embeddings, dedup, split by identity and place, cross-split leak audit",
    "summarize_ids": "images / identities / place groups per split",
}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m building_embed.preprocess` lists its stages."""
    from common.cli import list_stages

    argparse.ArgumentParser(prog="python -m building_embed.preprocess", description=__doc__).parse_args(argv)
    return list_stages("building_embed.preprocess", STAGES)
