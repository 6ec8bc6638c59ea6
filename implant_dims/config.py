"""Typed configuration of every implant_dims stage. A config file states only what differs from these defaults.

One YAML file describes an experiment: the data, the two ViT classifiers, the visual backbone, the regressors, HPO
and prediction; each stage reads the sections it needs. Run layout under `<run.out_dir>/<run.name>/`:

    classifier_company/      train_classifier classifier.target=company   (checkpoints/, metrics.jsonl, reports/)
    classifier_model_type/   train_classifier classifier.target=model_type
    single_<embedding>/      train_regression (the single-embedding baseline)
    <regression.out_subdir>/ train_dual (default dual/; ablations set their own subdir)
    hpo/                     hpo studies (optuna.db) and analyze_tuning_results reports
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.tuning import check_heartbeat

MODEL_SIZES = ("tiny", "small", "base", "large")
TARGETS = ("company", "model_type")
ATTENTION_TYPES = ("dual", "triple", "hierarchical", "cross", "concat")
RESUME_CHOICES = ("auto", "force", "false")
SNAP_MODES = ("catalogue", "predicted_class")
PRETRAINED_PATCH = 16  # the patch side of timm's vit_<small|base|large>_patch16_224
# The sample renderer's field of view: 128 px at 6 px/mm (it keeps the field when --size changes). The default input
# scale spreads it over data.img_size, so sample crops reach the model exactly as the earlier letterbox made them.
SAMPLE_FIELD_MM = 128 / 6.0


def _check_choice(value: object, choices: tuple, key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_at_least(section: object, prefix: str, minimum: float, *names: str) -> None:
    """Each field `names` of `section` must be >= minimum (ValueError naming `prefix.name`)."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ValueError(f"{prefix}.{name} must be >= {minimum}, got {value}")


def _check_positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise ValueError(f"{prefix}.{name} must be > 0, got {value}")


def _check_fraction(section: object, prefix: str, *names: str) -> None:
    """Each field must lie in [0, 1): a dropout or smoothing probability."""
    for name in names:
        value = getattr(section, name)
        if not 0 <= value < 1:
            raise ValueError(f"{prefix}.{name} must lie in [0, 1), got {value}")


def _check_coverage(value: float, key: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{key} is the interval's coverage, a fraction strictly between 0 and 1 (e.g. 0.9 for a "
                         f"90 % interval), got {value}")


def _check_warmup(warmup_epochs: int, epochs: int, prefix: str) -> None:
    """The cosine decay needs at least one epoch after the linear warm-up."""
    if warmup_epochs < 0:
        raise ValueError(f"{prefix}.warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs >= epochs:
        raise ValueError(f"{prefix}.warmup_epochs ({warmup_epochs}) must be smaller than {prefix}.epochs ({epochs}), "
                         f"leaving the cosine decay at least one epoch; lower {prefix}.warmup_epochs (0 = no warm-up) "
                         f"or raise {prefix}.epochs")


@dataclass
class RunConfig:
    name: str = "default"
    """Run directory: <out_dir>/<name>/ (one folder per stage inside, see the module docstring)."""
    out_dir: str = "runs/implant_dims"
    """Folder holding the run directories."""
    seed: int = 0
    """Seed of weight initialisation, dropout, augmentation and each epoch's order."""
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu, cuda, cuda:1 ... Under torchrun each rank takes its local GPU."""
    amp: str = "auto"
    """Mixed precision: auto (bf16 autocast on CUDA, off on CPU), off, bf16, fp16 (fp16 uses a GradScaler)."""
    num_threads: int = 0
    """torch CPU threads (0 leaves torch's default)."""
    tensorboard: bool | None = None
    """Write TensorBoard event files to a tensorboard/ folder beside each metrics.jsonl (every record's numbers per
    epoch; the config as hyper-parameters when training finishes): null = on when the tensorboard package is
    installed, true = required (exit 2 when it is missing), false = off. metrics.jsonl is written either way."""

    def __post_init__(self) -> None:
        _check_choice(self.amp, ("auto", "off", "bf16", "fp16"), "run.amp")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class DataConfig:
    train_json: str = "data/implant_dims/sample/augmented_train.json"
    """Training records: a JSON list of {image_path, company, model_type, length, diameter[, thread_type, group]}."""
    val_json: str = "data/implant_dims/sample/augmented_val.json"
    """Validation records (model selection, early stopping, HPO objective), same layout."""
    test_json: str = "data/implant_dims/sample/test.json"
    """Held-out records of company / model-type combinations seen in training (reports only; '' = none)."""
    unseen_json: str = "data/implant_dims/sample/unseen_test.json"
    """Held-out records of combinations never seen in training (reported separately; '' = none)."""
    calibration_json: str = ""
    """In-domain records that neither training nor model selection sees, used only to set the out-of-domain
    guard's threshold (implant_dims/ood.py; the sample data's calibration.json); '' = data.val_json."""
    image_root: str = ""
    """Folder relative image paths resolve against ('' = each JSON file's folder)."""
    img_size: int = 64
    """Square model input side: each image is resampled to data.mm_per_pixel, then centre-cropped / padded to it."""
    mm_per_pixel: float = 0.0
    """Pixel scale the model sees (mm per input pixel); every image is resampled to it from its own scale (DICOM
    PixelSpacing / ImagerPixelSpacing, else the record's mm_per_pixel, else data.assume_scale). 0 = the sample
    renderer's field of view over the input, SAMPLE_FIELD_MM / img_size (1/3 mm at 64 px), so a sample crop fills
    the input whole."""
    assume_scale: float = 0.0
    """mm per pixel to assume for images that carry no scale (0 = none: such an image is refused). Every prediction
    made under it says so (assumed_mm_per_pixel, scale_source=assumed)."""
    catalogue_csv: str = ""
    """Manufacturer catalogue (company, model_type, length, diameter): predictions can snap to its sizes."""

    def __post_init__(self) -> None:
        for key in ("mm_per_pixel", "assume_scale"):
            value = getattr(self, key)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"data.{key} must be a finite number of mm per pixel, or 0 for "
                                 f"{'the default' if key == 'mm_per_pixel' else 'none'}; got {value}")

    def input_mm_per_pixel(self) -> float:
        """The model input's mm per pixel: data.mm_per_pixel, or by default the sample field over img_size."""
        return self.mm_per_pixel if self.mm_per_pixel > 0 else SAMPLE_FIELD_MM / max(self.img_size, 1)


@dataclass
class VitConfig:
    model_size: str = "tiny"
    """tiny (from scratch: tests, demo, sample data) | small | base | large (timm vit_<size>_patch16_224)."""
    patch_size: int = 8
    """Patch side in pixels (tiny only; small/base/large keep 16)."""
    embed_dim: int = 64
    """Token width (tiny only)."""
    depth: int = 3
    """Transformer blocks (tiny only)."""
    num_heads: int = 4
    """Attention heads (tiny only)."""
    drop_rate: float = 0.0
    """Dropout inside the ViT."""
    drop_path_rate: float = 0.0
    """Stochastic depth inside the ViT."""
    global_pool: str = "token"
    """Image feature: token (class token, as pretrained ViTs) | avg (mean of patch tokens: trains much faster from
    scratch on small data; the tiny configs use it)."""
    stem: str = "patch"
    """tiny only: patch (standard patch embedding) | conv (stride-2 3x3 convolutions with BatchNorm down to the patch
    grid, 'early convolutions': a from-scratch ViT learns much sooner on small data; BatchNorm statistics are per
    rank under torchrun)."""
    weights: str = ""
    """Local pretrained weights file for small/base/large (timm pretrained_cfg_overlay); nothing is downloaded."""

    def __post_init__(self) -> None:
        _check_choice(self.model_size, MODEL_SIZES, "model_size")
        _check_choice(self.global_pool, ("token", "avg"), "global_pool")
        _check_choice(self.stem, ("patch", "conv"), "stem")
        if self.stem == "conv" and self.model_size != "tiny":
            raise ValueError("stem=conv is for tiny ViTs trained from scratch; pretrained sizes keep their patch stem")
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_size == "tiny" and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"stem=conv halves the image per convolution: patch_size must be a power of 2 (>= 2), "
                             f"got {self.patch_size}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")

    @property
    def grid_patch(self) -> int:
        """The patch side the model really uses: patch_size for tiny, the pretrained 16 for small/base/large."""
        return self.patch_size if self.model_size == "tiny" else PRETRAINED_PATCH


@dataclass
class ClassifierConfig:
    target: str = "company"
    """What train_classifier learns: company or model_type (each becomes a frozen embedding model)."""
    vit: VitConfig = field(default_factory=VitConfig)
    """The classifier's ViT backbone."""
    embedding_dim: int = 256
    """Width of the embedding layer the regressors reuse (the original's 256-d features)."""
    dropout: float = 0.1
    """Dropout after the embedding layer."""
    epochs: int = 30
    """Training epochs; raising it on a finished run continues that run."""
    batch_size: int = 64
    """Images per optimizer step."""
    lr: float = 1e-3
    """AdamW peak learning rate (cosine decay after a linear warmup)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms, position embeddings)."""
    warmup_epochs: int = 2
    """Linear warmup in epochs (0 = none; fewer than epochs, so the cosine decay gets at least one)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    augment: bool = True
    """Training augmentation (small rotation, flips, contrast, noise; never scaling)."""
    patience: int = 10
    """Early stopping: epochs without a better validation accuracy."""
    top_k: int = 3
    """k of the reported top-k accuracy."""
    resume: str | bool = "auto"
    """auto: continue checkpoints/latest when its config and data match (else exit 2 naming the change); force;
    false (start over); or a checkpoint path."""

    def __post_init__(self) -> None:
        _check_choice(self.target, TARGETS, "classifier.target")
        _check_at_least(self, "classifier", 1, "embedding_dim", "epochs", "batch_size", "patience", "top_k")
        _check_positive(self, "classifier", "lr")
        _check_at_least(self, "classifier", 0, "weight_decay")
        _check_fraction(self, "classifier", "dropout", "label_smoothing")
        _check_warmup(self.warmup_epochs, self.epochs, "classifier")


@dataclass
class VisualConfig:
    vit: VitConfig = field(default_factory=VitConfig)
    """The visual-feature ViT of the regressors (the original's ViT-Base, 768-d)."""
    init: str = "scratch"
    """scratch (or vit.weights when given) | company | model_type: start from that classifier's trained backbone."""
    frozen_in_stage0: bool = False
    """Freeze the visual backbone with the embedding models during the head-only epochs (true for a pretrained
    backbone; a from-scratch one must train from the start)."""

    def __post_init__(self) -> None:
        _check_choice(self.init, ("scratch", "company", "model_type"), "visual.init")


@dataclass
class RegressionConfig:
    attention_type: str = "triple"
    """Fusion of visual, company and model features: dual | triple | hierarchical | cross | concat."""
    embedding: str = "company"
    """train_regression only: which single classifier's embedding the baseline uses (company | model_type)."""
    company_checkpoint: str = ""
    """Company classifier checkpoint ('' = <run_dir>/classifier_company/checkpoints/best)."""
    model_checkpoint: str = ""
    """Model-type classifier checkpoint ('' = <run_dir>/classifier_model_type/checkpoints/best)."""
    out_subdir: str = "dual"
    """train_dual writes <run_dir>/<out_subdir>/ (ablations use their own, e.g. dual_cross)."""
    fusion_dim: int = 128
    """Width each input is projected to before the attention fusion."""
    head_hidden: int = 128
    """Hidden width of the regression head."""
    dropout: float = 0.1
    """Dropout in the fusion and the head (also what Monte Carlo dropout samples)."""
    aux_thread_weight: float = 0.0
    """Weight of the auxiliary thread-type cross-entropy (0 = no thread head)."""
    loss: str = "smooth_l1"
    """Loss on (length, diameter) in regression.loss_space: l1 | smooth_l1 (beta 0.5 in that space's units) | mse."""
    loss_space: str = "standardised"
    """Where the loss compares prediction and target: standardised (each dimension over its training std, the
    original's; it weighs a mm of diameter as much as std_length / std_diameter mm of length) | mm (a mm is a mm)."""
    dim_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """[length, diameter] weights of the loss terms (non-negative, not both 0); the loss is their weighted mean."""
    epochs: int = 60
    """Training epochs; raising it on a finished run continues that run."""
    batch_size: int = 64
    """Images per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum * world size)."""
    lr: float = 1e-3
    """Base learning rate of the fusion and head (AdamW, cosine with warmup)."""
    embedder_lr_mult: float = 0.1
    """Learning rate of the embedding models as a fraction of lr (the original: 10%)."""
    visual_lr_mult: float = 1.0
    """Learning rate of the visual backbone as a fraction of lr."""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms, position embeddings)."""
    warmup_epochs: int = 2
    """Linear warmup in epochs (0 = none; fewer than epochs, so the cosine decay gets at least one)."""
    unfreeze_half_epoch: int = 20
    """From this epoch (0-based) the last half of each embedding model's blocks train (the original: 20)."""
    unfreeze_all_epoch: int = 40
    """From this epoch both embedding models train whole (the original: 40)."""
    unfreeze_fraction: float = 0.5
    """Share of each embedding model's blocks (the last ones) unfrozen at unfreeze_half_epoch."""
    augment: bool = False
    """Training augmentation (rotation, flips, contrast, noise; never scaling, which would change the mm scale)."""
    cache_features: bool = True
    """While every feature extractor is frozen and augmentation is off, compute their features once and reuse
    them (the head-only epochs then skip the ViTs)."""
    patience: int = 20
    """Early stopping on validation mean MAE (counted only after the last unfreezing step)."""
    mc_samples: int = 30
    """Monte Carlo dropout passes for the uncertainty reported on held-out data (0 = no intervals)."""
    interval: float = 0.9
    """Nominal coverage of the reported prediction intervals (mean ± z * std), strictly between 0 and 1."""
    snap: str = "catalogue"
    """Snapping to data.catalogue_csv: catalogue (the nearest size of the whole catalogue) | predicted_class (among
    the sizes of the company / model type the regressor's heads read, each part only when its probability is above
    regression.snap_min_prob; below it that part matches every value)."""
    snap_min_prob: float = -1.0
    """snap=predicted_class: class probability a head must exceed for its class to narrow the snap, in [0, 1]
    (1 = never); -1 = choose it on validation (the value with the lowest snapped val MAE, recorded in the reports)."""
    resume: str | bool = "auto"
    """auto: continue checkpoints/latest when its config and data match (else exit 2 naming the change); force;
    false (start over); or a checkpoint path."""

    def __post_init__(self) -> None:
        _check_choice(self.attention_type, ATTENTION_TYPES, "regression.attention_type")
        _check_choice(self.loss_space, ("standardised", "mm"), "regression.loss_space")
        _check_choice(self.snap, SNAP_MODES, "regression.snap")
        weights = list(self.dim_weights)
        if len(weights) != 2 or not all(0 <= w < float("inf") for w in weights) or sum(weights) <= 0:
            raise ValueError(f"regression.dim_weights must be [length, diameter]: two finite weights >= 0, not both "
                             f"0 (e.g. [1.0, 1.0]), got {self.dim_weights}")
        if not (self.snap_min_prob == -1 or 0 <= self.snap_min_prob <= 1):
            raise ValueError(f"regression.snap_min_prob must lie in [0, 1], or be -1 to choose it on validation, got "
                             f"{self.snap_min_prob}")
        _check_choice(self.embedding, TARGETS, "regression.embedding")
        _check_choice(self.loss, ("l1", "smooth_l1", "mse"), "regression.loss")
        if not 0 <= self.unfreeze_half_epoch <= self.unfreeze_all_epoch:
            raise ValueError("regression.unfreeze_half_epoch must be between 0 and regression.unfreeze_all_epoch")
        _check_at_least(self, "regression", 1, "fusion_dim", "head_hidden", "epochs", "batch_size", "grad_accum",
                        "patience")
        _check_positive(self, "regression", "lr")
        _check_at_least(self, "regression", 0, "embedder_lr_mult", "visual_lr_mult", "weight_decay",
                        "aux_thread_weight", "mc_samples")
        _check_fraction(self, "regression", "dropout")
        if not 0 <= self.unfreeze_fraction <= 1:
            raise ValueError(f"regression.unfreeze_fraction must lie in [0, 1], got {self.unfreeze_fraction}")
        _check_coverage(self.interval, "regression.interval")
        _check_warmup(self.warmup_epochs, self.epochs, "regression")


@dataclass
class HpoConfig:
    kind: str = "dual"
    """Which study: classifier (maximise validation accuracy of classifier.target) or dual (minimise validation mean
    MAE of length and diameter)."""
    study_name: str = ""
    """Optuna study name ('' = implant_classifier_<classifier.target> or implant_dual)."""
    storage: str = ""
    """Optuna RDB storage URL shared by the workers ('' = sqlite:///<run_dir>/hpo/optuna.db)."""
    n_trials: int = 20
    """Finished (complete or pruned) trials the study should hold, over all workers and re-runs (the original: 20);
    re-running with a larger number continues the study."""
    n_workers: int = 4
    """Parallel worker processes this command starts (the original: 4 parallel jobs); 1 = run in-process."""
    worker_index: int = 0
    """Index of this worker (set by the parent for the workers it starts; it seeds the worker's sampler)."""
    trial_epochs: int = 0
    """Epochs per trial (0 = the stage's own epochs: classifier.epochs or regression.epochs)."""
    pruner: str = "median"
    """median | hyperband | none: stop unpromising trials from their per-epoch validation score."""
    pruner_warmup_epochs: int = 2
    """Epochs every trial runs before the median pruner may stop it."""
    sampler_seed: int = 0
    """TPE sampler seed (each worker adds its index, and each trial the number of trials already in the study)."""
    heartbeat_interval: int = 60
    """Seconds between a running trial's heartbeats in the storage."""
    grace_period: int = 180
    """A running trial whose last heartbeat is older than this (its worker was killed) is marked failed and
    re-queued with the same parameters by the next worker or re-run."""
    max_retries: int = 2
    """How often a trial whose worker died is re-queued."""
    max_failures: int = 5
    """A worker stops (exit 1) after this many of its trials failed in a row (0 = never)."""
    classifier_model_sizes: list[str] = field(default_factory=lambda: ["tiny"])
    """kind=classifier: ViT sizes to try (small / base / large need a GPU and local weights)."""
    classifier_lr: list[float] = field(default_factory=lambda: [1e-4, 3e-3])
    """kind=classifier: [low, high] of the log-uniform classifier.lr."""
    classifier_batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64])
    """kind=classifier: classifier.batch_size choices."""
    fusion_dims: list[int] = field(default_factory=lambda: [128, 256, 512])
    """kind=dual: regression.fusion_dim choices, the original's embedding dimension 128 / 256 / 512 (the width each
    embedding is projected to before fusion; the classifiers' own embedding layers are fixed once trained)."""
    attention_types: list[str] = field(default_factory=lambda: ["dual", "triple", "hierarchical"])
    """kind=dual: regression.attention_type choices."""
    unfreeze_schedules: list[list[int]] = field(default_factory=lambda: [[10, 30], [20, 40], [30, 50]])
    """kind=dual: [regression.unfreeze_half_epoch, regression.unfreeze_all_epoch] pairs to try."""
    regression_lr: list[float] = field(default_factory=lambda: [1e-4, 3e-3])
    """kind=dual: [low, high] of the log-uniform regression.lr."""
    embedder_lr_mult: list[float] = field(default_factory=lambda: [0.01, 0.3])
    """kind=dual: [low, high] of the log-uniform regression.embedder_lr_mult."""

    def __post_init__(self) -> None:
        _check_choice(self.kind, ("classifier", "dual"), "hpo.kind")
        _check_choice(self.pruner, ("median", "hyperband", "none"), "hpo.pruner")
        for key in ("n_trials", "n_workers", "heartbeat_interval", "grace_period"):
            if getattr(self, key) < 1:
                raise ValueError(f"hpo.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("worker_index", "trial_epochs", "pruner_warmup_epochs", "max_retries", "max_failures"):
            if getattr(self, key) < 0:
                raise ValueError(f"hpo.{key} must be >= 0, got {getattr(self, key)}")
        check_heartbeat(self.heartbeat_interval, self.grace_period, self.max_retries, key_prefix="hpo.")
        for key in ("classifier_lr", "regression_lr", "embedder_lr_mult"):
            bounds = getattr(self, key)
            if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
                raise ValueError(f"hpo.{key} must be [low, high] with 0 < low <= high, got {bounds}")
        for key in ("classifier_model_sizes", "classifier_batch_sizes", "fusion_dims", "attention_types",
                    "unfreeze_schedules"):
            if not getattr(self, key):
                raise ValueError(f"hpo.{key} must list at least one choice")
        for size in self.classifier_model_sizes:
            _check_choice(size, MODEL_SIZES, "hpo.classifier_model_sizes[]")
        for attention in self.attention_types:
            _check_choice(attention, ATTENTION_TYPES, "hpo.attention_types[]")
        for key in ("classifier_batch_sizes", "fusion_dims"):
            if any(v < 1 for v in getattr(self, key)):
                raise ValueError(f"hpo.{key} must hold positive integers, got {getattr(self, key)}")
        for pair in self.unfreeze_schedules:
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise ValueError(f"hpo.unfreeze_schedules: each entry is [half_epoch, all_epoch] with "
                                 f"0 <= half_epoch <= all_epoch, got {pair}")


@dataclass
class PredictConfig:
    input: str = ""
    """An image (PNG, JPEG, DICOM), a folder of them, or a JSON list of records."""
    checkpoint: str = ""
    """Regressor checkpoint ('' = <run_dir>/<regression.out_subdir>/checkpoints/best)."""
    out: str = ""
    """Output CSV ('' = <run_dir>/predictions/<input stem>.csv)."""
    mc_samples: int = 30
    """Monte Carlo dropout passes per image (0 = a single deterministic pass, no uncertainty)."""
    interval: float = 0.9
    """Coverage of the written interval columns (mean ± z * std), strictly between 0 and 1."""
    snap_to_catalogue: bool = False
    """Also write the nearest catalogue size (data.catalogue_csv) under the regression.snap rule."""
    batch_size: int = 64
    """Images per forward pass."""
    log_every_s: float = 10.0
    """Seconds between progress lines (images done of the total, images per second); 0 = a line after every batch."""
    ood_false_alarm: float = 0.02
    """Out-of-domain guard: the share of in-domain images it may flag, strictly between 0 and 1; the threshold on
    the Mahalanobis score is the split-conformal order statistic of the stored calibration scores for it
    (data.calibration_json, else data.val_json; implant_dims/ood.py)."""
    refuse_out_of_domain: bool = False
    """Write no millimetres (empty cells, the reason in `ood_reason`) for rows the guard flags; false only flags."""

    def __post_init__(self) -> None:
        _check_at_least(self, "predict", 0, "mc_samples", "log_every_s")
        _check_at_least(self, "predict", 1, "batch_size")
        _check_coverage(self.interval, "predict.interval")
        if not 0 < self.ood_false_alarm < 1:  # (also rejects nan)
            raise ValueError(f"predict.ood_false_alarm is the share of in-domain images the out-of-domain "
                             f"guard may flag, a fraction strictly between 0 and 1 (e.g. 0.02), got "
                             f"{self.ood_false_alarm}")


@dataclass
class ImplantConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run name, output folder, seed, device, mixed precision."""
    data: DataConfig = field(default_factory=DataConfig)
    """Record files, image root, input size, catalogue."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """train_classifier: the company or model-type ViT classifier."""
    visual: VisualConfig = field(default_factory=VisualConfig)
    """The regressors' visual-feature backbone."""
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    """train_regression / train_dual: fusion, head, unfreezing schedule, optimisation."""
    hpo: HpoConfig = field(default_factory=HpoConfig)
    """Optuna studies."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """predict: input, checkpoint, uncertainty, catalogue snapping."""

    def __post_init__(self) -> None:
        if self.data.img_size < 1:
            raise ValueError(f"data.img_size must be >= 1, got {self.data.img_size}")
        # the visual section's ViT is built only from scratch; otherwise it is a copy of a classifier's backbone
        for section in ("classifier", "visual") if self.visual.init == "scratch" else ("classifier",):
            vit = getattr(self, section).vit
            if self.data.img_size % vit.grid_patch:
                which = (f"{section}.vit.patch_size ({vit.patch_size})" if vit.model_size == "tiny" else
                         f"the {vit.grid_patch} px patches of {section}.vit.model_size={vit.model_size}")
                raise ValueError(f"data.img_size ({self.data.img_size}) must be a multiple of {which}; the ViT cuts "
                                 f"the input into whole patches")
