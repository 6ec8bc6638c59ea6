"""Typed configuration for every price_fusion stage.

One tree of dataclasses serves all stages; each stage reads the sections it needs. A config file states only what
differs from these defaults, e.g. ``configs/price_fusion/demo.yaml``; ``key=value`` overrides go on the command line:

    python -m price_fusion.train --config configs/price_fusion/base.yaml train.loss=focal_smape model.name=advanced_moe
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_NAMES = ("two_branch", "advanced_moe")
LOSS_NAMES = ("weighted_smape", "focal_smape", "hybrid_focal_smape", "log_smape", "huber", "mse", "mae")
BAD_PRICE_POLICIES = ("skip", "error")
ENSEMBLE_METHODS = ("mean", "fitted")


@dataclass
class DataConfig:
    """Where the challenge-format CSVs and the embedding store live (paths relative to the working directory)."""

    train_csv: str = "data/train.csv"
    test_csv: str = "data/test.csv"
    # Folder that relative `image_link` values (and URL basenames) are resolved against.
    image_dir: str = "data/images"
    # Output of `embed`, input of `train` / `gbt` / `predict`: <embeddings_dir>/<split>/...
    embeddings_dir: str = "embeddings"
    # Rows whose price is empty, non-numeric, zero, negative or NaN: "skip" (counted and logged) or "error".
    bad_price: str = "skip"
    val_fraction: float = 0.2
    # Stratification of the split / folds: quantile bins of log price.
    n_price_bins: int = 10
    split_seed: int = 42

    def __post_init__(self) -> None:
        if self.bad_price not in BAD_PRICE_POLICIES:
            raise ValueError(f"data.bad_price must be one of {BAD_PRICE_POLICIES}, got {self.bad_price!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class EmbedConfig:
    """Encoders (local paths only, nothing is downloaded) and what to embed."""

    # Local HF directory of a CLIP model (CLIPModel or CLIPVisionModelWithProjection); "" = no image branch input.
    clip_model: str = ""
    # Local sentence-transformers directory (Qwen3-Embedding in production). "minilm" = packaged all-MiniLM-L6-v2.
    text_model: str = "minilm"
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    image_batch_size: int = 32
    text_batch_size: int = 64
    # Units seen fewer times than this in train map to the unknown-unit index 0.
    min_unit_count: int = 2
    # Import the original's inputs instead of encoding: a directory of CLIP embeddings and a pickle of Qwen vectors.
    import_clip_dir: str = ""
    import_qwen_pickle: str = ""
    # The original's Qwen vectors are 1027-d: 1024 text + 3 structural features appended at the end.
    qwen_has_struct: bool = True
    # torch intra-op threads while encoding; 0 leaves torch's default (1 is fastest on a busy 2-core machine).
    num_threads: int = 0


@dataclass
class ModelConfig:
    """`TwoBranchFusionModel` / `AdvancedMoEFusionModel` sizes. Null dims are taken from the embedding manifest."""

    name: str = "two_branch"
    image_dim: int | None = 768
    text_dim: int | None = 1024
    struct_dim: int = 3
    branch_dim: int = 512
    head_dims: list[int] = field(default_factory=lambda: [512, 256, 128])
    dropout: float = 0.2
    num_experts: int = 3
    num_heads: int = 8
    # False trains with the image branch masked for every sample (text-only data such as the IKEA catalogue).
    use_image: bool = True

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name must be one of {MODEL_NAMES}, got {self.name!r}")
        if self.branch_dim % self.num_heads:
            raise ValueError(f"model.branch_dim ({self.branch_dim}) must be divisible by model.num_heads "
                             f"({self.num_heads})")


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "weighted_smape"
    # weighted_smape: price tiers (dollars) and their weights; len(weights) == len(edges) + 1.
    tier_edges: list[float] = field(default_factory=lambda: [10.0, 50.0])
    tier_weights: list[float] = field(default_factory=lambda: [2.0, 1.0, 1.5])
    smape_gamma: float = 2.0
    hybrid_alpha: float = 0.5
    huber_delta: float = 1.0
    # Weight of the mixture-of-experts load-balancing term (advanced_moe only).
    load_balance_weight: float = 0.01
    grad_clip: float = 1.0
    patience: int = 15
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    checkpoint_every: int = 100
    keep_last_n: int = 3
    # "auto" continues from checkpoints/latest when it exists; false starts fresh; a path resumes from there.
    resume: str | bool = "auto"
    # 0 = one stratified 80/20 split; K >= 2 = K-fold, writing out-of-fold predictions.
    kfold: int = 0
    # torch intra-op threads; 0 leaves torch's default.
    num_threads: int = 0
    # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # Stop after this many epochs of this process (testing kill-and-resume); 0 = no limit.
    max_epochs_this_run: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"train.loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if len(self.tier_weights) != len(self.tier_edges) + 1:
            raise ValueError(f"train.tier_weights needs len(train.tier_edges) + 1 = {len(self.tier_edges) + 1} "
                             f"values, got {len(self.tier_weights)}")
        if self.kfold == 1 or self.kfold < 0:
            raise ValueError(f"train.kfold must be 0 (single split) or >= 2, got {self.kfold}")


@dataclass
class EvaluateConfig:
    checkpoint: str = "best"
    # Score this prediction CSV (sample_id,price of labelled train products, e.g. out-of-fold) instead of the run.
    predictions: str = ""
    # True prices (sample_id,price, or a train-format CSV) for `predictions`; "" = data.train_csv.
    labels: str = ""
    # Price bins in dollars for the per-bin table ($0-5, $5-10, ...); the last bin is open-ended.
    bin_edges: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0])
    # Low < range_edges[0] <= Medium < range_edges[1] <= High.
    range_edges: list[float] = field(default_factory=lambda: [10.0, 50.0])
    top_n: int = 20


@dataclass
class PredictConfig:
    checkpoint: str = "best"
    split: str = "test"
    # Default: <run_dir>/predictions/test_out.csv
    output: str = ""


@dataclass
class EnsembleConfig:
    # Prediction CSVs (sample_id,price) to combine, all for the same ids.
    inputs: list[str] = field(default_factory=list)
    method: str = "mean"
    # method=fitted: out-of-fold prediction CSVs (sample_id,price) of the same models, in the same order as inputs.
    oof_inputs: list[str] = field(default_factory=list)
    output: str = "runs/price_fusion/ensemble/test_out.csv"

    def __post_init__(self) -> None:
        if self.method not in ENSEMBLE_METHODS:
            raise ValueError(f"ensemble.method must be one of {ENSEMBLE_METHODS}, got {self.method!r}")


@dataclass
class GbtConfig:
    """HistGradientBoosting on (PCA-reduced) embeddings + structural + out-of-fold kNN price features."""

    folds: int = 5
    knn_k: int = 10
    # PCA components per embedding before the trees (trees on 1800 raw dims are slow); 0 = raw dims.
    pca_dims: int = 32
    max_iter: int = 300
    learning_rate: float = 0.05
    max_leaf_nodes: int = 31
    l2_regularization: float = 1.0
    early_stopping_rounds: int = 20
    # OpenMP threads for the trees and faiss; 0 keeps the libraries' default (1 is fastest on a busy 2-core machine).
    num_threads: int = 0


@dataclass
class IkeaConfig:
    """The real-data benchmark (python -m price_fusion.ikea)."""

    # Relative to $REAL_DATA_DIR (default ../shared/data beside the repository).
    source: str = "products_ikea/ikea_sa_2020.csv"
    # 0 = every product; a smaller number draws a seeded subset (the real_data test uses a few hundred).
    max_products: int = 0
    test_fraction: float = 0.2


@dataclass
class PriceFusionConfig:
    run_name: str = "default"
    runs_dir: str = "runs/price_fusion"
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    gbt: GbtConfig = field(default_factory=GbtConfig)
    ikea: IkeaConfig = field(default_factory=IkeaConfig)
