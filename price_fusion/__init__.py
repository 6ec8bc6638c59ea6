"""price_fusion: CLIP image + sentence text embeddings -> two-branch / MoE fusion network -> product price."""

__version__ = "0.1.0"
