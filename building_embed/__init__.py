"""building_embed: building re-identification embeddings from 3D Street View tar shards.

Tar shards -> parquet intermediates -> frozen DINOv2 / DINOv3 embeddings -> dedup + identity / place split ->
difficulty bands -> triplet projection head (bandit band sampling, Optuna) -> Hugging Face export (see README.md).
"""
