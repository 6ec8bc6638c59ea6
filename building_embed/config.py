"""Typed configuration of every building_embed stage: one `config.toml` with eight sections.

    [global] [paths] [embedding_model] [training_model] [training] [data] [infrastructure] [logging]

A config file states only what differs from these defaults (`configs/building_embed/config.toml`); `key=value`
overrides go on the command line, e.g.

    python -m building_embed.preprocess.process_tar --config configs/building_embed/config.toml paths.tar_dir=/data/tars

Each stage reads the sections it needs. `[training_model]` and `[training]` are declared now (the trainer is the next
part of the issue) so that one file describes a whole experiment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

AUTOCAST_CHOICES = ("auto", "off", "bf16", "fp16")
BAND_BY_CHOICES = ("rank", "cosine")
KNN_METHODS = ("faiss", "torch")
BACKENDS = ("timm", "transformers")
RESUME_CHOICES = ("auto", "false", "force")


@dataclass
class GlobalConfig:
    seed: int = 42
    """Seed of the train / val / test split and (later) of training."""
    run_name: str = "default"
    """Name of the run directory under paths.runs_dir (training stages)."""
    resume: str | bool = "auto"
    """auto: skip work whose output exists and was made with the same settings (generate_embeddings: completed
    shards), refusing (exit 2) when the settings changed; force: keep existing outputs whatever changed; false: redo
    everything."""

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # `resume = false` in TOML or `global.resume=false` on the command line
            self.resume = "auto" if self.resume else "false"
        if self.resume not in RESUME_CHOICES:
            raise ValueError(f"global.resume must be one of {RESUME_CHOICES}, got {self.resume!r}")


@dataclass
class PathsConfig:
    tar_dir: str = "data/building_embed/tars"
    """Input of process_tar: folder of *.tar shards (one region each) in the 3D Street View layout."""
    intermediates_dir: str = "data/building_embed/intermediates"
    """process_tar output: one parquet per tar (image bytes + parsed metadata) and process_report.json."""
    embeddings_dir: str = "data/building_embed/embeddings"
    """generate_embeddings output: one float16 parquet per intermediate shard, embeddings_manifest.json."""
    merged_dir: str = "data/building_embed/merged"
    """merge_and_split output: train/val/test parquet, fingerprints.parquet, split_report.json, id_summary.json."""
    difficulty_dir: str = "data/building_embed/difficulty"
    """compute_visual_neighbors output: difficulty_metadata.parquet and difficulty_report.json."""
    runs_dir: str = "runs/building_embed"
    """Training run directories (next part of the issue)."""


@dataclass
class EmbeddingModelConfig:
    backend: str = "timm"
    """timm (vit_*_dinov2 / vit_*_dinov3 names) or transformers (a local Dinov2 / DINOv3 directory in `weights`)."""
    name: str = "vit_base_patch14_dinov2"
    """timm model name (vit_small_patch14_dinov2, vit_base_patch16_dinov3, ...); ignored for backend=transformers."""
    weights: str = ""
    """Local weights: a .safetensors / .pth file for timm (loaded through pretrained_cfg_overlay, position embeddings
    resized), a save_pretrained directory for transformers. Nothing is downloaded. Empty requires random_init=true."""
    random_init: bool = False
    """Use random weights (tests and the demo only): the embeddings then mean nothing."""
    img_size: int = 224
    """Square input side in pixels; images are resized (bicubic) to it."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm builder arguments, e.g. {depth = 2, embed_dim = 48, num_heads = 2} for a tiny test model."""
    global_pool: str = "token"
    """timm pooling of the final tokens: token (CLS, as DINOv2's own features) or avg."""
    batch_size: int = 64
    """Images per forward pass."""
    max_shards_this_run: int = 0
    """Stop after embedding this many shards (0 = all); a later run resumes at the next shard."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"embedding_model.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.img_size < 8:
            raise ValueError(f"embedding_model.img_size must be at least 8, got {self.img_size}")
        if self.batch_size < 1:
            raise ValueError(f"embedding_model.batch_size must be positive, got {self.batch_size}")


@dataclass
class TrainingModelConfig:
    input_dim: int = 768
    """Embedding width the projection head expects (must equal the generated embedding_dim)."""
    hidden_dim: int = 512
    """Hidden width of the projection head."""
    output_dim: int = 256
    """Width of the trained building embedding."""
    dropout: float = 0.1
    """Dropout inside the projection head."""


@dataclass
class TrainingConfig:
    epochs: int = 20
    """Training epochs (trainer: next part of the issue)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    margin: float = 0.2
    """Triplet-loss margin on cosine distance."""
    identities_per_batch: int = 16
    """P of a P x K batch."""
    views_per_identity: int = 4
    """K of a P x K batch."""


@dataclass
class DataConfig:
    max_member_bytes: int = 20_000_000
    """Tar members larger than this are skipped unread (reason oversized_member)."""
    max_image_pixels: int = 4096 * 4096
    """Images whose header declares more pixels are skipped undecoded (reason oversized_image)."""
    rows_per_shard: int = 2000
    """Rows per intermediate parquet shard (a tar larger than this gives several shards)."""
    dedup_hash_size: int = 8
    """imagehash.phash hash_size: the hash has hash_size^2 bits."""
    dedup_max_distance: int = 4
    """Near-duplicates: Hamming distance of the perceptual hashes at most this (0 = exact hash only)."""
    leak_audit_distance: int = 6
    """Cross-split audit: image pairs in different splits with hashes at most this far apart are leaks. Pairs of
    different identities this close are grouped before splitting, so the audit must report 0."""
    place_radius_m: float = 25.0
    """Targets whose facade points or camera positions lie within this many metres share a place group; a place
    group goes to one split whole."""
    val_fraction: float = 0.15
    """Share of images (by whole place groups) in the validation split."""
    test_fraction: float = 0.15
    """Share of images (by whole place groups) in the test split."""
    neighbors_k: int = 50
    """compute_visual_neighbors: neighbours kept per embedding (self excluded)."""
    knn_method: str = "faiss"
    """faiss (IndexFlatIP, exact) or torch (blocked matrix products)."""
    band_by: str = "rank"
    """Difficulty band of a neighbour of another identity: by its rank (band_edges are ranks, 1 = nearest) or by
    its cosine similarity (band_edges are similarity thresholds, descending)."""
    band_edges: list[float] = field(default_factory=lambda: [5.0, 20.0])
    """len + 1 bands, band 0 the hardest. rank: band b holds negatives of rank edges[b-1] < r <= edges[b] (rank 1 =
    the nearest other identity; the last band: past the last edge); cosine (descending edges): band b holds
    edges[b] <= similarity < edges[b-1]."""
    difficulty_splits: list[str] = field(default_factory=lambda: ["train"])
    """Splits whose embeddings get neighbours (each split searched on its own: negatives never cross splits)."""

    def __post_init__(self) -> None:
        if self.knn_method not in KNN_METHODS:
            raise ValueError(f"data.knn_method must be one of {KNN_METHODS}, got {self.knn_method!r}")
        if self.band_by not in BAND_BY_CHOICES:
            raise ValueError(f"data.band_by must be one of {BAND_BY_CHOICES}, got {self.band_by!r}")
        if not self.band_edges:
            raise ValueError("data.band_edges must hold at least one edge")
        step = 1 if self.band_by == "rank" else -1
        if any(step * (b - a) <= 0 for a, b in zip(self.band_edges, self.band_edges[1:])):
            raise ValueError(f"data.band_edges {self.band_edges} must be strictly "
                             f"{'increasing (ranks)' if step == 1 else 'decreasing (cosine)'}")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.test_fraction < 1.0 \
                or self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"data.val_fraction ({self.val_fraction}) and data.test_fraction ({self.test_fraction}) "
                             "must be in [0, 1) and sum below 1")
        if self.leak_audit_distance < self.dedup_max_distance:
            raise ValueError(f"data.leak_audit_distance ({self.leak_audit_distance}) must be >= "
                             f"data.dedup_max_distance ({self.dedup_max_distance})")
        if not 2 <= self.dedup_hash_size <= 8:
            raise ValueError(f"data.dedup_hash_size must be 2 to 8 (hashes are packed in 64 bits), "
                             f"got {self.dedup_hash_size}")
        if self.place_radius_m < 0:
            raise ValueError(f"data.place_radius_m must be >= 0, got {self.place_radius_m}")
        if self.neighbors_k < 1:
            raise ValueError(f"data.neighbors_k must be positive, got {self.neighbors_k}")


@dataclass
class InfrastructureConfig:
    device: str = "auto"
    """auto (CUDA when present, one GPU per torchrun rank), cpu or cuda."""
    num_workers: int = 4
    """DataLoader worker processes decoding JPEGs (0 = decode in the main process)."""
    num_threads: int = 0
    """torch CPU threads (0 leaves torch's default; 1 on a shared machine)."""
    autocast: str = "auto"
    """auto (bf16 on CUDA, off on CPU), off, bf16 or fp16."""

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"infrastructure.autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"infrastructure.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class LoggingConfig:
    level: str = "INFO"
    """Python logging level on rank 0."""
    tensorboard: bool = False
    """Also write TensorBoard scalars during training (when installed; trainer: next part)."""
    wandb: bool = False
    """Also log to W&B in offline mode during training (when installed; trainer: next part)."""


SECTIONS: dict[str, type] = {
    "global": GlobalConfig,
    "paths": PathsConfig,
    "embedding_model": EmbeddingModelConfig,
    "training_model": TrainingModelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "infrastructure": InfrastructureConfig,
    "logging": LoggingConfig,
}


@dataclass
class BuildingEmbedConfig:
    """The whole config, one section per TOML table. `global` is a Python keyword, so that section is the field
    `global_`, which common.config reads from and writes to the key `global` (files, overrides, --help)."""

    global_: GlobalConfig = field(default_factory=GlobalConfig, metadata={"key": "global"})
    paths: PathsConfig = field(default_factory=PathsConfig)
    embedding_model: EmbeddingModelConfig = field(default_factory=EmbeddingModelConfig)
    training_model: TrainingModelConfig = field(default_factory=TrainingModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infrastructure: InfrastructureConfig = field(default_factory=InfrastructureConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def section(self, name: str) -> Any:
        """A section by its TOML name (`global` included)."""
        return self.global_ if name == "global" else getattr(self, name)

    def to_section_dict(self, name: str) -> dict[str, Any]:
        """One section as plain data (for fingerprints and output metadata)."""
        return dataclasses.asdict(self.section(name))
