"""Stage 1: a timm ViT classifier of the implant's company (manufacturer) or model type, with an embedding layer
the regressors reuse as a frozen embedding model.

    python -m implant_dims.train_classifier --config configs/implant_dims/sample.yaml classifier.target=company
    python -m implant_dims.train_classifier --config configs/implant_dims/sample.yaml classifier.target=model_type
    torchrun --nproc_per_node=2 -m implant_dims.train_classifier --config ... run.device=cpu   # DDP (gloo on CPU)

Writes <run_dir>/classifier_<target>/: config.yaml, train.log, metrics.jsonl (train loss, validation accuracy and
top-k per epoch), checkpoints/{latest,best} (best = highest validation accuracy; meta.json holds the class list and
the ViT spec), reports/results_<split>.json (accuracy, top-k, macro F1, the majority-class baseline, the confusion
matrix) and reports/confusion_<split>.png for val, test and unseen. `classifier.resume=auto` continues an interrupted
run and refuses (exit 2, nothing written) one whose config or data changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.checkpoint import (
    CheckpointManager,
    capture_train_state,
    load_checkpoint,
    read_meta,
    resume_from_checkpoint,
)
from common.cli import config_main
from common.distributed import all_reduce_sum, cleanup_distributed, wrap_ddp
from common.errors import UserError
from common.io import write_json
from common.logs import MetricsWriter, progress
from common.metrics import macro_f1
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, cosine_with_warmup, param_groups
from implant_dims.config import ImplantConfig
from implant_dims.data import ImplantDataset, class_list
from implant_dims.engine import Runtime, collate, confusion_plot, epoch_batches, start_runtime
from implant_dims.models import EmbeddingClassifier
from implant_dims.stage_setup import (
    autocast,
    build_classifier_from_meta,
    class_indices,
    classifier_dir,
    classifier_meta,
    load_split,
    log_skipped,
    optional_splits,
    set_threads,
    stage_fingerprint,
    vit_spec,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: EmbeddingClassifier, dataset: ImplantDataset, rt: Runtime, batch_size: int = 128
                   ) -> np.ndarray:
    model.eval()
    out = []
    for idx in epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False):
        batch = collate(dataset, idx, rt.device)
        with autocast(rt.device, rt.amp_dtype):
            out.append(model(batch["image"]).float().cpu().numpy())
    return np.concatenate(out)


def classification_report(logits: np.ndarray, labels: np.ndarray, classes: list[str], majority: int, top_k: int
                          ) -> dict:
    """Accuracy, top-k, macro F1 and the confusion matrix over rows whose label the classifier knows (-1 rows are
    counted as unknown), beside the accuracy of always answering the training set's majority class."""
    known = labels >= 0
    y, scores = labels[known], logits[known]
    pred = scores.argmax(1)
    k = min(top_k, len(classes))
    topk = np.argsort(-scores, axis=1)[:, :k]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    return {"n": int(known.sum()), "n_unknown_label": int((~known).sum()), "accuracy": float((pred == y).mean()),
            f"top{k}_accuracy": float((topk == y[:, None]).any(1).mean()), "macro_f1": macro_f1(y, pred),
            "majority_accuracy": float((y == majority).mean()), "chance_accuracy": 1.0 / len(classes),
            "classes": classes, "confusion": confusion.tolist()}


def train_classifier(cfg: ImplantConfig, epoch_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train one classifier; returns the best checkpoint's validation report (HPO maximises its `accuracy`).
    `epoch_callback(epoch, val_report)` runs after each epoch's checkpoint (HPO pruning raises there)."""
    set_threads(cfg)
    cc = cfg.classifier
    target = cc.target
    out = classifier_dir(cfg, target)
    rt = start_runtime(cfg)
    train_records, train_skipped = load_split(cfg, "train")
    val_records, val_skipped = load_split(cfg, "val")
    classes = class_list(train_records, target)
    if len(classes) < 2:
        raise UserError(f"{cfg.data.train_json}: only {len(classes)} distinct {target} value(s); a classifier needs 2+")
    fingerprint = stage_fingerprint(cfg, ("classifier",), {"train": train_records, "val": val_records})
    start = open_run(out, cfg, resume=cc.resume, checkpoint_dirs=[out / "checkpoints"], fingerprint=fingerprint,
                     is_main=rt.is_main, resume_key="classifier.resume")
    log_skipped(cfg, {"train": (train_records, train_skipped), "val": (val_records, val_skipped)})
    seed_everything(cfg.run.seed)
    spec = vit_spec(cc.vit, cfg.data.img_size)
    train_set = ImplantDataset(train_records, cfg.data.img_size, classes if target == "company" else [],
                               classes if target == "model_type" else [], augment=cc.augment, seed=cfg.run.seed,
                               mm_per_pixel=cfg.data.mm_per_pixel)
    val_set = ImplantDataset(val_records, cfg.data.img_size, classes if target == "company" else [],
                             classes if target == "model_type" else [], mm_per_pixel=cfg.data.mm_per_pixel)
    labels_train = class_indices(train_records, target, classes)
    log.info("%s classifier: %d classes %s; %d train / %d val images; ViT %s, %s", target, len(classes), classes,
             len(train_set), len(val_set), spec.model_size, rt.device)

    model = EmbeddingClassifier(spec, len(classes), embedding_dim=cc.embedding_dim, dropout=cc.dropout).to(rt.device)
    optimizer = torch.optim.AdamW(param_groups(model, cc.weight_decay, cc.lr), lr=cc.lr)
    steps = len(epoch_batches(len(train_set), cc.batch_size, 0, 0, rank=rt.dist.rank,
                              world_size=rt.dist.world_size))
    scheduler = cosine_with_warmup(optimizer, cc.warmup_epochs * steps, cc.epochs * steps)
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)
    stopper = EarlyStopping(cc.patience, mode="max")
    manager = CheckpointManager(out / "checkpoints", fingerprint=start.fingerprint)
    # the input scale too: a regressor built on this classifier must feed it images at the same mm per pixel
    meta = {**classifier_meta(spec, target, classes, cc.embedding_dim, cc.dropout),
            "mm_per_pixel": cfg.data.input_mm_per_pixel()}
    resumed = resume_from_checkpoint(manager, start.resume, model, optimizer, scheduler, stopper, scaler)
    start_epoch = 1 if resumed is None else int(resumed["epoch"]) + 1
    if resumed is not None:
        log.info("resumed from %s at epoch %d", resumed["_resumed_from"], start_epoch)
    train_model = wrap_ddp(model, rt.dist)
    writer = MetricsWriter(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                           tensorboard=cfg.run.tensorboard, tensorboard_key="run.tensorboard") if rt.is_main else None
    majority = int(np.bincount(labels_train[labels_train >= 0], minlength=len(classes)).argmax())
    report: dict = {}
    for epoch in progress(range(start_epoch, cc.epochs + 1), desc=f"{target} epochs"):
        if stopper.should_stop:
            break
        started = time.time()
        train_set.set_epoch(epoch)
        model.train()
        loss_sum, seen = 0.0, 0
        for b, idx in enumerate(epoch_batches(len(train_set), cc.batch_size, cfg.run.seed, epoch, rank=rt.dist.rank,
                                              world_size=rt.dist.world_size)):
            batch = collate(train_set, idx, rt.device)
            with autocast(rt.device, rt.amp_dtype):
                logits = train_model(batch["image"])
                loss = F.cross_entropy(logits.float(), batch[target], label_smoothing=cc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step_loss = loss.item()
            loss_sum += step_loss * len(idx)
            seen += len(idx)
            if writer is not None:  # rank 0's own batch loss: no extra all-reduce per step for a log line
                writer.step(epoch, b, steps, {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        loss_sum, seen = all_reduce_sum(loss_sum), all_reduce_sum(seen)
        report = classification_report(predict_logits(model, val_set, rt), class_indices(val_records, target, classes),
                                        classes, majority, cc.top_k)
        improved = stopper.step(report["accuracy"])
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_accuracy": report["accuracy"],
                  f"val_top{min(cc.top_k, len(classes))}_accuracy": report[f"top{min(cc.top_k, len(classes))}_accuracy"],
                  "lr": scheduler.get_last_lr()[0], "best": improved, "seconds": round(time.time() - started, 2)}
        if writer is not None:
            writer.write(record)  # metrics before the checkpoint: a kill between leaves a line the resume rewrites
        manager.save(model, capture_train_state(epoch, optimizer, scheduler, stopper, scaler), epoch,
                     is_best=improved, meta={**meta, "val_accuracy": report["accuracy"]})
        log.info("%s epoch %d: loss %.4f val acc %.4f%s", target, epoch, record["train_loss"], report["accuracy"],
                 " *" if improved else "")
        if epoch_callback is not None:
            epoch_callback(epoch, report)
    if writer is not None:
        writer.close(hparams=cfg)
    result = {}
    if rt.is_main:
        result = report_splits(cfg, out, classes, majority, rt, val_set)
    cleanup_distributed()
    return result.get("val", report)


def report_splits(cfg: ImplantConfig, out, classes: list[str], majority: int, rt: Runtime,
                  val_set: ImplantDataset) -> dict:
    """Reports of the best checkpoint on val (`val_set`, as training used it) and each held-out split the config
    names."""
    best = out / "checkpoints" / "best"
    model = build_classifier_from_meta(read_meta(best))
    load_checkpoint(best, model)
    model.to(rt.device)
    target = cfg.classifier.target
    results = {}
    for split in ["val", *optional_splits(cfg)]:
        if split == "val":
            records, dataset = val_set.records, val_set
        else:
            records = load_split(cfg, split)[0]
            dataset = ImplantDataset(records, cfg.data.img_size, classes if target == "company" else [],
                                     classes if target == "model_type" else [], mm_per_pixel=cfg.data.mm_per_pixel)
        rep = classification_report(predict_logits(model, dataset, rt), class_indices(records, target, classes), classes,
                                    majority, cfg.classifier.top_k)
        rep.update(split=split, checkpoint=str(best), target=target)
        write_json(out / "reports" / f"results_{split}.json", rep)
        confusion_plot(np.array(rep["confusion"]), classes, out / "reports" / f"confusion_{split}.png",
                       f"{target}, {split}: accuracy {rep['accuracy']:.3f} (majority {rep['majority_accuracy']:.3f})")
        log.info("%s %s: accuracy %.4f top-k %s majority %.4f (n=%d)", target, split, rep["accuracy"],
                 {k: v for k, v in rep.items() if k.startswith("top")}, rep["majority_accuracy"], rep["n"])
        results[split] = rep
    return results


def _main(cfg: ImplantConfig) -> int:
    train_classifier(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.train_classifier")

if __name__ == "__main__":
    raise SystemExit(main())
