"""The regressor training loop shared by train_dual (company + model-type embeddings) and train_regression (one
embedding, the baseline), and the held-out report both write.

The loop, per epoch (1-based; the unfreezing epochs of the config are 0-based like the original's "epoch 0-20"):
stage 0 trains the fusion and heads on frozen embedding models (and a frozen visual backbone when
`visual.frozen_in_stage0`); stage 1, from `unfreeze_half_epoch`, also the last half of each embedding model's
blocks; stage 2, from `unfreeze_all_epoch`, everything. While every feature extractor is frozen and augmentation is
off their features are computed once per stage and reused (`regression.cache_features`), which changes no number:
the frozen parts run in eval mode and draw no random numbers. Micro-batches accumulate `grad_accum` times per
optimizer step; autocast follows run.amp; under torchrun the model is DDP-wrapped (re-wrapped when the set of
trainable parameters changes, as DDP fixes it at construction).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import metrics
from common.checkpoint import CheckpointManager, capture_train_state, load_checkpoint, read_meta, resume_from_checkpoint
from common.distributed import all_reduce_sum, cleanup_distributed, wrap_ddp
from common.errors import UserError
from common.io import atomic_write_text, write_json
from common.logs import MetricsWriter, progress
from common.runs import open_run
from common.seed import seed_everything
from common.training import EarlyStopping, cosine_with_warmup
from implant_dims.config import ImplantConfig
from implant_dims.data import ImplantDataset, ImplantRecord, check_class_lists, class_list
from implant_dims.engine import Runtime, collate, epoch_batches, scatter_plot, start_runtime
from implant_dims.models import ImplantRegressor, build_vit, mc_dropout_predict
from implant_dims.stage_setup import (
    autocast,
    build_classifier_from_meta,
    class_indices,
    classifier_checkpoint,
    load_classifier,
    load_split,
    log_skipped,
    optional_splits,
    read_classifier,
    set_threads,
    stage_fingerprint,
    vit_spec,
)

log = logging.getLogger(__name__)
DIMS = ("length", "diameter")


def stage_for(epoch: int, cfg: ImplantConfig) -> int:
    """Unfreezing stage of 1-based `epoch` (the config's epochs are 0-based: epoch 1 is the original's epoch 0)."""
    rc = cfg.regression
    zero_based = epoch - 1
    return 2 if zero_based >= rc.unfreeze_all_epoch else 1 if zero_based >= rc.unfreeze_half_epoch else 0


class _Step(torch.nn.Module):
    """One module for DDP to wrap: runs the regressor from images, or from cached features."""

    def __init__(self, model: ImplantRegressor) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor | None = None, feats: dict | None = None) -> dict:
        return self.model.forward_features(feats) if feats is not None else self.model(images)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
                    dim_weights: torch.Tensor | list[float] | tuple[float, ...] = (1.0, 1.0)) -> torch.Tensor:
    """sum_d w_d * mean_b rho(pred[b, d] - target[b, d]) / sum_d w_d for [B, 2] (length, diameter) in one space
    (standardised or mm, see `loss_inputs`); rho is |e| (l1), e^2 (mse) or smooth L1 with beta 0.5 in that space's
    units. Equal weights give the plain mean over every element."""
    weights = torch.as_tensor(dim_weights, dtype=pred.dtype, device=pred.device)
    if kind == "l1":
        per_element = F.l1_loss(pred, target, reduction="none")
    elif kind == "mse":
        per_element = F.mse_loss(pred, target, reduction="none")
    else:
        per_element = F.smooth_l1_loss(pred, target, beta=0.5, reduction="none")
    return (per_element.mean(0) * weights).sum() / weights.sum()


def loss_inputs(out: dict, target_mm: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, space: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) [B, 2] in the loss space: standardised compares (y - mean) / std, which weighs a mm of
    each dimension by 1 / its training std (a mm of diameter ~4x a mm of length on the sample data); mm compares
    millimetres, so regression.dim_weights alone say what each dimension is worth."""
    if space == "mm":
        return out["pred_std"].float() * std + mean, target_mm
    return out["pred_std"].float(), (target_mm - mean) / std


def read_classifiers(cfg: ImplantConfig, embedder_names: tuple[str, ...], train_records: list[ImplantRecord]
                     ) -> dict[str, tuple[Path, dict, str]]:
    """name -> (checkpoint, meta, weights SHA-256) of each classifier the regressor builds on, read without loading
    weights (cheap enough for the resume guard). Refuses a classifier whose class list misses a company or model type
    of the training data."""
    classifiers = {}
    for name in embedder_names:
        ckpt, meta, sha = read_classifier(classifier_checkpoint(cfg, name), name)
        check_class_lists(meta["classes"], class_list(train_records, name), name, str(ckpt))
        check_img_size(cfg, meta, ckpt, name)
        classifiers[name] = (ckpt, meta, sha)
    if cfg.visual.init != "scratch" and cfg.visual.init not in classifiers:
        ckpt, meta, _ = read_classifier(classifier_checkpoint(cfg, cfg.visual.init), cfg.visual.init)
        check_img_size(cfg, meta, ckpt, cfg.visual.init)
    return classifiers


def check_img_size(cfg: ImplantConfig, meta: dict, ckpt: Path, name: str) -> None:
    """A classifier embeds images of the side it was trained at (its position embeddings fix the patch grid), and
    reads sizes at the pixel scale it was trained at."""
    trained = int(meta["vit"]["img_size"])
    if trained != cfg.data.img_size:
        raise UserError(f"data.img_size={cfg.data.img_size} but the {name} classifier {ckpt} was trained at "
                        f"{trained} px; set data.img_size={trained} or retrain the classifiers at "
                        f"{cfg.data.img_size} px")
    scale = meta.get("mm_per_pixel")  # absent in checkpoints from before inputs had one scale
    if scale is not None and abs(float(scale) - cfg.data.input_mm_per_pixel()) > 1e-9 * float(scale):
        raise UserError(f"data.mm_per_pixel: the input scale here is {cfg.data.input_mm_per_pixel():.6g} mm per "
                        f"pixel but the {name} classifier {ckpt} was trained at {float(scale):.6g}; set "
                        f"data.mm_per_pixel={float(scale):.6g} or retrain the classifiers at this scale")


def build_regressor(cfg: ImplantConfig, attention_type: str, train_records: list[ImplantRecord],
                    classifiers: dict[str, tuple[Path, dict, str]]) -> tuple[ImplantRegressor, dict]:
    """The regressor on the trained classifiers (from read_classifiers): (model, the meta a checkpoint records to
    rebuild it)."""
    rc = cfg.regression
    embedders = {name: load_classifier(ckpt, name) for name, (ckpt, _, _) in classifiers.items()}
    if cfg.visual.init == "scratch":
        visual_spec = vit_spec(cfg.visual.vit, cfg.data.img_size)
        visual = build_vit(visual_spec)
    else:  # start from a trained classifier's backbone (no pretrained image weights can be had here)
        source = embedders.get(cfg.visual.init)
        if source is None:
            source = load_classifier(classifier_checkpoint(cfg, cfg.visual.init), cfg.visual.init)
        visual = copy.deepcopy(source.backbone)
        visual_spec = source.spec
    thread_classes = class_list(train_records, "thread_type") if rc.aux_thread_weight > 0 else []
    model = ImplantRegressor(embedders, visual, attention_type=attention_type, fusion_dim=rc.fusion_dim,
                             head_hidden=rc.head_hidden, dropout=rc.dropout, n_thread_classes=len(thread_classes))
    targets = np.array([[r.length, r.diameter] for r in train_records], dtype=np.float64)
    model.set_target_stats(torch.tensor(targets.mean(0), dtype=torch.float32),
                           torch.tensor(targets.std(0) + 1e-6, dtype=torch.float32))
    meta = {"kind": "regressor", "attention_type": attention_type,
            "embedders": {name: meta for name, (_, meta, _) in classifiers.items()},
            "visual_spec": {**dataclasses.asdict(visual_spec), "weights": ""}, "fusion_dim": rc.fusion_dim,
            "head_hidden": rc.head_hidden, "dropout": rc.dropout, "thread_classes": thread_classes,
            "img_size": cfg.data.img_size, "mm_per_pixel": cfg.data.input_mm_per_pixel()}
    return model, meta


def regressor_from_checkpoint(path: str | Path) -> tuple[ImplantRegressor, dict]:
    """Rebuild a trained regressor from its checkpoint alone (meta.json holds every shape)."""
    meta = read_meta(path)
    if meta.get("kind") != "regressor":
        raise UserError(f"{path}: not a regressor checkpoint (kind={meta.get('kind')!r}); use "
                        f"<run>/<regression.out_subdir>/checkpoints/best")
    from implant_dims.models import VitSpec

    embedders = {n: build_classifier_from_meta(m) for n, m in meta["embedders"].items()}
    model = ImplantRegressor(embedders, build_vit(VitSpec(**meta["visual_spec"])),
                             attention_type=meta["attention_type"], fusion_dim=meta["fusion_dim"],
                             head_hidden=meta["head_hidden"], dropout=meta["dropout"],
                             n_thread_classes=len(meta["thread_classes"]))
    load_checkpoint(path, model)
    model.eval()
    return model, meta


def make_dataset(records: list[ImplantRecord], meta_or_classes: dict, img_size: int, augment: bool = False,
                 seed: int = 0) -> ImplantDataset:
    embedders = meta_or_classes["embedders"]
    company = embedders["company"]["classes"] if "company" in embedders else []
    model_type = embedders["model_type"]["classes"] if "model_type" in embedders else []
    # the input scale the regressor was trained at (meta of checkpoints from before it was recorded: the default)
    return ImplantDataset(records, img_size, company, model_type, meta_or_classes.get("thread_classes") or None,
                          augment=augment, seed=seed, mm_per_pixel=float(meta_or_classes.get("mm_per_pixel", 0.0)))


@torch.no_grad()
def compute_features(model: ImplantRegressor, dataset: ImplantDataset, rt: Runtime, batch_size: int = 128
                     ) -> dict[str, torch.Tensor]:
    """The feature extractors' outputs for every image (in dataset order), on the training device."""
    parts: dict[str, list[torch.Tensor]] = {}
    for idx in epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False):
        batch = collate(dataset, idx, rt.device)
        with autocast(rt.device, rt.amp_dtype):
            feats = model.features(batch["image"])
        for k, v in feats.items():
            parts.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in parts.items()}


def feature_cache(model: ImplantRegressor, train_set: ImplantDataset, val_set: ImplantDataset,
                  thread_classes: list[str], rt: Runtime) -> dict:
    """What `run_epoch` and `predict_dataset` reuse while every feature extractor is frozen: the features of the
    train and val sets ("train", "val") and the training targets and thread-type indices ("train_target",
    "train_thread"), all on the training device."""
    return {"train": compute_features(model, train_set, rt), "val": compute_features(model, val_set, rt),
            "train_target": torch.tensor(train_set.targets, dtype=torch.float32, device=rt.device),
            "train_thread": torch.as_tensor(class_indices(train_set.records, "thread_type", thread_classes),
                                            device=rt.device)}


@torch.no_grad()
def predict_batch(model: ImplantRegressor, rt: Runtime, images: torch.Tensor | None = None,
                  feats: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """One batch of a model in eval mode, from images [B, 1, H, W] or from their `features()`: {"pred_mm": [B, 2],
    "logits_<embedder>": [B, n_classes] for each embedder (its classifier head, for catalogue snapping)}."""
    if feats is None:
        with autocast(rt.device, rt.amp_dtype):
            feats = model.features(images)
        feats = {k: v.float() for k, v in feats.items()}
    out = {"pred_mm": model.forward_features(feats)["pred_mm"].float().cpu().numpy()}
    for n, emb in model.embedders.items():
        out[f"logits_{n}"] = emb.classifier(feats[n]).float().cpu().numpy()
    return out


def concat_batches(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def predict_dataset(model: ImplantRegressor, dataset: ImplantDataset, rt: Runtime, feats: dict | None = None,
                    batch_size: int = 128) -> dict[str, np.ndarray]:
    """Deterministic (eval-mode) predictions in mm, with the embedders' class logits for catalogue snapping."""
    was_training = model.training
    model.eval()
    parts = []
    for idx in epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False):
        if feats is not None:
            parts.append(predict_batch(model, rt, feats={k: v[torch.as_tensor(idx, device=v.device)]
                                                          for k, v in feats.items()}))
        else:
            parts.append(predict_batch(model, rt, images=collate(dataset, idx, rt.device)["image"]))
    model.train(was_training)
    return concat_batches(parts)


def mae_report(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = np.abs(true - pred)
    return {"length_mae": float(err[:, 0].mean()), "diameter_mae": float(err[:, 1].mean()),
            "mean_mae": float(err.mean())}


def train_regressor(cfg: ImplantConfig, embedder_names: tuple[str, ...], attention_type: str, out: Path,
                    epoch_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train one regressor into `out`; returns the best checkpoint's validation report (HPO minimises its
    mean_mae). `epoch_callback(epoch, val_metrics)` runs after each epoch's checkpoint (HPO pruning raises there)."""
    set_threads(cfg)
    rc = cfg.regression
    rt = start_runtime(cfg)
    train_records, train_skipped = load_split(cfg, "train")
    val_records, val_skipped = load_split(cfg, "val")
    classifiers = read_classifiers(cfg, embedder_names, train_records)
    digests = {f"classifier_{name}": sha for name, (_, _, sha) in classifiers.items()}
    fingerprint = stage_fingerprint(cfg, ("regression", "visual"), {"train": train_records, "val": val_records},
                                    digests={**digests, "embedders": ",".join(embedder_names),
                                             "attention": attention_type})
    start = open_run(out, cfg, resume=rc.resume, checkpoint_dirs=[out / "checkpoints"], fingerprint=fingerprint,
                     is_main=rt.is_main, resume_key="regression.resume")
    log_skipped(cfg, {"train": (train_records, train_skipped), "val": (val_records, val_skipped)})
    seed_everything(cfg.run.seed)  # the fresh modules' initial weights come from run.seed alone
    model, meta = build_regressor(cfg, attention_type, train_records, classifiers)
    model.to(rt.device)
    train_set = make_dataset(train_records, meta, cfg.data.img_size, rc.augment, cfg.run.seed)
    val_set = make_dataset(val_records, meta, cfg.data.img_size)
    target_mean, target_std = model.target_mean, model.target_std
    log.info("regressor %s (%s): %d train / %d val images, target mean %s std %s, %.2fM parameters, device %s",
             attention_type, "+".join(embedder_names), len(train_set), len(val_set),
             np.round(target_mean.cpu().numpy(), 3), np.round(target_std.cpu().numpy(), 3),
             sum(p.numel() for p in model.parameters()) / 1e6, rt.device)

    optimizer = torch.optim.AdamW(model.param_groups(rc.lr, rc.embedder_lr_mult, rc.visual_lr_mult,
                                                     rc.weight_decay), lr=rc.lr)
    micro = len(epoch_batches(len(train_set), rc.batch_size, 0, 0, rank=rt.dist.rank, world_size=rt.dist.world_size))
    steps = math.ceil(micro / rc.grad_accum)
    scheduler = cosine_with_warmup(optimizer, rc.warmup_epochs * steps, rc.epochs * steps)
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)
    stopper = EarlyStopping(rc.patience, mode="min")
    manager = CheckpointManager(out / "checkpoints", fingerprint=start.fingerprint)
    resumed = resume_from_checkpoint(manager, start.resume, model, optimizer, scheduler, stopper, scaler)
    start_epoch = 1 if resumed is None else int(resumed["epoch"]) + 1
    if resumed is not None:
        log.info("resumed from %s at epoch %d", resumed["_resumed_from"], start_epoch)
    writer = MetricsWriter(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if resumed else None,
                           tensorboard=cfg.run.tensorboard, tensorboard_key="run.tensorboard") if rt.is_main else None

    current_stage, step_module, cache = None, None, None
    best: dict = {}
    for epoch in progress(range(start_epoch, rc.epochs + 1), desc="regressor epochs"):
        stage = stage_for(epoch, cfg)
        if stopper.should_stop and stage == 2 and epoch - 1 >= rc.unfreeze_all_epoch + rc.patience:
            break
        started = time.time()
        if stage != current_stage:
            model.set_stage(stage, rc.unfreeze_fraction, cfg.visual.frozen_in_stage0)
            step_module = wrap_ddp(_Step(model), rt.dist, find_unused_parameters=True)
            use_cache = rc.cache_features and not rc.augment and model.frozen_feature_parts
            cache = None
            if use_cache:
                cache = feature_cache(model, train_set, val_set, meta["thread_classes"], rt)
            log.info("epoch %d: unfreezing stage %d (%d trainable parameters)%s", epoch, stage,
                     sum(p.numel() for p in model.parameters() if p.requires_grad),
                     ", features cached" if cache else "")
            current_stage = stage
        train_set.set_epoch(epoch)
        model.train()
        loss_sum, seen = run_epoch(model, step_module, train_set, cache, optimizer, scheduler, scaler, cfg, rt, epoch,
                                   writer)
        val = mae_report(val_set.targets, predict_dataset(model, val_set, rt, cache["val"] if cache else None)["pred_mm"])
        improved = stopper.step(val["mean_mae"])
        if improved:
            best = {"epoch": epoch, **val}
        record = {"epoch": epoch, "stage": stage, "train_loss": loss_sum / max(seen, 1),
                  **{f"val_{k}": v for k, v in val.items()}, "lr": scheduler.get_last_lr()[0], "best": improved,
                  "cached_features": cache is not None, "seconds": round(time.time() - started, 2)}
        if writer is not None:
            writer.write(record)  # before the checkpoint: a kill between leaves a line the resume rewrites
        manager.save(model, capture_train_state(epoch, optimizer, scheduler, stopper, scaler, best=best), epoch,
                     is_best=improved, meta={**meta, "val": val})
        log.info("epoch %d stage %d: loss %.4f val length %.3f diameter %.3f mean %.3f mm%s", epoch, stage,
                 record["train_loss"], val["length_mae"], val["diameter_mae"], val["mean_mae"],
                 " *" if improved else "")
        if epoch_callback is not None:
            epoch_callback(epoch, val)
    if writer is not None:
        writer.close(hparams=cfg)
    results = report_regressor(cfg, out, rt, train_records, val_set) if rt.is_main else {}
    cleanup_distributed()
    return results.get("val", best)


def run_epoch(model, step_module, dataset, cache, optimizer, scheduler, scaler, cfg: ImplantConfig, rt: Runtime,
              epoch: int, writer: MetricsWriter | None = None) -> tuple[float, int]:
    """One pass over this rank's share of the training set with gradient accumulation; `writer` gets each optimizer
    step's loss (the mean over its micro-batches on this rank) through MetricsWriter.step."""
    rc = cfg.regression
    batches = epoch_batches(len(dataset), rc.batch_size, cfg.run.seed, epoch, rank=rt.dist.rank,
                            world_size=rt.dist.world_size)
    mean, std = model.target_mean, model.target_std
    steps = math.ceil(len(batches) / rc.grad_accum)
    loss_sum, seen, step_sum, step_seen = 0.0, 0, 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for i, idx in enumerate(batches):
        if cache is not None:
            index = torch.as_tensor(idx, device=rt.device)
            feats = {k: v[index] for k, v in cache["train"].items()}
            batch = {"target": cache["train_target"][index], "thread_type": cache["train_thread"][index]}
            images = None
        else:
            batch = collate(dataset, idx, rt.device)
            feats, images = None, batch["image"]
        last_of_step = (i + 1) % rc.grad_accum == 0 or i + 1 == len(batches)
        sync = step_module.no_sync() if (hasattr(step_module, "no_sync") and not last_of_step) else contextlib.nullcontext()
        with sync, autocast(rt.device, rt.amp_dtype):
            out = step_module(images=images, feats=feats)
            loss = regression_loss(*loss_inputs(out, batch["target"], mean, std, rc.loss_space), rc.loss,
                                   rc.dim_weights)
            if "thread_logits" in out and rc.aux_thread_weight > 0:
                thread = batch["thread_type"]
                if (thread >= 0).any():
                    loss = loss + rc.aux_thread_weight * F.cross_entropy(out["thread_logits"].float(), thread,
                                                                         ignore_index=-1)
            scaler.scale(loss / rc.grad_accum).backward()
        if last_of_step:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        loss_sum += loss_value * len(idx)
        seen += len(idx)
        step_sum, step_seen = step_sum + loss_value * len(idx), step_seen + len(idx)
        if last_of_step:
            if writer is not None:
                writer.step(epoch, i // rc.grad_accum, steps, {"train_loss": step_sum / max(step_seen, 1),
                                                               "lr": scheduler.get_last_lr()[0]})
            step_sum, step_seen = 0.0, 0
    return float(all_reduce_sum(loss_sum)), int(all_reduce_sum(seen))


# ---------------------------------------------------------------------------------------------------------------
# held-out report


def z_for(coverage: float) -> float:
    """z of a central normal interval: mean ± z * std holds `coverage` (0 < coverage < 1) of N(mean, std)."""
    if not 0 < coverage < 1:
        raise ValueError(f"interval coverage must lie strictly between 0 and 1, got {coverage}")
    from scipy.stats import norm

    return float(norm.ppf(0.5 + coverage / 2))


def interval_half_width(std: np.ndarray, coverage: float, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Half width (mm) of the `coverage` interval mean ± z * std * scale; std [N, 2] from Monte Carlo dropout, scale
    per dimension (the factor fitted on validation data, 1 = the raw dropout spread)."""
    return z_for(coverage) * np.asarray(std, dtype=np.float64) * scale


def fit_std_scale(true: np.ndarray, mean: np.ndarray, std: np.ndarray, coverage: float) -> np.ndarray:
    """The per-dimension factor on std that makes mean ± z * std * factor cover `coverage` of these rows (the
    `coverage` quantile of |true - mean| / std, over z); fitted on val, applied to every split and to predict."""
    ratio = np.abs(true - mean) / np.maximum(std, 1e-6)
    return np.quantile(ratio, coverage, axis=0) / z_for(coverage)


def interval_coverage(true: np.ndarray, mean: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Share of rows per dimension whose true value lies in mean ± half_width."""
    return (np.abs(true - mean) <= half_width).mean(0)


def load_catalogue(path: str | Path) -> dict[tuple[str, str], np.ndarray]:
    """(company, model_type) -> [K, 2] catalogue sizes (length, diameter) from a CSV with those four columns."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"data.catalogue_csv: cannot read {path} ({exc})") from exc
    missing = {"company", "model_type", "length", "diameter"} - set(frame.columns)
    if missing:
        raise UserError(f"{path}: catalogue lacks column(s) {sorted(missing)}; it needs company, model_type, "
                        f"length, diameter")
    out: dict[tuple[str, str], np.ndarray] = {}
    for (company, model_type), rows in frame.groupby(["company", "model_type"]):
        out[(str(company), str(model_type))] = rows[["length", "diameter"]].to_numpy(np.float64)
    return out


def snap(pred: np.ndarray, keys: list[tuple[str | None, str | None]], catalogue: dict, scale: np.ndarray
         ) -> np.ndarray:
    """Nearest catalogue size (distance in units of the training std per dimension) among the sizes of each
    prediction's (company, model type); a None part matches every value ((None, None): the whole catalogue), and a
    combination the catalogue does not list falls back to the whole catalogue. `snap_keys` turns a
    regression.snap rule into these keys."""
    everything = np.unique(np.concatenate(list(catalogue.values())), axis=0)
    out = np.empty(pred.shape, dtype=np.float64)  # catalogue sizes exactly (pred may be float32)
    for i, (p, (company, model_type)) in enumerate(zip(pred, keys)):
        matches = [sizes for (c, m), sizes in catalogue.items()
                   if company in (None, c) and model_type in (None, m)]
        options = np.concatenate(matches) if matches else everything
        out[i] = options[np.argmin((((options - p) / scale) ** 2).sum(1))]
    return out


def report_regressor(cfg: ImplantConfig, out: Path, rt: Runtime, train_records: list[ImplantRecord],
                     val_set: ImplantDataset) -> dict:
    """The best checkpoint on val and each held-out split: MAE per dimension with group-bootstrap intervals beside
    the mean- and median-predictor baselines, Monte Carlo dropout interval coverage (raw, and with the std scale
    fitted on val), catalogue snapping, the predicted-vs-true plot; reports/results_<split>.json + results.json.
    `train_records` and `val_set` are the ones training used (not read or decoded again)."""
    rc = cfg.regression
    best = out / "checkpoints" / "best"
    model, meta = regressor_from_checkpoint(best)
    model.to(rt.device)
    train_targets = np.array([[r.length, r.diameter] for r in train_records])
    mean_pred, median_pred = train_targets.mean(0), np.median(train_targets, 0)
    catalogue = load_catalogue(cfg.data.catalogue_csv) if cfg.data.catalogue_csv else None
    summary: dict = {"checkpoint": str(best), "attention_type": meta["attention_type"],
                     "embedders": list(meta["embedders"]), "interval": rc.interval, "splits": {}}
    # one snapping rule for every split (and for predict, which reads it back from results_val.json)
    train_scale = train_targets.std(0)
    snap_rule: dict = {"mode": rc.snap, "min_prob": None if rc.snap == "catalogue" else rc.snap_min_prob,
                       "min_prob_from": "config" if rc.snap == "predicted_class" else None}
    val_scale = None
    for split in ["val", *optional_splits(cfg)]:
        if split == "val":
            records, dataset = val_set.records, val_set
        else:
            records = load_split(cfg, split)[0]
            dataset = make_dataset(records, meta, cfg.data.img_size)
        true = dataset.targets
        det = predict_dataset(model, dataset, rt)
        pred = det["pred_mm"]
        rep = {"split": split, "n": len(records), **mae_report(true, pred)}
        for name, constant in (("mean", mean_pred), ("median", median_pred)):
            base = mae_report(true, np.broadcast_to(constant, true.shape))
            rep.update({f"{name}_baseline_{k}": v for k, v in base.items()})
        rep["mae_ratio_to_mean_baseline"] = rep["mean_mae"] / rep["mean_baseline_mean_mae"]
        groups = [r.group if r.group is not None else str(r.index) for r in records]
        for k, dim in enumerate(DIMS):
            rep[f"{dim}_mae_ci95"] = list(metrics.grouped_mean_bootstrap_ci(
                np.abs(true[:, k] - pred[:, k]), np.asarray(groups, dtype=str), seed=cfg.run.seed))
        if rc.mc_samples > 0:
            mc_mean, mc_std = mc_on_dataset(model, dataset, rt, rc.mc_samples, cfg.run.seed)
            if split == "val":  # the std multiplier that gives nominal coverage on val, applied to every split
                val_scale = fit_std_scale(true, mc_mean, mc_std, rc.interval)
            half = interval_half_width(mc_std, rc.interval)
            rep.update({"mc_samples": rc.mc_samples, "mc_mean_std_mm": mc_std.mean(0).tolist(),
                        "mc_mae": mae_report(true, mc_mean),
                        "interval_coverage_raw": interval_coverage(true, mc_mean, half).tolist(),
                        "interval_width_raw_mm": (2 * half).mean(0).tolist()})
            if val_scale is not None:
                half = interval_half_width(mc_std, rc.interval, val_scale)
                rep.update({"std_scale_fitted_on_val": val_scale.tolist(),
                            "interval_coverage_calibrated": interval_coverage(true, mc_mean, half).tolist(),
                            "interval_width_calibrated_mm": (2 * half).mean(0).tolist()})
        snapped = None
        if catalogue is not None:
            keys, probs = predicted_keys(det, meta, records), class_probabilities(det, meta)
            if split == "val" and rc.snap == "predicted_class" and rc.snap_min_prob == -1:
                snap_rule["min_prob"] = choose_snap_threshold(true, pred, keys, probs, catalogue, train_scale)
                snap_rule["min_prob_from"] = "chosen on val"
            snapped = snap(pred, snap_keys(keys, probs, rc.snap, snap_rule["min_prob"]), catalogue, train_scale)
            exact = np.isclose(snapped, true, atol=1e-6)
            rep.update({"snapped": mae_report(true, snapped), "snap_rule": dict(snap_rule),
                        "exact_size_accuracy": float(exact.all(1).mean()),
                        "exact_length_accuracy": float(exact[:, 0].mean()),
                        "exact_diameter_accuracy": float(exact[:, 1].mean())})
        for name in meta["embedders"]:
            labels = class_indices(records, name, meta["embedders"][name]["classes"])
            if (labels >= 0).any():
                rep[f"{name}_accuracy"] = float((det[f"logits_{name}"].argmax(1) == labels)[labels >= 0].mean())
        write_json(out / "reports" / f"results_{split}.json", rep)
        write_predictions(out / "reports" / f"predictions_{split}.csv", records, true, pred, snapped)
        scatter_plot(true, pred, DIMS, out / "reports" / f"pred_vs_true_{split}.png",
                     f"{meta['attention_type']} ({'+'.join(meta['embedders'])}), {split}")
        log.info("%s: length MAE %.3f diameter MAE %.3f mean %.3f mm (mean-predictor %.3f, ratio %.2f)", split,
                 rep["length_mae"], rep["diameter_mae"], rep["mean_mae"], rep["mean_baseline_mean_mae"],
                 rep["mae_ratio_to_mean_baseline"])
        summary["splits"][split] = rep
    if catalogue is not None:
        summary["snap_rule"] = snap_rule
    write_json(out / "reports" / "results.json", summary)
    return summary["splits"]


def write_predictions(path: Path, records: list[ImplantRecord], true: np.ndarray, pred: np.ndarray,
                      snapped: np.ndarray | None = None) -> None:
    """Per-image predictions of a report split (what the compare study pairs across models); with `snapped`, also
    the catalogue size each was snapped to under the run's regression.snap rule."""
    header = "image_path,group,length_true,diameter_true,length_pred,diameter_pred"
    lines = [header + (",length_snapped,diameter_snapped" if snapped is not None else "")]
    for i, (r, t, p) in enumerate(zip(records, true, pred)):
        line = (f"{r.image_path},{r.group if r.group is not None else r.index},{t[0]:.4f},{t[1]:.4f},"
                f"{p[0]:.4f},{p[1]:.4f}")
        lines.append(line + (f",{snapped[i, 0]:.4f},{snapped[i, 1]:.4f}" if snapped is not None else ""))
    atomic_write_text(path, "\n".join(lines) + "\n")


def class_probabilities(det: dict, meta: dict) -> dict[str, np.ndarray]:
    """embedder name -> [N] softmax probability of the class its head reads (the argmax)."""
    out = {}
    for name in meta["embedders"]:
        logits = np.asarray(det[f"logits_{name}"], dtype=np.float64)
        logits = logits - logits.max(1, keepdims=True)
        out[name] = 1.0 / np.exp(logits).sum(1)  # exp(max - max) / sum
    return out


def snap_keys(keys: list[tuple[str | None, str | None]], probs: dict[str, np.ndarray], mode: str,
              min_prob: float) -> list[tuple[str | None, str | None]]:
    """The (company, model type) keys `snap` narrows to under a regression.snap rule: catalogue -> (None, None) for
    every row (the whole catalogue); predicted_class -> each part of the heads' reading kept only where that head's
    probability is above `min_prob`, else None (any value), so an unsure head cannot lock the size into the wrong
    class's sizes."""
    if mode == "catalogue":
        return [(None, None)] * len(keys)
    out = []
    for i, (company, model_type) in enumerate(keys):
        if company is not None and not probs["company"][i] > min_prob:
            company = None
        if model_type is not None and not probs["model_type"][i] > min_prob:
            model_type = None
        out.append((company, model_type))
    return out


def choose_snap_threshold(true: np.ndarray, pred: np.ndarray, keys: list[tuple[str | None, str | None]],
                          probs: dict[str, np.ndarray], catalogue: dict, scale: np.ndarray) -> float:
    """regression.snap_min_prob chosen on validation rows: among 0, 1 and every head probability seen, the value
    whose predicted_class snap has the lowest mean |snapped - true| (mm, both dimensions); ties go to the highest
    (the fewest rows narrowed to a class, the nearest to the whole-catalogue rule)."""
    candidates = np.unique(np.concatenate([[0.0, 1.0], *[np.asarray(p, dtype=np.float64) for p in probs.values()]]))
    best, best_err = 1.0, float("inf")
    for t in candidates[::-1]:  # high to low: a tie keeps the higher one
        snapped = snap(pred, snap_keys(keys, probs, "predicted_class", float(t)), catalogue, scale)
        err = float(np.abs(snapped - true).mean())
        if err < best_err - 1e-12:
            best, best_err = float(t), err
    return best


def predicted_keys(det: dict, meta: dict, records: list[ImplantRecord]) -> list[tuple[str | None, str | None]]:
    """(company, model type) per image as the regressor's own classifier heads read them; None for the one a
    single-embedding regressor lacks (never the record's label: snapping must not see the answer)."""
    names = {n: m["classes"] for n, m in meta["embedders"].items()}
    keys: list[tuple[str | None, str | None]] = []
    for i in range(len(records)):
        company = names["company"][int(det["logits_company"][i].argmax())] if "company" in names else None
        model_type = (names["model_type"][int(det["logits_model_type"][i].argmax())] if "model_type" in names
                      else None)
        keys.append((company, model_type))
    return keys


def mc_on_dataset(model: ImplantRegressor, dataset: ImplantDataset, rt: Runtime, n_samples: int, seed: int,
                  batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo dropout mean and std (mm) per image, in dataset order (reports and predict)."""
    means, stds = [], []
    for idx in epoch_batches(len(dataset), batch_size, 0, 0, shuffle=False):
        images = collate(dataset, idx, rt.device)["image"]
        mean, std = mc_dropout_predict(model, images, n_samples=n_samples, generator_seed=seed)
        means.append(mean.float().cpu().numpy())
        stds.append(std.float().cpu().numpy())
    return np.concatenate(means), np.concatenate(stds)
