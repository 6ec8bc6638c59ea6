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

from common.tuning import check_heartbeat

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
    """Descriptions embedded per forward pass of the text model."""
    normalize: bool = True
    """L2-normalise the description embeddings (cosine geometry, as sentence-transformers intends)."""


@dataclass
class Stage1DataConfig:
    """Where stage 1 reads MEDS (and the original's CSVs) and writes the vocabulary and the sequence store."""

    data_dir: Path = Path("data/meds")
    """MEDS root: `data/**/*.parquet` plus `metadata/`."""
    labels_filepath: Path | None = None
    """MEDS label parquet (file or folder of parquets) or the original's labels CSV: one task."""
    task_labels: dict[str, Path] = field(default_factory=dict)
    """Several binary tasks learned together (multi-label), instead of labels_filepath: task name -> MEDS label
    parquet (file or folder). Rows are the union of the tasks' (subject_id, prediction_time); a task without a row at
    that time is missing there (stored as -1, left out of the loss and of that task's metrics)."""
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
    """Which training codes enter the next-event vocabulary."""

    min_count: int = 1
    """A training-split code seen fewer times is left out of the next-event vocabulary (it still gets an
    embedding from its description when it appears in a sequence, see sequences.embed_unseen_codes)."""


@dataclass
class SequenceConfig:
    """How each label row becomes a stored sequence."""

    max_length: int = 512
    """Keep the most recent `max_length` events before prediction_time (static events always kept first)."""
    label_column: Literal["auto", "boolean_value", "integer_value"] = "auto"
    """Label column of the labels file; `auto` takes boolean_value when present, else integer_value."""
    embed_unseen_codes: bool = True
    """Codes outside the training vocabulary get rows embedded from their descriptions (else they map to [UNK])."""
    pretrain_windows: bool = False
    """Also write a `pretrain` split: every training-split subject's whole timeline in consecutive max_length
    windows (far more next-event data than the label cuts; other splits are never touched)."""
    export_pt: bool = False
    """Also write the original per-patient .pt files under `<embedding_output_dir>/pt/<split>/`."""
    max_history_hours: float | None = None
    """Also drop timed events older than this many hours before prediction_time (null: the count window alone);
    static events are always kept."""
    context_codes: list[str] = field(default_factory=list)
    """Code prefixes (e.g. `HOSPITAL_ADMISSION`) whose most recent event before prediction_time is always kept, placed
    right after the static events, even when it falls outside the count or time window."""
    chunk_events: int = 4_000_000
    """Most MEDS events one process holds at once: a shard with more wanted events is processed in groups of whole
    subjects (read again per group), so memory is bounded by this and not by the shard or the dataset."""
    num_workers: int = 0
    """Processes over shards (0 or 1: in this process). Output is identical for any value."""
    shard_world_size: int = 1
    """> 1: this run builds only the parts of shards i with i % shard_world_size == shard_rank and stops (e.g. one
    SLURM array task each, sharing parts_dir); a final run with the default 1 reuses every part and writes the store."""
    shard_rank: int = 0
    """This run's index among shard_world_size (0-based)."""
    parts_dir: Path | None = None
    """Finished per-shard parts (what a re-run after a crash skips); null: `<embedding_output_dir>.parts` beside the
    store. Removed once the store is written."""
    all_to_split: str | None = None
    """Put every labelled subject in this split and read no splits file (predict on new MEDS data uses `held_out`)."""


@dataclass
class Stage1Config:
    """create_vocab_embeddings and create_embeddings (one file drives both, as in the original)."""

    model: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: Stage1DataConfig = field(default_factory=Stage1DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    device: str = "cpu"
    """Device of the text model: `cpu` or `cuda[:N]`."""

    def __post_init__(self) -> None:
        if self.vocab.min_count < 1:
            raise ValueError(f"vocab.min_count must be >= 1, got {self.vocab.min_count}")
        if self.sequences.max_length < 1:
            raise ValueError(f"sequences.max_length must be >= 1, got {self.sequences.max_length}")
        if self.sequences.chunk_events < 1 or self.sequences.num_workers < 0:
            raise ValueError("sequences.chunk_events must be >= 1 and sequences.num_workers >= 0")
        if not 0 <= self.sequences.shard_rank < self.sequences.shard_world_size:
            raise ValueError(f"sequences.shard_rank ({self.sequences.shard_rank}) must be in "
                             f"[0, sequences.shard_world_size={self.sequences.shard_world_size})")
        if self.sequences.max_history_hours is not None and not self.sequences.max_history_hours > 0:
            raise ValueError(f"sequences.max_history_hours must be > 0 or null, got {self.sequences.max_history_hours}")
        if self.data.task_labels and self.data.labels_filepath is not None:
            raise ValueError("data.labels_filepath and data.task_labels are both set; give one task's labels file, "
                             "or name every task (including that one) in data.task_labels")
        if len(self.data.task_labels) == 1:
            raise ValueError("data.task_labels names one task; use data.labels_filepath for a single task, or add "
                             "the other tasks")
        if self.sequences.all_to_split not in (None, "train", "tuning", "held_out"):
            raise ValueError(f"sequences.all_to_split must be train, tuning, held_out or null, "
                             f"got {self.sequences.all_to_split!r}")


# --------------------------------------------------------------------------------------------- models


@dataclass
class ModelConfig:
    """The transformer over event sequences (tiny values train on CPU in seconds)."""

    type: Literal["transformer_encoder_embedded", "transformer_decoder_embedded"] = "transformer_encoder_embedded"
    """Bidirectional encoder (pooled by `pooling`) or causal decoder (next-event head + classification on the last event)."""
    embedding_dim: int | None = None
    """Null: the code-embedding table's width. A value that disagrees with the table is an error."""
    model_dim: int = 128
    """Width of the transformer; the frozen code embeddings are projected from embedding_dim to it."""
    n_heads: int = 4
    """Attention heads; must divide model_dim."""
    n_layers: int = 2
    """Transformer blocks."""
    dropout: float = 0.1
    """Dropout inside the blocks (0 disables it)."""
    max_length: int = 512
    """Most events the model reads per sequence: the static events, then the most recent ones."""
    num_classes: int = 2
    """Classes of the label: 2 (binary metrics), K > 2 (integer_value, multi-class metrics), 1 for a regression
    task (a store built from float_value labels): one output, MSE on the train-standardised target; or, for a
    multi-label store (data.task_labels), the number of tasks: one sigmoid output per task."""
    vocab_size: int | None = None
    """Next-event vocabulary size; null reads it from the code table."""
    use_values: bool = True
    """Add each event's numeric value (z-scored per code on train, plus a has-value flag)."""
    use_time: bool = True
    """Add log hours since the previous event and log hours before prediction_time."""
    input_scaling: Literal["balanced", "none"] = "balanced"
    """`balanced`: code rows rescaled to unit RMS, log hours divided by log1p(720), positions initialised at
    N(0, 0.02), so code, value, time and position enter on comparable scales. `none`: the earlier scales (unit-length
    rows give ~0.04 per component against N(0, 1) positions; code identity is nearly invisible). Runs whose
    config.yaml predates this key are loaded with `none`."""
    code_embedding: Literal["frozen", "trainable"] = "frozen"
    """`frozen`: each code is its projected description embedding. `trainable`: plus a learned per-code vector
    (zero at init, weight-decayed) for the training vocabulary, i.e. a per-code embedding initialised from the
    sentence embedding; codes unseen in training still use their description alone."""
    pooling: Literal["mean", "max", "attention"] = "max"
    """Encoder only: how the final event states become one vector. `max` (per feature over events) and `attention`
    (learned softmax weight per event) let one decisive event decide; `mean` (the original; runs whose config.yaml
    predates this key load with it) dilutes it by the sequence length. The decoder always reads its last event."""

    def __post_init__(self) -> None:
        if self.model_dim % self.n_heads:
            raise ValueError(f"model.model_dim ({self.model_dim}) must be divisible by model.n_heads ({self.n_heads})")


@dataclass
class TrainDataConfig:
    """The store pretrain / finetune / evaluate read."""

    embedding_output_dir: Path = Path("embeddings/patients")
    """Folder written by create_embeddings: one compact store per split plus the code table."""
    pretrain_split: str = "train"
    """pretrain's training split: `train` (the label cuts) or `pretrain` (sequences.pretrain_windows=true)."""


@dataclass
class TrainingConfig:
    """The training loop, checkpoints and resume."""

    task: Literal["autoregressive", "classification"] = "classification"
    """`autoregressive` for pretrain (next-event prediction), `classification` for finetune."""
    output_dir: Path = Path("runs/ehr_embedded/finetune_encoder")
    """Run directory: config.yaml, train.log, metrics.jsonl, checkpoints/, reports/, predictions/, plots/."""
    pretrained_checkpoint: Path | None = None
    """Finetune only: a pretrain run dir or checkpoint dir whose decoder weights initialise the model."""
    seed: int = 0
    """Seeds model init, dropout and the batch order (drawn from seed + epoch)."""
    batch_size: int = 32
    """Sequences per training step (per process under torchrun)."""
    eval_batch_size: int = 64
    """Sequences per scoring step (tuning, evaluate, predict); may change across a resume."""
    epochs: int = 50
    """Last epoch to train; raising it on a finished run and resuming trains the extra epochs."""
    learning_rate: float = 1e-4
    """AdamW peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    min_learning_rate: float = 1e-6
    """Pretrain: cosine floor. Finetune: ReduceLROnPlateau floor."""
    warmup_steps: int = 0
    """Pretrain: linear warmup steps before the cosine decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    early_stopping_patience: int = 10
    """Stop after this many epochs without a better tuning selection_metric (pretrain: tuning loss)."""
    scheduler_patience: int = 3
    """Finetune: epochs without improvement before ReduceLROnPlateau lowers the learning rate."""
    scheduler_factor: float = 0.5
    """Finetune: ReduceLROnPlateau's multiplier."""
    class_weights: list[float] | Literal["auto"] | None = None
    """Per-class loss weights, `auto` (inverse training frequency) or null."""
    focal_gamma: float = 0.0
    """0 gives weighted cross-entropy; > 0 focal loss (common.losses.focal_loss)."""
    selection_metric: Literal["auroc", "auprc", "f1", "loss", "mae"] = "auroc"
    """Tuning-split metric for best checkpoint, early stopping and the LR plateau. Regression (model.num_classes=1)
    selects on `mae` (lower is better; auroc / auprc / f1 are read as mae there) or `loss` (standardised MSE)."""
    bucket_by_length: bool = True
    """Batch sequences of similar length together (less padding); false shuffles freely."""
    pad_to_max_length: bool = False
    """Pad every batch to model.max_length (the original's behaviour; only for comparisons)."""
    num_workers: int = 0
    """DataLoader worker processes (0 loads in the training process)."""
    save_every: int = 10
    """Also keep checkpoints/epoch_N every N epochs (0: only latest and best)."""
    keep_last_n: int = 3
    """How many epoch_N checkpoints to keep."""
    resume: str | bool = "auto"
    """`auto` (continue from checkpoints/latest when it exists and its config/data fingerprint agrees; else exit 2
    naming what changed), `force` (continue even so; logged), false (start over), or a checkpoint directory."""
    device: str = "cpu"
    """`cpu` or `cuda[:N]`; under torchrun each process takes its local GPU."""
    num_threads: int = 0
    """torch.set_num_threads when > 0."""
    tensorboard: bool | None = None
    """Write TensorBoard event files to a tensorboard/ folder beside each metrics.jsonl (every record's numbers per
    epoch; the config as hyper-parameters when training finishes): null = on when the tensorboard package is
    installed, true = required (exit 2 when it is missing), false = off. metrics.jsonl is written either way."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("training.batch_size and training.eval_batch_size must be >= 1")
        if self.epochs < 1:
            raise ValueError(f"training.epochs must be >= 1, got {self.epochs}")


@dataclass
class EvaluateConfig:
    """What evaluate scores and how (it reads the run under training.output_dir)."""

    split: str = "held_out"
    """Store split to score: train, tuning or held_out."""
    checkpoint: str = "best"
    """`best`, `latest`, or a checkpoint directory."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    calibration_bins: int = 10
    """Quantile bins of the calibration plot."""


@dataclass
class OptunaConfig:
    """optuna_worker and fetch_best_and_train: the shared hyperparameter study (not part of the resume fingerprint)."""

    storage: str = "sqlite:///runs/ehr_embedded/optuna.db"
    """RDB storage URL of the study (a SQLite file on one node; PostgreSQL when several nodes share it)."""
    study: str = "ehr_embedded"
    """Study name; trial runs go to `<parent of training.output_dir>/optuna/<study>/trial_<n>`."""
    trials: int = 10
    """optuna_worker: trials this worker runs."""
    total_trials: int = 0
    """optuna_worker: every worker stops once the study holds this many trials (0 = no cap)."""
    epochs: int = 5
    """optuna_worker: epochs of each (short) trial run; the median pruner judges tuning AUROC after each."""
    warmup_epochs: int = 1
    """optuna_worker: epochs a trial runs before it may be pruned (with optuna.cv_folds the pruner's steps are folds
    and only the first fold is exempt)."""
    heartbeat_interval: int = 60
    """optuna_worker: seconds between a running trial's heartbeats in the storage."""
    grace_period: int = 180
    """optuna_worker: a RUNNING trial without a heartbeat for this long (its worker was killed) is marked FAIL by the
    next worker that starts a trial, and its parameters are queued again (optuna.max_retries times)."""
    max_retries: int = 1
    """optuna_worker: how often a killed trial's parameters are retried."""
    model_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Choices of model.model_dim (each must be divisible by model.n_heads)."""
    n_layers: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Choices of model.n_layers."""
    poolings: list[str] = field(default_factory=lambda: ["max", "attention", "mean"])
    """Choices of model.pooling (training.learning_rate, training.weight_decay and model.dropout are searched on
    ranges fixed in optuna_worker.search_space)."""
    cv_folds: int = 0
    """optuna_worker: 0 = score a trial on the store's tuning split; K >= 2 = score it by the mean best tuning AUROC
    of K short finetunes over subject-grouped folds of train + tuning pooled (held_out never read;
    ehr_embedded.cv_folds)."""
    cv_seed: int = 0
    """optuna_worker: seed of the fold assignment when optuna.cv_folds >= 2 (same seed, same folds)."""

    def __post_init__(self) -> None:
        if self.trials < 1 or self.epochs < 1 or self.total_trials < 0:
            raise ValueError("optuna.trials and optuna.epochs must be >= 1 and optuna.total_trials >= 0")
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"optuna.cv_folds={self.cv_folds}: use 0 (tune on the tuning split) or K >= 2 folds")
        check_heartbeat(self.heartbeat_interval, self.grace_period, self.max_retries)
        if not self.model_dims or not self.n_layers or not self.poolings:
            raise ValueError("optuna.model_dims, optuna.n_layers and optuna.poolings each need at least one choice")
        bad = [p for p in self.poolings if p not in ("mean", "max", "attention")]
        if bad:
            raise ValueError(f"optuna.poolings: {bad} are not poolings; choose from mean, max, attention")


@dataclass
class TrainConfig:
    """pretrain, finetune and evaluate."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    """The store."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The loop, checkpoints and resume."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Scoring a finished run (not part of the resume fingerprint)."""
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    """The hyperparameter study (optuna_worker, fetch_best_and_train; not part of the resume fingerprint)."""


# --------------------------------------------------------------------------------------------- extras


@dataclass
class ExportConfig:
    """export_pt: write the original per-patient .pt layout from a compact store."""

    embedding_output_dir: Path = Path("embeddings/patients")
    """The compact store to export."""
    output_dir: Path = Path("embeddings/patients_pt")
    """Where `<split>/patient_<i>.pt` files go."""
    splits: list[str] = field(default_factory=lambda: ["train", "tuning", "held_out"])
    """Splits to export."""
    dtype: Literal["float32", "float16"] = "float32"
    """dtype of the exported embeddings."""


@dataclass
class BaselineConfig:
    """baseline: count features + logistic regression on the same stored sequences and splits."""

    embedding_output_dir: Path = Path("embeddings/patients")
    """The store the transformers train on (same sequences, same splits)."""
    output_dir: Path = Path("runs/ehr_embedded/baseline_counts")
    """Writes reports/baseline_held_out.json and predictions/held_out.parquet here."""
    features: Literal["counts", "mean_embedding"] = "counts"
    """`counts`: log1p count of each code; `mean_embedding`: the mean frozen description embedding."""
    max_length: int | None = None
    """Count only each sequence's most recent `max_length` events (match the model's max_length); null = all."""
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    """Inverse L2 strengths tried; the best on tuning AUROC is kept. Regression stores (float_value labels) fit Ridge
    with alpha = 1 / C for each C here, the best on tuning MAE kept."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed of the logistic regression and the bootstrap."""
    selection: Literal["tuning", "grouped_cv"] = "tuning"
    """How C is chosen: `tuning` = best tuning AUROC of a fit on train; `grouped_cv` = best mean AUROC over
    `cv_folds` subject-grouped folds of train + tuning pooled (the folds optuna.cv_folds cuts). Either way the final
    model is fitted on train and its threshold chosen on tuning. Classification only."""
    cv_folds: int = 5
    """Folds for selection=grouped_cv (>= 2, at most the subjects of train + tuning)."""
    cv_seed: int = 0
    """Seed of the fold assignment for selection=grouped_cv (ehr_embedded.cv_folds.assign_folds)."""

    def __post_init__(self) -> None:
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")


@dataclass
class ConvertConfig:
    """convert_mimic: the shared MIMIC-IV demo (MEDS-like) to canonical MEDS with real code descriptions and tasks."""

    events_filepath: Path = Path("../shared/data/ehr_mimic4demo_meds/mimic_iv_demo_meds_events.parquet")
    """The shared MEDS-like events parquet of the MIMIC-IV demo."""
    raw_dir: Path = Path("../shared/data/ehr_mimic4demo_raw")
    """The raw MIMIC-IV demo tables (hosp/, icu/) for descriptions and admissions."""
    output_dir: Path = Path("data/mimic4demo_meds")
    """The canonical MEDS root written (data/, metadata/, labels/)."""
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    """train / tuning / held_out fractions of subjects (the demo has only 100)."""
    seed: int = 0
    """Seed of the subject split."""
    prediction_hours_after_admission: float = 24.0
    """prediction_time = admission time + this many hours (both tasks)."""
    long_stay_days: float = 7.0
    """long_stay label: length of stay above this many days."""
    subjects_limit: int = 0
    """Keep only the first N subjects (0 = all); for quick checks."""


@dataclass
class PredictConfig:
    """predict: a finetuned run's predictions for one split of a store (or new MEDS data), in the columns evaluate
    writes for the run's task (binary: the MEDS predictions schema; multi-class; regression)."""

    run_dir: Path = Path("runs/ehr_embedded/finetune_encoder")
    """A finetune run directory (its config.yaml gives the model, reports/threshold.json the binary threshold,
    reports/target_scaling.json a regression run's target mean / std)."""
    split: str = "held_out"
    """Split of the store to predict: train, tuning or held_out."""
    dataset_dir: Path | None = None
    """Store to read (create_embeddings output); null = the one the run was trained on. Its code table must have
    the width the checkpoint was trained on."""
    meds_dir: Path | None = None
    """MEDS root of new data (`data/**/*.parquet`, optional `metadata/codes.parquet`; no splits file needed): every
    subject of `labels` is cut with the run's code table and sequence settings into a temporary store and predicted
    (`split` and `dataset_dir` are then unused)."""
    labels: Path | None = None
    """With `meds_dir`: the label rows to predict (subject_id, prediction_time and the value column of the run's task:
    boolean_value (or integer_value 0/1) for binary, integer_value for multi-class, float_value for regression)."""
    checkpoint: str = "best"
    """`best`, `latest`, or a checkpoint directory."""
    output: Path | None = None
    """Predictions parquet to write; null = `<run_dir>/predictions/predict_<split>.parquet` (`predict_meds.parquet`
    with `meds_dir`)."""
    batch_size: int = 64
    """Sequences per forward pass."""
    device: str = "cpu"
    """`cpu` or `cuda[:N]`."""


@dataclass
class RepresentConfig:
    """represent: the pooled patient representation a finetuned run's classification head reads, per label row."""

    run_dir: Path = Path("runs/ehr_embedded/finetune_encoder")
    """A finetune run directory (encoder or decoder; its config.yaml gives the model)."""
    split: str = "all"
    """Store split to export: train, tuning, held_out, or `all` (the three, what linear_probe reads)."""
    dataset_dir: Path | None = None
    """Store to read; null = the one the run was trained on."""
    checkpoint: str = "best"
    """`best`, `latest`, or a checkpoint directory."""
    output: Path | None = None
    """Parquet to write for a single split; null = `<run_dir>/representations/<split>.parquet`."""
    batch_size: int = 64
    """Sequences per forward pass."""
    device: str = "cpu"
    """`cpu` or `cuda[:N]`."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "tuning", "held_out", "all"):
            raise ValueError(f"split={self.split!r}: expected train, tuning, held_out or all")
        if self.output is not None and self.split == "all":
            raise ValueError("output names one file: give split=train|tuning|held_out with it, or leave output null")


@dataclass
class LinearProbeConfig:
    """linear_probe: standardised logistic regression on exported representations (train -> C on tuning ->
    held_out)."""

    run_dir: Path | None = None
    """A run whose `representations/{train,tuning,held_out}.parquet` were written by represent (or give the three
    files below; a file given explicitly wins)."""
    train: Path | None = None
    """Training representations parquet."""
    tuning: Path | None = None
    """Tuning representations parquet (C and the decision threshold are chosen on it)."""
    held_out: Path | None = None
    """Held-out representations parquet (scored once, with subject-bootstrap 95% intervals)."""
    output_dir: Path | None = None
    """Where linear_probe.{json,md} and linear_probe_held_out.parquet go; null = beside the held_out file."""
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    """Inverse L2 strengths tried."""
    selection: Literal["tuning", "grouped_cv"] = "tuning"
    """`tuning`: C with the best tuning AUROC (binary; macro one-vs-rest for multi-class). `grouped_cv`: C with
    the best mean AUROC over `cv_folds` subject-grouped folds of train (no fold shares a subject), then refit on train."""
    cv_folds: int = 5
    """Folds for selection=grouped_cv."""
    class_weight: Literal["balanced", "none"] = "balanced"
    """Class weights of the logistic regression (`balanced`, as the counts baseline)."""
    max_iter: int = 5000
    """lbfgs iterations."""
    n_bootstrap: int = 1000
    """Bootstrap resamples (subjects) for the 95% intervals."""
    seed: int = 0
    """Seed of the logistic regression and the bootstrap."""

    def __post_init__(self) -> None:
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ValueError(f"c_grid must hold positive values, got {self.c_grid}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")
