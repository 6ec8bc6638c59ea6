#!/usr/bin/env bash
# The original's "Dual Embeddings HPO" as one command: both classifiers (skipped when already trained: every stage
# resumes), then an Optuna study minimising the dual regressor's validation mean MAE over fusion width, attention
# type, unfreezing schedule, lr and embedding-model lr multiplier (hpo.* in the config), 20 trials with 4 worker
# processes on one SQLite storage, then the analysis reports (best_trials.md, parameter importances, history plot).
#   scripts/implant_dims/hpo_dual.sh [configs/implant_dims/sample.yaml] [dotted.key=value ...]
# Writes <run_dir>/hpo/implant_dual/. A re-run continues the study up to hpo.n_trials finished trials; a larger
# hpo.n_trials=N on the command line adds trials.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=configs/implant_dims/sample.yaml
if [[ "${1:-}" == *.yaml ]]; then CONFIG=$1; shift; fi
source scripts/_python.sh
if [[ "$CONFIG" == configs/implant_dims/sample.yaml && ! -f data/implant_dims/sample/calibration.json ]]; then
  $PY -m implant_dims.sample_data data/implant_dims/sample
fi
for target in company model_type; do
  $PY -m implant_dims.train_classifier --config "$CONFIG" classifier.target=$target "$@"
done
ARGS=(--config "$CONFIG" hpo.kind=dual hpo.n_trials=20 hpo.n_workers=4 "$@")
$PY -m implant_dims.hpo "${ARGS[@]}"
$PY -m implant_dims.analyze_tuning_results "${ARGS[@]}"
