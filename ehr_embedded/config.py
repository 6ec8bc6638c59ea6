"""Typed configs for every ehr_embedded stage.

Key names follow the original embedded-based pipeline (`model.name`, `data.vocab_embedding_path`,
`data.embedding_output_dir`, `training.early_stopping_patience`, ...) so its YAML files need few changes.
Two keys changed meaning on purpose:

- `model.embedding_dim` defaults to null: the projection reads the real width of the code-embedding table
  (the original hard-coded 768 while all-MiniLM-L6-v2 gives 384). A value that disagrees with the table is an error.
- `model.vocab_size` defaults to null: it is read from the vocabulary.

One file drives stage 1 (`create_vocab_embeddings` and `create_embeddings`, as in the original), one drives
`pretrain`, one drives `finetune` and `evaluate` (evaluate scores the run that finetune wrote).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PACKAGED_MINILM = "all-MiniLM-L6-v2"


# --------------------------------------------------------------------------------------------- stage 1


@dataclass
class TextEncoderConfig:
    """The sentence-transformers model that embeds code descriptions."""

    name: str = PACKAGED_MINILM
    """`all-MiniLM-L6-v2` (the packaged copy, 384-d) or a local sentence-transformers folder. Nothing downloads."""
    embedding_dim: int | None = None
    """Expected width; null reads it from the model. A mismatch is an error."""
    batch_size: int = 64
    normalize: bool = True
    """L2-normalise the description embeddings (cosine geometry, as sentence-transformers intends)."""


@dataclass
class Stage1DataConfig:
    data_dir: Path = Path("data/meds")
    """MEDS root: `data/**/*.parquet` plus `metadata/`."""
    labels_filepath: Path | None = None
    """MEDS label parquet (file or folder of parquets) or the original's labels CSV."""
    codes_filepath: Path | None = None
    """Default: `<data_dir>/metadata/codes.parquet` when it exists."""
    splits_filepath: Path | None = None
    """Default: `<data_dir>/metadata/subject_splits.parquet`."""
    vocab_filepath: Path | None = None
    """Optional original vocabulary CSV (`code` or `token` column, optional `description`): limits the vocabulary."""
    medical_lookup_filepath: Path | None = None
    """Optional CSV mapping codes to descriptions (columns `code`, `description`)."""
    lab_lookup_filepath: Path | None = None
    """Optional CSV mapping lab codes to descriptions (columns `code`, `description`)."""
    vocab_embedding_path: Path = Path("embeddings/vocab")
    """Folder written by create_vocab_embeddings: vocab.parquet, embeddings.npy, meta.json, coverage.json."""
    embedding_output_dir: Path = Path("embeddings/patients")
    """Folder written by create_embeddings: one compact store per split plus the code table."""


@dataclass
class VocabConfig:
    min_count: int = 1
    """A training-split code seen fewer times is left out of the next-event vocabulary (it still gets an
    embedding from its description when it appears in a sequence, see sequences.embed_unseen_codes)."""


@dataclass
class SequenceConfig:
    max_length: int = 512
    """Keep the most recent `max_length` events before prediction_time (static events always kept first)."""
    label_column: Literal["auto", "boolean_value", "integer_value"] = "auto"
    embed_unseen_codes: bool = True
    """Codes outside the training vocabulary get rows embedded from their descriptions (else they map to [UNK])."""
    pretrain_windows: bool = False
    """Also write a `pretrain` split: every training-split subject's whole timeline in consecutive max_length
    windows (far more next-event data than the label cuts; other splits are never touched)."""
    export_pt: bool = False
    """Also write the original per-patient .pt files under `<embedding_output_dir>/pt/<split>/`."""


@dataclass
class Stage1Config:
    model: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: Stage1DataConfig = field(default_factory=Stage1DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.vocab.min_count < 1:
            raise ValueError(f"vocab.min_count must be >= 1, got {self.vocab.min_count}")
        if self.sequences.max_length < 1:
            raise ValueError(f"sequences.max_length must be >= 1, got {self.sequences.max_length}")


# --------------------------------------------------------------------------------------------- models


@dataclass
class ModelConfig:
    type: Literal["transformer_encoder_embedded", "transformer_decoder_embedded"] = "transformer_encoder_embedded"
    embedding_dim: int | None = None
    """Null: the code-embedding table's width. A value that disagrees with the table is an error."""
    model_dim: int = 128
    n_heads: int = 4
    n_layers: int = 2
    dropout: float = 0.1
    max_length: int = 512
    num_classes: int = 2
    vocab_size: int | None = None
    """Next-event vocabulary size; null reads it from the code table."""
    use_values: bool = True
    """Add each event's numeric value (z-scored per code on train, plus a has-value flag)."""
    use_time: bool = True
    """Add log hours since the previous event and log hours before prediction_time."""

    def __post_init__(self) -> None:
        if self.model_dim % self.n_heads:
            raise ValueError(f"model.model_dim ({self.model_dim}) must be divisible by model.n_heads ({self.n_heads})")


@dataclass
class TrainDataConfig:
    embedding_output_dir: Path = Path("embeddings/patients")
    pretrain_split: str = "train"
    """pretrain's training split: `train` (the label cuts) or `pretrain` (sequences.pretrain_windows=true)."""


@dataclass
class TrainingConfig:
    task: Literal["autoregressive", "classification"] = "classification"
    output_dir: Path = Path("runs/ehr_embedded/finetune_encoder")
    pretrained_checkpoint: Path | None = None
    """Finetune only: a pretrain run dir or checkpoint dir whose decoder weights initialise the model."""
    seed: int = 0
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 50
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    min_learning_rate: float = 1e-6
    """Pretrain: cosine floor. Finetune: ReduceLROnPlateau floor."""
    warmup_steps: int = 0
    grad_clip: float = 1.0
    early_stopping_patience: int = 10
    scheduler_patience: int = 3
    scheduler_factor: float = 0.5
    class_weights: list[float] | Literal["auto"] | None = None
    """Per-class loss weights, `auto` (inverse training frequency) or null."""
    focal_gamma: float = 0.0
    """0 gives weighted cross-entropy; > 0 focal loss (common.losses.focal_loss)."""
    selection_metric: Literal["auroc", "auprc", "f1", "loss"] = "auroc"
    """Tuning-split metric for best checkpoint, early stopping and the LR plateau."""
    bucket_by_length: bool = True
    """Batch sequences of similar length together (less padding); false shuffles freely."""
    pad_to_max_length: bool = False
    """Pad every batch to model.max_length (the original's behaviour; only for comparisons)."""
    num_workers: int = 0
    save_every: int = 10
    keep_last_n: int = 3
    resume: str | bool = "auto"
    """`auto` (continue from checkpoints/latest when it exists), false, or a checkpoint directory."""
    device: str = "cpu"
    num_threads: int = 0
    """torch.set_num_threads when > 0."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("training.batch_size and training.eval_batch_size must be >= 1")
        if self.epochs < 1:
            raise ValueError(f"training.epochs must be >= 1, got {self.epochs}")


@dataclass
class EvaluateConfig:
    split: str = "held_out"
    checkpoint: str = "best"
    """`best`, `latest`, or a checkpoint directory."""
    n_bootstrap: int = 1000
    seed: int = 0
    calibration_bins: int = 10


@dataclass
class TrainConfig:
    """pretrain, finetune and evaluate."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------------------------- extras


@dataclass
class ExportConfig:
    """export_pt: write the original per-patient .pt layout from a compact store."""

    embedding_output_dir: Path = Path("embeddings/patients")
    output_dir: Path = Path("embeddings/patients_pt")
    splits: list[str] = field(default_factory=lambda: ["train", "tuning", "held_out"])
    dtype: Literal["float32", "float16"] = "float32"


@dataclass
class BaselineConfig:
    """baseline: count features + logistic regression on the same stored sequences and splits."""

    embedding_output_dir: Path = Path("embeddings/patients")
    output_dir: Path = Path("runs/ehr_embedded/baseline_counts")
    features: Literal["counts", "mean_embedding"] = "counts"
    max_length: int | None = None
    """Count only each sequence's most recent `max_length` events (match the model's max_length); null = all."""
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    """Inverse L2 strengths tried; the best on tuning AUROC is kept."""
    n_bootstrap: int = 1000
    seed: int = 0


@dataclass
class ConvertConfig:
    """convert_mimic: the shared MIMIC-IV demo (MEDS-like) to canonical MEDS with real code descriptions and tasks."""

    events_filepath: Path = Path("../shared/data/ehr_mimic4demo_meds/mimic_iv_demo_meds_events.parquet")
    raw_dir: Path = Path("../shared/data/ehr_mimic4demo_raw")
    output_dir: Path = Path("data/mimic4demo_meds")
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    """train / tuning / held_out fractions of subjects (the demo has only 100)."""
    seed: int = 0
    prediction_hours_after_admission: float = 24.0
    long_stay_days: float = 7.0
    subjects_limit: int = 0
    """Keep only the first N subjects (0 = all); for quick checks."""
