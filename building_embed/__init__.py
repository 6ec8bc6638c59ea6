"""building_embed: building re-identification embeddings from 3D Street View tar shards.

Built: sample data, tar -> parquet, DINOv2 / DINOv3 embeddings, dedup + identity / place split, difficulty bands.
Next: the triplet projection head with bandit band sampling, Optuna, Hugging Face export (see README.md).
"""
