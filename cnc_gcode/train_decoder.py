"""Stage 2: train the SensorMultiHeadDecoder over the frozen encoder's memory.

    python -m cnc_gcode.train_decoder --config configs/cnc_gcode/sample.yaml
    python -m cnc_gcode.train_decoder --config configs/cnc_gcode/tiny.yaml train.epochs=2          # CPU smoke run
    torchrun --nproc_per_node=2 -m cnc_gcode.train_decoder --config configs/cnc_gcode/sample.yaml  # DDP, gloo

Reads the encoder from <run_dir>/encoder/checkpoints/best (or train.encoder_checkpoint) and writes
<run_dir>/decoder/{config.yaml, metrics.jsonl, checkpoints/{latest,best}}; the checkpoint holds the frozen encoder
too, so it is all `evaluate`, `predict` and `export_onnx` need. Loss: focal loss summed over the heads, with label
smoothing; AdamW with a cosine schedule and warmup; early stopping on validation token accuracy (teacher-forced).
`train.resume=auto` continues from checkpoints/latest with the optimizer, scheduler, early-stopping and RNG
state, and each epoch's order comes from (seed, epoch), so a killed and resumed run ends with the same weights.
It refuses (exit 2, nothing written) a run whose config (data, encoder, decoder, train sections, run.seed), data files
or frozen encoder weights changed since its checkpoint; epochs, threads, names and paths may change, so raising
`train.epochs` on a finished run continues it. `train.resume=force` continues anyway (logged); `false` starts over.

Under torchrun (gloo, CPU) `train.batch_size` is the global batch: each rank takes every world_size-th window of it and
weights each head's token mean by its share of that head's tokens in the batch, so N processes take the steps one
process takes (up to float summation order; dropout is per rank). Rank 0 validates, logs and writes checkpoints.

decoder.value_mode=regress: before the first epoch the value heads' statistics are fitted on the training split
(`fit_value_statistics`: anchor channels by name - actual_x/y/z for X/Y/Z, velocity_x/y/z for F's plateau-speed
anchor where all three exist -, per-letter centre / scale of the standardised targets, decimals per letter) and saved with the weights; the loss adds train.value_weight x smooth L1 on the values (losses.py), and
early stopping and `best` follow validation token accuracy with values within tolerance (metrics.py), the figure the
regress mode is for; the digits mode keeps exact token accuracy.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cnc_gcode.checkpoints import DECODER_DIR, Pipeline, decoder_meta, encoder_path, load_encoder, stage_fingerprint
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import batches, cap_windows, epoch_order, load_split, log_windows
from cnc_gcode.losses import head_losses, multihead_loss, token_targets, value_targets
from cnc_gcode.metrics import teacher_forced_predictions, token_metrics
from cnc_gcode.model import (
    ANCHOR_CHANNELS,
    DEFAULT_DECIMALS,
    LOG_LETTERS,
    SPEED_ANCHOR_LETTERS,
    VALUE_HEAD,
    VELOCITY_CHANNELS,
    build_decoder,
    decoder_inputs,
)
from cnc_gcode.tokenizer import IGNORE, dequantize, load_vocabulary
from common.checkpoint import (
    WEIGHTS_FILE,
    CheckpointManager,
    capture_train_state,
    read_meta,
    resume_from_checkpoint,
)
from common.cli import config_main
from common.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    main_rank_value,
    rank_part,
    setup_distributed,
    wrap_ddp,
)
from common.errors import UserError
from common.logs import MetricsWriter, progress
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, cosine_with_warmup, param_groups

log = logging.getLogger(__name__)


def select(targets: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in targets.items()}


def max_decimals(vocab, tokens: np.ndarray) -> np.ndarray:
    """Per letter, the most decimal places any training value of it is written with (DEFAULT_DECIMALS for a letter
    the split never writes): the program's resolution, which regressed values are rounded to."""
    fields = vocab.fields(tokens)
    out = np.full(len(vocab.letters), -1, dtype=np.int64)
    is_param = fields["ptype"] >= 0
    for ptype, exponent, digits in {(int(p), int(e), tuple(d)) for p, e, d in
                                    zip(fields["ptype"][is_param], fields["exponent"][is_param],
                                        fields["digits"][is_param])}:
        value = dequantize(0, int("".join(map(str, digits))), exponent, vocab.n_digits).normalize()
        places = max(-value.as_tuple().exponent, 0) if value else 0
        out[ptype // 2] = max(out[ptype // 2], places)
    return np.where(out < 0, DEFAULT_DECIMALS, out)


def fit_value_statistics(decoder, vocab, windows, channel_names: list[str] | None) -> dict:
    """Set the regress-mode buffers from the training split; returns them (logged)."""
    names = list(channel_names or [])
    letters = list(vocab.letters)
    anchor_channel = [names.index(ANCHOR_CHANNELS[k]) if ANCHOR_CHANNELS.get(k) in names else -1 for k in letters]
    log_letter = np.array([k in LOG_LETTERS for k in letters])
    has_velocity = all(c in names for c in VELOCITY_CHANNELS)  # no speed anchor where the dataset lacks them
    speed_anchor = np.array([has_velocity and k in SPEED_ANCHOR_LETTERS for k in letters])
    velocity = [names.index(c) for c in VELOCITY_CHANNELS] if has_velocity else None
    decoder.set_value_statistics(anchor_channel, np.zeros(len(letters)), np.ones(len(letters)),
                                 max_decimals(vocab, windows.tokens), speed_anchor, velocity)
    anchor = decoder.value_anchor(torch.from_numpy(windows.continuous)).numpy()
    letter, raw = value_targets(vocab, windows.tokens, anchor, np.zeros(len(letters)), np.ones(len(letters)),
                                log_letter)
    letter, raw = letter.numpy(), raw.numpy().astype(np.float64)
    center, scale = np.zeros(len(letters)), np.ones(len(letters))
    for k in range(len(letters)):
        seen = raw[letter == k]
        if seen.size:
            center[k] = np.median(seen)
            scale[k] = max(float(seen.std()), 1e-3)
    decoder.set_value_statistics(anchor_channel, center, scale, decoder.value_decimals.numpy())
    return {"anchor_channel": dict(zip(letters, anchor_channel)),
            "speed_anchor": [k for k, on in zip(letters, speed_anchor) if on],
            "center": dict(zip(letters, center.round(4).tolist())), "scale": dict(zip(letters, scale.round(4).tolist())),
            "decimals": dict(zip(letters, decoder.value_decimals.tolist()))}


def value_target_tensors(decoder, vocab, windows) -> dict[str, torch.Tensor]:
    """The value head's targets of a split (empty in the digits mode)."""
    if not decoder.regress:
        return {}
    anchor = decoder.value_anchor(torch.from_numpy(windows.continuous)).numpy()
    letter, target = value_targets(vocab, windows.tokens, anchor, decoder.value_center.numpy(),
                                   decoder.value_scale.numpy(), decoder.value_log.numpy())
    return {VALUE_HEAD: letter, "value_target": target}


def rank_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], batch: np.ndarray, mine: np.ndarray,
              share: float, info: DistInfo, gamma: float, label_smoothing: float, value_weight: float = 1.0,
              value_beta: float = 0.02) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's multi-head loss of rows `batch[mine]` (`logits` are theirs) within the global batch `batch`, and
    its per-head contributions to the global batch's loss (their sum over ranks is that loss; logging only).

    Each head averages over the tokens where it applies, and ranks hold different numbers of them: a head's mean on
    this rank is weighted by world_size x its share of that head's tokens in the global batch, so DDP's average of the
    gradients over ranks is the gradient of the global batch's loss. One process: `multihead_loss` itself."""
    mine_targets = select(targets, batch[mine])
    if info.world_size == 1:
        return multihead_loss(logits, mine_targets, gamma, label_smoothing, value_weight, value_beta)
    total, parts = torch.zeros(()), {}
    for head, mean in head_losses(logits, mine_targets, gamma, label_smoothing, value_weight, value_beta).items():
        tokens_here = int((mine_targets[head] != IGNORE).sum()) if share > 0 else 0
        head_share = tokens_here / max(int((targets[head][batch] != IGNORE).sum()), 1)
        total = total + mean * (head_share * info.world_size)
        parts[head] = mean.item() * head_share
    return total, parts


@torch.no_grad()
def validate(encoder, decoder, windows, vocab, cfg: CncConfig) -> dict:
    """Teacher-forced validation: loss and token metrics from the unconstrained argmax of each head (values from
    the value head in the regress mode)."""
    decoder.eval()
    cont, cat = torch.from_numpy(windows.continuous), torch.from_numpy(windows.categorical)
    tokens = torch.from_numpy(windows.tokens)
    targets = {**token_targets(vocab, windows.tokens), **value_target_tensors(decoder, vocab, windows)}
    loss_sum, predictions = 0.0, []
    decimals = decoder.value_decimals.numpy() if decoder.regress else None
    for idx in batches(len(windows), 256):
        memory, _ = encoder(cont[idx], cat[idx])
        logits = decoder(memory, decoder_inputs(tokens[idx]))
        loss, _ = multihead_loss(logits, select(targets, idx), cfg.train.focal_gamma, cfg.train.label_smoothing,
                                 cfg.train.value_weight, cfg.train.value_beta)
        loss_sum += float(loss) * len(idx)
        values = (decoder.absolute_values(logits[VALUE_HEAD], decoder.value_anchor(cont[idx])).numpy()
                  if decoder.regress else None)
        predictions.append(teacher_forced_predictions(vocab, logits, values, decimals,
                                                      getattr(decoder, "value_digits_confidence", 2.0)))
    scores = token_metrics(vocab, np.concatenate(predictions), windows.tokens)
    return {"val_loss": loss_sum / len(windows), "val_token_acc": scores["token_acc"],
            "val_token_acc_tol": scores["token_acc_tol"], "val_line_exact": scores["line_exact_match"]}


def train_decoder(cfg: CncConfig) -> int:
    set_threads(cfg)
    dist_info = setup_distributed("cpu")  # trained on the CPU: gloo
    tc = cfg.train
    out = cfg.run.run_dir / DECODER_DIR
    vocab = load_vocabulary(cfg.data.vocab_path)
    encoder, enc_meta, enc_ckpt = load_encoder(encoder_path(cfg))
    dim = int(enc_meta["continuous_dim"])
    names = enc_meta.get("channel_names")
    train_windows = cap_windows(load_split(cfg, "train", vocab, dim, names), cfg.data.max_train_windows, cfg.run.seed)
    val_windows = load_split(cfg, "val", vocab, dim, names)
    # Refuses (exit 2, nothing written) to resume a run whose config, data or frozen encoder changed.
    fingerprint = stage_fingerprint(cfg, ("data", "encoder", "decoder", "train"),
                                    {"train": cfg.data.train_path, "val": cfg.data.val_path,
                                     "encoder_weights": enc_ckpt / WEIGHTS_FILE})
    start = open_run(out, cfg, resume=tc.resume, checkpoint_dirs=[out / "checkpoints"], fingerprint=fingerprint,
                     resume_key="train.resume")
    log_windows(train_windows, val_windows)
    seed_everything(cfg.run.seed)

    decoder = build_decoder(cfg.decoder, vocab, encoder.lstm.hidden_size * 2)
    if decoder.regress:  # a resumed run loads the same statistics with its weights
        log.info("value heads: %s", fit_value_statistics(decoder, vocab, train_windows, names))
    pipeline = Pipeline(encoder, decoder)  # saved together; only the decoder trains
    optimizer = torch.optim.AdamW(param_groups(decoder, tc.weight_decay, tc.lr), lr=tc.lr)
    steps_per_epoch = -(-len(train_windows) // tc.batch_size)
    scheduler = cosine_with_warmup(optimizer, min(tc.warmup_epochs, tc.epochs) * steps_per_epoch,
                                   tc.epochs * steps_per_epoch)
    stopper = EarlyStopping(tc.patience, mode="max")
    manager = CheckpointManager(out / "checkpoints", every_n_epochs=tc.save_every, fingerprint=start.fingerprint)
    meta = decoder_meta(cfg, vocab, enc_ckpt, enc_meta)
    start_epoch = 1
    barrier()  # rank 0's manager may have repaired an interrupted save that every rank is about to load
    resume_path = manager.resolve_resume(start.resume)
    if resume_path is not None:  # refuse a checkpoint of another vocabulary before touching any weights
        vocab.check_matches(read_meta(resume_path).get("vocab", {}), str(resume_path))
    resumed = resume_from_checkpoint(manager, resume_path, pipeline, optimizer, scheduler, stopper)
    if resumed is not None:
        start_epoch = int(resumed["epoch"]) + 1
        log.info("resumed from %s at epoch %d", resume_path, start_epoch)
    metrics = MetricsWriter(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                            tensorboard=cfg.run.tensorboard, tensorboard_key="run.tensorboard")
    # after the resume (DDP starts from rank 0's weights); with share_cross_kv the shared cross-attention's query and
    # output projections take no part in the forward, so DDP must look for unused parameters
    train_decoder = wrap_ddp(decoder, dist_info, find_unused_parameters=True)

    cont, cat = torch.from_numpy(train_windows.continuous), torch.from_numpy(train_windows.categorical)
    tokens = torch.from_numpy(train_windows.tokens)
    targets = {**token_targets(vocab, train_windows.tokens), **value_target_tensors(decoder, vocab, train_windows)}
    select_key = "val_token_acc_tol" if decoder.regress else "val_token_acc"
    for epoch in progress(range(start_epoch, tc.epochs + 1), desc="epochs"):
        if stopper.should_stop:
            log.info("early stopping: no improvement in %d epochs", tc.patience)
            break
        decoder.train()
        sums: dict[str, float] = {}
        for b, batch in enumerate(batches(len(train_windows), tc.batch_size,
                                          epoch_order(len(train_windows), cfg.run.seed, epoch))):
            mine, share = rank_part(len(batch), dist_info)
            idx = batch[mine]
            with torch.no_grad():
                memory, _ = encoder(cont[idx], cat[idx])  # frozen encoder, eval mode
            logits = train_decoder(memory, decoder_inputs(tokens[idx]))
            loss, parts = rank_loss(logits, targets, batch, mine, share, dist_info, tc.focal_gamma,
                                    tc.label_smoothing, tc.value_weight, tc.value_beta)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at epoch {epoch}: {parts}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step_values = {"loss": loss.item() / dist_info.world_size, **parts}
            for key, value in step_values.items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
            metrics.step(epoch, b, steps_per_epoch, {**{f"train_{k}": v for k, v in step_values.items()},
                                                     "lr": scheduler.get_last_lr()[0]})
        sums = {key: all_reduce_sum(value) for key, value in sums.items()}
        val = main_rank_value(validate(encoder, decoder, val_windows, vocab, cfg) if dist_info.is_main else None)
        improved = stopper.step(val[select_key])
        record = {"epoch": epoch, **{f"train_{k}": v / len(train_windows) for k, v in sums.items()}, **val,
                  "lr": scheduler.get_last_lr()[0]}
        metrics.write(record)
        log.info("decoder epoch %d: loss %.4f val_token_acc %.4f (values within tolerance %.4f) val_line_exact %.4f",
                 epoch, record["train_loss"], val["val_token_acc"], val["val_token_acc_tol"], val["val_line_exact"])
        manager.save(pipeline, capture_train_state(epoch, optimizer, scheduler, stopper), epoch, is_best=improved, meta={**meta, **val})
    metrics.close(hparams=cfg)
    if stopper.best is None:
        raise UserError(f"train.epochs={tc.epochs}: no epoch ran (already finished? see {manager.latest})")
    log.info("decoder best %s %.4f -> %s", select_key, stopper.best, manager.best)
    cleanup_distributed()
    return 0


main = config_main(CncConfig, train_decoder, __doc__, prog="python -m cnc_gcode.train_decoder")

if __name__ == "__main__":
    raise SystemExit(main())
