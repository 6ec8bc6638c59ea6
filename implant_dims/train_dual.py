"""Stage 3: the dual-embedding regressor. The company and model-type classifiers become embedding models (frozen,
then unfrozen gradually), fused with visual ViT features by `dual`, `triple`, `hierarchical` or `cross` attention
(or plain `concat`) into a head predicting implant length and diameter in mm.

    python -m implant_dims.train_dual --config configs/implant_dims/sample.yaml
    python -m implant_dims.train_dual --config configs/implant_dims/sample.yaml regression.attention_type=cross \
        regression.out_subdir=dual_cross
    torchrun --nproc_per_node=2 -m implant_dims.train_dual --config ... run.device=cpu   # DDP (gloo on CPU)

Needs <run_dir>/classifier_company and classifier_model_type (train_classifier) or regression.company_checkpoint /
regression.model_checkpoint. Progressive unfreezing: head only until regression.unfreeze_half_epoch, then the last
half of each embedding model's blocks, all from regression.unfreeze_all_epoch; embedding models learn at
regression.embedder_lr_mult x lr; cosine schedule with warmup; gradient accumulation (regression.grad_accum).

Writes <run_dir>/<regression.out_subdir>/: config.yaml, train.log, metrics.jsonl (length, diameter and mean MAE on
val every epoch), checkpoints/{latest,best} (best = lowest validation mean MAE; meta.json rebuilds the model),
reports/results_<split>.json and pred_vs_true_<split>.png for val, test (seen combinations) and unseen (held-out
combinations): MAE with group-bootstrap intervals, the mean-predictor baseline, Monte Carlo dropout interval
coverage, catalogue exact-size accuracy when data.catalogue_csv is set; ood_stats.npz, the out-of-domain guard's
statistics that predict reads (implant_dims/ood.py), and reports/ood.json, the share of calibration / val / test /
unseen images it flags. `regression.resume=auto` continues an interrupted run (also across an unfreezing boundary) and refuses
(exit 2) one whose config, data or classifiers changed.
"""

from __future__ import annotations

from common.cli import config_main
from implant_dims.config import ImplantConfig
from implant_dims.ood import fit_for_run, require_calibration
from implant_dims.regression import train_regressor


def train_dual(cfg: ImplantConfig) -> dict:
    out = cfg.run.run_dir / cfg.regression.out_subdir
    require_calibration(cfg)  # the guard fitted after training needs it: refuse a missing file now
    results = train_regressor(cfg, ("company", "model_type"), cfg.regression.attention_type, out)
    fit_for_run(cfg, out)  # the out-of-domain guard's statistics, beside the checkpoints (predict reads them)
    return results


def _main(cfg: ImplantConfig) -> int:
    train_dual(cfg)
    return 0


main = config_main(ImplantConfig, _main, __doc__, prog="python -m implant_dims.train_dual")

if __name__ == "__main__":
    raise SystemExit(main())
