"""Publish: the trained projection head as a Hugging Face model (AutoModel + trust_remote_code), and inference with it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

STAGES = {
    "convert_to_hf": "trainer checkpoint + config -> Hugging Face directory (safetensors, auto_map, remote code)",
    "generate_embeddings_from_hf": "images (intermediates or an image folder) -> backbone -> published head -> parquet",
    "generate_embeddings_from_parquet": "stored backbone embeddings -> published head -> parquet (ids kept)",
    "demo_usage": "load a published model, embed stored embeddings, print nearest neighbours",
    "estimate_model_size": "parameters, fp32 / fp16 bytes and safetensors size of a published model",
}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m building_embed.publish` lists its stages."""
    from common.cli import list_stages

    argparse.ArgumentParser(prog="python -m building_embed.publish", description=__doc__).parse_args(argv)
    return list_stages("building_embed.publish", STAGES)
