"""Typed configuration for every price_fusion stage.

One tree of dataclasses serves all stages; each stage reads the sections it needs. A config file states only what
differs from these defaults, e.g. ``configs/price_fusion/demo.yaml``; ``key=value`` overrides go on the command line:

    python -m price_fusion.train --config configs/price_fusion/base.yaml train.loss=focal_smape model.name=advanced_moe
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.tuning import check_heartbeat

MODEL_NAMES = ("two_branch", "advanced_moe")
LOSS_NAMES = ("weighted_smape", "focal_smape", "hybrid_focal_smape", "smape", "huber", "mse", "mae")
# Loss names that were renamed: old name -> new name (the old name is refused with the new one in the message).
RENAMED_LOSSES = {"log_smape": "smape"}
GROUP_KEYS = ("name", "none")
STRUCTURAL_MODES = ("quantities", "legacy")
BASELINE_METHODS = ("median", "knn", "ridge")
IKEA_GROUPS = ("name", "item")
BAD_PRICE_POLICIES = ("skip", "error")
ENSEMBLE_METHODS = ("mean", "fitted")
EMBED_DEVICES = ("auto", "cpu", "cuda")
EMBED_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class DataConfig:
    """Where the challenge-format CSVs and the embedding store live (paths relative to the working directory)."""

    train_csv: str = "data/train.csv"
    """Labelled catalogue: sample_id, catalog_content, image_link, price (dollars)."""
    test_csv: str = "data/test.csv"
    """Unlabelled catalogue to predict: sample_id, catalog_content, image_link."""
    image_dir: str = "data/images"
    """Folder that relative `image_link` values (and URL basenames) are resolved against."""
    embeddings_dir: str = "embeddings"
    """Output of `embed`, input of `train` / `gbt` / `predict`: <embeddings_dir>/<split>/ + unit_vocab.json."""
    bad_price: str = "skip"
    """Rows whose price is empty, non-numeric, zero, negative or NaN: "skip" (counted and logged) or "error"."""
    val_fraction: float = 0.2
    """Share of the training rows held out for early stopping and the best checkpoint (single-split runs)."""
    n_price_bins: int = 10
    """Stratification of the split / folds: this many quantile bins of (each group's median) log price."""
    split_seed: int = 42
    """Seed of the train / validation split and of the K folds."""
    group_column: str = ""
    """Column of the training CSV naming each product's group (product family): every split (validation, K folds,
    inner splits) keeps a group on one side. "" = groups from data.group_key."""
    group_key: str = "name"
    """Groups when data.group_column is "": name (the normalised Item Name: size, pack, numbers and parentheses
    removed, so variants of one product share a group) or none (every product its own group: row-level splits)."""
    structural: str = "quantities"
    """Structural features that `embed` writes beside the text embedding (price_fusion/quantities.py):
    quantities (amount x unit x pack normalised to grams / millilitres / centimetres / items, the dimension and the
    unit one-hot, log1p total per dimension, an object's sizes: 13 + |unit vocabulary| columns) or legacy (the
    original's 3 columns: log1p(Value) whatever its unit, the unit's frequency rank / |vocabulary|, log1p(pack)).
    Part of the resume fingerprint; `train` refuses embeddings written under the other setting."""

    def __post_init__(self) -> None:
        if self.structural not in STRUCTURAL_MODES:
            raise ValueError(f"data.structural must be one of {STRUCTURAL_MODES}, got {self.structural!r}")
        if self.group_key not in GROUP_KEYS:
            raise ValueError(f"data.group_key must be one of {GROUP_KEYS}, got {self.group_key!r}")
        if self.bad_price not in BAD_PRICE_POLICIES:
            raise ValueError(f"data.bad_price must be one of {BAD_PRICE_POLICIES}, got {self.bad_price!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class EmbedConfig:
    """Encoders (local paths only, nothing is downloaded) and what to embed."""

    clip_model: str = ""
    """Local HF directory of a CLIP model (CLIPModel or CLIPVisionModelWithProjection); "" = no image input."""
    text_model: str = "minilm"
    """Local sentence-transformers directory (Qwen3-Embedding in production); "minilm" = packaged all-MiniLM-L6-v2."""
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    """Which CSVs to embed: train and/or test (test alone reuses the unit vocabulary fitted on train)."""
    image_batch_size: int = 32
    """Images per CLIP forward pass."""
    text_batch_size: int = 64
    """Texts per sentence-encoder forward pass."""
    min_unit_count: int = 2
    """Units seen fewer times than this in train map to the unknown-unit index 0."""
    import_clip_dir: str = ""
    """Import the original's CLIP vectors instead of encoding: a folder ({split} is replaced by train / test)."""
    import_qwen_pickle: str = ""
    """Import the original's Qwen vectors instead of encoding: a pickle ({split} replaced); trusted files only."""
    qwen_has_struct: bool = True
    """The original's Qwen vectors are 1027-d: 1024 text + 3 structural features appended at the end (used as the
    structural features under data.structural=legacy; dropped and recomputed from the text under quantities)."""
    num_threads: int = 0
    """torch intra-op threads while encoding; 0 leaves torch's default (1 is fastest on a busy 2-core machine)."""
    device: str = "auto"
    """Where both encoders run: auto (CUDA when available, else CPU), cpu or cuda."""
    precision: str = "auto"
    """Autocast dtype of the encoders' forward passes: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16. The
    stored vectors are float32 whatever this is."""
    num_workers: int = 2
    """DataLoader worker processes that open, decode and preprocess images beside the encoder; 0 = in process."""
    max_seq_length: int = 0
    """Tokens per text kept by the sentence encoder (longer texts are truncated); 0 = the model's own limit."""
    chunk_rows: int = 4096
    """Products per resumable chunk: each finished chunk is saved under <embeddings_dir>/<split>.partial/, and a
    re-run after a kill encodes only the chunks not yet saved."""

    def __post_init__(self) -> None:
        if self.device not in EMBED_DEVICES:
            raise ValueError(f"embed.device must be one of {EMBED_DEVICES}, got {self.device!r}")
        if self.precision not in EMBED_PRECISIONS:
            raise ValueError(f"embed.precision must be one of {EMBED_PRECISIONS}, got {self.precision!r}")
        for key in ("image_batch_size", "text_batch_size", "chunk_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"embed.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("num_workers", "max_seq_length", "num_threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"embed.{key} must be 0 or more, got {getattr(self, key)}")


@dataclass
class ModelConfig:
    """`TwoBranchFusionModel` / `AdvancedMoEFusionModel` sizes. Null dims are taken from the embedding manifest."""

    name: str = "two_branch"
    """two_branch (concat + MLP head) or advanced_moe (attention over the 2 tokens + gated experts)."""
    image_dim: int | None = 768
    """Width of the image embeddings (768 for CLIP ViT-L/14); null = take it from the files."""
    text_dim: int | None = 1024
    """Width of the text embeddings (1024 for Qwen3-Embedding-0.6B); null = take it from the files."""
    struct_dim: int | None = None
    """Width of the structural features appended to the text (3 under data.structural=legacy; 13 + |unit vocabulary|
    under quantities); null = take it from the files."""
    branch_dim: int = 512
    """Output width of the image branch and of the text + struct branch."""
    head_dims: list[int] = field(default_factory=lambda: [512, 256, 128])
    """Hidden widths of the regression head (each expert's head for advanced_moe), before the 1-d output."""
    dropout: float = 0.2
    """Dropout after each hidden layer."""
    num_experts: int = 3
    """advanced_moe: experts behind the softmax gate."""
    num_heads: int = 8
    """advanced_moe: attention heads over the image and text tokens (must divide branch_dim)."""
    use_image: bool = True
    """False trains with the image branch masked for every sample (text-only data such as the IKEA catalogue)."""

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name must be one of {MODEL_NAMES}, got {self.name!r}")
        if self.branch_dim % self.num_heads:
            raise ValueError(f"model.branch_dim ({self.branch_dim}) must be divisible by model.num_heads "
                             f"({self.num_heads})")


@dataclass
class TrainConfig:
    """Optimisation, loss and checkpointing of `train` (also the seed of `gbt`)."""

    seed: int = 0
    """Seed of initialisation, dropout and the per-epoch shuffle (epoch order = f(seed, epoch))."""
    epochs: int = 1000
    """Most epochs; raising it on a finished run and resuming continues that run."""
    batch_size: int = 256
    """Products per optimiser step."""
    lr: float = 1e-3
    """AdamW learning rate (reduced on validation plateaus)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (not applied to biases and norms)."""
    loss: str = "weighted_smape"
    """One of weighted_smape, focal_smape, hybrid_focal_smape, smape (plain SMAPE of the prices, computed from log
    prices), huber, mse, mae (the last three on log price)."""
    tier_edges: list[float] = field(default_factory=lambda: [10.0, 50.0])
    """weighted_smape: price tier edges in dollars."""
    tier_weights: list[float] = field(default_factory=lambda: [2.0, 1.0, 1.5])
    """weighted_smape: weight of each tier; len(tier_weights) == len(tier_edges) + 1."""
    smape_gamma: float = 2.0
    """focal_smape / hybrid_focal_smape: exponent on each SMAPE term (1 = plain SMAPE; larger favours big errors)."""
    hybrid_alpha: float = 0.5
    """hybrid_focal_smape: alpha x focal SMAPE + (1 - alpha) x Huber on log price."""
    huber_delta: float = 1.0
    """huber: the delta (in log price) where the loss turns from quadratic to linear."""
    load_balance_weight: float = 0.01
    """Weight of the mixture-of-experts load-balancing term (advanced_moe only)."""
    grad_clip: float = 1.0
    """Clip the gradient's global L2 norm to this."""
    patience: int = 15
    """Early stopping: epochs without a better validation SMAPE before the run stops."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau: multiply the learning rate by this on a plateau."""
    plateau_patience: int = 5
    """ReduceLROnPlateau: epochs without improvement before the learning rate drops."""
    checkpoint_every: int = 100
    """Also keep checkpoints/epoch_N every this many epochs (latest and best are written every epoch)."""
    keep_last_n: int = 3
    """How many of the periodic epoch_N checkpoints to keep."""
    resume: str | bool = "auto"
    """auto: continue from checkpoints/latest if its fingerprint (config + data) matches, else exit 2 naming what
    changed; force: continue anyway (logged); false: start over; a path: resume from that checkpoint."""
    kfold: int = 0
    """0 = one grouped split (data.val_fraction of the groups held out for early stopping); K >= 2 = K grouped folds
    with out-of-fold predictions, each fold early-stopped on an inner grouped split of its own training rows."""
    refit: bool = False
    """After the early-stopped fit(s), train one more model on every training row for the number of epochs they chose
    (median best epoch over the folds) with their learning-rate schedule; `predict` then uses it (<run>/refit/).
    Validation / out-of-fold predictions stay those of the early-stopped models."""
    num_threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    max_epochs_this_run: int = 0
    """Stop after this many epochs of this process (testing kill-and-resume); 0 = no limit."""
    tensorboard: bool | None = None
    """Write TensorBoard event files to a tensorboard/ folder beside each metrics.jsonl (every record's numbers per
    epoch; the config as hyper-parameters when training finishes): null = on when the tensorboard package is
    installed, true = required (exit 2 when it is missing), false = off. metrics.jsonl is written either way."""

    def __post_init__(self) -> None:
        if self.loss in RENAMED_LOSSES:
            raise ValueError(f"train.loss={self.loss} is now called {RENAMED_LOSSES[self.loss]} (it is SMAPE of the "
                             f"prices, computed from log prices); set train.loss={RENAMED_LOSSES[self.loss]}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"train.loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if len(self.tier_weights) != len(self.tier_edges) + 1:
            raise ValueError(f"train.tier_weights needs len(train.tier_edges) + 1 = {len(self.tier_edges) + 1} "
                             f"values, got {len(self.tier_weights)}")
        if self.kfold == 1 or self.kfold < 0:
            raise ValueError(f"train.kfold must be 0 (single split) or >= 2, got {self.kfold}")


@dataclass
class EvaluateConfig:
    """What `evaluate` scores and how it groups the errors."""

    checkpoint: str = "best"
    """best, latest, epoch_N (inside the run's checkpoints/) or a checkpoint path."""
    predictions: str = ""
    """Score this prediction CSV (sample_id,price of labelled products, e.g. out-of-fold) instead of the run."""
    labels: str = ""
    """True prices (sample_id,price, or a train-format CSV) for `predictions`; "" = data.train_csv."""
    bin_edges: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0])
    """Price bins in dollars for the per-bin table ($0-5, $5-10, ...); the last bin is open-ended."""
    range_edges: list[float] = field(default_factory=lambda: [10.0, 50.0])
    """Low < range_edges[0] <= Medium < range_edges[1] <= High."""
    top_n: int = 20
    """Rows in worst_predictions.csv and best_predictions.csv."""


@dataclass
class PredictConfig:
    """What `predict` writes."""

    checkpoint: str = "best"
    """best, latest, epoch_N or a checkpoint path (for K-fold runs: the same name in every fold)."""
    split: str = "test"
    """test (data.test_csv) or train (data.train_csv), read from <embeddings_dir>/<split>/."""
    output: str = ""
    """Prediction CSV to write; "" = <run_dir>/predictions/test_out.csv."""


@dataclass
class EnsembleConfig:
    """How `ensemble` combines prediction files."""

    inputs: list[str] = field(default_factory=list)
    """Prediction CSVs (sample_id,price) to combine, all for the same ids."""
    method: str = "mean"
    """mean (equal weights) or fitted (simplex weights minimising SMAPE on oof_inputs; never worse there than the
    best single input, which is one of the candidates)."""
    oof_inputs: list[str] = field(default_factory=list)
    """method=fitted: out-of-fold prediction CSVs (sample_id,price) of the same models, in the order of inputs."""
    min_gain: float = 0.5
    """method=fitted: keep the blend only if its out-of-fold SMAPE is at least this many points below the best single
    input's; else use that input alone (on a few hundred products a smaller gain is noise, and blending for it made
    the held-out score worse than the best baseline's)."""
    output: str = "runs/price_fusion/ensemble/test_out.csv"
    """The combined CSV; the weights go to <output stem>.weights.json beside it."""

    def __post_init__(self) -> None:
        if self.method not in ENSEMBLE_METHODS:
            raise ValueError(f"ensemble.method must be one of {ENSEMBLE_METHODS}, got {self.method!r}")


@dataclass
class GbtConfig:
    """HistGradientBoosting on (PCA-reduced) embeddings + structural + out-of-fold kNN price features."""

    folds: int = 5
    """Outer folds: out-of-fold predictions for every training row; the test prediction averages the fold models."""
    knn_k: int = 10
    """Neighbours (cosine on text embeddings) behind the kNN price features."""
    pca_dims: int = 32
    """PCA components per embedding before the trees (trees on 1800 raw dims are slow); 0 = raw dims."""
    max_iter: int = 300
    """Most boosting iterations."""
    learning_rate: float = 0.05
    """Boosting learning rate."""
    max_leaf_nodes: int = 31
    """Leaves per tree."""
    l2_regularization: float = 1.0
    """L2 penalty on leaf values."""
    early_stopping_rounds: int = 20
    """Stop boosting after this many iterations without improvement on a 10% inner validation (N >= 100)."""
    num_threads: int = 0
    """OpenMP threads for the trees and faiss; 0 keeps the libraries' default (1 is fastest on a busy 2-core machine)."""


@dataclass
class BaselinesConfig:
    """The simple methods of `python -m price_fusion.baselines`, each with out-of-fold and test predictions."""

    methods: list[str] = field(default_factory=lambda: list(BASELINE_METHODS))
    """Any of median (training median price), knn (cosine kNN on text embeddings), ridge (on text embeddings +
    standardised structural features); each writes <run>/<method>/predictions/{oof_predictions,test_out}.csv."""
    folds: int = 5
    """Outer grouped folds for the out-of-fold predictions (the same folds as train.kfold / gbt.folds of equal K)."""
    cv_folds: int = 5
    """Grouped inner folds choosing k (knn) and alpha (ridge) on the training rows of each fit."""
    knn_ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 40])
    """Candidate neighbour counts (each uniform or distance-weighted)."""
    ridge_alphas: list[float] = field(default_factory=lambda: [float(f"{a:.4g}") for a in
                                                                [10 ** (e / 2) for e in range(-6, 7)]])
    """Candidate ridge penalties."""
    num_threads: int = 0
    """BLAS threads; 0 keeps the library default (1 is fastest on a busy 2-core machine)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in BASELINE_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"baselines.methods must be a non-empty list of {BASELINE_METHODS}, got {self.methods}")
        if self.folds < 2 or self.cv_folds < 2:
            raise ValueError(f"baselines.folds and baselines.cv_folds must be >= 2, got {self.folds}, {self.cv_folds}")


@dataclass
class IkeaConfig:
    """The IKEA real-data study (python -m studies.price_fusion.ikea; read by no product stage)."""

    source: str = "products_ikea/ikea_sa_2020.csv"
    """The catalogue, relative to $REAL_DATA_DIR (default ../shared/data beside the repository)."""
    max_products: int = 0
    """0 = every product; a smaller number draws a seeded subset (the real_data test uses 400)."""
    test_fraction: float = 0.2
    """Share of the product groups held out as the test set, stratified by the groups' median price."""
    group: str = "name"
    """Test-split groups: name (IKEA's product name, e.g. BILLY: its colours and sizes never straddle train and test)
    or item (every item its own group: a row-level split, where most test items had a same-name variant in
    training). The training stages inside the benchmark group by the same key."""
    kfold: int = 5
    """Folds of the K-fold fusion run, the trees + kNN head and the baselines' out-of-fold predictions."""
    extras: bool = False
    """True: skip the benchmark and train the variants (advanced_moe, the mean of two_branch, advanced_moe and gbt) on
    the split and embeddings of the finished benchmark run of the same run_name; writes reports/ikea_extras.{json,md}."""

    def __post_init__(self) -> None:
        if self.group not in IKEA_GROUPS:
            raise ValueError(f"ikea.group must be one of {IKEA_GROUPS}, got {self.group!r}")
        if self.kfold < 2:
            raise ValueError(f"ikea.kfold must be >= 2, got {self.kfold}")


@dataclass
class OptunaConfig:
    """Hyperparameter search (python -m price_fusion.optuna_worker, then price_fusion.fetch_best_and_train)."""

    storage: str = "sqlite:///runs/price_fusion/optuna.db"
    """RDB storage URL of the study (a SQLite file on one node; PostgreSQL when several nodes share the study)."""
    study: str = "price_fusion"
    """Study name; each trial trains in <runs_dir>/optuna/<study>/trial_<NNNN>."""
    trials: int = 10
    """Trials this worker runs."""
    total_trials: int = 0
    """Every worker stops once the study holds this many trials (0 = no cap)."""
    epochs: int = 30
    """Epochs of each (short, single-split) trial run; validation SMAPE after each goes to the median pruner."""
    warmup_epochs: int = 3
    """Epochs a trial runs before the median pruner may stop it."""
    lr_range: list[float] = field(default_factory=lambda: [1e-4, 1e-2])
    """train.lr is searched on this [low, high] range (log scale)."""
    weight_decay_range: list[float] = field(default_factory=lambda: [1e-6, 1e-2])
    """train.weight_decay is searched on this [low, high] range (log scale)."""
    dropout_range: list[float] = field(default_factory=lambda: [0.0, 0.4])
    """model.dropout is searched on this [low, high] range."""
    branch_dims: list[int] = field(default_factory=lambda: [128, 256, 512])
    """Choices of model.branch_dim (each must be divisible by model.num_heads)."""
    model_names: list[str] = field(default_factory=lambda: ["two_branch", "advanced_moe"])
    """Choices of model.name."""
    heartbeat_interval: int = 60
    """Seconds between a running trial's heartbeats in the storage."""
    grace_period: int = 180
    """A RUNNING trial without a heartbeat for this long (its worker was killed) is marked FAIL by the next worker
    that starts a trial, and its parameters are run again (optuna.max_retries times)."""
    max_retries: int = 1
    """How often a killed trial's parameters are retried."""

    def __post_init__(self) -> None:
        for name in ("lr_range", "weight_decay_range", "dropout_range"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1]:
                raise ValueError(f"optuna.{name} must be [low, high] with 0 <= low <= high, got {low_high}")
        if not self.branch_dims or not self.model_names:
            raise ValueError("optuna.branch_dims and optuna.model_names must each hold at least one choice")
        bad_names = [n for n in self.model_names if n not in MODEL_NAMES]
        if bad_names:
            raise ValueError(f"optuna.model_names must be a list of {MODEL_NAMES}, got {self.model_names}")
        if self.trials < 1 or self.epochs < 1 or self.total_trials < 0:
            raise ValueError(f"optuna.trials and optuna.epochs must be >= 1 and optuna.total_trials >= 0, got "
                             f"{self.trials}, {self.epochs}, {self.total_trials}")
        check_heartbeat(self.heartbeat_interval, self.grace_period, self.max_retries)


@dataclass
class PriceFusionConfig:
    """Every price_fusion stage reads this one tree; each stage uses the sections it needs."""

    run_name: str = "default"
    """The run directory's name: <runs_dir>/<run_name>/."""
    runs_dir: str = "runs/price_fusion"
    """Where run directories go."""
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    gbt: GbtConfig = field(default_factory=GbtConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    ikea: IkeaConfig = field(default_factory=IkeaConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
