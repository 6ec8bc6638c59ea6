"""Line library for closed programs: where the program a machine runs is known, pick one of its lines instead of
composing one token by token, and regress only the feed, which a run may set differently from the program.

    python -m cnc_gcode.line_library --config configs/cnc_gcode/umich_lines.yaml library.program=PROGRAM.ngc

Classes are the program's distinct lines WITHOUT their feed word (`G1 X146 Z29.5`), tokenized as the training data
is (parse_program with its modal state, then Vocabulary.encode_line), plus the no-motion line (NONE): every run
idles between lines. A head on the encoder's memory (last step and mean over time; the encoder frozen, or trained
with the head under library.finetune_encoder) gives the line's logits and the feed: log F = log(the window's median
measured path speed) + a regressed residual (LibraryHead). The line's tokens are the class's with F inserted where
the tokenizer puts it, the feed rounded to the program's resolution (the most decimals any F of the program is
written with). So a run at a feed no training run had still gets the right line, where a classifier over the
training lines (feed included) cannot.

The generative decoder is the fallback: a window whose library confidence (the line's softmax probability) is below
`library.threshold` takes the decoder's line. threshold < 0 (the default) means chosen on the validation split: the
value that maximises validation token accuracy of the combination (ties: the lowest, i.e. trust the library most),
written to <run_dir>/library/threshold.json when the decoder (<run_dir>/decoder/checkpoints/best) exists. Without a
library (library.program empty) predict uses the decoder alone.

Training reuses the package's pieces: the frozen encoder from train_encoder (train.encoder_checkpoint or
<run_dir>/encoder/checkpoints/best), common.runs' resume guard (library, data and encoder sections, run.seed, the
data files, the encoder's weights and the program), CheckpointManager (latest / best), early stopping and `best` on
validation token accuracy of the library's lines, `library.resume=auto` to continue. Writes <run_dir>/library/
{config.yaml, metrics.jsonl, checkpoints/{latest,best}}; the checkpoint holds the encoder, the head and the library's
token rows, so predict needs neither the program file nor the encoder checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_gcode.checkpoints import KIND_LIBRARY, encoder_path, load_encoder, load_trained, stage_fingerprint
from cnc_gcode.config import CncConfig, EncoderConfig, set_threads
from cnc_gcode.data import Windows, batches, cap_windows, epoch_order, load_split, log_windows
from cnc_gcode.gcode import parse_program
from cnc_gcode.metrics import token_metrics
from cnc_gcode.model import build_encoder
from cnc_gcode.tokenizer import (
    CANONICAL_LETTER_ORDER,
    EOS,
    PAD,
    TYPE_PARAM,
    TokenizeError,
    Vocabulary,
    load_vocabulary,
    tokenize_text,
)
from common.checkpoint import (
    WEIGHTS_FILE,
    CheckpointManager,
    capture_train_state,
    find_checkpoint,
    load_checkpoint,
    resume_from_checkpoint,
)
from common.cli import config_main
from common.errors import UserError
from common.io import write_json
from common.logs import MetricsWriter, progress
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, cosine_with_warmup, param_groups

log = logging.getLogger(__name__)
LIBRARY_DIR = "library"
THRESHOLD_FILE = "threshold.json"
FEED_LETTER = "F"
NO_MOTION_TEXT = "(no axis motion)"


def _letter_rank(letter: str) -> int:
    """The order the tokenizer writes parameter words in (Vocabulary.encode_line)."""
    return CANONICAL_LETTER_ORDER.index(letter) if letter in CANONICAL_LETTER_ORDER else len(CANONICAL_LETTER_ORDER)


class LineLibrary:
    """The distinct lines of a program without their feed: `rows` [K, L] token ids, `has_feed` [K] (the program
    writes an F on that line, so a window of it gets a regressed one) and `feed_decimals` (the program's resolution).
    """

    def __init__(self, vocab: Vocabulary, rows: np.ndarray, has_feed: np.ndarray, feed_decimals: int) -> None:
        if FEED_LETTER not in vocab.letters:
            raise UserError(f"the vocabulary has no {FEED_LETTER} word; a line library regresses the feed, so use a "
                            f"vocabulary with F (data.vocab_path)")
        self.vocab = vocab
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, vocab.max_tokens)
        self.has_feed = np.asarray(has_feed, dtype=bool)
        self.feed_decimals = int(feed_decimals)
        self._index = {tuple(row.tolist()): k for k, row in enumerate(self.rows)}

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_program(cls, path: str | Path, vocab: Vocabulary) -> LineLibrary:
        """Read a G-code program: each line that tokenizes becomes a class (duplicates once); lines that do not
        (unknown words, too long) are logged and left out. UserError when the file is missing or holds no line."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config key 'library.program': {path} not found; name the G-code program the machine "
                            f"runs (umich_lines writes <run_dir>/reports/umich_program.ngc)")
        text = path.read_text(encoding="utf-8", errors="replace")
        rows, has_feed, decimals, skipped = [tokenize_text(vocab, NO_MOTION_TEXT)], [False], 0, []
        for line in parse_program(text):
            if line.is_empty and not line.error:
                continue
            try:
                ids = vocab.encode_line(line)
            except TokenizeError as exc:
                skipped.append(f"line {line.lineno}: {exc}")
                continue
            row, feed = strip_feed(vocab, np.asarray(ids))
            if feed is not None:
                decimals = max(decimals, max(-feed.normalize().as_tuple().exponent, 0))
            rows.append(row.tolist())
            has_feed.append(feed is not None)
        if skipped:
            log.warning("%s: %d lines left out of the library (first: %s)", path, len(skipped), skipped[:3])
        unique: dict[tuple, bool] = {}
        for row, feed in zip(rows, has_feed):
            unique[tuple(row)] = unique.get(tuple(row), False) or feed
        if len(unique) < 2:
            raise UserError(f"config key 'library.program': {path} holds no G-code line the vocabulary can write")
        return cls(vocab, np.array(list(unique)), np.array(list(unique.values())), decimals)

    def state(self) -> dict:
        """What a checkpoint records to rebuild the library (meta.json)."""
        return {"rows": self.rows.tolist(), "has_feed": self.has_feed.tolist(), "feed_decimals": self.feed_decimals,
                "vocab": self.vocab.fingerprint()}

    @classmethod
    def from_state(cls, state: dict, vocab: Vocabulary, source: str) -> LineLibrary:
        vocab.check_matches(state["vocab"], source)
        return cls(vocab, np.array(state["rows"]), np.array(state["has_feed"]), state["feed_decimals"])

    def targets(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token rows [N, L] -> (class [N], -1 where the line is not in the library; feed [N], NaN without F)."""
        classes, feeds = np.full(len(tokens), -1, dtype=np.int64), np.full(len(tokens), np.nan)
        for i, row in enumerate(np.asarray(tokens)):
            stripped, feed = strip_feed(self.vocab, row)
            classes[i] = self._index.get(tuple(stripped.tolist()), -1)
            feeds[i] = np.nan if feed is None else float(feed)
        return classes, feeds

    def compose(self, classes: np.ndarray, feeds: np.ndarray) -> np.ndarray:
        """Token rows [N, L] of library lines `classes` [N] with feed `feeds` [N] (rounded to the program's
        resolution) where the line has one."""
        out = self.rows[np.asarray(classes)].copy()
        quantum = Decimal(1).scaleb(-self.feed_decimals)
        for i, k in enumerate(classes):
            if self.has_feed[k]:
                value = Decimal(repr(float(feeds[i]))).quantize(quantum, rounding=ROUND_HALF_EVEN)
                out[i] = insert_param(self.vocab, out[i], FEED_LETTER, value)
        return out

    def texts(self) -> list[str]:
        return [self.vocab.decode_line(row) or NO_MOTION_TEXT for row in self.rows]


def strip_feed(vocab: Vocabulary, row: np.ndarray) -> tuple[np.ndarray, Decimal | None]:
    """A token row without its F word (the rest moved up, PAD at the end) and that F's value (None without one)."""
    commands, params = vocab.decode_words(row)
    feed = next((value for letter, value in params if letter == FEED_LETTER), None)
    if feed is None:
        return np.asarray(row, dtype=np.int64), None
    kept = [i for i in np.asarray(row).tolist() if i not in (EOS, PAD)]
    fields = vocab.fields(np.asarray(kept, dtype=np.int64))
    keep = [i for i, (kind, ptype) in enumerate(zip(fields["type"], fields["ptype"]))
            if not (kind == TYPE_PARAM and vocab.letters[int(ptype) // 2] == FEED_LETTER)]
    ids = [kept[i] for i in keep]
    return np.array(ids + [EOS] + [PAD] * (vocab.max_tokens - len(ids) - 1), dtype=np.int64), feed


def insert_param(vocab: Vocabulary, row: np.ndarray, letter: str, value: Decimal) -> np.ndarray:
    """`row` with the word `letter``value` placed where Vocabulary.encode_line puts it (after the commands, in the
    canonical letter order). UserError when the line would exceed max_tokens."""
    ids = [i for i in np.asarray(row).tolist() if i not in (EOS, PAD)]
    fields = vocab.fields(np.asarray(ids, dtype=np.int64))
    at = len(ids)
    for i, (kind, ptype) in enumerate(zip(fields["type"], fields["ptype"])):
        if kind == TYPE_PARAM and _letter_rank(vocab.letters[int(ptype) // 2]) > _letter_rank(letter):
            at = i
            break
    ids.insert(at, vocab.param_id(letter, value))
    if len(ids) + 1 > vocab.max_tokens:
        raise UserError(f"a library line with {letter}{value} needs {len(ids) + 1} tokens, the vocabulary has "
                        f"max_tokens={vocab.max_tokens}")
    return np.array(ids + [EOS] + [PAD] * (vocab.max_tokens - len(ids) - 1), dtype=np.int64)


# Measured velocity channels whose path speed anchors the feed regression (UMich, simulator); the first triple
# found among the model's inputs is used.
SPEED_CHANNELS = (("X1_ActualVelocity", "Y1_ActualVelocity", "Z1_ActualVelocity"),
                  ("velocity_x", "velocity_y", "velocity_z"))
SPEED_FLOOR = 1e-2  # the anchor's lowest speed (input units), so a window at rest gives a finite log


def speed_channels(channel_names: list[str] | None) -> list[int]:
    """Indices of the measured X/Y/Z velocity channels among the inputs ([] when they are not all there)."""
    names = list(channel_names or [])
    for triple in SPEED_CHANNELS:
        if all(name in names for name in triple):
            return [names.index(name) for name in triple]
    return []


class LibraryHead(nn.Module):
    """Encoder memory [B,T,H] (+ the raw window [B,T,C] for the feed anchor) -> (line logits [B,K], standardised
    log-feed residual [B]). Reads the last step (the line executing at the window's end) and the mean over the
    window (its context).

    The feed is regressed as log F = anchor + centre + scale x output, where the anchor is the log of the window's
    median measured path speed (`speed_select` picks the X/Y/Z velocity channels; 0 without them): a cutting move
    runs at its feed, so the head learns only the unit factor and the corrections (corners, dwells), and a feed
    between or beyond the training runs' comes out where a plain regression would pull it to the nearest one seen.
    """

    def __init__(self, memory_dim: int, n_lines: int, continuous_dim: int, hidden_dim: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2 * memory_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.line = nn.Linear(hidden_dim, n_lines)
        self.feed = nn.Linear(hidden_dim, 1)
        # fitted on the training windows and saved with the weights: the speed channels and the standardisation of
        # the log-feed residual
        self.register_buffer("speed_select", torch.zeros(continuous_dim))
        self.register_buffer("feed_center", torch.zeros(()))
        self.register_buffer("feed_scale", torch.ones(()))

    def set_speed_channels(self, channels: list[int]) -> None:
        self.speed_select.zero_()
        self.speed_select[channels] = 1.0

    def feed_anchor(self, continuous: Tensor) -> Tensor:
        """Raw window [B,T,C] -> [B]: log of the median path speed over the window (0 without speed channels)."""
        if not bool(self.speed_select.any()):
            return continuous.new_zeros(continuous.shape[0])
        speed = ((continuous * self.speed_select) ** 2).sum(-1).sqrt()
        return torch.log(speed.median(dim=1).values.clamp(min=SPEED_FLOOR))

    def forward(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(torch.cat([memory[:, -1], memory.mean(dim=1)], dim=-1))
        return self.line(h), self.feed(h).squeeze(-1)

    def feed_value(self, standardized: Tensor, continuous: Tensor) -> Tensor:
        """Standardised residuals [B] and the raw windows [B,T,C] -> feeds [B] in program units."""
        log_feed = self.feed_anchor(continuous) + self.feed_center + self.feed_scale * standardized
        return torch.exp(log_feed.clamp(max=20.0))  # finite, so it always rounds to a token


class LibraryModel(nn.Module):
    """Encoder + library head, saved together so a library checkpoint is self-contained."""

    def __init__(self, encoder: nn.Module, head: LibraryHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head


def library_path(cfg: CncConfig) -> Path:
    return Path(cfg.library.checkpoint) if cfg.library.checkpoint else \
        cfg.run.run_dir / LIBRARY_DIR / "checkpoints" / "best"


@torch.no_grad()
def library_predict(model: LibraryModel, library: LineLibrary, windows: Windows, batch_size: int = 256
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token rows [N,L], confidence [N] (the chosen line's probability), operation [N]) of windows."""
    model.eval()
    classes, feeds, confidence, ops = [], [], [], []
    for idx in batches(len(windows), batch_size):
        memory, op_logits = model.encoder(torch.from_numpy(windows.continuous[idx]),
                                          torch.from_numpy(windows.categorical[idx]))
        logits, feed = model.head(memory)
        probs = logits.softmax(-1)
        top = probs.max(-1)
        classes.append(top.indices.numpy())
        confidence.append(top.values.numpy())
        feeds.append(model.head.feed_value(feed, torch.from_numpy(windows.continuous[idx])).numpy())
        ops.append(op_logits.argmax(1).numpy())
    classes = np.concatenate(classes)
    return library.compose(classes, np.concatenate(feeds)), np.concatenate(confidence), np.concatenate(ops)


def combine(library_tokens: np.ndarray, confidence: np.ndarray, decoder_tokens: np.ndarray,
            threshold: float) -> np.ndarray:
    """The library's line where its confidence reaches `threshold`, else the decoder's."""
    return np.where((np.asarray(confidence) >= threshold)[:, None], library_tokens, decoder_tokens)


def choose_threshold(library_tokens: np.ndarray, confidence: np.ndarray, decoder_tokens: np.ndarray,
                     target: np.ndarray) -> tuple[float, float]:
    """(threshold, token accuracy) maximising the token accuracy of `combine` on labelled windows; ties go to the
    lowest threshold (the library kept wherever the decoder does no better). Candidates: 0 and each confidence."""
    valid = np.asarray(target) != PAD
    lib_right = ((library_tokens == target) & valid).sum(1)
    dec_right = ((decoder_tokens == target) & valid).sum(1)
    best, best_acc = 0.0, -1.0
    for threshold in np.unique(np.concatenate([[0.0], confidence, [np.nextafter(confidence.max(), 2.0)]])):
        right = np.where(confidence >= threshold, lib_right, dec_right).sum()
        acc = float(right / valid.sum())
        if acc > best_acc + 1e-12:
            best, best_acc = float(threshold), acc
    return best, best_acc


def line_loss(logits: Tensor, classes: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over windows whose line is in the library (class >= 0); 0 for a batch without any, where the
    mean over no window would be NaN."""
    have = classes >= 0
    if not have.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[have], classes[have], label_smoothing=label_smoothing)


def feed_loss(predicted: Tensor, target_log: Tensor, continuous: Tensor, head: LibraryHead) -> Tensor:
    """Smooth L1 on the standardised log-feed residual over windows whose line has one (0 when none does)."""
    have = torch.isfinite(target_log)
    if not have.any():
        return predicted.sum() * 0.0
    target = (target_log[have] - head.feed_anchor(continuous[have]) - head.feed_center) / head.feed_scale
    return F.smooth_l1_loss(predicted[have], target, beta=0.1)


@torch.no_grad()
def validate(model: LibraryModel, library: LineLibrary, windows: Windows, classes: np.ndarray,
             feed_weight: float) -> dict:
    model.eval()
    target_log = torch.from_numpy(np.log(windows_feeds(library, windows))).float()
    loss_sum = 0.0
    for idx in batches(len(windows), 256):
        memory, _ = model.encoder(torch.from_numpy(windows.continuous[idx]), torch.from_numpy(windows.categorical[idx]))
        logits, feed = model.head(memory)
        loss = line_loss(logits, torch.from_numpy(classes[idx])) \
            + feed_weight * feed_loss(feed, target_log[idx], torch.from_numpy(windows.continuous[idx]), model.head)
        loss_sum += float(loss) * len(idx)
    tokens, confidence, _ = library_predict(model, library, windows)
    scores = token_metrics(library.vocab, tokens, windows.tokens)
    return {"val_loss": loss_sum / len(windows), "val_token_acc": scores["token_acc"],
            "val_line_exact": scores["line_exact_match"], "val_confidence_mean": float(confidence.mean())}


def windows_feeds(library: LineLibrary, windows: Windows) -> np.ndarray:
    return library.targets(windows.tokens)[1]


def train_library(cfg: CncConfig) -> int:
    """Train the library head over the frozen encoder (module docstring); then choose the fallback threshold on
    validation when the decoder is there."""
    set_threads(cfg)
    lc = cfg.library
    if not lc.program:
        raise UserError("config key 'library.program' is empty; name the G-code program whose lines are the classes")
    out = cfg.run.run_dir / LIBRARY_DIR
    vocab = load_vocabulary(cfg.data.vocab_path)
    library = LineLibrary.from_program(lc.program, vocab)
    encoder, enc_meta, enc_ckpt = load_encoder(encoder_path(cfg))
    dim, names = int(enc_meta["continuous_dim"]), enc_meta.get("channel_names")
    train_w = cap_windows(load_split(cfg, "train", vocab, dim, names), cfg.data.max_train_windows, cfg.run.seed)
    val_w = load_split(cfg, "val", vocab, dim, names)
    # what decides the head's weights: the threshold and the checkpoint predict reads do not, and the program counts
    # by content (below), not by where it lies
    weights_cfg = copy.deepcopy(cfg)
    weights_cfg.library.threshold, weights_cfg.library.checkpoint, weights_cfg.library.program = -1.0, "", ""
    fingerprint = stage_fingerprint(weights_cfg, ("data", "encoder", "library"),
                                    {"train": cfg.data.train_path, "val": cfg.data.val_path,
                                     "encoder_weights": enc_ckpt / WEIGHTS_FILE, "program": lc.program})
    start = open_run(out, cfg, resume=lc.resume, checkpoint_dirs=[out / "checkpoints"], fingerprint=fingerprint,
                     resume_key="library.resume")
    log_windows(train_w, val_w)
    train_classes, train_feeds = library.targets(train_w.tokens)
    val_classes, _ = library.targets(val_w.tokens)
    log.info("library: %d lines from %s (%d with a feed, F to %d decimals); windows outside it (left out of the "
             "line loss): train %d of %d, val %d of %d", len(library), lc.program, int(library.has_feed.sum()),
             library.feed_decimals, int((train_classes < 0).sum()), len(train_w), int((val_classes < 0).sum()),
             len(val_w))
    if (train_classes >= 0).sum() == 0:
        raise UserError(f"config key 'library.program': no training window's line is in {lc.program}; name the "
                        f"program the training runs executed")
    seed_everything(cfg.run.seed)
    head = LibraryHead(encoder.lstm.hidden_size * 2, len(library), dim, lc.hidden_dim, lc.dropout)
    head.set_speed_channels(speed_channels(names))
    fed = np.isfinite(train_feeds) & (train_feeds > 0)
    if fed.any():
        residual = np.log(train_feeds[fed]) - head.feed_anchor(torch.from_numpy(train_w.continuous[fed])).numpy()
        # median and MAD: windows at rest (speed at the floor) sit far out and must not set the scale
        center = float(np.median(residual))
        head.feed_center.fill_(center)
        # at least 1 % (in log): finer than any feed resolution needs, and the smooth L1 stays in a sane range
        head.feed_scale.fill_(max(1.4826 * float(np.median(np.abs(residual - center))), 1e-2))
    log.info("feed: log F regressed as %s + residual (centre %.4f, scale %.4f)",
             "log median path speed of " + ", ".join(names[i] for i in speed_channels(names))
             if speed_channels(names) else "0 (no velocity channels among the inputs)",
             float(head.feed_center), float(head.feed_scale))
    model = LibraryModel(encoder, head)
    if lc.finetune_encoder:
        encoder.requires_grad_(True)
    trained = model if lc.finetune_encoder else head
    optimizer = torch.optim.AdamW(param_groups(trained, lc.weight_decay, lc.lr), lr=lc.lr)
    steps = -(-len(train_w) // lc.batch_size)
    scheduler = cosine_with_warmup(optimizer, min(lc.warmup_epochs, lc.epochs) * steps, lc.epochs * steps)
    stopper = EarlyStopping(lc.patience, mode="max")
    manager = CheckpointManager(out / "checkpoints", fingerprint=start.fingerprint)
    meta = {"kind": KIND_LIBRARY, "library": library.state(), "encoder": enc_meta["encoder"],
            "encoder_checkpoint": str(enc_ckpt), "continuous_dim": dim, "channel_names": names,
            "channel_groups": enc_meta.get("channel_groups", []), "head": {"hidden_dim": lc.hidden_dim,
                                                                            "dropout": lc.dropout}}
    resumed = resume_from_checkpoint(manager, start.resume, model, optimizer, scheduler, stopper)
    start_epoch = int(resumed["epoch"]) + 1 if resumed else 1
    metrics = MetricsWriter(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                            tensorboard=cfg.run.tensorboard, tensorboard_key="run.tensorboard")
    cont, cat = torch.from_numpy(train_w.continuous), torch.from_numpy(train_w.categorical)
    classes_t = torch.from_numpy(train_classes)
    log_feed_t = torch.from_numpy(np.log(train_feeds)).float()
    for epoch in progress(range(start_epoch, lc.epochs + 1), desc="epochs"):
        if stopper.should_stop:
            log.info("early stopping: no better validation token accuracy in %d epochs", lc.patience)
            break
        head.train()
        encoder.train(lc.finetune_encoder)
        loss_sum = 0.0
        for b, idx in enumerate(batches(len(train_w), lc.batch_size, epoch_order(len(train_w), cfg.run.seed, epoch))):
            with torch.set_grad_enabled(lc.finetune_encoder):
                memory, _ = encoder(cont[idx], cat[idx])
            logits, feed = head(memory)
            loss = line_loss(logits, classes_t[idx], lc.label_smoothing) \
                + lc.feed_weight * feed_loss(feed, log_feed_t[idx], cont[idx], head)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step_loss = loss.item()
            loss_sum += step_loss * len(idx)
            metrics.step(epoch, b, steps, {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        val = validate(model, library, val_w, val_classes, lc.feed_weight)
        improved = stopper.step(val["val_token_acc"])
        record = {"epoch": epoch, "train_loss": loss_sum / len(train_w), **val, "lr": scheduler.get_last_lr()[0]}
        metrics.write(record)
        log.info("library epoch %d: loss %.4f val_token_acc %.4f val_line_exact %.4f", epoch, record["train_loss"],
                 val["val_token_acc"], val["val_line_exact"])
        manager.save(model, capture_train_state(epoch, optimizer, scheduler, stopper), epoch, is_best=improved,
                     meta={**meta, **val})
    metrics.close(hparams=cfg)
    if stopper.best is None:
        raise UserError(f"library.epochs={lc.epochs}: no epoch ran (already finished? see {manager.latest})")
    log.info("library best val_token_acc %.4f -> %s", stopper.best, manager.best)
    fit_threshold(cfg, manager.best, val_w)
    return 0


def load_library(cfg: CncConfig, checkpoint: str | Path | None = None
                 ) -> tuple[LibraryModel, LineLibrary, dict, Path]:
    """The library model (encoder + head, eval mode) and its library from a checkpoint of this stage."""
    ckpt, meta, vocab = load_trained(cfg, checkpoint or library_path(cfg), KIND_LIBRARY)
    library = LineLibrary.from_state(meta["library"], vocab, str(ckpt))
    encoder = build_encoder(EncoderConfig(**meta["encoder"]), int(meta["continuous_dim"]))
    head = LibraryHead(encoder.lstm.hidden_size * 2, len(library), int(meta["continuous_dim"]), **meta["head"])
    model = LibraryModel(encoder, head)
    load_checkpoint(ckpt, model)
    model.eval().requires_grad_(False)
    return model, library, meta, ckpt


def fit_threshold(cfg: CncConfig, checkpoint: Path, val_w: Windows) -> dict | None:
    """library.threshold < 0: choose it on `val_w` against the decoder's lines and write threshold.json (None when
    the decoder is not trained yet, logged)."""
    from cnc_gcode.checkpoints import decoder_path, load_models
    from cnc_gcode.evaluate import predict_windows

    if cfg.library.threshold >= 0:
        return None
    try:
        find_checkpoint(decoder_path(cfg))
    except UserError:
        log.info("no decoder at %s: the fallback threshold is chosen when this stage runs after `cnc_gcode.train_decoder`",
                 decoder_path(cfg))
        return None
    model, library, _, _ = load_library(cfg, checkpoint)
    lib_tokens, confidence, _ = library_predict(model, library, val_w)
    encoder, decoder, vocab, _ = load_models(cfg)
    _, dec_tokens = predict_windows(encoder, decoder, vocab, val_w, cfg.eval.batch_size)
    threshold, acc = choose_threshold(lib_tokens, confidence, dec_tokens, val_w.tokens)
    result = {"threshold": threshold, "val_token_acc": acc,
              "val_token_acc_library": token_metrics(vocab, lib_tokens, val_w.tokens)["token_acc"],
              "val_token_acc_decoder": token_metrics(vocab, dec_tokens, val_w.tokens)["token_acc"],
              "val_fallback_share": float((confidence < threshold).mean()), "checkpoint": str(checkpoint)}
    write_json(cfg.run.run_dir / LIBRARY_DIR / THRESHOLD_FILE, result)
    log.info("fallback threshold %.4f (validation token accuracy %.4f; library alone %.4f, decoder alone %.4f)",
             threshold, acc, result["val_token_acc_library"], result["val_token_acc_decoder"])
    return result


def configured_threshold(cfg: CncConfig) -> float:
    """library.threshold, or (when < 0) the one this stage chose on validation; UserError when none was chosen."""
    if cfg.library.threshold >= 0:
        return float(cfg.library.threshold)
    path = cfg.run.run_dir / LIBRARY_DIR / THRESHOLD_FILE
    if not path.is_file():
        raise UserError(f"config key 'library.threshold' is < 0 (chosen on validation) but {path} does not exist; "
                        f"run `python -m cnc_gcode.line_library` after `python -m cnc_gcode.train_decoder`, or set "
                        f"library.threshold")
    return float(json.loads(path.read_text(encoding="utf-8"))["threshold"])


main = config_main(CncConfig, train_library, __doc__, prog="python -m cnc_gcode.line_library")

if __name__ == "__main__":
    raise SystemExit(main())
