"""MMDTAELSTM sensor encoder and SensorMultiHeadDecoder (the original's two-stage architecture).

    encoder = build_encoder(cfg.encoder, continuous_dim=27)
    memory, op_logits = encoder(continuous [B,T,C], categorical [B,T,K])     # [B,T,128], [B,9]
    decoder = build_decoder(cfg.decoder, vocab, sensor_dim=128)
    logits = decoder(memory, input_ids [B,L])                                 # dict of head logits

The decoder uses its own small pre-norm transformer layers instead of nn.TransformerDecoder: the cached step
(`decoder.step`) keeps the self-attention keys/values of earlier positions in a fixed-size buffer
[layers, 2, B, heads, max_tokens, head_dim] written with a one-hot blend, and the cross-attention keys/values
of the memory are computed once per window. Fixed shapes and plain matmuls export to ONNX without dynamic
sequence axes or graph breaks, which nn.TransformerDecoder's fused path does not give for a cached step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_gcode.config import DecoderConfig, EncoderConfig
from cnc_gcode.tokenizer import (
    EOS,
    N_INPUT_TYPES,
    N_TYPES,
    PAD,
    SOS,
    SPECIAL_TOKENS,
    TYPE_COMMAND,
    TYPE_EOS,
    TYPE_PAD,
    TYPE_PARAM,
    TYPE_SOS,
    TYPE_UNK,
    UNK,
    Vocabulary,
)
from common.errors import UserError

HEADS = ("type", "command", "ptype", "exponent", "digits")
# decoder.value_mode=regress: the value head's key among the head outputs (beside every token head of HEADS).
VALUE_HEAD = "value"
# Letters whose value is regressed on a log scale (feed mm/min, spindle rpm: their errors are relative); the axis
# letters are offsets from the window's last measured position of the channel named here; every other letter is
# regressed as it is (arc centre offsets and R are already relative to the start point).
LOG_LETTERS = "FS"
ANCHOR_CHANNELS = {"X": "actual_x", "Y": "actual_y", "Z": "actual_z"}
DEFAULT_DECIMALS = 3
# F is regressed as a correction to log(1 + the window's plateau path speed in mm/min), read from these channels
# (mm/s) by `plateau_speed`; S keeps its plain log value (the completed windows show no spindle reading that good).
SPEED_ANCHOR_LETTERS = "F"
VELOCITY_CHANNELS = ("velocity_x", "velocity_y", "velocity_z")
PLATEAU_SKIP_LAST = 3  # the exact stop and the settle samples at the window's end
PLATEAU_REL_STEP = 0.01  # a step belongs to a plateau when the speed changes by under 1 % (of at least 1 mm/min)


def plateau_speed(continuous: Tensor, velocity_channels: Tensor) -> Tensor:
    """Raw continuous [B,T,C] and the indices of velocity_x/y/z [3] (mm/s) -> [B] path speed (mm/min) on the
    window's last speed plateau: the median over the last run of steps whose speed changes by under 1 % per step,
    the last PLATEAU_SKIP_LAST samples left out; the window's top speed when no step is that flat. The torch twin
    of measured_only's numpy reading, written with plain tensor ops (no loops, no data-dependent shapes) so it
    exports to ONNX inside the encoder graph."""
    vel = continuous.index_select(2, velocity_channels).double()  # float64: sums of squares of mm/s agree with numpy
    speed = torch.sqrt((vel * vel).sum(2)) * 60.0
    if speed.shape[1] > PLATEAU_SKIP_LAST + 1:
        speed = speed[:, :-PLATEAU_SKIP_LAST]
    nxt = speed[:, 1:]
    flat = (nxt - speed[:, :-1]).abs() < PLATEAU_REL_STEP * torch.clamp(nxt, min=1.0)  # [B,T-1]: step i -> i+1
    step = torch.arange(flat.shape[1], device=speed.device)[None]
    end = torch.where(flat, step, torch.full_like(step, -1)).max(1).values  # last flat step (-1: none)
    broken = (~flat) & (step < end[:, None])
    start = torch.where(broken, step, torch.full_like(step, -1)).max(1).values + 1  # first step of the last run
    sample = torch.arange(speed.shape[1], device=speed.device)[None]
    inside = (sample >= start[:, None]) & (sample <= end[:, None] + 1)  # the run's steps cover samples start..end+1
    count = inside.sum(1)
    ordered = torch.sort(torch.where(inside, speed, torch.full_like(speed, 1e30)), dim=1).values
    low = ordered.gather(1, torch.clamp(torch.div(count - 1, 2, rounding_mode="floor"), min=0)[:, None])[:, 0]
    high = ordered.gather(1, torch.div(count, 2, rounding_mode="floor")[:, None])[:, 0]
    median = 0.5 * (low + high)
    return torch.where(end >= 0, median, speed.max(1).values).float()


class MMDTAELSTM(nn.Module):
    """Multi-modal (continuous + categorical) denoising-autoencoder BiLSTM encoder.

    continuous [B,T,C] float (raw units; scaled inside with the training set's per-channel centre / scale, the
    channel_mean / channel_std buffers), categorical [B,T,K] int64 -> memory [B,T,hidden], operation logits
    [B,n_operations]. `squash` (encoder.input_scaling=robust) passes the scaled channels through asinh. With
    `depth_band` set, one more input channel is derived inside from the raw Z channel
    (one-hot `depth_select` [C]): depth = clip(surface_z - Z, band) in mm, centred on the band, so a millimetre of
    depth stays one unit whatever the channel's spread. Everything lives in buffers: checkpoints, ONNX export and
    predict apply the same transform to raw units. `reconstruct(memory)` gives the transformed input [B,T,C(+1)]
    (the DTAE objective).
    """

    def __init__(self, continuous_dim: int, categorical_dims: list[int], hidden_dim: int = 128,
                 categorical_embed_dim: int = 4, lstm_layers: int = 2, dropout: float = 0.1,
                 n_operations: int = 9, residual: bool = True,
                 depth_band: tuple[float, float] | None = None, squash: bool = False) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"encoder.hidden_dim must be even (two LSTM directions), got {hidden_dim}")
        self.continuous_dim = continuous_dim
        self.residual = residual
        self.categorical_dims = list(categorical_dims)
        self.squash = squash
        self.register_buffer("channel_mean", torch.zeros(continuous_dim))
        self.register_buffer("channel_std", torch.ones(continuous_dim))
        # Registered only with a depth channel, so checkpoints of encoders without one load as before.
        self.depth_band = None if depth_band is None else (float(depth_band[0]), float(depth_band[1]))
        if self.depth_band is not None:
            self.register_buffer("depth_select", torch.zeros(continuous_dim))
            self.register_buffer("surface_z", torch.zeros(()))
        input_dim = continuous_dim + (self.depth_band is not None)
        self.input_dim = input_dim
        self.continuous_proj = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU())
        self.categorical_embeds = nn.ModuleList(nn.Embedding(d, categorical_embed_dim) for d in categorical_dims)
        self.categorical_proj = nn.Sequential(nn.Linear(categorical_embed_dim * len(categorical_dims), hidden_dim),
                                              nn.LayerNorm(hidden_dim), nn.ReLU())
        self.lstm = nn.LSTM(hidden_dim, hidden_dim // 2, num_layers=lstm_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if lstm_layers > 1 else 0.0)
        self.value_skip = nn.Linear(input_dim, hidden_dim) if residual else None
        self.dropout = nn.Dropout(dropout)
        self.operation_head = nn.Linear(hidden_dim, n_operations)
        self.reconstruction_head = nn.Linear(hidden_dim, input_dim)

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        self.channel_mean.copy_(mean)
        self.channel_std.copy_(torch.clamp(std, min=1e-6))

    def set_depth(self, channel: int, surface_z: float) -> None:
        """Read depth from raw channel `channel` (index into the C inputs) below `surface_z` (same units, mm)."""
        if self.depth_band is None:
            raise ValueError("this encoder was built without a depth channel (encoder.depth_channel is empty)")
        self.depth_select.zero_()
        self.depth_select[channel] = 1.0
        self.surface_z.fill_(float(surface_z))

    def depth(self, continuous: Tensor) -> Tensor:
        """[B,T,C] raw -> [B,T,1]: depth below the surface in mm, clipped to the band and centred on it."""
        low, high = self.depth_band
        z = (continuous * self.depth_select).sum(dim=-1, keepdim=True)  # one-hot pick: exact, exports as plain ops
        return torch.clamp(self.surface_z - z, low, high) - (low + high) / 2

    def normalize(self, continuous: Tensor) -> Tensor:
        scaled = (continuous - self.channel_mean) / self.channel_std
        if self.squash:
            # asinh: linear within about one IQR of the median, logarithmic beyond, so heavy-tailed channels (UMich
            # Y velocity reaches 680 IQRs on rapid moves) stay in a range the LayerNorm and the MSE can work with.
            # Written out because the ONNX exporter has no asinh at opset 17.
            magnitude = scaled.abs()
            scaled = torch.sign(scaled) * torch.log(magnitude + torch.sqrt(magnitude * magnitude + 1.0))
        if self.depth_band is None:
            return scaled
        return torch.cat([scaled, self.depth(continuous)], dim=-1)

    def encode_normalized(self, normalized: Tensor, categorical: Tensor) -> tuple[Tensor, Tensor]:
        cont = self.continuous_proj(normalized)
        cat = torch.cat([emb(categorical[..., i]) for i, emb in enumerate(self.categorical_embeds)], dim=-1)
        fused = cont + self.categorical_proj(cat)  # additive fusion, as in the original
        memory, _ = self.lstm(self.dropout(fused))
        if self.value_skip is not None:
            # The BiLSTM and the LayerNorm/ReLU fusion summarise context but blur exact values (reconstruction
            # error ~5 mm on X without this); the decoder must read coordinates and feeds to four significant
            # digits, so the fused features and a linear view of the normalised channels are added back.
            memory = memory + fused + self.value_skip(normalized)
        op_logits = self.operation_head(memory.mean(dim=1))
        return memory, op_logits

    def forward(self, continuous: Tensor, categorical: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_normalized(self.normalize(continuous), categorical)

    def reconstruct(self, memory: Tensor) -> Tensor:
        return self.reconstruction_head(memory)


class Attention(nn.Module):
    """Multi-head attention with explicit matmuls (exportable, cache-friendly). Shapes in the docstrings below."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, with_kv: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"decoder.d_model={d_model} must be divisible by decoder.n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model) if with_kv else None
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x: Tensor) -> Tensor:
        """[B,L,D] -> [B,H,L,hd]"""
        b, length, _ = x.shape
        return x.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q [B,H,Lq,hd], k/v [B,H,Lk,hd], bias broadcastable to [B,H,Lq,Lk] (0 or -inf) -> [B,Lq,D]"""
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2)
        return self.out(out.reshape(out.shape[0], out.shape[1], -1))


class DecoderLayer(nn.Module):
    """Pre-norm: x + SelfAttn(LN x); x + CrossAttn(LN x, memory); x + FFN(LN x)."""

    def __init__(self, d_model: int, n_heads: int, ff_dim: int, dropout: float, own_cross_kv: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, dropout)
        self.cross_attn = Attention(d_model, n_heads, dropout, with_kv=own_cross_kv)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cross_k: Tensor, cross_v: Tensor, causal_bias: Tensor) -> Tensor:
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        x = x + self.drop(self.self_attn.attend(self.self_attn.split(self.self_attn.q(h)), k, v, causal_bias))
        h = self.norm2(x)
        x = x + self.drop(self.cross_attn.attend(self.cross_attn.split(self.cross_attn.q(h)), cross_k, cross_v, None))
        return x + self.drop(self.ff(self.norm3(x)))

    def step(self, x: Tensor, cache: Tensor, slot: Tensor, cache_bias: Tensor, cross_k: Tensor,
             cross_v: Tensor) -> tuple[Tensor, Tensor]:
        """One position. x [B,1,D]; cache [2,B,H,Lmax,hd]; slot [1,1,Lmax,1] one-hot of this position;
        cache_bias [1,1,1,Lmax] (-inf after this position). Returns (x, updated cache)."""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)  # [B,H,1,hd]
        keys = cache[0] * (1 - slot) + k * slot
        values = cache[1] * (1 - slot) + v * slot
        x = x + self.self_attn.attend(self.self_attn.split(self.self_attn.q(h)), keys, values, cache_bias)
        h = self.norm2(x)
        x = x + self.cross_attn.attend(self.cross_attn.split(self.cross_attn.q(h)), cross_k, cross_v, None)
        return x + self.ff(self.norm3(x)), torch.stack([keys, values])


def seed_sizes_vocabulary(vocab: Vocabulary | None, **sizes: int | None) -> Vocabulary:
    """The vocabulary a decoder is built for, checked against the original's size arguments (n_types,
    n_commands, n_param_types; None = not given). Raises UserError on a size the vocabulary does not have."""
    given = {k: v for k, v in sizes.items() if v is not None}
    if vocab is None:
        vocab = Vocabulary.seed()
        source = ("no vocab was passed, so the original's (G0 G1 G3 G53 M30 NONE; F R X Y Z, 4 digits); pass "
                  "vocab=load_vocabulary(<vocab.json>) (or seed_vocab.load_seed_vocabulary(<original json>)"
                  ".vocabulary()) for another one")
    else:
        source = "the vocab passed; the sizes follow from it, so drop the argument or pass the matching vocabulary"
    actual = {"n_types": N_TYPES, "n_commands": vocab.n_commands, "n_param_types": vocab.n_param_types}
    for name, value in given.items():
        if value != actual[name]:
            raise UserError(f"SensorMultiHeadDecoder({name}={value!r}): the vocabulary has {name}={actual[name]} "
                            f"({source})")
    return vocab


class SensorMultiHeadDecoder(nn.Module):
    """Transformer decoder over encoder memory with separate heads for each field of a token.

    Token ids are split into fields inside the model (so ONNX takes plain ids) and embedded as the sum of
    type, command, parameter-type, exponent and per-position digit embeddings plus a learned position.
    Heads: type [.,4], command [.,C], ptype [.,2L], exponent [.,E], digits [.,K,10] (K = vocab.n_digits).

    The original's constructor call is accepted as it was written,
    `SensorMultiHeadDecoder(sensor_dim=128, d_model=192, n_heads=8, n_layers=4, n_operations=9, n_types=4,
    n_commands=6, n_param_types=10, max_seq_len=32, dropout=0.3)`: without `vocab` its sizes must be the original
    vocabulary's (6 commands, 10 parameter types), which gives `Vocabulary.seed()`; with `vocab` they must equal
    that vocabulary's. A size that differs raises UserError naming the argument, both values and the fix (the
    sizes follow from the vocabulary here, so they cannot be chosen apart from it). `n_operations` is accepted and
    recorded only: the operation head is the encoder's (`MMDTAELSTM(n_operations=...)`).
    """

    def __init__(self, vocab: Vocabulary | None = None, sensor_dim: int = 128, d_model: int = 192, n_heads: int = 8,
                 n_layers: int = 4, ff_dim: int = 768, dropout: float = 0.1, max_seq_len: int = 32,
                 share_cross_kv: bool = True, max_memory_len: int = 256, last_step_context: bool = True,
                 memory_norm: bool = True, value_mode: str = "digits", value_digits_confidence: float = 0.45, *,
                 n_types: int | None = None,
                 n_commands: int | None = None, n_param_types: int | None = None,
                 n_operations: int | None = None) -> None:
        super().__init__()
        vocab = seed_sizes_vocabulary(vocab, n_types=n_types, n_commands=n_commands, n_param_types=n_param_types)
        if n_operations is not None and (not isinstance(n_operations, int) or n_operations < 1):
            raise UserError(f"SensorMultiHeadDecoder(n_operations={n_operations!r}): expected a positive number of "
                            f"operation classes (it is recorded only; the encoder classifies operations)")
        self.n_operations = n_operations
        self.vocab = vocab
        if vocab.max_tokens + 1 > max_seq_len:
            raise ValueError(f"decoder.max_seq_len={max_seq_len} is shorter than max_tokens+1={vocab.max_tokens + 1}")
        self.n_commands, self.n_ptypes, self.n_exponents = vocab.n_commands, vocab.n_param_types, vocab.n_exponents
        self.param_base = vocab.param_base
        self.n_digits, self.digit_base = vocab.n_digits, vocab.digit_base
        self.max_tokens = vocab.max_tokens
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, d_model // n_heads
        self.memory_proj = nn.Sequential(nn.Linear(sensor_dim, d_model),
                                         nn.LayerNorm(d_model) if memory_norm else nn.Identity())
        # The memory has no notion of time of its own; the executing line's values sit at the window's end, so
        # cross-attention needs to know where that is: learned time-step embeddings are added to the memory.
        self.memory_position = nn.Embedding(max_memory_len, d_model)
        # The line being executed is the one at the window's last step: its memory vector is added to every token
        # embedding, so the digit heads read it through the feed-forward layers without first learning a sharp
        # cross-attention (which took many epochs on CPU).
        self.context_proj = nn.Linear(sensor_dim, d_model) if last_step_context else None
        self.type_embed = nn.Embedding(N_INPUT_TYPES, d_model)
        self.command_embed = nn.Embedding(self.n_commands + 1, d_model)  # last row: "not a command"
        self.ptype_embed = nn.Embedding(self.n_ptypes + 1, d_model)
        self.exponent_embed = nn.Embedding(self.n_exponents + 1, d_model)
        self.digit_embed = nn.Embedding(self.n_digits * 11, d_model)  # 10 digits + "not a parameter" per position
        self.position_embed = nn.Embedding(max_seq_len, d_model)
        # share_cross_kv: one key/value projection of the memory serves all layers (each keeps its own queries and
        # output projection). Projecting 64 memory steps per layer was ~3/4 of the decoder's training FLOPs on CPU.
        self.share_cross_kv = share_cross_kv
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_heads, ff_dim, dropout, own_cross_kv=not share_cross_kv)
                                    for _ in range(n_layers))
        self.shared_cross = Attention(d_model, n_heads, dropout) if share_cross_kv else None
        self.final_norm = nn.LayerNorm(d_model)
        self.type_head = nn.Linear(d_model, N_TYPES)
        self.command_head = nn.Linear(d_model, self.n_commands)
        self.ptype_head = nn.Linear(d_model, self.n_ptypes)
        self.exponent_head = nn.Linear(d_model, self.n_exponents)
        self.digit_head = nn.Linear(d_model, self.n_digits * 10)
        if value_mode not in ("digits", "regress"):
            raise ValueError(f"decoder.value_mode={value_mode!r}; use digits or regress")
        self.value_mode = value_mode
        self.value_digits_confidence = float(value_digits_confidence)
        # Created last and only in regress mode, so a digits decoder draws the same initial weights from a seed as
        # before this head existed (and its state dict is unchanged).
        self.value_head = nn.Linear(d_model, len(vocab.letters)) if value_mode == "regress" else None
        if self.value_head is not None:
            n_letters = len(vocab.letters)
            # Fitted on the training split by `set_value_statistics` and saved with the weights, so evaluation,
            # predict and ONNX read values the same way: per letter, the input channel of its anchor (-1: none),
            # log scale or not, centre and scale of the standardised target, and the decimals a value is rounded to.
            self.register_buffer("value_anchor_channel", torch.full((n_letters,), -1, dtype=torch.long))
            self.register_buffer("value_log", torch.tensor([k in LOG_LETTERS for k in vocab.letters]))
            self.register_buffer("value_center", torch.zeros(n_letters))
            self.register_buffer("value_scale", torch.ones(n_letters))
            self.register_buffer("value_decimals", torch.full((n_letters,), DEFAULT_DECIMALS, dtype=torch.long))
            # Letters regressed from the plateau-speed anchor and the velocity_x/y/z channel indices it reads;
            # all False (no anchor) until `set_value_statistics` finds the channels, and in checkpoints saved before
            # the anchor existed (see `_load_from_state_dict`).
            self.register_buffer("value_speed_anchor", torch.zeros(n_letters, dtype=torch.bool))
            self.register_buffer("value_velocity_channels", torch.zeros(len(VELOCITY_CHANNELS), dtype=torch.long))

    @property
    def regress(self) -> bool:
        return self.value_head is not None

    def set_value_statistics(self, anchor_channel, center, scale, decimals, speed_anchor=None,
                             velocity_channels=None) -> None:
        """Per-letter anchor channel index (-1: offset from 0), standardisation and rounding (decimals); with
        `speed_anchor` (per letter bool) and `velocity_channels` (indices of velocity_x/y/z) those letters are
        regressed as log values relative to log(1 + plateau speed)."""
        self.value_anchor_channel.copy_(torch.as_tensor(anchor_channel, dtype=torch.long))
        if speed_anchor is not None:
            self.value_speed_anchor.copy_(torch.as_tensor(speed_anchor, dtype=torch.bool))
            self.value_velocity_channels.copy_(torch.as_tensor(
                velocity_channels if velocity_channels is not None else [0] * len(VELOCITY_CHANNELS),
                dtype=torch.long))
        self.value_center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.value_scale.copy_(torch.clamp(torch.as_tensor(scale, dtype=torch.float32), min=1e-4))
        self.value_decimals.copy_(torch.as_tensor(decimals, dtype=torch.long))

    def value_anchor(self, continuous: Tensor) -> Tensor:
        """Raw continuous input [B,T,C] -> [B, letters]: each letter's offset base, the last step of its anchor
        channel (the window's last measured position of that axis), 0 for letters without one."""
        last = continuous[:, -1]
        picked = last.index_select(1, self.value_anchor_channel.clamp(min=0))
        anchor = torch.where(self.value_anchor_channel >= 0, picked, torch.zeros_like(picked))
        if bool(self.value_speed_anchor.any()):  # a Python branch: fixed per decoder, so the ONNX graph has one path
            speed = torch.log(1.0 + plateau_speed(continuous, self.value_velocity_channels))
            anchor = torch.where(self.value_speed_anchor, speed[:, None], anchor)
        return anchor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints saved before the F anchor lack its buffers: load them as "no speed anchor" (their F was
        # regressed as a plain log value, which is what all-False reproduces) rather than refusing them.
        for name in ("value_speed_anchor", "value_velocity_channels"):
            if self.value_head is not None and prefix + "value_log" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def absolute_values(self, standardized: Tensor, anchor: Tensor) -> Tensor:
        """Value-head output [B,(L,)letters] and anchors [B,letters] -> values in program units (mm, mm/min, rpm)."""
        raw = self.value_center + self.value_scale * standardized
        if standardized.dim() == 3:
            anchor = anchor[:, None]
        # log letters: log(1 + value) = anchor + raw (anchor 0 without a speed anchor); expm1 has no ONNX op
        return torch.where(self.value_log, torch.exp((raw + anchor).clamp(max=20.0)) - 1.0, raw + anchor)

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        """ids [B,L] int64, positions [L] -> [B,L,D]"""
        n_special = len(SPECIAL_TOKENS)
        is_cmd = (ids >= n_special) & (ids < self.param_base)
        is_param = ids >= self.param_base
        kind = torch.full_like(ids, TYPE_PAD)
        kind = torch.where(ids == EOS, torch.full_like(ids, TYPE_EOS), kind)
        kind = torch.where(ids == SOS, torch.full_like(ids, TYPE_SOS), kind)
        kind = torch.where(ids == UNK, torch.full_like(ids, TYPE_UNK), kind)
        kind = torch.where(is_cmd, torch.full_like(ids, TYPE_COMMAND), kind)
        kind = torch.where(is_param, torch.full_like(ids, TYPE_PARAM), kind)
        command = torch.where(is_cmd, ids - n_special, torch.full_like(ids, self.n_commands))
        rel = torch.where(is_param, ids - self.param_base, torch.zeros_like(ids))
        digit_value = torch.remainder(rel, self.digit_base)
        exponent = torch.remainder(torch.div(rel, self.digit_base, rounding_mode="floor"), self.n_exponents)
        ptype = torch.div(rel, self.digit_base * self.n_exponents, rounding_mode="floor")
        exponent = torch.where(is_param, exponent, torch.full_like(ids, self.n_exponents))
        ptype = torch.where(is_param, ptype, torch.full_like(ids, self.n_ptypes))
        x = (self.type_embed(kind) + self.command_embed(command) + self.ptype_embed(ptype)
             + self.exponent_embed(exponent) + self.position_embed(positions)[None])
        for i in range(self.n_digits):
            digit = torch.remainder(torch.div(digit_value, 10 ** (self.n_digits - 1 - i), rounding_mode="floor"), 10)
            digit = torch.where(is_param, digit, torch.full_like(ids, 10))
            x = x + self.digit_embed(digit + 11 * i)
        return x

    def heads(self, x: Tensor) -> dict[str, Tensor]:
        x = self.final_norm(x)
        digits = self.digit_head(x)
        out = {"type": self.type_head(x), "command": self.command_head(x), "ptype": self.ptype_head(x),
               "exponent": self.exponent_head(x), "digits": digits.view(*digits.shape[:-1], self.n_digits, 10)}
        if self.value_head is not None:  # standardised; `absolute_values` turns it into program units
            out[VALUE_HEAD] = self.value_head(x)
        return out

    def context(self, memory: Tensor) -> Tensor | float:
        """[B,1,D] projection of the last memory step (0.0 when disabled)."""
        return self.context_proj(memory[:, -1:]) if self.context_proj is not None else 0.0

    def step_context(self, memory: Tensor) -> Tensor:
        """The per-window context input of `step`: [B,1,D] (zeros when disabled)."""
        if self.context_proj is None:
            return memory.new_zeros(memory.shape[0], 1, self.position_embed.embedding_dim)
        return self.context_proj(memory[:, -1:])

    def cross_kv(self, memory: Tensor) -> Tensor:
        """memory [B,T,sensor_dim] -> cross-attention keys/values [layers (1 when shared), 2, B, H, T, hd]"""
        steps = torch.arange(memory.shape[1], device=memory.device)
        projected = self.memory_proj(memory) + self.memory_position(steps)[None]
        if self.shared_cross is not None:
            return torch.stack(self.shared_cross.keys_values(projected))[None]
        return torch.stack([torch.stack(layer.cross_attn.keys_values(projected)) for layer in self.layers])

    def _cross(self, cross: Tensor, i: int) -> tuple[Tensor, Tensor]:
        j = 0 if self.shared_cross is not None else i
        return cross[j, 0], cross[j, 1]

    def forward(self, memory: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        """Teacher-forced pass: memory [B,T,S], input_ids [B,L] (SOS first) -> head logits at each of L positions."""
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids, positions) + self.context(memory)
        causal = torch.triu(torch.full((length, length), float("-inf"), device=x.device), diagonal=1)
        cross = self.cross_kv(memory)
        for i, layer in enumerate(self.layers):
            x = layer(x, *self._cross(cross, i), causal)
        return self.heads(x)

    def empty_cache(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Zero self-attention cache [layers, 2, B, H, max_tokens, hd]."""
        return torch.zeros(self.n_layers, 2, batch, self.n_heads, self.max_tokens, self.head_dim, device=device)

    def step(self, token: Tensor, position: Tensor, cache: Tensor, cross: Tensor,
             context: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """One cached decoding step. token [B,1] int64 (the previous output, SOS first), position [1] int64 (0-based),
        cache from `empty_cache` / the previous step, cross from `cross_kv`, context [B,1,D] from `step_context`.
        Returns (head logits [B,1,...], cache)."""
        slots = torch.arange(self.max_tokens, device=token.device)
        slot = (slots == position).to(cache.dtype).view(1, 1, -1, 1)
        cache_bias = torch.where(slots <= position, 0.0, float("-inf")).to(cache.dtype).view(1, 1, 1, -1)
        x = self.embed(token, position) + context
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer.step(x, cache[i], slot, cache_bias, *self._cross(cross, i))
            new_cache.append(layer_cache)
        return self.heads(x), torch.stack(new_cache)


def build_encoder(cfg: EncoderConfig, continuous_dim: int) -> MMDTAELSTM:
    return MMDTAELSTM(continuous_dim, cfg.categorical_dims, cfg.hidden_dim, cfg.categorical_embed_dim,
                      cfg.lstm_layers, cfg.dropout, cfg.n_operations, cfg.residual,
                      tuple(cfg.depth_band) if cfg.depth_channel else None, cfg.input_scaling == "robust")


def build_decoder(cfg: DecoderConfig, vocab: Vocabulary, sensor_dim: int) -> SensorMultiHeadDecoder:
    return SensorMultiHeadDecoder(vocab, sensor_dim, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ff_dim,
                                  cfg.dropout, cfg.max_seq_len, cfg.share_cross_kv, cfg.max_memory_len,
                                  cfg.last_step_context, cfg.memory_norm, cfg.value_mode, cfg.value_digits_confidence)


def decoder_inputs(tokens: Tensor) -> Tensor:
    """Targets [B,L] -> teacher-forcing inputs [B,L]: SOS followed by the targets shifted right."""
    sos = torch.full_like(tokens[:, :1], SOS)
    return torch.cat([sos, tokens[:, :-1]], dim=1)


__all__ = ["MMDTAELSTM", "SensorMultiHeadDecoder", "build_encoder", "build_decoder", "decoder_inputs", "HEADS", "PAD",
           "VALUE_HEAD"]
