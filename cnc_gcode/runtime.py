"""Shared plumbing of the cnc_gcode stages: run paths, data loading, loading trained models from checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cnc_gcode.config import CncConfig, DecoderConfig, EncoderConfig
from cnc_gcode.data import Windows, check_channels, load_windows, select_groups
from cnc_gcode.model import MMDTAELSTM, SensorMultiHeadDecoder, build_decoder, build_encoder
from cnc_gcode.tokenizer import Vocabulary, load_vocabulary
from common.checkpoint import find_checkpoint, load_checkpoint
from common.config import to_dict
from common.distributed import DistInfo, setup_distributed
from common.errors import UserError
from common.fingerprint import make_fingerprint
from common.threads import set_torch_threads

log = logging.getLogger(__name__)
ENCODER_DIR, DECODER_DIR = "encoder", "decoder"
KIND_ENCODER, KIND_DECODER = "cnc_gcode.encoder", "cnc_gcode.decoder"


# Threads a stage takes when run.num_threads=0. The models run many small ops per step (LSTM time steps, a narrow
# decoder): a second intra-op thread adds an OpenMP barrier to each op and gains nothing, and beside busy processes
# its spin-waiting burns the CPU the others need (30 demo-size steps on the shared 2-core machine, a one-off
# measurement: 1 thread 0.7-0.8 CPU-s in 0.8-1.3 s, 2 threads 4.4-5.3 CPU-s in 4.8-6.7 s). Whole stages, alone and
# beside busy processes: benchmarks/cnc_contention.py.
AUTO_MAX_THREADS = 1


def set_threads(cfg: CncConfig) -> int:
    """torch intra-op threads: run.num_threads when > 0, else $OMP_NUM_THREADS when set, else the CPUs this process
    may use (affinity, SLURM_CPUS_PER_TASK, cgroup quota) up to AUTO_MAX_THREADS. Returns the count."""
    return set_torch_threads(cfg.run.num_threads, cap=AUTO_MAX_THREADS)


def start_distributed() -> DistInfo:
    """The torchrun process group, gloo (these stages train on the CPU); world size 1 without torchrun."""
    return setup_distributed("cpu")


def split_path(cfg: CncConfig, split: str) -> str:
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


# Data paths are volatile in the fingerprint: the files they name are recorded by size and SHA-256 instead, so a moved
# data folder resumes and a changed file is refused. The encoder checkpoint of the decoder stage likewise.
PATH_KEYS = ("data.train_path", "data.val_path", "data.test_path", "data.vocab_path", "train.encoder_checkpoint")


def stage_fingerprint(cfg: CncConfig, sections: tuple[str, ...], data: dict[str, str | Path]) -> dict:
    """The fingerprint a checkpoint of this stage records (common.runs): the config `sections` that decide its
    weights plus run.seed, and the identity of the files in `data` (the training/validation windows, the vocabulary
    file when one is configured, the frozen encoder's weights). Epochs, threads, names and paths are left out."""
    full = to_dict(cfg)
    if not cfg.data.channel_groups:  # all channels, as before the key existed: runs from then still resume
        full["data"].pop("channel_groups", None)
    config = {"run": {"seed": cfg.run.seed}, **{name: full[name] for name in sections}}
    files = dict(data)
    if cfg.data.vocab_path:
        files["vocab"] = cfg.data.vocab_path
    return make_fingerprint(config, data=files, volatile=PATH_KEYS)


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


def encoder_meta(cfg: CncConfig, continuous_dim: int, channel_names: list[str]) -> dict:
    return {"kind": KIND_ENCODER, "encoder": to_dict(cfg.encoder), "continuous_dim": continuous_dim,
            "channel_names": channel_names, "channel_groups": list(cfg.data.channel_groups)}


def decoder_meta(cfg: CncConfig, vocab: Vocabulary, encoder_ckpt: Path, enc_meta: dict) -> dict:
    return {"kind": KIND_DECODER, "decoder": to_dict(cfg.decoder), "vocab": vocab.fingerprint(),
            "encoder_checkpoint": str(encoder_ckpt), "encoder": enc_meta["encoder"],
            "continuous_dim": enc_meta["continuous_dim"], "channel_names": enc_meta["channel_names"],
            "channel_groups": enc_meta.get("channel_groups", [])}


def load_encoder(path: str | Path) -> tuple[MMDTAELSTM, dict, Path]:
    """Encoder built from its checkpoint's meta and loaded, in eval mode with frozen weights."""
    ckpt = find_checkpoint(path)
    _, meta = load_checkpoint(ckpt)
    if meta.get("kind") != KIND_ENCODER:
        raise UserError(f"{ckpt}: not an encoder checkpoint (kind={meta.get('kind')!r}); pass the directory "
                        f"written by `python -m cnc_gcode.train_encoder`")
    encoder = build_encoder(EncoderConfig(**meta["encoder"]), int(meta["continuous_dim"]))
    load_checkpoint(ckpt, encoder)
    encoder.eval().requires_grad_(False)
    return encoder, meta, ckpt


def encoder_path(cfg: CncConfig) -> Path:
    return Path(cfg.train.encoder_checkpoint) if cfg.train.encoder_checkpoint else \
        cfg.run.run_dir / ENCODER_DIR / "checkpoints" / "best"


def decoder_path(cfg: CncConfig) -> Path:
    return Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else cfg.run.run_dir / DECODER_DIR / "checkpoints" / "best"


class Pipeline(torch.nn.Module):
    """Frozen encoder + decoder, saved together so a decoder checkpoint is self-contained."""

    def __init__(self, encoder: MMDTAELSTM, decoder: SensorMultiHeadDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder


def load_models(cfg: CncConfig, checkpoint: str | Path | None = None
                ) -> tuple[MMDTAELSTM, SensorMultiHeadDecoder, Vocabulary, dict]:
    """Encoder + decoder of a trained decoder checkpoint, checked against the configured vocabulary."""
    ckpt = find_checkpoint(checkpoint or decoder_path(cfg))
    _, meta = load_checkpoint(ckpt)
    if meta.get("kind") != KIND_DECODER:
        raise UserError(f"{ckpt}: not a decoder checkpoint (kind={meta.get('kind')!r}); pass the directory "
                        f"written by `python -m cnc_gcode.train`")
    vocab = load_vocabulary(cfg.data.vocab_path)
    vocab.check_matches(meta["vocab"], str(ckpt))
    encoder = build_encoder(EncoderConfig(**meta["encoder"]), int(meta["continuous_dim"]))
    decoder = build_decoder(DecoderConfig(**meta["decoder"]), vocab, encoder.lstm.hidden_size * 2)
    pipeline = Pipeline(encoder, decoder)
    load_checkpoint(ckpt, pipeline)
    pipeline.eval().requires_grad_(False)
    return encoder, decoder, vocab, meta
