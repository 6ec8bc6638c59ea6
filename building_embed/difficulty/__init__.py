"""Difficulty bands: exact visual nearest neighbours of every embedding, grouped for negative sampling."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

STAGES = {"compute_visual_neighbors": "exact kNN (faiss flat IP / blocked torch) -> difficulty_metadata.parquet"}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m building_embed.difficulty` lists its stages."""
    from common.cli import list_stages

    argparse.ArgumentParser(prog="python -m building_embed.difficulty", description=__doc__).parse_args(argv)
    return list_stages("building_embed.difficulty", STAGES)
