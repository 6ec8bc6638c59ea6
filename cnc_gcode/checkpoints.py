"""The checkpoints of the cnc_gcode training stages: where each lies in a run, the meta and fingerprint it records,
and loading trained models back from it (the encoder; encoder + decoder; the line library's model in
line_library.load_library), each refused with exit 2 when the directory holds another stage's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cnc_gcode.config import CncConfig, DecoderConfig, EncoderConfig
from cnc_gcode.model import MMDTAELSTM, SensorMultiHeadDecoder, build_decoder, build_encoder
from cnc_gcode.tokenizer import Vocabulary, load_vocabulary
from common.checkpoint import find_checkpoint, load_checkpoint
from common.config import to_dict
from common.errors import UserError
from common.fingerprint import make_fingerprint

ENCODER_DIR, DECODER_DIR = "encoder", "decoder"
KIND_ENCODER, KIND_DECODER, KIND_LIBRARY = "cnc_gcode.encoder", "cnc_gcode.decoder", "cnc_gcode.line_library"
# kind -> (what the error calls it, the stage that writes it, the config key that points to it)
KIND_WRITERS = {KIND_ENCODER: ("an encoder", "train_encoder", "train.encoder_checkpoint"),
                KIND_DECODER: ("a decoder", "train_decoder", "eval.checkpoint"),
                KIND_LIBRARY: ("a line-library", "line_library", "library.checkpoint")}


# Data paths are volatile in the fingerprint: the files they name are recorded by size and SHA-256 instead, so a moved
# data folder resumes and a changed file is refused. The encoder checkpoint of the decoder stage likewise.
PATH_KEYS = ("data.train_path", "data.val_path", "data.test_path", "data.vocab_path", "train.encoder_checkpoint")


def stage_fingerprint(cfg: CncConfig, sections: tuple[str, ...], data: dict[str, str | Path]) -> dict:
    """The fingerprint a checkpoint of this stage records (common.runs): the config `sections` that decide its
    weights plus run.seed, and the identity of the files in `data` (the training/validation windows, the vocabulary
    file when one is configured, the frozen encoder's weights). Epochs, threads, names and paths are left out."""
    full = to_dict(cfg)
    if not cfg.data.channel_groups:  # all channels: the fingerprint of runs from before the key existed still holds
        full["data"].pop("channel_groups", None)
    config = {"run": {"seed": cfg.run.seed}, **{name: full[name] for name in sections}}
    files = dict(data)
    if cfg.data.vocab_path:
        files["vocab"] = cfg.data.vocab_path
    return make_fingerprint(config, data=files, volatile=PATH_KEYS)


def encoder_meta(cfg: CncConfig, continuous_dim: int, channel_names: list[str]) -> dict:
    """meta.json of an encoder checkpoint: what rebuilds the encoder and the input channels it was trained on."""
    return {"kind": KIND_ENCODER, "encoder": to_dict(cfg.encoder), "continuous_dim": continuous_dim,
            "channel_names": channel_names, "channel_groups": list(cfg.data.channel_groups)}


def decoder_meta(cfg: CncConfig, vocab: Vocabulary, encoder_ckpt: Path, enc_meta: dict) -> dict:
    """meta.json of a decoder checkpoint: the encoder's meta, the decoder config and the vocabulary's fingerprint."""
    return {"kind": KIND_DECODER, "decoder": to_dict(cfg.decoder), "vocab": vocab.fingerprint(),
            "encoder_checkpoint": str(encoder_ckpt), "encoder": enc_meta["encoder"],
            "continuous_dim": enc_meta["continuous_dim"], "channel_names": enc_meta["channel_names"],
            "channel_groups": enc_meta.get("channel_groups", [])}


def encoder_path(cfg: CncConfig) -> Path:
    """The encoder checkpoint the later stages read: train.encoder_checkpoint, else the run's encoder/best."""
    return Path(cfg.train.encoder_checkpoint) if cfg.train.encoder_checkpoint else \
        cfg.run.run_dir / ENCODER_DIR / "checkpoints" / "best"


def decoder_path(cfg: CncConfig) -> Path:
    """The decoder checkpoint evaluate / predict / export read: eval.checkpoint, else the run's decoder/best."""
    return Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else cfg.run.run_dir / DECODER_DIR / "checkpoints" / "best"


def read_checkpoint(path: str | Path, kind: str) -> tuple[Path, dict]:
    """The checkpoint directory `path` names (a run's checkpoints/ folder picks best, common.checkpoint) and its meta;
    UserError when the meta's kind is not `kind`, naming the stage that writes one."""
    ckpt = find_checkpoint(path)
    _, meta = load_checkpoint(ckpt)
    if meta.get("kind") != kind:
        what, stage, key = KIND_WRITERS[kind]
        raise UserError(f"{ckpt}: not {what} checkpoint (kind={meta.get('kind')!r}); pass the directory written by "
                        f"`python -m cnc_gcode.{stage}` (config key {key})")
    return ckpt, meta


def load_trained(cfg: CncConfig, path: str | Path, kind: str) -> tuple[Path, dict, Vocabulary]:
    """read_checkpoint, and the configured vocabulary (data.vocab_path) a decoder or line library decodes with; the
    caller checks it against the fingerprint its meta records (Vocabulary.check_matches)."""
    ckpt, meta = read_checkpoint(path, kind)
    return ckpt, meta, load_vocabulary(cfg.data.vocab_path)


def load_encoder(path: str | Path) -> tuple[MMDTAELSTM, dict, Path]:
    """Encoder built from its checkpoint's meta and loaded, in eval mode with frozen weights."""
    ckpt, meta = read_checkpoint(path, KIND_ENCODER)
    encoder = build_encoder(EncoderConfig(**meta["encoder"]), int(meta["continuous_dim"]))
    load_checkpoint(ckpt, encoder)
    encoder.eval().requires_grad_(False)
    return encoder, meta, ckpt


class Pipeline(torch.nn.Module):
    """Frozen encoder + decoder, saved together so a decoder checkpoint is self-contained."""

    def __init__(self, encoder: MMDTAELSTM, decoder: SensorMultiHeadDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder


def load_models(cfg: CncConfig, checkpoint: str | Path | None = None
                ) -> tuple[MMDTAELSTM, SensorMultiHeadDecoder, Vocabulary, dict]:
    """Encoder + decoder of a trained decoder checkpoint, checked against the configured vocabulary."""
    ckpt, meta, vocab = load_trained(cfg, checkpoint or decoder_path(cfg), KIND_DECODER)
    vocab.check_matches(meta["vocab"], str(ckpt))
    encoder = build_encoder(EncoderConfig(**meta["encoder"]), int(meta["continuous_dim"]))
    decoder = build_decoder(DecoderConfig(**meta["decoder"]), vocab, encoder.lstm.hidden_size * 2)
    pipeline = Pipeline(encoder, decoder)
    load_checkpoint(ckpt, pipeline)
    pipeline.eval().requires_grad_(False)
    return encoder, decoder, vocab, meta
