"""Finetune TransformerEncoderEmbedded or TransformerDecoderEmbedded for classification.

    python -m ehr_embedded.finetune --config configs/ehr_embedded/finetune_encoder_embedded.yaml
    python -m ehr_embedded.finetune --config configs/ehr_embedded/finetune_decoder_embedded.yaml \
        training.pretrained_checkpoint=runs/ehr_embedded/pretrain_decoder
    # CPU-sized: model.model_dim=32 model.n_layers=1 training.epochs=3

Class-weighted loss (common.losses.focal_loss; gamma 0 = weighted cross-entropy), model selection, early stopping
and ReduceLROnPlateau on the tuning split's `selection_metric`; then the F1-best decision threshold on tuning and a
final score on held_out (through evaluate). `model.num_classes > 2` (integer_value labels) trains a multi-class head;
its tuning `auroc` is the macro one-vs-rest AUROC and its held_out report holds evaluate's multi-class metrics.
Regression: a store built from float_value labels (float64 `label`) with `model.num_classes=1` trains one output on
the target standardised with the train split's mean and std (MSE; `reports/target_scaling.json` keeps mean, std and
median so evaluate de-standardises), selects on tuning MAE (lower is better; `selection_metric=loss` selects on the
standardised MSE), and uses no class weights (refused when set), no focal_gamma and no threshold. Either of the two
alone is refused with the fix. Multi-label: a store built from `data.task_labels` with `model.num_classes` = its K
tasks trains K sigmoid outputs with binary cross-entropy over the labelled (row, task) pairs (engine.masked_bce;
`class_weights=auto` weighs each task's positives by its train negatives / positives, a list gives K such weights),
selects on the macro over tasks (auroc, auprc, f1 at 0.5, or loss) and picks one F1-best threshold per task on
tuning.
`training.resume=auto` continues from checkpoints/latest bit for bit; it refuses (exit 2, nothing written) a run whose
config, store or pretrained checkpoint changed since (see engine.run_fingerprint), `training.resume=force` continues
anyway and logs it, and raising `training.epochs` on a finished run trains the extra epochs. `config.yaml` is written
by a fresh run only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common import metrics
from common.checkpoint import (
    CheckpointManager,
    capture_train_state,
    load_weights,
    resume_from_checkpoint,
)
from common.cli import config_main
from common.distributed import all_reduce_sum, cleanup_distributed, wrap_ddp
from common.errors import UserError
from common.io import write_json
from common.logs import MetricsWriter, progress
from common.losses import focal_loss
from common.training import EarlyStopping, param_groups
from ehr_embedded.config import TrainConfig
from ehr_embedded.data import make_loader
from ehr_embedded.engine import (
    TARGET_SCALING_FILE,
    load_pretrained,
    load_splits,
    masked_bce,
    model_for,
    predict_multilabel,
    predict_probs,
    predict_values,
    run_fingerprint,
    start_run,
    target_scaling,
)
from ehr_embedded.evaluate import choose_threshold, evaluate, macro_auprc, macro_auroc, macro_ovr_auroc, micro_auroc
from ehr_embedded.prediction_files import DEFAULT_THRESHOLD
from ehr_embedded.storage import CODE_TABLE_DIR

log = logging.getLogger(__name__)
HIGHER_IS_BETTER = {"auroc": True, "auprc": True, "f1": True, "loss": False, "mae": False}


def class_weights(setting, labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: explicit list, `auto` = n / (num_classes * count_c), or None."""
    if setting is None:
        return None
    if setting == "auto":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        if (counts == 0).any():
            raise UserError(f"training.class_weights=auto: class {int(np.argmin(counts))} never occurs in train")
        return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)
    if len(setting) != num_classes:
        raise UserError(f"training.class_weights has {len(setting)} entries; model.num_classes={num_classes}")
    return torch.tensor(setting, dtype=torch.float32)


def task_pos_weight(setting, labels: np.ndarray) -> torch.Tensor | None:
    """Multi-label positive weights per task: `auto` = train negatives / positives of each task (labelled rows
    only), an explicit list of K, or None."""
    if setting is None:
        return None
    if setting == "auto":
        positives, negatives = (labels == 1).sum(0), (labels == 0).sum(0)
        if (positives == 0).any() or (negatives == 0).any():
            k = int(np.flatnonzero((positives == 0) | (negatives == 0))[0])
            raise UserError(f"training.class_weights=auto: task {k} has one class only in train; every multi-label "
                            f"task needs positives and negatives there")
        return torch.tensor(negatives / positives, dtype=torch.float32)
    if len(setting) != labels.shape[1]:
        raise UserError(f"training.class_weights has {len(setting)} entries; a multi-label store with "
                        f"{labels.shape[1]} tasks takes one positive weight per task")
    return torch.tensor(setting, dtype=torch.float32)


def multilabel_tuning_scores(model, dataset, cfg: TrainConfig, device) -> dict[str, float]:
    """Tuning scores of a multi-label run: loss (masked BCE), macro AUROC / AUPRC over tasks (`auroc`, `auprc`,
    present when every task has both classes in tuning), micro AUROC and macro F1 at 0.5."""
    probs, y, loss = predict_multilabel(model, dataset, cfg.training.eval_batch_size, device)
    out = {"loss": loss}
    try:
        out.update(auroc=macro_auroc(y, probs), auprc=macro_auprc(y, probs), micro_auroc=micro_auroc(y, probs))
    except ValueError:  # a task with one class in tuning: finetune refuses AUROC selection before training then
        pass
    f1s = [metrics.macro_f1(y[y[:, k] >= 0, k], probs[y[:, k] >= 0, k] >= 0.5) for k in range(y.shape[1])]
    out["f1"] = float(np.mean(f1s))
    return out


def tuning_scores(model, dataset, cfg: TrainConfig, device, scaling: dict | None = None) -> dict[str, float]:
    if dataset.store.is_multilabel:
        return multilabel_tuning_scores(model, dataset, cfg, device)
    if scaling is not None:  # regression
        pred, y, loss = predict_values(model, dataset, cfg.training.eval_batch_size, device, scaling["mean"],
                                       scaling["std"])
        return {"loss": loss, "mae": float(np.mean(np.abs(pred - y))), "rmse": float(np.sqrt(np.mean((pred - y) ** 2)))}
    probs, y, loss = predict_probs(model, dataset, cfg.training.eval_batch_size, device)
    out = {"loss": loss, "accuracy": metrics.accuracy(y, probs.argmax(1))}
    if probs.shape[1] == 2 and len(np.unique(y)) == 2:
        out.update(auroc=metrics.auroc(y, probs[:, 1]), auprc=metrics.auprc(y, probs[:, 1]))
    elif probs.shape[1] > 2 and len(np.unique(y)) == probs.shape[1]:
        out["auroc"] = macro_ovr_auroc(y, probs)  # macro one-vs-rest, as evaluate reports it
    out["f1"] = metrics.macro_f1(y, probs.argmax(1))
    return out


def check_regression_setup(cfg: TrainConfig, is_regression: bool) -> str:
    """The selection metric to use; raises UserError when the store's label type and model.num_classes disagree or a
    classification-only setting is given for a regression task."""
    tc, metric = cfg.training, cfg.training.selection_metric
    store = cfg.data.embedding_output_dir
    if metric == "mae" and not is_regression:
        raise UserError("training.selection_metric=mae is for regression (model.num_classes=1); use auroc, "
                        "auprc, f1 or loss")
    if is_regression and cfg.model.num_classes != 1:
        raise UserError(f"{store}: the store holds float (float_value) regression targets but model.num_classes="
                        f"{cfg.model.num_classes}; set model.num_classes=1 for regression")
    if not is_regression and cfg.model.num_classes == 1:
        raise UserError(f"{store}: model.num_classes=1 is regression, but the store holds class labels; set "
                        f"model.num_classes to the number of classes or rebuild the store from float_value labels")
    if not is_regression:
        return metric
    if tc.class_weights is not None:
        raise UserError("training.class_weights is set but the task is regression (float_value labels); set it "
                        "to null")
    return metric if metric in ("mae", "loss") else "mae"


def check_multilabel_setup(cfg: TrainConfig, train, tuning, metric: str) -> None:
    """Raise UserError when a multi-label store and the config disagree: model.num_classes must be the number of
    tasks, focal loss is for softmax heads, and AUROC / AUPRC selection needs both classes of every task in tuning."""
    tasks = train.task_names
    if cfg.model.num_classes != len(tasks):
        raise UserError(f"{cfg.data.embedding_output_dir}: the store is multi-label with {len(tasks)} tasks {tasks} "
                        f"but model.num_classes={cfg.model.num_classes}; set model.num_classes={len(tasks)}")
    if cfg.training.focal_gamma:
        raise UserError("training.focal_gamma is set but the store is multi-label (sigmoid outputs, binary "
                        "cross-entropy per task); set training.focal_gamma=0")
    if metric in ("auroc", "auprc"):
        for k, task in enumerate(tasks):
            labelled = tuning.labels[:, k][tuning.labels[:, k] >= 0]
            if len(np.unique(labelled)) < 2:
                raise UserError(f"training.selection_metric={metric} but task '{task}' has "
                                f"{'no labels' if not len(labelled) else 'one class only'} in the tuning split; use "
                                f"training.selection_metric=loss or a larger tuning split")


def finetune(cfg: TrainConfig, on_epoch: Callable[[int, float | None], None] | None = None,
             held_out: bool = True) -> dict:
    """Train, pick the threshold on tuning, then score held_out (skipped with `held_out=False`, as inside an Optuna
    trial). `on_epoch(epoch, tuning_auroc)` is called after each epoch's checkpoint (AUROC None when the tuning split
    has one class); an exception it raises (e.g. optuna.TrialPruned) stops the run there."""
    tc = cfg.training
    table, data = load_splits(cfg, ("train", "tuning"))
    train_labels = data["train"].store.labels
    if len(data["train"]) == 0 or len(data["tuning"]) == 0:
        raise UserError(f"{cfg.data.embedding_output_dir}: the train and tuning splits both need sequences")
    regression = data["train"].store.is_regression
    multilabel = data["train"].store.is_multilabel
    if multilabel:
        check_multilabel_setup(cfg, data["train"].store, data["tuning"].store, tc.selection_metric)
    metric = check_regression_setup(cfg, regression)
    if not regression and not multilabel and train_labels.max() >= cfg.model.num_classes:
        raise UserError(f"labels go up to {train_labels.max()} but model.num_classes={cfg.model.num_classes}")
    n_classes = cfg.model.num_classes
    present = np.unique(data["tuning"].store.labels)
    # AUROC (macro one-vs-rest) needs every class in tuning (check_multilabel_setup checked each task's)
    if not multilabel and len(present) < {"auroc": n_classes, "auprc": 2}.get(metric, 0):
        raise UserError(f"training.selection_metric={metric} but the tuning split lacks a class (it holds "
                        f"classes {present.tolist()} of {n_classes}); "
                        f"use training.selection_metric=loss or a larger tuning split")
    if metric == "auprc" and n_classes > 2 and not multilabel:
        raise UserError(f"training.selection_metric=auprc is binary; with model.num_classes={n_classes} use auroc "
                        f"(macro one-vs-rest), f1 (macro) or loss")
    run_dir, dist_info, device, start = start_run(cfg, run_fingerprint(cfg, ("train", "tuning")))

    model = model_for(cfg, table, "classification").to(device)
    scaling = None
    if regression:
        scaling = target_scaling(train_labels)
        if dist_info.is_main:
            write_json(run_dir / "reports" / TARGET_SCALING_FILE, scaling)
        log.info("regression: target standardised with train mean %.4g, std %.4g; selection on tuning %s",
                 scaling["mean"], scaling["std"], metric)
    if multilabel:
        weights = task_pos_weight(tc.class_weights, train_labels)
    else:
        weights = None if regression else class_weights(tc.class_weights, train_labels, cfg.model.num_classes)
    weights = weights.to(device) if weights is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.learning_rate), lr=tc.learning_rate)
    mode = "max" if HIGHER_IS_BETTER[metric] else "min"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=tc.scheduler_factor,
                                                           patience=tc.scheduler_patience, min_lr=tc.min_learning_rate)
    early = EarlyStopping(tc.early_stopping_patience, mode=mode)
    ckpts = CheckpointManager(run_dir / "checkpoints", keep_last_n=tc.keep_last_n, every_n_epochs=tc.save_every,
                              fingerprint=start.fingerprint)

    start_epoch = 1
    resumed = resume_from_checkpoint(ckpts, start.resume, model, optimizer, scheduler, early)
    if resumed is not None:
        start_epoch = int(resumed["epoch"]) + 1
        log.info("resumed from %s at epoch %d", resumed["_resumed_from"], start_epoch)
    elif tc.pretrained_checkpoint is not None:
        load_pretrained(model, tc.pretrained_checkpoint, table, Path(cfg.data.embedding_output_dir) / CODE_TABLE_DIR)

    # DDP wraps the model for training steps only; evaluation and checkpoints use the bare module
    # (a decoder's next-event head is unused here; the frozen code table is identical on every rank)
    train_model = wrap_ddp(model, dist_info, find_unused_parameters=hasattr(model, "lm_head"), broadcast_buffers=False)
    writer = MetricsWriter(run_dir / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                           tensorboard=tc.tensorboard, tensorboard_key="training.tensorboard")
    loader = make_loader(data["train"], tc.batch_size, shuffle=True, seed=tc.seed, bucket=tc.bucket_by_length,
                         pad_to=cfg.model.max_length if tc.pad_to_max_length else None, num_workers=tc.num_workers,
                         rank=dist_info.rank, world_size=dist_info.world_size)
    log.info("finetune %s (%d params) on %d train / %d tuning sequences", cfg.model.type,
             sum(p.numel() for p in model.parameters()), len(data["train"]), len(data["tuning"]))
    for epoch in progress(range(start_epoch, tc.epochs + 1), desc="epochs"):
        if early.should_stop:
            break
        started = time.time()
        loader.batch_sampler.set_epoch(epoch)
        model.train()
        loss_sum, n_seen = 0.0, 0
        for b, batch in enumerate(loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = train_model(batch)
            if scaling is not None:
                target = (batch["labels"] - scaling["mean"]) / scaling["std"]
                loss = torch.nn.functional.mse_loss(logits[:, 0].float(), target.float())
            elif multilabel:
                loss = masked_bce(logits, batch["labels"], pos_weight=weights)
            else:
                loss = focal_loss(logits, batch["labels"], gamma=tc.focal_gamma, alpha=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            step_loss = loss.item()  # syncs with the device; once per step is cheap here
            loss_sum += step_loss * len(logits)
            n_seen += len(logits)
            writer.step(epoch, b, len(loader), {"train_loss": step_loss, "lr": optimizer.param_groups[0]["lr"]})

        loss_sum, n_seen = all_reduce_sum(loss_sum), all_reduce_sum(n_seen)
        # every rank scores the whole (small) tuning split, so plateau and early-stopping decisions agree
        tuning = tuning_scores(model, data["tuning"], cfg, device, scaling)
        scheduler.step(tuning[metric])
        improved = early.step(tuning[metric])
        record = {"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1),
                  **{f"tuning_{k}": v for k, v in tuning.items()}, "lr": optimizer.param_groups[0]["lr"],
                  "best": improved, "seconds": round(time.time() - started, 2)}
        # metrics first: a kill between the two leaves a record the resumed run drops and rewrites, never a
        # checkpoint whose epoch is missing from metrics.jsonl
        writer.write(record)
        ckpts.save(model, capture_train_state(epoch, optimizer, scheduler, early), epoch, is_best=improved,
                   meta={"tuning": tuning, "model_type": cfg.model.type})
        log.info("epoch %d train_loss %.4f tuning %s%s", epoch, record["train_loss"],
                 {k: round(v, 4) for k, v in tuning.items()}, " *" if improved else "")
        if on_epoch is not None:
            on_epoch(epoch, tuning.get("auroc"))
    writer.close(hparams=cfg)

    if not dist_info.is_main:
        cleanup_distributed()
        return {}
    # threshold on tuning from the best checkpoint, then the held-out score (main process only)
    load_weights(ckpts.best, model)
    if not regression:  # regression has no threshold: evaluate reads reports/target_scaling.json
        write_json(run_dir / "reports" / "threshold.json",
                   tuning_thresholds(model, data["tuning"], tc.eval_batch_size, device, multilabel))
    report = evaluate(cfg, "held_out") if held_out else {}
    cleanup_distributed()
    return report


def tuning_thresholds(model, tuning, batch_size: int, device, multilabel: bool) -> dict:
    """reports/threshold.json: the F1-best threshold on tuning (binary), one per task on its labelled tuning rows
    (multi-label), or none to choose (multi-class predicts the argmax class)."""
    if multilabel:
        probs, y, _ = predict_multilabel(model, tuning, batch_size, device)
        chosen = {t: choose_threshold(y[y[:, k] >= 0, k], probs[y[:, k] >= 0, k])
                  for k, t in enumerate(tuning.store.task_names)}
        return {"threshold": None, "thresholds": chosen, "chosen_on": "tuning", "criterion": "max F1 per task"}
    probs, y, _ = predict_probs(model, tuning, batch_size, device)
    if probs.shape[1] == 2:
        return {"threshold": choose_threshold(y, probs[:, 1]), "chosen_on": "tuning", "criterion": "max F1"}
    return {"threshold": DEFAULT_THRESHOLD, "chosen_on": None, "criterion": "argmax (multi-class)"}


def run(cfg: TrainConfig) -> int:
    if cfg.training.task != "classification":
        raise UserError("finetune needs training.task=classification; next-event pretraining is "
                        "`python -m ehr_embedded.pretrain`")
    finetune(cfg)
    return 0


main = config_main(TrainConfig, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
