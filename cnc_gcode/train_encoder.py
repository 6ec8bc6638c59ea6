"""Stage 1: train the MMDTAELSTM encoder on operation classification (+ denoising reconstruction, the DTAE).

    python -m cnc_gcode.train_encoder --config configs/cnc_gcode/sample.yaml
    python -m cnc_gcode.train_encoder --config configs/cnc_gcode/tiny.yaml encoder_train.epochs=2   # CPU smoke run
    torchrun --nproc_per_node=2 -m cnc_gcode.train_encoder --config configs/cnc_gcode/sample.yaml    # DDP, gloo

Writes <run_dir>/encoder/{config.yaml, metrics.jsonl, checkpoints/{latest,best}}. The best checkpoint (highest
validation operation accuracy, ties broken by the lower validation loss; early stopping counts the same) is what the
decoder stage freezes and what the test report scores. The operation cross-entropy is computed on the clean input;
with the DTAE objective (encoder_train.denoise) the same batch, corrupted, is reconstructed as an auxiliary loss.
metrics.jsonl keeps both validation figures (val_op_acc, val_loss = clean cross-entropy + weighted reconstruction).

Inputs: encoder.input_scaling (zscore | robust) is fitted on the training windows and encoder.depth_channel's surface
(data.estimate_surface) is found on them; both are stored as encoder buffers, so every later stage, ONNX export and
predict apply them to raw units. `encoder_train.resume=auto` continues an interrupted run, and
refuses (exit 2, nothing written) one whose config or data changed since its checkpoint (common.runs: data, encoder
and encoder_train sections, run.seed, and the train/val files by content; epochs, threads and paths may change);
`resume=force` continues anyway (logged), `resume=false` starts over. Raising `encoder_train.epochs` on a finished run
continues it.

Under torchrun (gloo, CPU) `encoder_train.batch_size` is the global batch: each rank takes every world_size-th window
of it, the whole batch's DTAE noise is drawn on every rank from the one seeded stream, and each rank's loss is weighted
by its share of the batch, so N processes take the steps one process takes (up to float summation order; dropout is
per rank). Rank 0 validates, logs and writes; every rank loads the checkpoint it resumes from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnc_gcode.checkpoints import ENCODER_DIR, encoder_meta, stage_fingerprint
from cnc_gcode.config import CncConfig, set_threads
from cnc_gcode.data import (
    batches,
    cap_windows,
    epoch_order,
    estimate_surface,
    groups_used,
    input_stats,
    load_split,
    log_windows,
)
from cnc_gcode.model import build_encoder
from cnc_gcode.tokenizer import load_vocabulary
from common.checkpoint import CheckpointManager, capture_train_state, load_checkpoint, resume_from_checkpoint
from common.cli import config_main
from common.distributed import (
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    main_rank_value,
    rank_part,
    setup_distributed,
    wrap_ddp,
)
from common.errors import UserError
from common.io import write_json
from common.logs import MetricsWriter, progress
from common.metrics import macro_f1
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, cosine_with_warmup, param_groups

log = logging.getLogger(__name__)


def corrupt(x: torch.Tensor, noise_std: float, mask_prob: float) -> torch.Tensor:
    """Denoising input: Gaussian noise on normalised channels and random (time, channel) entries zeroed."""
    noisy = x + noise_std * torch.randn_like(x)
    keep = (torch.rand_like(x) >= mask_prob).to(x.dtype)
    return noisy * keep


class EncoderStep(nn.Module):
    """The encoder's training forward as one module call, so DDP (which hooks `forward`) can wrap it:
    transformed clean channels [B,T,C'], their corrupted copy [B,T,C'] or None, categorical [B,T,K] -> operation
    logits of the clean input [B,ops], reconstruction from the corrupted input [B,T,C'] (None without it).

    The classifier is scored on what it will see at test time (clean windows); the corrupted copy only feeds the
    denoising objective. Both go through one batched call (2B windows), one forward for DDP's hooks."""

    def __init__(self, encoder, reconstruct: bool) -> None:
        super().__init__()
        self.encoder, self.reconstruct = encoder, reconstruct

    def forward(self, clean: torch.Tensor, corrupted: torch.Tensor | None, categorical: torch.Tensor):
        if corrupted is None or not self.reconstruct:
            _, op_logits = self.encoder.encode_normalized(clean, categorical)
            return op_logits, None
        memory, op_logits = self.encoder.encode_normalized(torch.cat([clean, corrupted]),
                                                           torch.cat([categorical, categorical]))
        n = len(clean)
        return op_logits[:n], self.encoder.reconstruct(memory[n:])


class AccuracyStopping(EarlyStopping):
    """Early stopping and `best` on validation accuracy, ties broken by the lower validation loss: the checkpoint
    kept is the one whose figure the report quotes. `step(accuracy, loss)`; state round-trips for resume."""

    def __init__(self, patience: int) -> None:
        super().__init__(patience, mode="max")
        self.best_loss: float | None = None

    def step(self, accuracy: float, loss: float = float("inf")) -> bool:  # type: ignore[override]
        accuracy, loss = float(accuracy), float(loss)
        better = self.best is None or accuracy > self.best or (accuracy == self.best and loss < self.best_loss)
        if better:
            self.best, self.best_loss, self.bad_epochs = accuracy, loss, 0
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_loss": self.best_loss}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != "max" or "best_loss" not in state:
            raise UserError("the checkpoint to resume was selected on validation loss (an encoder trained before "
                            "selection moved to validation accuracy); start over with encoder_train.resume=false")
        super().load_state_dict(state)
        self.best_loss = state["best_loss"]


@torch.no_grad()
def evaluate_encoder(encoder, windows, batch_size: int, recon_weight: float) -> dict:
    encoder.eval()
    cont, cat = torch.from_numpy(windows.continuous), torch.from_numpy(windows.categorical)
    ops = torch.from_numpy(windows.operation_type)
    loss_sum, correct = 0.0, 0  # loss: clean cross-entropy + recon_weight x reconstruction of the clean input
    for idx in batches(len(windows), batch_size):
        x = encoder.normalize(cont[idx])
        memory, op_logits = encoder.encode_normalized(x, cat[idx])
        loss = F.cross_entropy(op_logits, ops[idx]) + recon_weight * F.mse_loss(encoder.reconstruct(memory), x)
        loss_sum += loss.item() * len(idx)
        correct += int((op_logits.argmax(1) == ops[idx]).sum())
    return {"val_loss": loss_sum / len(windows), "val_op_acc": correct / len(windows)}


def train_encoder(cfg: CncConfig) -> int:
    set_threads(cfg)
    dist_info = setup_distributed("cpu")  # trained on the CPU: gloo
    tc = cfg.encoder_train
    out = cfg.run.run_dir / ENCODER_DIR
    vocab = load_vocabulary(cfg.data.vocab_path)
    train = cap_windows(load_split(cfg, "train", vocab), cfg.data.max_train_windows, cfg.run.seed)
    val = load_split(cfg, "val", vocab, continuous_dim=train.continuous.shape[2])
    # Refuses (exit 2, nothing written) to resume a run whose config or data changed; writes config.yaml when fresh.
    fingerprint = stage_fingerprint(cfg, ("data", "encoder", "encoder_train"),
                                    {"train": cfg.data.train_path, "val": cfg.data.val_path})
    start = open_run(out, cfg, resume=tc.resume, checkpoint_dirs=[out / "checkpoints"], fingerprint=fingerprint,
                     resume_key="encoder_train.resume")
    log_windows(train, val)
    log.info("input groups: %s (%d continuous channels)", ", ".join(groups_used(train)), train.continuous.shape[2])
    seed_everything(cfg.run.seed)

    encoder = build_encoder(cfg.encoder, train.continuous.shape[2])
    encoder.set_normalization(*input_stats(train.continuous, cfg.encoder.input_scaling))
    if cfg.encoder.depth_channel:  # the part's top surface, from the training sensors (never labels)
        surface = estimate_surface(train.continuous, train.channel_names, cfg.encoder.depth_channel)
        encoder.set_depth(train.channel_names.index(cfg.encoder.depth_channel), surface)
        log.info("depth channel: %s below the surface at %.2f mm, clipped to %s mm", cfg.encoder.depth_channel,
                 surface, cfg.encoder.depth_band)
    optimizer = torch.optim.AdamW(param_groups(encoder, tc.weight_decay, tc.lr), lr=tc.lr)
    steps_per_epoch = -(-len(train) // tc.batch_size)
    scheduler = cosine_with_warmup(optimizer, tc.warmup_epochs * steps_per_epoch, tc.epochs * steps_per_epoch)
    stopper = AccuracyStopping(tc.patience)
    manager = CheckpointManager(out / "checkpoints", fingerprint=start.fingerprint)
    meta = encoder_meta(cfg, train.continuous.shape[2], train.channel_names)
    start_epoch = 1
    barrier()  # rank 0's manager may have repaired an interrupted save that every rank is about to load
    resumed = resume_from_checkpoint(manager, start.resume, encoder, optimizer, scheduler, stopper)
    if resumed is not None:
        start_epoch = int(resumed["epoch"]) + 1
        log.info("resumed from %s at epoch %d", resumed["_resumed_from"], start_epoch)
    metrics = MetricsWriter(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                            tensorboard=cfg.run.tensorboard, tensorboard_key="run.tensorboard")
    # the reconstruction head takes no part without the DTAE objective: DDP must be told
    step = wrap_ddp(EncoderStep(encoder, tc.denoise), dist_info, find_unused_parameters=not tc.denoise)

    cont, cat = torch.from_numpy(train.continuous), torch.from_numpy(train.categorical)
    ops = torch.from_numpy(train.operation_type)
    for epoch in progress(range(start_epoch, tc.epochs + 1), desc="epochs"):
        if stopper.should_stop:
            break
        encoder.train()
        loss_sum = 0.0
        for b, batch in enumerate(batches(len(train), tc.batch_size, epoch_order(len(train), cfg.run.seed, epoch))):
            mine, share = rank_part(len(batch), dist_info)
            idx = batch[mine]
            clean = encoder.normalize(cont[batch])
            # noise for the whole global batch on every rank: one random stream, the one a single process draws
            corrupted = corrupt(clean, tc.noise_std, tc.mask_prob)[mine] if tc.denoise else None
            op_logits, reconstruction = step(clean[mine], corrupted, cat[idx])
            loss = F.cross_entropy(op_logits, ops[idx])
            if tc.denoise:
                loss = loss + tc.recon_weight * F.mse_loss(reconstruction, clean[mine])
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; weighting each rank's batch mean by share x world_size makes that
            # average the gradient of the global batch's mean (x1.0 in one process)
            (loss * (share * dist_info.world_size)).backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step_loss = loss.item()  # under DDP rank 0's own batch mean: no extra all-reduce per step for a log line
            loss_sum += step_loss * share * len(batch)
            metrics.step(epoch, b, steps_per_epoch, {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        loss_sum = all_reduce_sum(loss_sum)
        val_metrics = main_rank_value(evaluate_encoder(encoder, val, 256, tc.recon_weight if tc.denoise else 0.0)
                                      if dist_info.is_main else None)
        improved = stopper.step(val_metrics["val_op_acc"], val_metrics["val_loss"])
        record = {"epoch": epoch, "train_loss": loss_sum / len(train), **val_metrics,
                  "lr": scheduler.get_last_lr()[0]}
        metrics.write(record)
        log.info("encoder epoch %d: %s", epoch, {k: round(v, 4) for k, v in record.items()})
        manager.save(encoder, capture_train_state(epoch, optimizer, scheduler, stopper), epoch, is_best=improved, meta={**meta, **val_metrics})
    metrics.close(hparams=cfg)
    log.info("encoder best val_op_acc %.4f (val_loss %.4f) -> %s", stopper.best, stopper.best_loss, manager.best)
    if dist_info.is_main and Path(cfg.data.test_path).is_file():
        report_test(cfg, manager.best, train, vocab)
    cleanup_distributed()
    return 0


@torch.no_grad()
def report_test(cfg: CncConfig, best: Path, train, vocab) -> dict:
    """Operation accuracy and macro F1 of the best encoder on the test split vs the majority baseline, the confusion
    matrix (rows true, columns predicted) in reports/encoder_results_test.json, and a confusion plot."""
    from cnc_gcode.evaluate import confusion_plot, operation_names

    encoder = build_encoder(cfg.encoder, train.continuous.shape[2])
    load_checkpoint(best, encoder)
    encoder.eval()
    test = load_split(cfg, "test", vocab, continuous_dim=train.continuous.shape[2])
    predictions = []
    for idx in batches(len(test), 256):
        _, op_logits = encoder(torch.from_numpy(test.continuous[idx]), torch.from_numpy(test.categorical[idx]))
        predictions.append(op_logits.argmax(1).numpy())
    predicted = np.concatenate(predictions)
    majority = np.bincount(train.operation_type).argmax()
    names = operation_names(cfg.encoder.n_operations, cfg.data.train_path)
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)  # rows: true operation, columns: predicted
    np.add.at(confusion, (test.operation_type, predicted), 1)
    result = {"split": "test", "n_windows": len(test), "operation_acc": float((predicted == test.operation_type).mean()),
              "majority_operation_acc": float((test.operation_type == majority).mean()),
              "macro_f1": macro_f1(test.operation_type, predicted), "checkpoint": str(best),
              "operations": names, "confusion": confusion.tolist(), "channel_groups": groups_used(test),
              "channels": test.channel_names, "input_scaling": cfg.encoder.input_scaling,
              "depth_channel": cfg.encoder.depth_channel or None,
              "surface_z": float(encoder.surface_z) if cfg.encoder.depth_channel else None}
    reports = cfg.run.run_dir / "reports"
    write_json(reports / "encoder_results_test.json", result)
    confusion_plot(test.operation_type, predicted, names,
                   reports / "encoder_confusion_test.png", f"encoder operations, test (acc {result['operation_acc']:.3f})")
    log.info("encoder test: operation_acc %.4f (majority %.4f)", result["operation_acc"],
             result["majority_operation_acc"])
    return result


main = config_main(CncConfig, train_encoder, __doc__, prog="python -m cnc_gcode.train_encoder")

if __name__ == "__main__":
    raise SystemExit(main())

