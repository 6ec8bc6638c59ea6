"""Embedding generation: images of the parquet intermediates through a frozen DINOv2 / DINOv3 backbone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

STAGES = {"generate_embeddings": "DINOv2 / DINOv3 (timm or transformers, local weights) -> float16 parquet per shard"}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m building_embed.generate` lists its stages."""
    from common.cli import list_stages

    argparse.ArgumentParser(prog="python -m building_embed.generate", description=__doc__).parse_args(argv)
    return list_stages("building_embed.generate", STAGES)
