"""Pretrain the causal decoder on next-event prediction over the training vocabulary.

    python -m ehr_embedded.pretrain --config configs/ehr_embedded/pretrain_decoder_embedded.yaml
    # CPU-sized: model.model_dim=32 model.n_layers=1 training.epochs=2

Position t predicts the code of event t+1. Targets outside the next-event vocabulary (description-only rows) and
padding are ignored. AdamW with cosine-with-warmup down to `min_learning_rate`; the best checkpoint by tuning
loss is what finetune's `training.pretrained_checkpoint` picks up. `training.resume=auto` continues bit for bit,
and refuses (exit 2) a run whose config or data changed since its checkpoint (see engine.run_fingerprint); raising
`training.epochs` on a finished run continues it (the cosine schedule stretches to the new length).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from common.checkpoint import CheckpointManager, capture_train_state, resume_from_checkpoint
from common.cli import config_main
from common.distributed import all_reduce_sum, cleanup_distributed, wrap_ddp
from common.errors import UserError
from common.logs import MetricsWriter, progress
from common.training import EarlyStopping, cosine_with_warmup, param_groups
from ehr_embedded.config import TrainConfig
from ehr_embedded.data import make_loader
from ehr_embedded.engine import load_splits, model_for, run_fingerprint, start_run

log = logging.getLogger(__name__)
IGNORE = -100
TOP_K = 10


def next_event_targets(token_ids: torch.Tensor, padding_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[B, T]` target at position t = token at t+1; IGNORE for the last event, padding and description-only rows."""
    targets = torch.full_like(token_ids, IGNORE)
    targets[:, :-1] = token_ids[:, 1:]
    next_is_pad = torch.ones_like(padding_mask)
    next_is_pad[:, :-1] = padding_mask[:, 1:]
    targets[next_is_pad | (targets >= vocab_size)] = IGNORE
    return targets


def lm_loss(model, batch: dict[str, torch.Tensor], vocab_size: int) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy over real targets, number of targets, top-10 hits)."""
    logits = model(batch, task="autoregressive")
    targets = next_event_targets(batch["token_ids"], batch["padding_mask"], vocab_size)
    valid = targets != IGNORE
    if not valid.any():  # a batch of one-event sequences has nothing to predict: a zero loss keeps DDP ranks in step
        return logits.sum() * 0.0, 0, 0
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    hits = (logits.topk(min(TOP_K, vocab_size), -1).indices == targets.unsqueeze(-1)).any(-1) & valid
    return loss, int(valid.sum()), int(hits.sum())


@torch.no_grad()
def tuning_loss(model, dataset, cfg: TrainConfig, device, vocab_size: int) -> dict[str, float]:
    model.eval()
    total, n, hits = 0.0, 0, 0
    for batch in make_loader(dataset, cfg.training.eval_batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, count, top = lm_loss(model, batch, vocab_size)
        if count:
            total += loss.item() * count
            n += count
            hits += top
    mean = total / max(n, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), f"top{TOP_K}_accuracy": hits / max(n, 1)}


def pretrain(cfg: TrainConfig) -> dict[str, float]:
    tc = cfg.training
    if cfg.model.type != "transformer_decoder_embedded":
        raise UserError(f"pretrain trains model.type=transformer_decoder_embedded, got {cfg.model.type!r}")
    splits = (cfg.data.pretrain_split, "tuning")
    table, data = load_splits(cfg, splits)
    run_dir, dist_info, device, start = start_run(cfg, run_fingerprint(cfg, splits))
    data["train"] = data[cfg.data.pretrain_split]
    vocab_size = table.lm_vocab_size
    model = model_for(cfg, table, "autoregressive").to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.learning_rate), lr=tc.learning_rate)
    loader = make_loader(data["train"], tc.batch_size, shuffle=True, seed=tc.seed, bucket=tc.bucket_by_length,
                         num_workers=tc.num_workers, rank=dist_info.rank, world_size=dist_info.world_size)
    total_steps = max(1, len(loader) * tc.epochs)
    scheduler = cosine_with_warmup(optimizer, tc.warmup_steps, total_steps, tc.min_learning_rate / tc.learning_rate)
    early = EarlyStopping(tc.early_stopping_patience, mode="min")
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last_n=tc.keep_last_n, every_n_epochs=tc.save_every,
                              fingerprint=start.fingerprint)

    start_epoch = 1
    resumed = resume_from_checkpoint(ckpts, start.resume, model, optimizer, scheduler, early)
    if resumed is not None:
        start_epoch = int(resumed["epoch"]) + 1
        log.info("resumed from %s at epoch %d", resumed["_resumed_from"], start_epoch)
    # DDP wraps the model for training steps only; evaluation and checkpoints use the bare module
    # the classifier head is unused here; the frozen code table is identical on every rank, so no buffer broadcast
    train_model = wrap_ddp(model, dist_info, find_unused_parameters=True, broadcast_buffers=False)
    writer = MetricsWriter(run_dir / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                           tensorboard=tc.tensorboard, tensorboard_key="training.tensorboard")
    log.info("pretrain decoder (%d params, vocabulary %d) on %d sequences", sum(p.numel() for p in model.parameters()),
             vocab_size, len(data["train"]))
    tuning: dict[str, float] = {}
    for epoch in progress(range(start_epoch, tc.epochs + 1), desc="epochs"):
        if early.should_stop:
            break
        started = time.time()
        loader.batch_sampler.set_epoch(epoch)
        model.train()
        loss_sum, n_targets = 0.0, 0
        for b, batch in enumerate(loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, count, _ = lm_loss(train_model, batch, vocab_size)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients, and each rank's loss is a mean over its own next-event targets;
            # weighting it by its share of the global batch's targets (x world size) makes that average the
            # gradient of the mean over all targets, as one process on the whole batch computes it
            share = count * dist_info.world_size / max(float(all_reduce_sum(float(count))), 1.0)
            (loss * share).backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step_loss = loss.item()
            loss_sum += step_loss * count
            n_targets += count
            # rank 0's own loss (its share of the batch): no extra all-reduce per step for a log line
            writer.step(epoch, b, len(loader), {"train_loss": step_loss, "lr": optimizer.param_groups[0]["lr"]})
        loss_sum, n_targets = all_reduce_sum(loss_sum), all_reduce_sum(n_targets)
        tuning = tuning_loss(model, data["tuning"], cfg, device, vocab_size)
        improved = early.step(tuning["loss"])
        record = {"epoch": epoch, "train_loss": loss_sum / max(n_targets, 1),
                  **{f"tuning_{k}": v for k, v in tuning.items()}, "lr": optimizer.param_groups[0]["lr"],
                  "best": improved, "seconds": round(time.time() - started, 2)}
        # metrics first: a kill between the two leaves a record the resumed run drops and rewrites, never a
        # checkpoint whose epoch is missing from metrics.jsonl
        writer.write(record)
        ckpts.save(model, capture_train_state(epoch, optimizer, scheduler, early), epoch, is_best=improved,
                   meta={"tuning": tuning, "model_type": cfg.model.type})
        log.info("epoch %d train_loss %.4f tuning %s%s", epoch, record["train_loss"],
                 {k: round(v, 4) for k, v in tuning.items()}, " *" if improved else "")
    writer.close(hparams=cfg)
    cleanup_distributed()
    return tuning


def run(cfg: TrainConfig) -> int:
    pretrain(cfg)
    return 0


main = config_main(TrainConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
