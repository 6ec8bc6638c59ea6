"""Typed configuration of every building_embed stage: one `config.toml` with eight sections.

    [global] [paths] [embedding_model] [training_model] [training] [data] [infrastructure] [logging]

A config file states only what differs from these defaults (`configs/building_embed/config.toml`); `key=value`
overrides go on the command line, e.g.

    python -m building_embed.preprocess.process_tar --config configs/building_embed/config.toml paths.tar_dir=/data/tars

Each stage reads the sections it needs; `[training_model]` and `[training]` drive train.train, train.optuna_worker and
train.fetch_best_and_train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.tuning import check_heartbeat

AUTOCAST_CHOICES = ("auto", "off", "bf16", "fp16")
BAND_BY_CHOICES = ("rank", "cosine")
KNN_METHODS = ("faiss", "torch")
BACKENDS = ("timm", "transformers", "pixels")
RESUME_CHOICES = ("auto", "false", "force")


@dataclass
class GlobalConfig:
    seed: int = 42
    """Seed of the train / val / test split and of training (head init, batch order, dropout)."""
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
    """Training run directories: paths.runs_dir/<global.run_name>/ (config.yaml, metrics.jsonl, checkpoints/,
    reports/)."""


@dataclass
class EmbeddingModelConfig:
    backend: str = "timm"
    """timm (vit_*_dinov2 / vit_*_dinov3 names, or packaged weights), transformers (a local Dinov2 / DINOv3
    directory in `weights`) or pixels (no weights: img_size x img_size grey pixels standardised per image, e.g.
    img_size=32; a fast descriptor with real signal for tests, not for production)."""
    name: str = "vit_base_patch14_dinov2"
    """timm model name (vit_small_patch14_dinov2, vit_base_patch16_dinov3, tf_efficientnet_lite0 for
    packaged=efficientnet_lite0, ...); ignored for backend=transformers."""
    weights: str = ""
    """Local weights, the production default: DINOv2 / DINOv3 as a .safetensors / .pth file for timm (loaded through
    pretrained_cfg_overlay, position embeddings resized), a save_pretrained directory for transformers. Nothing is
    downloaded. Exactly one of weights, packaged and random_init is given."""
    packaged: str = ""
    """Weights shipped in a pinned package of the project (common.backbones.PACKAGED): efficientnet_lite0 (ImageNet
    EfficientNet-Lite0, name=tf_efficientnet_lite0, global_pool=avg, 1280-d). Real features with no download: the
    sample data, the demo and tests that need a real signal."""
    random_init: bool = False
    """Use random weights (plumbing tests only): the embeddings then mean nothing. Refused with global_pool=token
    (every image would get the same vector)."""
    img_size: int = 224
    """Square input side in pixels (overrides the backbone's own input size): the short side is resized to
    img_size / crop_pct (the backbone's eval transform, aspect ratio kept) and the centre img_size square cropped."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm builder arguments, e.g. {depth = 2, embed_dim = 48, num_heads = 2} for a tiny test model."""
    global_pool: str = "token"
    """timm pooling of the final features: token (CLS, as DINOv2's own features; ViTs only) or avg (CNNs such as
    EfficientNet, and random-weight test models)."""
    max_image_pixels: int = 200_000_000
    """Images whose header declares more pixels are refused undecoded (a decompression bomb; no camera makes one).
    Large photos below it are decoded at reduced size (JPEG draft) and downscaled, never skipped."""
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
        if self.max_image_pixels < 1:
            raise ValueError(f"embedding_model.max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.backend == "timm" and self.random_init and self.global_pool == "token":
            raise ValueError("embedding_model.random_init=true with embedding_model.global_pool=token gives every "
                             "image the same embedding; set embedding_model.global_pool=avg, or use real weights "
                             "(embedding_model.packaged=efficientnet_lite0 or embedding_model.weights)")


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


MINER_CHOICES = ("all", "hard", "semihard", "easy", "none")


@dataclass
class TrainingConfig:
    epochs: int = 20
    """Training epochs (an epoch is training.batches_per_epoch P x K batches; may be raised to continue a run)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay (not on biases and norms)."""
    margin: float = 0.2
    """Triplet-loss margin on cosine distance (pytorch-metric-learning TripletMarginLoss, CosineSimilarity)."""
    identities_per_batch: int = 16
    """P of a P x K batch (capped at the number of training identities)."""
    views_per_identity: int = 4
    """K of a P x K batch (identities with fewer images repeat views)."""
    negative_share: float = 0.5
    """Share of the P identities of a batch drawn as negatives from the difficulty band the bandit chose; the rest
    are anchor identities taken in a seeded order that visits every identity once per epoch."""
    batches_per_epoch: int = 0
    """Batches per epoch; 0 = training images // (P * K), at least 1."""
    miner: str = "all"
    """pytorch-metric-learning TripletMarginMiner type_of_triplets (all = every triplet violating the margin, hard,
    semihard, easy) or none (every triplet of the batch)."""
    ucb_exploration: float = 0.1
    """UCB1 exploration constant c: score of a band = mean reward + c * sqrt(2 ln t / n_band). Rewards (relative
    loss decreases of one step) are typically a few percent, so the textbook c = 1 would pull every band evenly."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    patience: int = 5
    """Early stopping: epochs without a better validation mAP@R."""
    keep_last_n: int = 2
    """Periodic checkpoints kept (with training.save_every)."""
    save_every: int = 0
    """Also keep checkpoints/epoch_N every this many epochs (0 = only latest and best)."""
    optuna_storage: str = "sqlite:///runs/building_embed/optuna.db"
    """optuna_worker: RDB storage URL of the study (SQLite file, or PostgreSQL when several nodes share it)."""
    optuna_study: str = "building_embed"
    """optuna_worker / fetch_best_and_train: study name; trial runs go to
    paths.runs_dir/optuna/<study>/trial_<n>."""
    optuna_trials: int = 10
    """optuna_worker: trials this worker runs."""
    optuna_total_trials: int = 0
    """optuna_worker: stop every worker once the study holds this many trials (0 = no cap)."""
    optuna_epochs: int = 5
    """optuna_worker: epochs of each (short) trial run; the median pruner judges val mAP@R after each."""
    optuna_warmup_epochs: int = 1
    """optuna_worker: epochs a trial runs before it may be pruned."""
    optuna_heartbeat_interval: int = 60
    """optuna_worker: seconds between a running trial's heartbeats in the storage."""
    optuna_grace_period: int = 180
    """optuna_worker: a RUNNING trial without a heartbeat for this long (its worker was killed) is marked FAIL by the
    next worker that starts a trial, and its parameters are queued again (training.optuna_max_retries times)."""
    optuna_max_retries: int = 1
    """optuna_worker: how often a killed trial's parameters are retried."""
    optuna_hidden_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """optuna_worker: choices of training_model.hidden_dim (lr, margin, dropout and weight_decay are searched on
    log / linear ranges fixed in optuna_worker.search_space)."""

    def __post_init__(self) -> None:
        if self.miner not in MINER_CHOICES:
            raise ValueError(f"training.miner must be one of {MINER_CHOICES}, got {self.miner!r}")
        if self.identities_per_batch < 2 or self.views_per_identity < 2:
            raise ValueError(f"training.identities_per_batch ({self.identities_per_batch}) and "
                             f"training.views_per_identity ({self.views_per_identity}) must be at least 2")
        if not 0.0 < self.negative_share < 1.0:
            raise ValueError(f"training.negative_share must be in (0, 1), got {self.negative_share}")
        if self.lr <= 0 or self.margin < 0:
            raise ValueError(f"training.lr ({self.lr}) must be > 0 and training.margin ({self.margin}) >= 0")
        if self.patience < 1:
            raise ValueError(f"training.patience must be >= 1, got {self.patience}")
        check_heartbeat(self.optuna_heartbeat_interval, self.optuna_grace_period, self.optuna_max_retries,
                        key_prefix="training.optuna_")


@dataclass
class DataConfig:
    max_member_bytes: int = 20_000_000
    """Tar members larger than this are skipped unread (reason oversized_member)."""
    max_image_pixels: int = 200_000_000
    """Images whose header declares more pixels are skipped undecoded (reason oversized_image): a guard against
    decompression bombs, far beyond any camera; a 12-50 MP phone photo is kept (generate downscales it)."""
    keep_metadata: bool = False
    """Store image bytes as they are in the tar. false: EXIF (GPS, camera), XMP, IPTC and comments are dropped
    losslessly from JPEGs before they are stored (common.images.strip_metadata; the orientation tag is kept)."""
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
    knn_method: str = "torch"
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
    eval_memory_mb: int = 512
    """Working memory of the retrieval evaluation (train/retrieval.py): queries go in blocks against all references,
    each block sized to stay under this; the N x N similarity matrix is never built. The scores do not depend on it."""

    def __post_init__(self) -> None:
        if self.eval_memory_mb < 1:
            raise ValueError(f"infrastructure.eval_memory_mb must be at least 1, got {self.eval_memory_mb}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"infrastructure.autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"infrastructure.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class LoggingConfig:
    level: str = "INFO"
    """Python logging level on rank 0."""
    tensorboard: bool | None = None
    """Write TensorBoard event files to a tensorboard/ folder beside each metrics.jsonl (every record's numbers per
    epoch; the config as hyper-parameters when training finishes): null = on when the tensorboard package is
    installed, true = required (exit 2 when it is missing), false = off. metrics.jsonl is written either way."""
    wandb: bool = False
    """Also log to W&B in offline mode under <run>/wandb (needs the wandb package; exit 2 when missing)."""
    wandb_project: str = "building_embed"
    """W&B project name of the offline run."""
    progress_every: int = 50
    """When stderr is not a terminal (SLURM logs), long loops (training batches, embedding batches) log a line every
    this many steps with rate and ETA (0 = off); on a terminal a tqdm bar shows instead."""


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
