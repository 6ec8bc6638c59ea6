"""Train a fusion model on log price: a grouped 80/20 split, or K grouped folds with out-of-fold predictions.

    python -m price_fusion.train --config configs/price_fusion/base.yaml
    python -m price_fusion.train --config configs/price_fusion/demo.yaml train.epochs=5     # CPU-sized
    python -m price_fusion.train --config configs/price_fusion/base.yaml train.kfold=5 model.name=advanced_moe
    python -m price_fusion.train --config configs/price_fusion/base.yaml train.kfold=5 train.refit=true

Splits keep each product group (data.group_column, else the normalised item name) on one side. K-fold: each fold
early-stops and picks its best checkpoint on an inner grouped split of its own training rows (data.val_fraction of
them), never on its out-of-fold rows, so oof_predictions.csv is an honest estimate that ensemble weights can be
fitted on. train.refit=true then trains one model on every row for the median chosen epoch count (<run>/refit/).

Writes runs/price_fusion/<run_name>/: config.yaml, split.json, [fold_k/]checkpoints/{latest,best,epoch_N},
[fold_k/]metrics.jsonl, [fold_k/]training_history.json, predictions/val_predictions.csv (or oof_predictions.csv),
[refit/checkpoints/latest].

Resume: a killed run continues where it stopped with train.resume=auto (the default) and ends with identical
weights; raising train.epochs continues a finished run. Every checkpoint records a fingerprint of what decides the
weights (the data / model / train config less epochs, threads, device and paths, plus the size and SHA-256 of the
training CSV and of the embedding files); resume=auto refuses (exit 2, nothing written) to continue a run whose
fingerprint differs, naming each changed key or file. resume=force continues anyway (logged), resume=false starts
over. A resumed run keeps its config.yaml and split.json: the held-out ids are read back, never re-drawn.

DDP: `torchrun --nproc_per_node=N -m price_fusion.train ...` (gloo on CPU, NCCL with one GPU per rank).
train.batch_size stays the global batch: rank r trains rows r::N of each batch, weighted by its share of the batch's
loss weight, so N processes take the steps one process takes (up to float summation order; dropout draws per rank).
Validation runs on rank 0 and its metrics are broadcast, so early stopping and `best` agree; only rank 0 writes.
K-fold and refit run each model the same way. The MoE load-balancing term is computed on each rank's part of the
batch, so advanced_moe under DDP is close to, not equal to, one process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common import metrics
from common.checkpoint import CheckpointManager, capture_train_state, load_weights, resume_from_checkpoint
from common.cli import config_main
from common.config import to_dict
from common.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    is_main_process,
    main_rank_value,
    rank_part,
    setup_distributed,
    wrap_ddp,
)
from common.errors import UserError
from common.fingerprint import make_fingerprint
from common.logs import MetricsWriter, progress, write_json
from common.losses import price_tier_weights
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, param_groups

from .batching import FusionTensors, epoch_batches, load_split, predict_log_price
from .config import PriceFusionConfig
from .data import grouped_folds, grouped_split, product_groups
from .embedding_store import MANIFEST
from .losses import build_loss
from .model import build_model, init_output_bias
from .prediction_files import log_to_price, write_predictions

log = logging.getLogger(__name__)
DONE_FILE = "done.json"
SPLIT_FILE = "split.json"
REFIT_DIR = "refit"


def regression_metrics(pred_log: np.ndarray, price: np.ndarray) -> dict[str, float]:
    """SMAPE (percent), MAE / RMSE (dollars) and R2 of dollar predictions."""
    pred = log_to_price(pred_log)
    return {"smape": metrics.smape(price, pred), "mae": metrics.mae(price, pred), "rmse": metrics.rmse(price, pred),
            "r2": metrics.r2(price, pred)}


def loss_weights(tc, target_log: torch.Tensor) -> torch.Tensor:
    """Each row's weight in the batch loss: the price-tier weights of weighted_smape (a weighted mean), else 1 (every
    other loss is a plain mean over rows)."""
    if tc.loss == "weighted_smape":
        return price_tier_weights(target_log, tuple(tc.tier_edges), tuple(tc.tier_weights))
    return torch.ones_like(target_log)


def fit_one(cfg: PriceFusionConfig, fold_dir: Path, train_data: FusionTensors, val_data: FusionTensors | None,
            fingerprint: dict, resume: str | bool, lr_schedule: list[float] | None = None,
            on_epoch: Callable[[int, float], None] | None = None,
            dist_info: DistInfo | None = None) -> torch.nn.Module | None:
    """Train on `train_data`; returns the model with the weights to use, or None when this process stopped on purpose
    (train.max_epochs_this_run) before the run finished.

    With `val_data`: early stopping, ReduceLROnPlateau and the best checkpoint on its SMAPE; the best weights are
    returned. Without (a refit): exactly train.epochs epochs at the learning rates `lr_schedule[epoch - 1]`, and the
    last weights are returned. Resumes from `fold_dir/checkpoints/latest` when `resume` (from `open_run`) says so;
    every checkpoint records `fingerprint`. `on_epoch(epoch, val_smape)`, when given, is called after each epoch's
    checkpoint (runs with `val_data` only); it may raise to stop the run (an Optuna pruner does). `dist_info`: the
    torchrun process group (None: one process)."""
    tc = cfg.train
    dist_info = dist_info or DistInfo(0, 0, 1, resolve_device(tc.device))
    seed_everything(tc.seed)
    model = build_model(cfg.model, train_data.image.shape[1], train_data.text.shape[1], train_data.struct.shape[1])
    model.branches.set_struct_stats(train_data.struct)
    init_output_bias(model, float(train_data.log_price.mean()))
    device = dist_info.device if dist_info.world_size > 1 else resolve_device(tc.device)
    model.to(device)
    train_data = train_data.to(device)
    val_data = None if val_data is None else val_data.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr), lr=tc.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=tc.plateau_factor,
                                                           patience=tc.plateau_patience)
    stopper = EarlyStopping(tc.patience, mode="min")
    manager = CheckpointManager(fold_dir / "checkpoints", keep_last_n=tc.keep_last_n, every_n_epochs=tc.checkpoint_every,
                                fingerprint=fingerprint)
    loss_fn = build_loss(tc)
    val_price = None if val_data is None else val_data.log_price.double().exp().cpu().numpy()
    history: list[dict] = []
    start_epoch = 1

    barrier()  # rank 0's manager may have repaired an interrupted save that every rank is about to load
    resumed = resume_from_checkpoint(manager, resume, model, optimizer, scheduler, stopper)
    if resumed is not None:
        history = list(resumed["history"])
        start_epoch = int(resumed["epoch"]) + 1
        log.info("resumed from %s at epoch %d (best val SMAPE %s)", resumed["_resumed_from"], start_epoch,
                 stopper.best)
    writer = MetricsWriter(fold_dir / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                           tensorboard=tc.tensorboard, tensorboard_key="train.tensorboard")
    step = wrap_ddp(model, dist_info) if dist_info.world_size > 1 else model  # trains `model`'s own parameters

    epochs_this_run = 0
    for epoch in progress(range(start_epoch, tc.epochs + 1), desc="epochs"):
        if stopper.should_stop or (tc.max_epochs_this_run and epochs_this_run >= tc.max_epochs_this_run):
            break
        epoch_start = time.perf_counter()
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[epoch - 1]
        model.train()
        loss_sum, n_seen = 0.0, 0
        batches = list(epoch_batches(len(train_data), tc.batch_size, tc.seed, epoch))
        for b, rows in enumerate(batches):
            mine, share = rows, 1.0
            if dist_info.world_size > 1:  # the batch loss is a weighted mean: this rank's share of its weights
                part, share = rank_part(len(rows), dist_info, loss_weights(tc, train_data.target(rows)))
                mine = rows[torch.from_numpy(part)]
            pred_log = step(*train_data.inputs(mine))
            loss = loss_fn(pred_log, train_data.target(mine)) + tc.load_balance_weight * model.aux_loss()
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks: share x world_size makes that the global batch's gradient
            (loss * (share * dist_info.world_size) if dist_info.world_size > 1 else loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            step_loss = loss.item()  # syncs, harmless on CPU
            loss_sum += step_loss * share * len(rows)
            n_seen += len(rows)
            # under DDP, rank 0's loss on its part of the batch: no extra all-reduce per step for a log line
            writer.step(epoch, b, len(batches), {"train_loss": step_loss, "lr": optimizer.param_groups[0]["lr"]})
        loss_sum = all_reduce_sum(loss_sum)
        steps_seconds = time.perf_counter() - epoch_start

        record = {"epoch": epoch, "train_loss": loss_sum / n_seen}
        improved = False
        if val_data is not None:
            val_metrics = main_rank_value(regression_metrics(predict_log_price(model, val_data), val_price)
                                          if dist_info.is_main else None)
            scheduler.step(val_metrics["smape"])
            improved = stopper.step(val_metrics["smape"])
            record.update({f"val_{k}": v for k, v in val_metrics.items()})
        record.update({"lr": optimizer.param_groups[0]["lr"], "best_val_smape": stopper.best})
        history.append(record)
        writer.write(record)
        state = capture_train_state(epoch, optimizer, scheduler, stopper, history=history)
        manager.save(model, state, epoch, is_best=improved, meta=_model_meta(cfg, train_data))
        if dist_info.is_main:
            write_json(fold_dir / "training_history.json", history)
        # logged once the epoch is saved; the two times are what benchmarks/price_fusion_full_run.py compares
        log.info("epoch %d  loss %.4f%s  lr %.2e%s  (%.2f s, training steps %.2f s)", epoch, record["train_loss"],
                 "" if val_data is None else
                 "  val SMAPE {val_smape:.2f}%  MAE {val_mae:.2f}  RMSE {val_rmse:.2f}  R2 {val_r2:.3f}".format(**record),
                 record["lr"], "  *best*" if improved else "", time.perf_counter() - epoch_start, steps_seconds)
        epochs_this_run += 1
        if on_epoch is not None and val_data is not None:
            on_epoch(epoch, record["val_smape"])
    finished = stopper.should_stop or (history and history[-1]["epoch"] >= tc.epochs)
    writer.close(hparams=cfg if finished else None)  # hyper-parameters only once the fit is done
    if not finished:
        return None  # stopped early on purpose (max_epochs_this_run): resume later
    barrier()  # rank 0 wrote the checkpoint every rank loads
    load_weights(manager.best if val_data is not None else manager.latest, model)
    best_epoch = (min(history, key=lambda h: h["val_smape"])["epoch"] if val_data is not None else history[-1]["epoch"])
    if dist_info.is_main:
        write_json(fold_dir / DONE_FILE, {"best_val_smape": stopper.best, "epochs": history[-1]["epoch"],
                                          "best_epoch": best_epoch, "stopped_early": stopper.should_stop})
    log.info("finished %s after %d epochs (best epoch %d, val SMAPE %s)", fold_dir, history[-1]["epoch"], best_epoch,
             stopper.best)
    return model


def refit_plan(fold_dirs: list[Path], first_lr: float) -> tuple[int, list[float]]:
    """(epochs, learning rate of each epoch) for the refit on every row: the median of the folds' best epochs, and the
    schedule of the fold whose best epoch is nearest to it (the rate in force during each of its epochs)."""
    done = [json.loads((d / DONE_FILE).read_text()) for d in fold_dirs]
    best = [int(d["best_epoch"]) for d in done]
    epochs = max(1, int(round(float(np.median(best)))))
    chosen = fold_dirs[int(np.argmin([abs(b - epochs) for b in best]))]
    history = json.loads((chosen / "training_history.json").read_text())
    rates = [first_lr] + [h["lr"] for h in history]  # history[e]["lr"] is the rate after epoch e + 1's plateau step
    return epochs, [rates[min(e, len(rates) - 1)] for e in range(epochs)]


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else CPU. Bit-identical resume is guaranteed (and tested) on CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _model_meta(cfg: PriceFusionConfig, data: FusionTensors) -> dict:
    """What `predict` needs to rebuild the network without the training config."""
    return {"model": to_dict(cfg.model), "image_dim": int(data.image.shape[1]), "text_dim": int(data.text.shape[1]),
            "struct_dim": int(data.struct.shape[1]), "use_image": cfg.model.use_image}


# Config keys that decide where files are, not what the weights are: the data files they name are fingerprinted by
# content instead (moving the data does not invalidate a run; changing it does).
PATH_KEYS = ("data.train_csv", "data.test_csv", "data.image_dir", "data.embeddings_dir")


def run_fingerprint(cfg: PriceFusionConfig) -> dict:
    """What decides the weights of a training run: the data / model / train sections (less epochs, threads, device,
    resume and checkpoint cadence; `common.fingerprint.VOLATILE_KEYS`), the training CSV and the train embedding files by
    size and SHA-256, and the embedding store's digest of its id order. Call it after `load_split` has validated
    the embedding folder (its manifest is read here as is)."""
    emb_dir = Path(cfg.data.embeddings_dir) / "train"
    manifest = json.loads((emb_dir / MANIFEST).read_text())
    sections = {name: to_dict(getattr(cfg, name)) for name in ("data", "model", "train")}
    return make_fingerprint(sections, data={"train_csv": cfg.data.train_csv, "train_embeddings": emb_dir},
                            digests={"train_embedding_ids": manifest.get("sample_ids_sha256", "")}, volatile=PATH_KEYS)


def train(cfg: PriceFusionConfig, on_epoch: Callable[[int, float], None] | None = None) -> int:
    previous_threads = torch.get_num_threads()
    if cfg.train.num_threads:
        # Small MLPs on a shared CPU: 1 thread was 10x faster than 2 here (threads contend with other processes).
        torch.set_num_threads(cfg.train.num_threads)
    try:
        # a torchrun process group when launched by torchrun (gloo on CPU, NCCL with one GPU per rank), else no-op
        device = resolve_device(cfg.train.device)
        dist_info = (setup_distributed("cpu" if device.type == "cpu" else "cuda")
                     if int(os.environ.get("WORLD_SIZE", "1")) > 1 else DistInfo(0, 0, 1, device))
        code = _train(cfg, Path(cfg.runs_dir) / cfg.run_name, on_epoch, dist_info)
        cleanup_distributed()
        return code
    finally:
        torch.set_num_threads(previous_threads)


def _checkpoint_dirs(run_dir: Path, kfold: int) -> list[Path]:
    """Every checkpoint folder this run (or an earlier run under the same name, single-split or K-fold) may hold."""
    dirs = [run_dir / "checkpoints", *(run_dir / f"fold_{k}" / "checkpoints" for k in range(kfold)),
            run_dir / REFIT_DIR / "checkpoints"]
    dirs += [d for d in sorted(run_dir.glob("fold_*/checkpoints")) if d not in dirs]
    return dirs


def _read_split(run_dir: Path, sample_ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The (fit rows, early-stopping rows, held-out rows) of each fold recorded in split.json by the run resumed."""
    path = run_dir / SPLIT_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing, but {run_dir} holds checkpoints to resume; restore the file or start "
                        "over with train.resume=false")
    split = json.loads(path.read_text())
    if "early_stopping_ids" not in split:
        raise UserError(f"{path}: written before grouped splits (no early_stopping_ids); start over with "
                        "train.resume=false or a new run_name")

    def rows_of(ids: list[str]) -> np.ndarray:
        return np.flatnonzero(np.isin(sample_ids, np.asarray(ids, dtype=str)))

    fits = []
    for val_ids, stop_ids in zip(split["val_ids"], split["early_stopping_ids"]):
        held_out, stop = rows_of(val_ids), rows_of(stop_ids)
        fits.append((np.setdiff1d(np.arange(len(sample_ids)), np.union1d(held_out, stop)), stop, held_out))
    return fits


def make_fits(cfg: PriceFusionConfig, prices: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """(fit rows, early-stopping rows, held-out rows) of each model. Single split: the held-out rows are the
    early-stopping rows. K-fold: the held-out rows are the fold's out-of-fold rows, and early stopping uses an inner
    grouped split of the fold's training rows (seeded data.split_seed + 1 + k)."""
    dc = cfg.data
    if not cfg.train.kfold:
        fit, val = grouped_split(prices, groups, dc.val_fraction, dc.n_price_bins, dc.split_seed)
        return [(fit, val, val)]
    fits = []
    for k, (rest, held_out) in enumerate(grouped_folds(prices, groups, cfg.train.kfold, dc.n_price_bins,
                                                       dc.split_seed)):
        inner_fit, inner_stop = grouped_split(prices[rest], groups[rest], dc.val_fraction, dc.n_price_bins,
                                              dc.split_seed + 1 + k)
        fits.append((rest[inner_fit], rest[inner_stop], held_out))
    return fits


def _train(cfg: PriceFusionConfig, run_dir: Path, on_epoch: Callable[[int, float], None] | None = None,
           dist_info: DistInfo | None = None) -> int:
    # Inputs are read and validated (ids, prices, NaN/inf) and the fingerprint is checked against every checkpoint
    # before anything is written (config.yaml, train.log).
    catalog, data = load_split(cfg.data.embeddings_dir, "train", cfg.data.train_csv, labelled=True,
                               bad_price=cfg.data.bad_price, use_image=cfg.model.use_image,
                               group_column=cfg.data.group_column, structural=cfg.data.structural)
    start = open_run(run_dir, cfg, resume=cfg.train.resume, checkpoint_dirs=_checkpoint_dirs(run_dir, cfg.train.kfold),
                     fingerprint=run_fingerprint(cfg), resume_key="train.resume")
    barrier()  # every rank has decided fresh-or-resume before rank 0 writes split.json or a checkpoint
    log.info("%d training products (%d skipped for bad prices), %d with images", len(data), catalog.n_bad_prices,
             int(data.has_image.sum()))

    if start.resuming:
        fits = _read_split(run_dir, catalog.sample_ids)  # never re-drawn under a resumed run
    else:
        groups = product_groups(catalog, cfg.data.group_key)
        fits = make_fits(cfg, catalog.prices, groups)  # the same on every rank (seeded)
        if is_main_process():
            write_json(run_dir / SPLIT_FILE, {
                "kfold": cfg.train.kfold, "refit": cfg.train.refit, "n_groups": int(len(np.unique(groups))),
                "groups": cfg.data.group_column or cfg.data.group_key,
                "val_ids": [catalog.sample_ids[held_out].tolist() for _, _, held_out in fits],
                "early_stopping_ids": [catalog.sample_ids[stop].tolist() for _, stop, _ in fits]})

    out_of_fold = np.full(len(data), np.nan)
    fold_dirs = [run_dir / f"fold_{k}" if cfg.train.kfold else run_dir for k in range(len(fits))]
    for fold_dir, (fit_rows, stop_rows, held_out) in zip(fold_dirs, fits):
        model = fit_one(cfg, fold_dir, data.subset(fit_rows), data.subset(stop_rows), start.fingerprint, start.resume,
                        on_epoch=on_epoch, dist_info=dist_info)
        if model is None:
            log.info("stopped after train.max_epochs_this_run=%d epochs; run again to resume",
                     cfg.train.max_epochs_this_run)
            return 0
        out_of_fold[held_out] = predict_log_price(model, data.subset(held_out))
    if cfg.train.refit:
        barrier()  # rank 0 wrote the folds' done.json and histories that refit_plan reads
        epochs, rates = refit_plan(fold_dirs, cfg.train.lr)
        log.info("refit on all %d training rows for %d epochs", len(data), epochs)
        refit_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
        if fit_one(refit_cfg, run_dir / REFIT_DIR, data, None, start.fingerprint, start.resume, rates,
                   dist_info=dist_info) is None:
            log.info("stopped after train.max_epochs_this_run; run again to resume")
            return 0

    if not is_main_process():
        return 0  # rank 0 writes the predictions and the report
    val_rows = np.sort(np.concatenate([held_out for _, _, held_out in fits]))
    name = "oof_predictions.csv" if cfg.train.kfold else "val_predictions.csv"
    write_predictions(run_dir / "predictions" / name, catalog.sample_ids[val_rows],
                      log_to_price(out_of_fold[val_rows]), actual=catalog.prices[val_rows])
    summary = regression_metrics(out_of_fold[val_rows], catalog.prices[val_rows])
    write_json(run_dir / "reports" / "train_summary.json", {"n_train_rows": len(data), "folds": len(fits), **summary})
    log.info("%s: SMAPE %.3f%%  MAE %.3f  RMSE %.3f  R2 %.4f", name, summary["smape"], summary["mae"],
             summary["rmse"], summary["r2"])
    return 0


main = config_main(PriceFusionConfig, train, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
