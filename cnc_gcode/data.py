"""Load and validate sensor-window NPZ files (the original layout) at the boundary.

    windows = load_windows("data/cnc_gcode/sample/train.npz", vocab, nan_policy="skip")
    windows.continuous [N,T,C] float32, categorical [N,T,K] int64, tokens [N,L] int64, operation_type [N] int64

Bad files raise UserError naming the file, the key, what was expected and the fix: missing keys, wrong
rank or dtype, mismatched N, categorical values outside `categorical_dims`, token ids outside the vocabulary,
token rows longer than the vocabulary's `max_tokens`, and tokens written with another vocabulary: every tokenized
file names its vocabulary by `vocab_digest` (`Vocabulary.digest()`), and a missing or different digest is refused,
because ids of another vocabulary would load and decode to other words. Windows holding NaN/inf are skipped and counted
(`nan_policy: skip`) or refused (`nan_policy: error`).

Input groups: a file may record `channel_groups` (a JSON string {group: [channel names]}, continuous and categorical
names; sample_data and simulate write it) and `categorical_names` [K]; files without them use `input_groups` (or
`groups`) of the channels.json beside them. `select_groups` keeps the continuous channels of the chosen groups (the
model's input width follows) and holds the categorical channels of the other groups at 0, so they carry nothing.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnc_gcode.config import CncConfig
from cnc_gcode.tokenizer import VOCAB_DIGEST_KEY, Vocabulary
from cnc_gcode.virtual_mill import CATEGORICAL_NAMES_KEY, CHANNEL_GROUPS_KEY
from common.errors import UserError
from common.io import require_finite

log = logging.getLogger(__name__)
REQUIRED_SENSOR_KEYS = ("continuous", "categorical")
LABEL_KEYS = ("tokens", "operation_type")


@dataclass
class Windows:
    continuous: np.ndarray
    categorical: np.ndarray
    tokens: np.ndarray | None
    operation_type: np.ndarray | None
    channel_names: list[str]
    extra: dict[str, np.ndarray]
    skipped_nan: int = 0
    source: str = ""
    categorical_names: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Input groups the file records: group -> channel names (continuous and categorical)."""
    groups_used: list[str] = field(default_factory=list)
    """The groups `select_groups` kept (empty: all channels, no selection)."""

    def __len__(self) -> int:
        return len(self.continuous)

    def subset(self, index: np.ndarray) -> Windows:
        def pick(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[index]
        return Windows(self.continuous[index], self.categorical[index], pick(self.tokens),
                       pick(self.operation_type), self.channel_names, {k: v[index] for k, v in self.extra.items()},
                       self.skipped_nan, self.source, self.categorical_names, self.groups, self.groups_used)


def _check(condition: bool, path: Path, key: str, message: str) -> None:
    if not condition:
        raise UserError(f"{path}: key '{key}' {message}")


def load_windows(path: str | Path, vocab: Vocabulary | None = None, categorical_dims: list[int] | None = None,
                 n_operations: int | None = None, nan_policy: str = "skip", labels: bool = True,
                 continuous_dim: int | None = None) -> Windows:
    """Read and validate one NPZ. `labels=False` accepts sensor-only files (for predict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; create sensor windows with `python -m cnc_gcode.sample_data OUT` "
                        f"or `python -m studies.cnc_gcode.ingest_umich`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc}); rewrite it with numpy.savez") from exc
    needed = REQUIRED_SENSOR_KEYS + (LABEL_KEYS if labels else ())
    for key in needed:
        _check(key in data, path, key, f"is missing (found {sorted(data)}); the layout is continuous [N,T,C], "
                                       f"categorical [N,T,K], tokens [N,L], operation_type [N]")
    cont, cat = data["continuous"], data["categorical"]
    _check(cont.ndim == 3, path, "continuous", f"must be [N,T,C], got shape {cont.shape}")
    _check(np.issubdtype(cont.dtype, np.floating), path, "continuous", f"must be float32, got {cont.dtype}")
    _check(cat.ndim == 3 and cat.shape[:2] == cont.shape[:2], path, "categorical",
           f"must be [N,T,K] with N,T = {cont.shape[:2]}, got shape {cat.shape}")
    _check(np.issubdtype(cat.dtype, np.integer), path, "categorical", f"must be int64, got {cat.dtype}")
    _check(len(cont) > 0, path, "continuous", "holds no windows")
    if continuous_dim is not None:
        _check(cont.shape[2] == continuous_dim, path, "continuous",
               f"has C={cont.shape[2]} channels but the model was trained with C={continuous_dim}; use data with the "
               f"same channel list (channel_names) or retrain")
    if categorical_dims is not None:
        _check(cat.shape[2] == len(categorical_dims), path, "categorical",
               f"has K={cat.shape[2]} channels, config encoder.categorical_dims has {len(categorical_dims)}")
        for i, dim in enumerate(categorical_dims):
            bad = (cat[..., i] < 0) | (cat[..., i] >= dim)
            _check(not bad.any(), path, "categorical",
                   f"channel {i} holds value {int(cat[..., i][bad][0]) if bad.any() else 0} outside 0..{dim - 1} "
                   f"(window {int(np.argwhere(bad)[0][0]) if bad.any() else 0}); fix the data or "
                   f"encoder.categorical_dims")
    tokens = operation = None
    if labels:
        tokens, operation = data["tokens"], data["operation_type"]
        _check(tokens.ndim == 2 and len(tokens) == len(cont), path, "tokens", f"must be [N={len(cont)},L], got {tokens.shape}")
        _check(np.issubdtype(tokens.dtype, np.integer), path, "tokens", f"must be int64, got {tokens.dtype}")
        _check(operation.shape == (len(cont),), path, "operation_type", f"must be [N={len(cont)}], got {operation.shape}")
        _check(np.issubdtype(operation.dtype, np.integer), path, "operation_type", f"must be int64, got {operation.dtype}")
        if vocab is not None:
            check_vocab_digest(data, path, vocab)
            _check(tokens.shape[1] == vocab.max_tokens, path, "tokens",
                   f"rows have {tokens.shape[1]} tokens, the vocabulary has max_tokens={vocab.max_tokens}")
            try:
                vocab.fields(tokens)
            except UserError as exc:
                raise UserError(f"{path}: key 'tokens': {exc}") from exc
        if n_operations is not None:
            bad = (operation < 0) | (operation >= n_operations)
            _check(not bad.any(), path, "operation_type",
                   f"holds {int(operation[bad][0]) if bad.any() else 0} outside 0..{n_operations - 1} "
                   f"(encoder.n_operations)")
    names = [str(x) for x in data["channel_names"]] if "channel_names" in data else \
        [f"channel_{i}" for i in range(cont.shape[2])]
    cat_names = [str(x) for x in data[CATEGORICAL_NAMES_KEY]] if CATEGORICAL_NAMES_KEY in data else \
        [f"categorical_{i}" for i in range(cat.shape[2])]
    extra = {k: v for k, v in data.items()
             if k not in needed + ("channel_names", VOCAB_DIGEST_KEY, CATEGORICAL_NAMES_KEY)
             and v.shape[:1] == (len(cont),)}
    windows = Windows(cont.astype(np.float32, copy=False), cat.astype(np.int64, copy=False),
                      None if tokens is None else tokens.astype(np.int64),
                      None if operation is None else operation.astype(np.int64), names, extra, 0, str(path),
                      cat_names, _recorded_groups(data, path))
    finite = np.isfinite(windows.continuous).all(axis=(1, 2))
    if not finite.all():
        n_bad = int((~finite).sum())
        if nan_policy == "error":
            require_finite(windows.continuous, f"{path}: key 'continuous'", what="window",
                           fix="clean the data or set data.nan_policy=skip to drop and count those windows")
        log.warning("%s: skipped %d of %d windows holding NaN/inf sensor values", path, n_bad, len(finite))
        windows = windows.subset(np.flatnonzero(finite))
        windows.skipped_nan = n_bad
        if len(windows) == 0:
            raise UserError(f"{path}: every window holds NaN/inf sensor values; nothing left to use")
    return windows


def _recorded_groups(data: dict[str, np.ndarray], path: Path) -> dict[str, list[str]]:
    """The file's input groups: its `channel_groups` key, else channels.json beside it (input_groups, or groups)."""
    if CHANNEL_GROUPS_KEY in data:
        try:
            groups = json.loads(str(data[CHANNEL_GROUPS_KEY]))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: key '{CHANNEL_GROUPS_KEY}' is not a JSON object of group -> channel names "
                            f"({exc})") from exc
        _check(isinstance(groups, dict), path, CHANNEL_GROUPS_KEY, "must be a JSON object of group -> channel names")
        return {str(k): [str(c) for c in v] for k, v in groups.items()}
    beside = path.parent / "channels.json"
    if beside.is_file():
        try:
            info = json.loads(beside.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        groups = info.get("input_groups") or info.get("groups") or {}
        return {str(k): [str(c) for c in v] for k, v in groups.items()} if isinstance(groups, dict) else {}
    return {}


def select_groups(windows: Windows, wanted: list[str]) -> Windows:
    """Keep the continuous channels of the `wanted` input groups (in file order) and zero the categorical channels of
    the others. Empty `wanted`: all channels. UserError naming an unknown group and the known ones."""
    if not wanted:
        return windows
    groups = windows.groups
    if not groups:
        raise UserError(f"config key 'data.channel_groups': {windows.source} records no channel groups (no "
                        f"'{CHANNEL_GROUPS_KEY}' key and no channels.json beside it); re-create the data with "
                        f"sample_data / simulate, or leave data.channel_groups empty to use all channels")
    unknown = [g for g in wanted if g not in groups]
    if unknown:
        raise UserError(f"config key 'data.channel_groups': unknown group(s) {', '.join(map(repr, unknown))} in "
                        f"{windows.source}; known groups: {', '.join(sorted(groups))}")
    chosen = {c for g in wanted for c in groups[g]}
    keep = [i for i, name in enumerate(windows.channel_names) if name in chosen]
    if not keep:
        raise UserError(f"config key 'data.channel_groups': {list(wanted)} hold no continuous channel of "
                        f"{windows.source}; add a group with continuous channels")
    categorical = windows.categorical
    off = [i for i, name in enumerate(windows.categorical_names) if name not in chosen]
    if off:
        categorical = categorical.copy()
        categorical[..., off] = 0
    return Windows(np.ascontiguousarray(windows.continuous[..., keep]), categorical, windows.tokens,
                   windows.operation_type, [windows.channel_names[i] for i in keep], windows.extra,
                   windows.skipped_nan, windows.source, windows.categorical_names, groups, list(wanted))


def check_channels(windows: Windows, channel_names: list[str] | None, continuous_dim: int | None) -> None:
    """UserError unless the (selected) windows have the channels the model was trained with."""
    path = windows.source
    if continuous_dim is not None and windows.continuous.shape[2] != continuous_dim:
        raise UserError(f"{path}: key 'continuous': has C={windows.continuous.shape[2]} channels "
                        f"({'groups ' + ', '.join(windows.groups_used) if windows.groups_used else 'all channels'}) "
                        f"but the model was trained with C={continuous_dim}; use the same data.channel_groups and "
                        f"channel list (channel_names) as in training, or retrain")
    if channel_names is not None and list(channel_names) != windows.channel_names:
        raise UserError(f"{path}: channels {windows.channel_names} differ from the model's {list(channel_names)}; "
                        f"use the data.channel_groups the model was trained with")


def check_vocab_digest(data: dict[str, np.ndarray], path: Path, vocab: Vocabulary) -> None:
    """UserError unless the file's `vocab_digest` names `vocab` (its tokens were made by this vocabulary)."""
    if VOCAB_DIGEST_KEY not in data:
        raise UserError(f"{path}: key '{VOCAB_DIGEST_KEY}' is missing, so nothing says which vocabulary made its "
                        f"tokens; re-create the file (cnc_gcode.sample_data / ingest_umich) or save it with "
                        f"{VOCAB_DIGEST_KEY}=vocab.digest() of the vocabulary that tokenized it")
    stored = str(data[VOCAB_DIGEST_KEY])
    if stored != vocab.digest():
        raise UserError(f"{path}: its tokens were made with vocabulary {stored}, the configured vocabulary is "
                        f"{vocab.digest()} ({vocab.n_commands} commands, {len(vocab.letters)} letters, values "
                        f"{vocab.mode}); pass the vocab.json written with the data (data.vocab_path=...) or "
                        f"re-create the data with this vocabulary")


def channel_stats(continuous: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over windows and time: [C], [C] (float64 sums, returned as float32)."""
    flat = continuous.reshape(-1, continuous.shape[-1]).astype(np.float64)
    return torch.from_numpy(flat.mean(0).astype(np.float32)), torch.from_numpy(flat.std(0).astype(np.float32))


def robust_stats(continuous: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel median and IQR / 1.349 (the std of a normal with that IQR) over windows and time: [C], [C].

    A channel's std is set by its rare long moves (UMich Z: 38 mm from the tool change height), which squeezes the
    millimetre steps that matter into a few hundredths of a unit; the IQR is set by where the machine spends its
    time. Channels whose IQR is 0 (mostly constant: spindle off, a still axis) fall back to their std, then to 1."""
    flat = continuous.reshape(-1, continuous.shape[-1]).astype(np.float64)
    low, median, high = np.percentile(flat, [25.0, 50.0, 75.0], axis=0)
    scale = (high - low) / 1.349
    std = flat.std(0)
    scale = np.where(scale > 1e-6, scale, np.where(std > 1e-6, std, 1.0))
    return torch.from_numpy(median.astype(np.float32)), torch.from_numpy(scale.astype(np.float32))


def input_stats(continuous: np.ndarray, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale [C], [C] of encoder.input_scaling (zscore: mean / std; robust: median / IQR)."""
    if scaling == "robust":
        return robust_stats(continuous)
    if scaling == "zscore":
        return channel_stats(continuous)
    raise UserError(f"config key 'encoder.input_scaling': {scaling!r}; use zscore or robust")


# Channels estimate_surface reads beside Z, by the names UMich (ingest_umich) and the simulator give them.
SPINDLE_SPEED_CHANNELS = ("S1_ActualVelocity", "spindle_speed")
PLANAR_VELOCITY_CHANNELS = (("X1_ActualVelocity", "Y1_ActualVelocity"), ("velocity_x", "velocity_y"))
SURFACE_BIN_MM = 0.1
SURFACE_MIN_SHARE = 0.05


def cutting_rows(continuous: np.ndarray, channel_names: list[str]) -> np.ndarray:
    """[N*T] bool: rows where the tool cuts, from measured channels only: the spindle turns (above 5 % of its
    highest training speed) and the tool moves in X/Y faster than a crawl (2 % of the fast moves) but slower than
    the rapid / positioning moves (80 % of the 99th-percentile planar speed). UserError when the channels are
    missing."""
    spindle = next((c for c in SPINDLE_SPEED_CHANNELS if c in channel_names), None)
    planar = next((pair for pair in PLANAR_VELOCITY_CHANNELS if all(c in channel_names for c in pair)), None)
    if spindle is None or planar is None:
        raise UserError(f"config key 'encoder.depth_channel': the surface is found where the tool cuts, which needs a "
                        f"spindle speed channel (one of {', '.join(SPINDLE_SPEED_CHANNELS)}) and X/Y velocity channels "
                        f"({' or '.join('/'.join(p) for p in PLANAR_VELOCITY_CHANNELS)}) among the input channels; "
                        f"add their groups to data.channel_groups or leave encoder.depth_channel empty")
    flat = continuous.reshape(-1, continuous.shape[-1]).astype(np.float64)
    speed = np.abs(flat[:, channel_names.index(spindle)])
    planar_speed = np.hypot(flat[:, channel_names.index(planar[0])], flat[:, channel_names.index(planar[1])])
    fast = np.percentile(planar_speed, 99.0)
    return (speed > 0.05 * speed.max()) & (planar_speed > 0.02 * fast) & (planar_speed < 0.8 * fast)


def estimate_surface(continuous: np.ndarray, channel_names: list[str], z_channel: str) -> float:
    """The part's top surface in the units of `z_channel` (mm): the highest Z level holding at least 5 % of the
    cutting rows (cutting_rows; 0.1 mm levels), so stray cutting-speed moves above the part do not set it. Uses the
    sensors only, never labels. UserError when `z_channel` is not an input or no row cuts."""
    if z_channel not in channel_names:
        raise UserError(f"config key 'encoder.depth_channel': {z_channel!r} is not among the input channels "
                        f"{channel_names}; name the Z position channel (UMich Z1_ActualPosition, simulator actual_z) "
                        f"or leave it empty")
    cutting = cutting_rows(continuous, channel_names)
    if not cutting.any():
        raise UserError("config key 'encoder.depth_channel': no training row looks like cutting (spindle on, moving "
                        "at a feed); the surface cannot be found, so leave encoder.depth_channel empty")
    z = continuous.reshape(-1, continuous.shape[-1])[cutting, channel_names.index(z_channel)].astype(np.float64)
    levels, counts = np.unique(np.round(z / SURFACE_BIN_MM).astype(np.int64), return_counts=True)
    common = levels[counts >= SURFACE_MIN_SHARE * len(z)]
    top = common.max() if len(common) else levels[counts.argmax()]
    return float(top * SURFACE_BIN_MM)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch, derived from (seed, epoch) alone so a resumed run repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(n: int, batch_size: int, order: np.ndarray | None = None):
    """Index arrays of consecutive batches over `order` (default 0..n-1)."""
    order = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def split_path(cfg: CncConfig, split: str) -> str:
    """The file of one split of the config: data.train_path, val_path or test_path."""
    paths = {"train": cfg.data.train_path, "val": cfg.data.val_path, "test": cfg.data.test_path}
    if split not in paths:
        raise UserError(f"config key 'eval.split': expected one of {sorted(paths)}, got {split!r}")
    return paths[split]


def load_split(cfg: CncConfig, split: str, vocab: Vocabulary, continuous_dim: int | None = None,
               channel_names: list[str] | None = None) -> Windows:
    """One split's windows with the configured input groups (data.channel_groups) selected, checked against the
    model's width and channel names when given."""
    windows = load_windows(split_path(cfg, split), vocab, cfg.encoder.categorical_dims, cfg.encoder.n_operations,
                           cfg.data.nan_policy)
    windows = select_groups(windows, cfg.data.channel_groups)
    check_channels(windows, channel_names, continuous_dim)
    return windows


def groups_used(windows: Windows) -> list[str]:
    """The input groups a stage used, for its reports: the selected ones, else every group the file records, else
    ['all channels']."""
    return list(windows.groups_used) or sorted(windows.groups) or ["all channels"]


def log_windows(train: Windows, val: Windows) -> None:
    """One log line per split read (after open_run, so it reaches the run's train.log)."""
    for name, windows in (("train", train), ("val", val)):
        log.info("%s: %d windows from %s (%d skipped: NaN/inf)", name, len(windows), windows.source,
                 windows.skipped_nan)


def cap_windows(windows: Windows, limit: int, seed: int) -> Windows:
    """A seeded random subset of at most `limit` windows (0 = all)."""
    if limit <= 0 or len(windows) <= limit:
        return windows
    return windows.subset(np.sort(np.random.default_rng(seed).choice(len(windows), limit, replace=False)))
