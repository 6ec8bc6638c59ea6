#!/usr/bin/env bash
# The sample-data experiment behind the implant_dims results tables (studies/implant_dims/RESULTS.md): data -> both
# classifiers -> the single-embedding baselines -> the dual regressor with each attention type, + the thread head,
# + 4 px patches -> simple baselines -> one table (<run_dir>/comparison.md, studies.implant_dims.compare).
#   studies/implant_dims/sample_experiment.sh [configs/implant_dims/sample.yaml] [dotted.key=value ...]
# About 35 minutes on 2 CPU cores. Every stage resumes, so a re-run after a kill continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-configs/implant_dims/sample.yaml}
shift || true
source scripts/_python.sh
# (re)render when missing or written before the calibration split (the other images come out the same)
[ -f data/implant_dims/sample/calibration.json ] || $PY -m implant_dims.sample_data data/implant_dims/sample
for target in company model_type; do
  $PY -m implant_dims.train_classifier --config "$CONFIG" classifier.target=$target "$@"
done
for embedding in company model_type; do
  $PY -m implant_dims.train_regression --config "$CONFIG" regression.embedding=$embedding "$@"
done
$PY -m implant_dims.train_dual --config "$CONFIG" "$@"   # triple attention -> dual/
for attention in dual hierarchical cross; do
  $PY -m implant_dims.train_dual --config "$CONFIG" regression.attention_type=$attention \
      regression.out_subdir=dual_$attention "$@"
done
$PY -m implant_dims.train_dual --config "$CONFIG" regression.aux_thread_weight=0.3 \
    regression.out_subdir=dual_triple_thread "$@"
$PY -m implant_dims.train_dual --config "$CONFIG" visual.vit.patch_size=4 regression.out_subdir=dual_patch4 "$@"
$PY -m implant_dims.baselines --config "$CONFIG" "$@"
$PY -m studies.implant_dims.compare --config "$CONFIG" "$@"
