"""Train the projection head on frozen embeddings with triplet loss and bandit-chosen negative bands.

    python -m building_embed.train.train --config configs/building_embed/sample.toml
    python -m building_embed.train.train --config configs/building_embed/config.toml global.run_name=vitb-run1
    torchrun --nproc_per_node=2 -m building_embed.train.train --config configs/building_embed/sample.toml  # DDP

Reads paths.merged_dir/{train,val,test}.parquet (embeddings from generate_embeddings, split by merge_and_split) and
paths.difficulty_dir/difficulty_metadata.parquet. Each step: a UCB1 bandit (train/bandit.py) picks a difficulty band;
a P x K batch takes its negative identities from that band (train/data.py); triplet loss with mining
(pytorch-metric-learning, train/losses.py); the bandit's reward is the learning progress of that step (the batch's
unmined triplet loss before vs after the step, relative). Each epoch: recall@1/5/10, precision@1 and mAP@R on val
(train/retrieval.py: the query's own panorama is left out of its gallery; computed in query blocks within
infrastructure.eval_memory_mb); early stopping and `best` on val mAP@R.
At the end the best head and the frozen input embeddings are evaluated on val and test side by side.

Where stderr is not a terminal (SLURM logs) an epoch logs a line every logging.progress_every batches with rate and
ETA. A train split where no identity has two images, or a val split where no identity has images from two panoramas,
is refused (exit 2, naming the split file) before anything is written.

Writes paths.runs_dir/<global.run_name>/: config.yaml, train.log, metrics.jsonl (one record per epoch, and
per-step train-loss records between them), checkpoints/{latest,best}/ (model.safetensors = the ProjectionHead of
building_embed.model; meta.json holds [training_model]), reports/retrieval.{json,md}, tensorboard/ (unless
logging.tensorboard=false) and wandb/ when [logging] turns it on.

Resume: global.resume=auto continues from checkpoints/latest with optimizer, early stopping, bandit and RNG state;
batches come from (seed, epoch, batch), so a killed and resumed run ends with the same weights, bit for bit (CPU). It
refuses (exit 2, nothing written) when [training_model], [training] (less epochs, checkpoint cadence and the optuna_*
keys), global.seed or the train / val / difficulty files changed; `force` continues anyway, `false` starts over.
An embedding width other than training_model.input_dim is refused (exit 2) naming both widths and the file.

Under torchrun (gloo on CPU, NCCL on GPU) each step is still one global P x K batch: rank 0's bandit picks the band and
broadcasts it, every rank builds the same batch, embeds its contiguous part of it, and the loss (with mining) is taken
over the whole gathered batch (train/ddp.py), so N processes take the steps one process takes up to float summation
order (dropout draws per rank). Rank 0 validates and broadcasts the metrics, so early stopping agrees; it alone logs,
writes checkpoints and the report; every rank loads the checkpoint it resumes from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from building_embed.config import BuildingEmbedConfig
from building_embed.model import build_head
from building_embed.progress import ProgressLog
from building_embed.train.bandit import UCB1Bandit, learning_progress
from building_embed.train.data import (
    BandNegatives,
    IdentityIndex,
    anchor_schedule,
    difficulty_path,
    load_splits,
    pk_batch,
    require_trainable,
    split_paths,
)
from building_embed.train.ddp import global_batch_loss
from building_embed.train.losses import build_objective
from building_embed.train.retrieval import DEFAULT_MEMORY_MB, embed, markdown_table, retrieval_metrics
from building_embed.train.trackers import Trackers, open_trackers, require_trackers
from common.checkpoint import CheckpointManager, capture_train_state, load_weights, resume_from_checkpoint
from common.cli import config_main
from common.config import to_dict
from common.distributed import barrier, cleanup_distributed, main_rank_value, setup_distributed, wrap_ddp
from common.errors import UserError
from common.fingerprint import make_fingerprint
from common.io import atomic_write_text, write_json
from common.logs import MetricsWriter, progress
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, param_groups

log = logging.getLogger(__name__)
REPORT_JSON, REPORT_MD = "retrieval.json", "retrieval.md"
# [training] keys that steer the search, not the weights of this run.
OPTUNA_KEYS = tuple(f"training.{k}" for k in ("optuna_storage", "optuna_study", "optuna_trials",
                                              "optuna_total_trials", "optuna_epochs", "optuna_warmup_epochs",
                                              "optuna_hidden_dims"))
EpochHook = Callable[[int, dict[str, Any]], None]


def run_dir_of(cfg: BuildingEmbedConfig) -> Path:
    return Path(cfg.paths.runs_dir) / cfg.global_.run_name


def run_fingerprint(cfg: BuildingEmbedConfig) -> dict:
    """[training_model], [training] and global.seed, plus the train / val splits and difficulty file by content."""
    sections = {"global": {"seed": cfg.global_.seed}, "training_model": to_dict(cfg.training_model),
                "training": to_dict(cfg.training)}
    paths = split_paths(cfg)
    return make_fingerprint(sections, data={"train": paths["train"], "val": paths["val"],
                                            "difficulty": difficulty_path(cfg)}, volatile=OPTUNA_KEYS)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present. Bit-identical resume is promised (and tested) on CPU."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def train(cfg: BuildingEmbedConfig) -> int:
    run_training(cfg)
    return 0


def run_training(cfg: BuildingEmbedConfig, on_epoch: EpochHook | None = None, final_report: bool = True) -> dict:
    """Train (or resume) the run `paths.runs_dir/<global.run_name>`; returns {"run_dir", "best_val_map@r",
    "results"} ("results" only with final_report). `on_epoch(epoch, record)` runs after each epoch's checkpoint
    (Optuna reports and prunes there)."""
    if cfg.infrastructure.num_threads > 0:
        torch.set_num_threads(cfg.infrastructure.num_threads)
    tc, run_dir = cfg.training, run_dir_of(cfg)
    require_trackers(cfg.logging)
    splits = load_splits(cfg)  # refuses a width other than training_model.input_dim before anything is written
    train_split, val_split = splits["train"], splits["val"]
    require_trainable(train_split, val_split)  # a train split without pairs would loop forever looking for anchors
    negatives = BandNegatives.from_difficulty(difficulty_path(cfg), train_split)
    start = open_run(run_dir, cfg, resume=cfg.global_.resume, checkpoint_dirs=[run_dir / "checkpoints"],
                     fingerprint=run_fingerprint(cfg), resume_key="global.resume")
    logging.getLogger().setLevel(getattr(logging, cfg.logging.level.upper(), logging.INFO))
    wanted = resolve_device(cfg.infrastructure.device)
    dist_info = setup_distributed(wanted.type)
    device = dist_info.device if dist_info.world_size > 1 else wanted
    seed_everything(cfg.global_.seed)

    head = build_head(cfg.training_model).to(device)
    optimizer = torch.optim.AdamW(param_groups(head, tc.weight_decay, tc.lr), lr=tc.lr)
    stopper = EarlyStopping(tc.patience, mode="max")
    bandit = UCB1Bandit(negatives.n_bands, tc.ucb_exploration)
    objective = build_objective(tc)
    manager = CheckpointManager(run_dir / "checkpoints", keep_last_n=tc.keep_last_n, every_n_epochs=tc.save_every,
                                fingerprint=start.fingerprint)
    barrier()  # rank 0's manager may have repaired an interrupted save that every rank is about to load
    resumed = resume_from_checkpoint(manager, start.resume, head, optimizer, None, stopper)
    start_epoch = 1
    if resumed is not None:
        bandit.load_state_dict(resumed["bandit"])
        start_epoch = int(resumed["epoch"]) + 1
        log.info("resumed from %s at epoch %d", resumed["_resumed_from"], start_epoch)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                            tensorboard=cfg.logging.tensorboard, tensorboard_key="logging.tensorboard")
    trackers = open_trackers(cfg.logging, run_dir, to_dict(cfg)) if dist_info.is_main else Trackers([])
    train_head = wrap_ddp(head, dist_info)  # after the resume: DDP starts from rank 0's weights

    index = IdentityIndex(train_split.identity)
    n_ids = min(tc.identities_per_batch, index.n_identities)
    n_negative = max(1, round(n_ids * tc.negative_share))
    n_anchor = max(1, min(n_ids - n_negative, len(index.anchorable)))
    n_batches = tc.batches_per_epoch or max(1, len(train_split) // (n_ids * tc.views_per_identity))
    inputs, labels = train_split.embeddings.to(device), torch.from_numpy(train_split.identity).to(device)
    eval_mb = cfg.infrastructure.eval_memory_mb
    meta = {"training_model": to_dict(cfg.training_model), "embedding_model": to_dict(cfg.embedding_model)}
    try:
        for epoch in progress(range(start_epoch, tc.epochs + 1), desc="epochs"):
            if stopper.should_stop:
                log.info("early stopping: val mAP@R did not improve in %d epochs", tc.patience)
                break
            loss_sum, triplet_sum, band_pulls = 0.0, 0, [0] * bandit.n_arms
            steps = ProgressLog(f"epoch {epoch}", n_batches, every=cfg.logging.progress_every, logger=log)
            for b, anchors in enumerate(anchor_schedule(index, n_anchor, n_batches, cfg.global_.seed, epoch)):
                band = main_rank_value(bandit.select())  # the bandit lives on rank 0 (one broadcast per step)
                rows = torch.from_numpy(pk_batch(index, negatives, band, anchors, n_negative, tc.views_per_identity,
                                                 np.random.default_rng([cfg.global_.seed, epoch, b + 1])))
                x, y = inputs[rows], labels[rows]
                before = unmined_loss(head, objective, x, y) if dist_info.is_main else 0.0
                head.train()
                # .item() inside syncs with the GPU: once per step, the head is tiny anyway
                loss, loss_value, n_triplets = global_batch_loss(train_head, objective, x, y, dist_info)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(head.parameters(), tc.grad_clip)
                optimizer.step()
                if dist_info.is_main:
                    bandit.update(band, learning_progress(before, unmined_loss(head, objective, x, y)))
                loss_sum += loss_value
                triplet_sum += n_triplets
                metrics.step(epoch, b, n_batches, {"train_loss": loss_value, "mined_triplets": n_triplets,
                                                   "lr": optimizer.param_groups[0]["lr"]})
                band_pulls[band] += 1
                steps.step()
            val = main_rank_value(retrieval_metrics(embed(head, val_split.embeddings), val_split.identity,
                                                    val_split.panorama, memory_mb=eval_mb)
                                  if dist_info.is_main else None)
            improved = stopper.step(val["map@r"])
            record = {"epoch": epoch, "train_loss": loss_sum / n_batches, "mined_triplets": triplet_sum / n_batches,
                      **{f"band{i}_pulls": n for i, n in enumerate(band_pulls)},
                      **{f"band{i}_mean_reward": m for i, m in enumerate(bandit.means()) if m is not None},
                      **{f"val_{k}": v for k, v in val.items()}, "best_val_map@r": stopper.best}
            metrics.write(record)
            trackers.log(record, step=epoch)
            log.info("epoch %d: loss %.4f bands %s val recall@1 %.4f mAP@R %.4f%s", epoch, record["train_loss"],
                     band_pulls, val["recall@1"], val["map@r"], "  *best*" if improved else "")
            state = capture_train_state(epoch, optimizer, None, stopper, bandit=bandit.state_dict())
            manager.save(head, state, epoch, is_best=improved, meta={**meta, "val": val})
            if on_epoch is not None:
                on_epoch(epoch, record)
        metrics.close(hparams=cfg)
    finally:
        metrics.close()  # a no-op after the close above; closes the files when training raised
        trackers.close()
    barrier()  # rank 0 has written its last checkpoint
    if not (manager.best / "model.safetensors").is_file():
        raise UserError(f"training.epochs={tc.epochs}: no epoch ran and {manager.best} does not exist")
    summary = {"run_dir": str(run_dir), "best_val_map@r": stopper.best}
    if dist_info.is_main:
        load_weights(manager.best, head)
        if final_report:
            summary["results"] = write_report(run_dir, head, splits, eval_mb)
    cleanup_distributed()
    return summary


@torch.no_grad()
def unmined_loss(head: torch.nn.Module, objective, x: torch.Tensor, y: torch.Tensor) -> float:
    """The batch's triplet loss over every triplet, in eval mode (no dropout): the bandit's progress measure."""
    head.eval()
    return float(objective.progress_loss(head(x), y))


def write_report(run_dir: Path, head: torch.nn.Module, splits: dict, memory_mb: float = DEFAULT_MEMORY_MB) -> dict:
    """Best head vs frozen input embeddings on val and test -> reports/retrieval.{json,md}."""
    results = {}
    for name in ("val", "test"):
        split = splits[name]
        results[name] = {"head": retrieval_metrics(embed(head, split.embeddings), split.identity, split.panorama,
                                                   memory_mb=memory_mb),
                         "frozen": retrieval_metrics(split.embeddings, split.identity, split.panorama,
                                                     memory_mb=memory_mb)}
    write_json(run_dir / "reports" / REPORT_JSON, results)
    atomic_write_text(run_dir / "reports" / REPORT_MD, markdown_table(results))
    test = results["test"]
    log.info("test recall@1: head %.4f vs frozen %.4f; mAP@R: head %.4f vs frozen %.4f -> %s",
             test["head"]["recall@1"], test["frozen"]["recall@1"], test["head"]["map@r"], test["frozen"]["map@r"],
             run_dir / "reports" / REPORT_MD)
    return results


main = config_main(BuildingEmbedConfig, train, __doc__, prog="python -m building_embed.train.train")

if __name__ == "__main__":
    raise SystemExit(main())
