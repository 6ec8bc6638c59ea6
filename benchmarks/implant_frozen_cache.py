"""Head-only (stage 0) regressor epochs with the frozen feature extractors' outputs cached, against recomputing the
three ViTs (visual + company + model-type embedders) on every batch, in one process, same model, same seed.

    python benchmarks/implant_frozen_cache.py                          # 512 train / 128 val images at 64 px, 1 thread
    python benchmarks/implant_frozen_cache.py --threads 2 --epochs 3
    python benchmarks/implant_frozen_cache.py --images 128 --epochs 2  # a quick look

Setup (not timed): a synthetic data set (implant_dims.sample_data.make_dataset, rendered at --img-size so no
resize) in a temp dir; an ImplantRegressor with random weights at the --config sizes (sample.yaml: tiny ViTs
64-d, 3 blocks, patch 8 for the two EmbeddingClassifiers and the visual backbone), set_stage(0) with the visual
backbone frozen (visual.frozen_in_stage0), so `frozen_feature_parts` holds.
Both ways run the training loop's own code, implant_dims.regression: per epoch `run_epoch` (AdamW over
`param_groups`, cosine schedule, grad clipping) then `predict_dataset` on val, as `train_regressor` does.
  recompute  cache None: every batch runs `features()` on its images (regression.cache_features=false);
  cached     `feature_cache` once (train + val features, counted in the cached time), then the head on cached rows.
Ratios: per epoch (mean epoch time, recompute / cached, the one-off feature pass excluded) and over n epochs
(recompute total / (feature pass + cached total)) for n = 1, 3 and --epochs (the sample config trains 15 head-only
epochs). Equality: the per-batch training losses, head outputs, epoch losses, val predictions and final weights of
the two ways; max abs diff must be <= --tol (exit 1 otherwise). Goal from the issue: >= 5x, identical losses.
Writes --out (JSON: timings, ratios, diffs, threads, sizes, CPU).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from common.io import write_json  # noqa: E402
from common.seed import seed_everything  # noqa: E402
from common.training import cosine_with_warmup  # noqa: E402
from implant_dims.config import ImplantConfig  # noqa: E402
from implant_dims.data import class_list, load_records  # noqa: E402
from implant_dims.engine import epoch_batches, start_runtime  # noqa: E402
from implant_dims.models import EmbeddingClassifier, ImplantRegressor, build_vit  # noqa: E402
from implant_dims.regression import (  # noqa: E402
    _Step,
    feature_cache,
    make_dataset,
    predict_dataset,
    regression_loss,
    run_epoch,
)
from implant_dims.sample_data import make_dataset as make_sample_data  # noqa: E402
from implant_dims.stage_setup import vit_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL = 5.0


class Recorder(torch.nn.Module):
    """The step module `run_epoch` calls, passing through to regression._Step and keeping each batch's pred_std."""

    def __init__(self, step: torch.nn.Module) -> None:
        super().__init__()
        self.step = step
        self.outputs: list[torch.Tensor] = []

    def forward(self, images=None, feats=None) -> dict:
        out = self.step(images=images, feats=feats)
        self.outputs.append(out["pred_std"].detach().float().cpu().clone())
        return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(args: argparse.Namespace, data: Path):
    overrides = [f"data.img_size={args.img_size}", f"run.device={args.device}",
                 f"regression.batch_size={args.batch_size}", "visual.frozen_in_stage0=true",
                 "regression.augment=false", *args.overrides]
    for key, value in (("embed_dim", args.embed_dim), ("depth", args.depth), ("num_heads", args.heads),
                       ("patch_size", args.patch_size)):
        if value is not None:
            overrides += [f"classifier.vit.{key}={value}", f"visual.vit.{key}={value}"]
    for key, value in (("fusion_dim", args.fusion_dim), ("head_hidden", args.head_hidden)):
        if value is not None:
            overrides.append(f"regression.{key}={value}")
    cfg = load_config(ImplantConfig, args.config, overrides)
    rc = cfg.regression
    train_records, _ = load_records(data / "augmented_train.json")
    val_records, _ = load_records(data / "augmented_val.json")
    classes = {name: class_list(train_records, name) for name in ("company", "model_type")}
    meta = {"embedders": {name: {"classes": c} for name, c in classes.items()}, "thread_classes": []}
    seed_everything(cfg.run.seed)
    spec = vit_spec(cfg.classifier.vit, cfg.data.img_size)
    embedders = {name: EmbeddingClassifier(spec, len(c), cfg.classifier.embedding_dim, cfg.classifier.dropout)
                 for name, c in classes.items()}
    visual = build_vit(vit_spec(cfg.visual.vit, cfg.data.img_size))
    model = ImplantRegressor(embedders, visual, attention_type=rc.attention_type, fusion_dim=rc.fusion_dim,
                             head_hidden=rc.head_hidden, dropout=rc.dropout, n_thread_classes=0)
    targets = np.array([[r.length, r.diameter] for r in train_records], dtype=np.float64)
    model.set_target_stats(torch.tensor(targets.mean(0), dtype=torch.float32),
                           torch.tensor(targets.std(0) + 1e-6, dtype=torch.float32))
    train_set = make_dataset(train_records, meta, cfg.data.img_size, False, cfg.run.seed)
    val_set = make_dataset(val_records, meta, cfg.data.img_size)
    return cfg, model, train_set, val_set, meta


def run_way(cfg: ImplantConfig, rt, template: ImplantRegressor, train_set, val_set, meta: dict, epochs: int,
            cached: bool) -> dict:
    """`epochs` stage-0 epochs of the training loop's code; timings, per-batch outputs and losses, val preds."""
    rc = cfg.regression
    model = copy.deepcopy(template).to(rt.device)
    model.set_stage(0, rc.unfreeze_fraction, cfg.visual.frozen_in_stage0)
    if not model.frozen_feature_parts:
        raise SystemExit("stage 0 left a feature extractor trainable; the cache would not be valid")
    seed_everything(cfg.run.seed)
    optimizer = torch.optim.AdamW(model.param_groups(rc.lr, rc.embedder_lr_mult, rc.visual_lr_mult,
                                                     rc.weight_decay), lr=rc.lr)
    steps = len(epoch_batches(len(train_set), rc.batch_size, 0, 0))
    scheduler = cosine_with_warmup(optimizer, min(rc.warmup_epochs, epochs) * steps, max(epochs, 1) * steps)
    scaler = torch.amp.GradScaler(enabled=False)
    step_module = Recorder(_Step(model))
    mean, std = model.target_mean, model.target_std
    targets = torch.tensor(train_set.targets, dtype=torch.float32)
    start = time.perf_counter()
    cache = feature_cache(model, train_set, val_set, meta["thread_classes"], rt) if cached else None
    feature_s = time.perf_counter() - start
    epoch_s, train_s, val_s, epoch_loss, batch_losses, val_preds = [], [], [], [], [], []
    for epoch in range(1, epochs + 1):
        step_module.outputs = []
        t0 = time.perf_counter()
        train_set.set_epoch(epoch)
        model.train()
        loss_sum, seen = run_epoch(model, step_module, train_set, cache, optimizer, scheduler, scaler, cfg, rt,
                                   epoch)
        t1 = time.perf_counter()
        pred = predict_dataset(model, val_set, rt, cache["val"] if cache else None)["pred_mm"]
        t2 = time.perf_counter()
        epoch_s.append(t2 - t0)
        train_s.append(t1 - t0)
        val_s.append(t2 - t1)
        epoch_loss.append(loss_sum / max(seen, 1))
        val_preds.append(pred)
        # the loss of each batch, from the head output run_epoch produced and that batch's targets
        batches = epoch_batches(len(train_set), rc.batch_size, cfg.run.seed, epoch)
        for idx, out in zip(batches, step_module.outputs, strict=True):
            target_std = (targets[torch.as_tensor(idx)] - mean.cpu()) / std.cpu()
            batch_losses.append(float(regression_loss(out, target_std, rc.loss)))
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return {"feature_pass_s": feature_s, "epoch_s": epoch_s, "train_s": train_s, "val_s": val_s,
            "epoch_loss": epoch_loss, "batch_losses": batch_losses, "outputs": step_module.outputs,
            "val_preds": np.stack(val_preds), "weights": weights}


def max_diff(a: dict, b: dict) -> dict[str, float]:
    return {
        "batch_loss": float(np.max(np.abs(np.subtract(a["batch_losses"], b["batch_losses"])))),
        "epoch_loss": float(np.max(np.abs(np.subtract(a["epoch_loss"], b["epoch_loss"])))),
        "last_epoch_head_output": float(max((x - y).abs().max() for x, y in zip(a["outputs"], b["outputs"],
                                                                                 strict=True))),
        "val_pred_mm": float(np.max(np.abs(a["val_preds"] - b["val_preds"]))),
        "final_weights": float(max((a["weights"][k] - b["weights"][k]).abs().max() for k in a["weights"])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "implant_dims" / "sample.yaml"),
                        help="sizes, optimizer and loss (data paths are replaced by the generated set)")
    parser.add_argument("--images", type=int, default=512, help="training images")
    parser.add_argument("--val-images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=15, help="head-only epochs per way (sample.yaml: 15)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=None, help="ViT width of all three ViTs (config's)")
    parser.add_argument("--depth", type=int, default=None, help="ViT blocks (config's)")
    parser.add_argument("--heads", type=int, default=None, help="ViT attention heads (config's)")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch side (config's)")
    parser.add_argument("--fusion-dim", type=int, default=None)
    parser.add_argument("--head-hidden", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--tol", type=float, default=1e-6, help="largest allowed abs difference of the losses")
    parser.add_argument("--out", default=str(REPO / "reports" / "implant_frozen_cache.json"))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="implant_cache_") as tmp:
        make_sample_data(tmp, n_train=args.images, n_val=args.val_images, n_test=0, n_unseen=0,
                         size=args.img_size, seed=0)
        cfg, template, train_set, val_set, meta = build(args, Path(tmp))
    rt = start_runtime(cfg)
    with torch.no_grad():  # warm-up (lazy kernel set-up), not timed
        template.eval()(train_set[0]["image"][None].to(rt.device))
    ways = {"recompute": run_way(cfg, rt, template, train_set, val_set, meta, args.epochs, cached=False),
            "cached": run_way(cfg, rt, template, train_set, val_set, meta, args.epochs, cached=True)}
    rec, cac = ways["recompute"], ways["cached"]
    diffs = max_diff(rec, cac)
    per_epoch = float(np.mean(rec["epoch_s"]) / np.mean(cac["epoch_s"]))
    over = {}
    for n in sorted({1, 3, args.epochs} & set(range(1, args.epochs + 1))):
        over[str(n)] = float(sum(rec["epoch_s"][:n]) / (cac["feature_pass_s"] + sum(cac["epoch_s"][:n])))
    n_params = sum(p.numel() for p in template.parameters())
    print(f"implant_dims stage-0 epochs, {args.threads} thread(s), {args.device}, {len(train_set)} train / "
          f"{len(val_set)} val images at {cfg.data.img_size} px, batch {cfg.regression.batch_size}, "
          f"{n_params / 1e6:.2f}M parameters, {cpu_name()}")
    print(f"{'way':<10} {'feature pass s':>14} {'epoch s':>8} {'train s':>8} {'val s':>7} {f'{args.epochs} epochs s':>12}")
    for name, r in ways.items():
        total = r["feature_pass_s"] + sum(r["epoch_s"])
        print(f"{name:<10} {r['feature_pass_s']:14.3f} {np.mean(r['epoch_s']):8.3f} {np.mean(r['train_s']):8.3f} "
              f"{np.mean(r['val_s']):7.3f} {total:12.2f}")
    print(f"per-epoch speed-up (feature pass excluded): {per_epoch:.1f}x")
    for n, ratio in over.items():
        print(f"speed-up over {n} epoch(s), feature pass included: {ratio:.2f}x")
    print(f"max abs diff recompute vs cached: {diffs}")
    worst = max(diffs["batch_loss"], diffs["epoch_loss"])
    identical = worst <= args.tol
    print(f"losses {'identical' if worst == 0 else 'equal within tol' if identical else 'DIFFER'} "
          f"(max abs diff {worst:.3g}, tol {args.tol:g}); goal >= {GOAL:g}x: per epoch "
          f"{'met' if per_epoch >= GOAL else 'missed'}, over {args.epochs} epochs "
          f"{'met' if over[str(args.epochs)] >= GOAL else 'missed'}")
    report = {
        "goal": f">= {GOAL:g}x faster head-only epochs with cached features, identical losses",
        "threads": args.threads, "device": str(rt.device), "cpu": cpu_name(), "torch": torch.__version__,
        "sizes": {"train_images": len(train_set), "val_images": len(val_set), "img_size": cfg.data.img_size,
                  "batch_size": cfg.regression.batch_size, "epochs": args.epochs, "parameters": n_params,
                  "vit": {k: getattr(cfg.classifier.vit, k) for k in ("embed_dim", "depth", "num_heads",
                                                                      "patch_size")},
                  "embedding_dim": cfg.classifier.embedding_dim, "fusion_dim": cfg.regression.fusion_dim,
                  "head_hidden": cfg.regression.head_hidden, "attention_type": cfg.regression.attention_type},
        "config": args.config, "overrides": args.overrides,
        "ways": {name: {k: r[k] for k in ("feature_pass_s", "epoch_s", "train_s", "val_s", "epoch_loss")}
                 for name, r in ways.items()},
        "mean_epoch_s": {name: float(np.mean(r["epoch_s"])) for name, r in ways.items()},
        "speedup_per_epoch": per_epoch, "speedup_over_epochs_incl_feature_pass": over,
        "max_abs_diff": diffs, "tol": args.tol, "losses_identical": identical,
    }
    write_json(args.out, report)
    print(f"-> {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
