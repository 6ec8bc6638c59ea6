"""Typed configuration of every cnc_gcode stage. A config file states only what differs from these defaults.

One dataclass tree serves all stages, so one YAML file describes a whole experiment (data, encoder, decoder,
training, evaluation) and each stage reads the sections it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.threads import set_torch_threads

VALUE_MODES = ("exact", "seed4")
INPUT_SCALINGS = ("zscore", "robust")
DECODER_VALUE_MODES = ("digits", "regress")


@dataclass
class RunConfig:
    name: str = "default"
    """Run directory: <out_dir>/<name>/ (encoder/ and decoder/ subfolders, reports/, predictions/)."""
    out_dir: str = "runs/cnc_gcode"
    """Folder holding the run directories."""
    seed: int = 0
    """Seed of weight initialisation, dropout, noise and each epoch's order (an epoch's order is (seed, epoch))."""
    num_threads: int = 0
    """torch CPU threads; 0 = $OMP_NUM_THREADS when set, else the CPUs the process may use (affinity,
    SLURM_CPUS_PER_TASK, cgroup quota) but at most one: a second thread only adds OpenMP waits to these small models'
    ops (AUTO_MAX_THREADS, below)."""
    tensorboard: bool | None = None
    """Write TensorBoard event files to a tensorboard/ folder beside each metrics.jsonl (every record's numbers per
    epoch; the config as hyper-parameters when training finishes): null = on when the tensorboard package is
    installed, true = required (exit 2 when it is missing), false = off. metrics.jsonl is written either way."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class DataConfig:
    train_path: str = "data/cnc_gcode/sample/train.npz"
    """Training windows NPZ: continuous [N,T,C] float32, categorical [N,T,K] int64, tokens [N,L], operation_type [N]."""
    val_path: str = "data/cnc_gcode/sample/val.npz"
    """Validation windows NPZ (model selection, early stopping), same layout."""
    test_path: str = "data/cnc_gcode/sample/test.npz"
    """Test windows NPZ (reports only), same layout; its folder holds channels.json for the modality ablation."""
    vocab_path: str = ""
    """Vocabulary JSON from build_vocab; empty = the default (original) vocabulary."""
    nan_policy: str = "skip"
    """skip: drop windows holding NaN/inf and count them; error: refuse the file."""
    max_train_windows: int = 0
    """Cap on training windows (0 = all), taken as a seeded random subset."""
    channel_groups: list[str] = field(default_factory=list)
    """Input groups the model reads (empty = every channel). Simulator data: measured_motion, drives, spindle,
    process (measured) and commanded (controller setpoints); the groups are recorded in each NPZ (channel_groups)."""

    def __post_init__(self) -> None:
        if self.nan_policy not in ("skip", "error"):
            raise ValueError(f"data.nan_policy must be 'skip' or 'error', got {self.nan_policy!r}")


@dataclass
class EncoderConfig:
    hidden_dim: int = 128
    """Width of the fused sensor features and of the BiLSTM output (hidden_dim / 2 per direction)."""
    categorical_dims: list[int] = field(default_factory=lambda: [3, 3, 3, 3])
    """Number of values of each categorical channel (motion mode, spindle, coolant, motion phase)."""
    categorical_embed_dim: int = 4
    """Embedding width of each categorical channel."""
    lstm_layers: int = 2
    """BiLSTM layers."""
    dropout: float = 0.1
    """Dropout on the fused features before the BiLSTM and between its layers."""
    n_operations: int = 9
    """Operation classes (9 for the simulator, 9 or 4 or 8 for UMich phases; see umich.*)."""
    residual: bool = True
    """memory = BiLSTM(fused) + fused + Linear(x): keeps exact per-step values readable for the digit heads."""
    input_scaling: str = "zscore"
    """How raw channels are scaled before the network, fitted on the training windows and stored in the checkpoint
    (channel_mean / channel_std buffers): zscore (mean / std) or robust (median / IQR/1.349,
    the std where a channel's IQR is 0, then asinh, which is linear within about one IQR and logarithmic beyond).
    Robust keeps the common range of a channel whose std is set by a few long moves spread over several units, and
    its heavy tails (UMich velocities reach hundreds of IQRs) bounded."""
    depth_channel: str = ""
    """Name of the raw Z position channel to derive a depth channel from (empty = no depth channel).
    depth = surface_z - Z in mm, clipped to depth_band, appended to the scaled channels inside the
    encoder, so export and predict read raw units; surface_z is the highest Z at which the tool cuts in the training
    windows (data.estimate_surface: spindle turning, moving at a feed below the rapid moves), never a label."""
    depth_band: list[float] = field(default_factory=lambda: [-1.0, 3.0])
    """[above, below] limits of the depth channel in mm (negative = above the surface): the band of the cut, where a
    millimetre decides the pass; everything farther away reads as the band's edge."""

    def __post_init__(self) -> None:
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"encoder.input_scaling must be one of {', '.join(INPUT_SCALINGS)}, got "
                             f"{self.input_scaling!r}")
        if len(self.depth_band) != 2 or not self.depth_band[0] < self.depth_band[1]:
            raise ValueError(f"encoder.depth_band must be [low, high] mm with low < high, got {self.depth_band}")


@dataclass
class EncoderTrainConfig:
    epochs: int = 15
    """Encoder training epochs; raising it on a finished run continues that run."""
    batch_size: int = 64
    """Windows per optimizer step."""
    lr: float = 2e-3
    """AdamW peak learning rate (cosine decay after warmup)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (not on biases, norms and embeddings)."""
    warmup_epochs: int = 1
    """Linear warmup length in epochs."""
    patience: int = 5
    """Early stopping: epochs without a better validation operation accuracy (ties: a lower validation loss) before
    stopping; `best` is the epoch with the highest validation accuracy, the figure the reports quote."""
    denoise: bool = True
    """Train as a denoising autoencoder too (the DTAE): reconstruct clean channels from corrupted input, as an
    auxiliary loss beside the operation cross-entropy, which is computed on the clean input."""
    noise_std: float = 0.1
    """DTAE corruption: Gaussian noise std on the normalised channels."""
    mask_prob: float = 0.1
    """DTAE corruption: share of (time, channel) entries zeroed."""
    recon_weight: float = 0.5
    """Weight of the reconstruction MSE beside the operation cross-entropy."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    resume: str | bool = "auto"
    """auto: continue checkpoints/latest if its config and data match (else exit 2, naming what changed); force:
    continue whatever changed (logged); false: start over; or a checkpoint path."""


@dataclass
class DecoderConfig:
    d_model: int = 192
    """Token embedding and transformer width."""
    n_heads: int = 8
    """Attention heads (d_model must divide by it)."""
    n_layers: int = 4
    """Pre-norm decoder layers (self-attention, cross-attention to the encoder memory, FFN)."""
    ff_dim: int = 768
    """Feed-forward hidden width."""
    dropout: float = 0.1
    """Dropout in attention and feed-forward blocks."""
    max_seq_len: int = 32
    """Longest token sequence the learned positions cover (at least the vocabulary's max_tokens)."""
    share_cross_kv: bool = True
    """One key/value projection of the encoder memory for all layers (4x fewer cross-attention FLOPs on CPU)."""
    max_memory_len: int = 256
    """Longest encoder memory (window length) the decoder's time-step embeddings cover."""
    last_step_context: bool = True
    """Add a projection of the last memory step (the executing line) to every token embedding."""
    memory_norm: bool = True
    """LayerNorm after the memory projection."""
    value_mode: str = "digits"
    """How parameter values are predicted. digits: exponent + K digit heads (the original's; a value is a class, so
    only values seen in training come out). regress: one head per letter regresses the quantity (X/Y/Z: the offset in
    mm from the window's last measured position of that axis; F/S: log scale; other letters: the value), rounded to
    the training data's decimals per letter and turned into the tokenizer's id (cnc_gcode/README.md, "Configuration")."""
    value_digits_confidence: float = 0.45
    """decoder.value_mode=regress: the digit heads are trained beside the value head, and a parameter takes the
    digit heads' value where their probability (geometric mean over the exponent and the K digits) is at least this
    (round and recurring values such as a Z5 clearance), else the regressed one; above 1 = always regressed. 0.45:
    the best of 0.4-0.6 on the validation split of the measured-only data (seed 0)."""

    def __post_init__(self) -> None:
        if self.value_mode not in DECODER_VALUE_MODES:
            raise ValueError(f"decoder.value_mode={self.value_mode!r}; use one of {', '.join(DECODER_VALUE_MODES)}")


@dataclass
class TrainConfig:
    epochs: int = 50
    """Decoder training epochs; raising it on a finished run continues that run."""
    batch_size: int = 32
    """Windows per optimizer step."""
    lr: float = 5e-4
    """AdamW peak learning rate (cosine decay after warmup)."""
    weight_decay: float = 1e-2
    """AdamW weight decay (not on biases, norms and embeddings)."""
    warmup_epochs: int = 5
    """Linear warmup length in epochs."""
    patience: int = 10
    """Early stopping: epochs without a higher validation token accuracy before stopping."""
    focal_gamma: float = 3.0
    """Focal-loss gamma of every head (0 = cross-entropy)."""
    label_smoothing: float = 0.1
    """Label smoothing of every head's targets."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    encoder_checkpoint: str = ""
    """Frozen encoder checkpoint; empty = <run_dir>/encoder/checkpoints/best."""
    resume: str | bool = "auto"
    """auto: continue checkpoints/latest if its config, data and encoder match (else exit 2, naming what changed);
    force: continue whatever changed (logged); false: start over; or a checkpoint path."""
    save_every: int = 0
    """Also keep checkpoints/epoch_N every N epochs (0 = only latest and best)."""
    value_weight: float = 1.0
    """decoder.value_mode=regress: weight of the value loss (smooth L1 on the standardised quantity) beside the
    summed token-head losses."""
    value_beta: float = 0.02
    """decoder.value_mode=regress: smooth-L1 beta in standardised units (below it the loss is quadratic); small, so
    the head is pulled towards the median and sub-0.1 mm errors still count."""


@dataclass
class EvalConfig:
    split: str = "test"
    """Split to evaluate: train, val or test."""
    checkpoint: str = ""
    """Decoder checkpoint; empty = <run_dir>/decoder/checkpoints/best."""
    batch_size: int = 128
    """Windows decoded at once."""
    max_windows: int = 0
    """Evaluate on at most this many windows (0 = all), a seeded random subset."""


@dataclass
class PredictConfig:
    input: str = ""
    """Sensor NPZ (continuous, categorical) to turn into G-code."""
    output: str = ""
    """G-code text file; empty = <run_dir>/predictions/<input stem>.nc"""


@dataclass
class ExportConfig:
    out_dir: str = ""
    """empty = <run_dir>/onnx"""
    opset: int = 17
    """ONNX opset of both graphs."""
    parity_windows: int = 8
    """Test windows decoded by both PyTorch and onnxruntime for parity.json."""


@dataclass
class AblationConfig:
    gammas: list[str | float] = field(default_factory=lambda: ["ce", "ce+ls", 1.0, 2.0, 3.0])
    """Focal-gamma table rows: ce (cross-entropy), ce+ls (+label smoothing), or a gamma (focal + smoothing)."""
    epochs: int = 0
    """Epochs per ablation run (0 = train.epochs)."""
    groups: list[str] = field(default_factory=list)
    """Channel groups to remove one at a time (empty = all groups listed in the data's channels.json)."""
    seeds: list[int] = field(default_factory=list)
    """Seeds of the repeats (empty = [run.seed]): ablation_gamma trains one decoder per row and seed over the frozen
    encoder; ablation_modality evaluates the configured run for run.seed and trains an encoder + decoder in
    <run_dir>/ablations/modality_seed<N> for each other seed. With several seeds the tables give mean and spread
    (sample std) over them."""
    seed_runs: list[str] = field(default_factory=list)
    """ablation_modality: run directories of already trained pipelines for the seeds other than run.seed, in the
    order of ablation.seeds (e.g. the measured_only stage's <setting>_seed<N>); empty = train them."""


@dataclass
class MeasuredOnlyConfig:
    measured_groups: list[str] = field(default_factory=lambda: ["measured_motion", "drives", "spindle", "process"])
    """Input groups of the 'measured only' rows: every group but the controller's setpoints (commanded)."""
    seeds: list[int] = field(default_factory=list)
    """run.seed of each training repeat (empty = [run.seed]); with several, the table gives mean and spread (sample
    std) over them."""
    neighbors: int = 1
    """k of the nearest-neighbour baseline (k=1: the token sequence and operation of the nearest training window)."""
    value_modes: list[str] = field(default_factory=lambda: ["regress", "digits"])
    """decoder.value_mode of the measured-only model rows (one row each, same split and seeds); the all-channels row
    uses the first. Empty = decoder.value_mode only."""


@dataclass
class UmichConfig:
    data_dir: str = ""
    """Folder of experiment_XX.csv; empty = $REAL_DATA_DIR/cnc_umich_toolwear (default ../shared/data)."""
    out_dir: str = "data/cnc_gcode/umich"
    """Where the train/val/test NPZ, channels.json and manifest.json go."""
    window: int = 64
    """Rows (100 ms each) per window; a window takes the label of its last row."""
    stride: int = 8
    """Rows between consecutive window ends."""
    val_experiments: list[int] = field(default_factory=lambda: [3, 8, 14])
    """Experiments held out for validation (the rest not in test are training)."""
    test_experiments: list[int] = field(default_factory=lambda: [2, 9, 13, 17])
    """Experiments held out for testing."""
    relative_positions: bool = False
    """Subtract each experiment's minimum from its X/Y/Z position channels. Off: machine coordinates, in which the
    passes sit at the same Z in every run; per-run minima put the first pass of runs 04 / 05 / 16 (which stop after
    it) where the other runs cut their third (kept for the ablation)."""
    phase_grouping: str = "fine"
    """fine: the 9 Machining_Process phases; coarse: prep / layer cutting / repositioning / end (set
    encoder.n_operations=4 to train on it). Recorded labels only."""
    label_source: str = "recorded"
    """recorded: the Machining_Process column; machine_state: each row's phase derived from its own signals
    (spindle, feed, Z depth, X/Y direction; ingest_umich.machine_state_phases; 8 classes, encoder.n_operations=8);
    sequence_map: each row's phase read from its M1_sequence_number through the line -> phase map learned on
    umich.map_experiment (ingest_umich.learn_phase_map; 9 classes; needs umich.record_windows=true)."""
    map_experiment: int = 1
    """label_source=sequence_map: the continuous run whose recorded phases teach the line -> phase map."""
    map_min_share: float = 0.5
    """label_source=sequence_map: a line enters the map when its majority phase holds more than this share of its
    rows in map_experiment (the once-per-record marker line 2 spreads over all phases and stays out)."""
    record_windows: bool = False
    """Windows lie inside one 1 s record / continuous stretch (ingest_umich.record_segments); window must then be
    at most a record's length (6-11 rows)."""

    def __post_init__(self) -> None:
        if self.phase_grouping not in ("fine", "coarse"):
            raise ValueError(f"umich.phase_grouping must be 'fine' or 'coarse', got {self.phase_grouping!r}")
        if self.label_source not in ("recorded", "machine_state", "sequence_map"):
            raise ValueError(f"umich.label_source must be 'recorded', 'machine_state' or 'sequence_map', got "
                             f"{self.label_source!r}")
        if self.label_source != "recorded" and self.phase_grouping != "fine":
            raise ValueError("umich.phase_grouping=coarse applies to recorded labels only; use label_source=recorded")
        if self.label_source == "sequence_map" and not self.record_windows:
            raise ValueError("umich.label_source=sequence_map needs umich.record_windows=true (a window's line must "
                             "be the one executing in its rows, so no window may straddle two shuffled records)")
        if not 0.0 <= self.map_min_share < 1.0:
            raise ValueError(f"umich.map_min_share must be in [0, 1), got {self.map_min_share}")
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"umich.window and umich.stride must be >= 1, got {self.window} and {self.stride}")
        if self.record_windows and self.window < 2:
            raise ValueError("umich.record_windows=true needs umich.window >= 2 (a record opens with its marker row)")


@dataclass
class UmichLinesConfig:
    out_dir: str = "data/cnc_gcode/umich_lines"
    """Where umich_lines writes the token-target windows (train/val/test.npz, channels.json, manifest.json)."""
    min_move_mm: float = 0.05
    """An axis word is written when the line's end differs from its start by at least this (mm); a line that moves
    no axis this far is a no-motion line (the NONE token line)."""
    neighbors: int = 1
    """k of the nearest-neighbour baseline."""
    train_model: bool = True
    """Train the encoder + decoder (package path) on the windows; false: baselines only."""
    forest_trees: int = 300
    """Trees of the random-forest row (a class per distinct training target line); 0 leaves the row out."""
    library: bool = True
    """With train_model: also train the line-library head (cnc_gcode.line_library) on the reconstructed program
    (library.program is set to <run_dir>/reports/umich_program.ngc) and report it alone and with the decoder as
    its fallback."""
    seeds: list[int] = field(default_factory=list)
    """run.seed of each training repeat of the model rows (and the forest's seed); empty = [run.seed]. Each seed
    other than run.seed trains in <run_dir>/seed<N>; with several, the table gives mean +- sample sd."""


@dataclass
class LibraryConfig:
    """The line-library head for closed programs (cnc_gcode.line_library): one of the program's lines (without
    feed) picked from the encoder's memory, plus a regressed feed; the decoder is the fallback."""

    program: str = ""
    """G-code program whose lines are the classes; empty = no library (predict uses the decoder alone)."""
    checkpoint: str = ""
    """Library checkpoint predict reads; empty = <run_dir>/library/checkpoints/best."""
    threshold: float = -1.0
    """A window whose library confidence (the line's probability) is below this takes the decoder's line; < 0 =
    chosen on the validation split by the line_library stage (<run_dir>/library/threshold.json)."""
    hidden_dim: int = 128
    """Width of the head's two hidden layers."""
    dropout: float = 0.1
    """Dropout after the head's first layer."""
    finetune_encoder: bool = False
    """Train the encoder with the head (starting from the encoder stage's weights); false: the encoder is frozen."""
    epochs: int = 40
    """Head training epochs; raising it on a finished run continues that run."""
    batch_size: int = 64
    """Windows per optimizer step."""
    lr: float = 2e-3
    """AdamW peak learning rate (cosine decay after warmup)."""
    weight_decay: float = 1e-4
    """AdamW weight decay (not on biases and norms)."""
    warmup_epochs: int = 1
    """Linear warmup length in epochs."""
    patience: int = 10
    """Early stopping: epochs without a higher validation token accuracy of the library's lines."""
    feed_weight: float = 1.0
    """Weight of the feed regression (smooth L1 on the standardised log F) beside the line cross-entropy."""
    label_smoothing: float = 0.0
    """Label smoothing of the line cross-entropy (it also softens the confidences the threshold reads)."""
    resume: str | bool = "auto"
    """auto: continue checkpoints/latest if its config, data, encoder and program match (else exit 2); force;
    false: start over; or a checkpoint path."""

    def __post_init__(self) -> None:
        if self.threshold > 1:
            raise ValueError(f"library.threshold must be <= 1 (a probability; < 0 = chosen on validation), got "
                             f"{self.threshold}")


@dataclass
class BuildVocabConfig:
    corpus: list[str] = field(default_factory=list)
    """G-code files or folders (searched for .nc .ngc .tap .gcode .gc .g .cnc .ncc .mpf .spf .eia .iso, and .txt
    files whose lines read as G-code; every other file is skipped and logged with the reason)."""
    out: str = "data/cnc_gcode/vocab.json"
    """Vocabulary JSON to write (pass it to the other stages as data.vocab_path)."""
    min_count: int = 1
    """Commands and letters seen fewer times than this stay out of the vocabulary."""
    max_tokens: int = 7
    """Ids per line (commands + parameters + EOS + PAD); the original uses 7."""
    report: str = ""
    """Per-line report JSON; empty = next to `out` as <stem>_report.json."""
    value_mode: str = "exact"
    """How parameter values become tokens: 'exact' (as written; a value longer than n_digits is refused) or
    'seed4' (the original's 4 significant digits, rounded). The report covers both modes either way."""
    n_digits: int = 0
    """Significant digits per value in the exact mode; 0 = as many as the corpus's longest value needs, at least
    10 (4 decimals in mm / 5 in inch with 6 / 5 integer digits) and at most 15."""

    def __post_init__(self) -> None:
        if self.value_mode not in VALUE_MODES:
            raise ValueError(f"build_vocab.value_mode={self.value_mode!r}; use one of {', '.join(VALUE_MODES)}")
        if self.n_digits and not 1 <= self.n_digits <= 15:
            raise ValueError(f"build_vocab.n_digits={self.n_digits}; use 1..15, or 0 to fit the corpus")


@dataclass
class SimulateConfig:
    input: str = ""
    """A G-code program or a folder of them (the suffixes of build_vocab.corpus), run on the virtual mill."""
    out: str = "data/cnc_gcode/simulated.npz"
    """Sensor-window NPZ to write (the layout sample_data writes, vocab_digest included)."""
    report: str = ""
    """Report JSON (lines per unsupported reason, per file); empty = next to `out` as <stem>_report.json."""
    vocab_path: str = ""
    """Vocabulary JSON for the tokens; empty = the default commands and letters plus those the programs use,
    written next to `out` as <stem>_vocab.json (pass it to the other stages as data.vocab_path)."""
    max_tokens: int = 12
    """Ids per line when the vocabulary is built here (`G83 X Y Z R Q F` + EOS is 8; inch, incremental or G98 state
    adds one each)."""
    on_unsupported: str = "skip"
    """skip: leave unsupported lines out and count them by reason; error: exit 2 naming the file and line."""
    window: int = 64
    """Samples per window (50 Hz)."""
    stride: int = 16
    """Samples between window starts (every line's last sample also ends a window)."""
    max_per_line: int = 3
    """At most this many windows labelled with one line (chosen at random; 0 = all)."""
    window_end: str = "executing"
    """executing: windows every `stride` samples and at each line's end, labelled with the line executing at their
    last sample (its end point may still lie ahead); completed: one window per line, ending on its last sample and
    labelled with that just-completed line (see virtual_mill.WINDOW_ENDS)."""
    settle_samples: int = 0
    """With window_end completed: end each window this many samples after its line's last sample, so the measured
    position (2 samples behind the command) has reached the end point."""
    seed: int = 0
    """Seed of the sensor noise and of the window choice."""
    chunk_samples: int = 100_000
    """Samples (50 Hz) simulated before their windows go to disk, so memory stays bounded for any program length
    (about 0.3 GB at 100000); the output does not depend on it. 0: the whole program at once and every window in
    memory until the end (for comparison)."""

    def __post_init__(self) -> None:
        if self.chunk_samples < 0:
            raise ValueError(f"simulate.chunk_samples must be >= 0 (0 = all at once), got {self.chunk_samples}")
        if self.on_unsupported not in ("skip", "error"):
            raise ValueError(f"simulate.on_unsupported must be 'skip' or 'error', got {self.on_unsupported!r}")
        if self.window_end not in ("executing", "completed"):
            raise ValueError(f"simulate.window_end must be 'executing' or 'completed', got {self.window_end!r}")
        if self.settle_samples < 0 or (self.settle_samples and self.window_end != "completed"):
            raise ValueError(f"simulate.settle_samples must be 0, or >= 0 with simulate.window_end completed, got "
                             f"{self.settle_samples}")
        if self.window < 1 or self.stride < 1 or self.max_per_line < 0 or self.max_tokens < 2:
            raise ValueError("simulate.window and simulate.stride must be >= 1, max_per_line >= 0, max_tokens >= 2")


@dataclass
class CncConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    encoder_train: EncoderTrainConfig = field(default_factory=EncoderTrainConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    umich: UmichConfig = field(default_factory=UmichConfig)
    umich_lines: UmichLinesConfig = field(default_factory=UmichLinesConfig)
    library: LibraryConfig = field(default_factory=LibraryConfig)
    measured_only: MeasuredOnlyConfig = field(default_factory=MeasuredOnlyConfig)
    build_vocab: BuildVocabConfig = field(default_factory=BuildVocabConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)


# Threads a stage takes when run.num_threads=0. The models run many small ops per step (LSTM time steps, a narrow
# decoder): a second intra-op thread adds an OpenMP barrier to each op and gains nothing, and beside busy processes
# its spin-waiting burns the CPU the others need (30 demo-size steps on a shared 2-core machine, a one-off
# measurement: 1 thread 0.7-0.8 CPU-s in 0.8-1.3 s, 2 threads 4.4-5.3 CPU-s in 4.8-6.7 s). Whole stages, alone and
# beside busy processes: benchmarks/cnc_contention.py.
AUTO_MAX_THREADS = 1


def set_threads(cfg: CncConfig) -> int:
    """torch intra-op threads: run.num_threads when > 0, else $OMP_NUM_THREADS when set, else the CPUs this process
    may use (affinity, SLURM_CPUS_PER_TASK, cgroup quota) up to AUTO_MAX_THREADS. Returns the count."""
    return set_torch_threads(cfg.run.num_threads, cap=AUTO_MAX_THREADS)
