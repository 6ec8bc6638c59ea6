#!/usr/bin/env bash
# The original's "Model Classification HPO" as one command: an Optuna study maximising the model-type classifier's
# validation accuracy over ViT size, lr and batch size (hpo.classifier_* in the config), 20 trials with 4 worker
# processes on one SQLite storage, then the analysis reports (best_trials.md, parameter importances, history plot).
#   scripts/implant_dims/hpo_model_type.sh [configs/implant_dims/sample.yaml] [dotted.key=value ...]
# Writes <run_dir>/hpo/implant_classifier_model_type/. A re-run continues the study up to hpo.n_trials finished
# trials; a larger hpo.n_trials=N on the command line adds trials.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=configs/implant_dims/sample.yaml
if [[ "${1:-}" == *.yaml ]]; then CONFIG=$1; shift; fi
source scripts/_python.sh
if [[ "$CONFIG" == configs/implant_dims/sample.yaml && ! -f data/implant_dims/sample/calibration.json ]]; then
  $PY -m implant_dims.sample_data data/implant_dims/sample
fi
ARGS=(--config "$CONFIG" hpo.kind=classifier classifier.target=model_type hpo.n_trials=20 hpo.n_workers=4 "$@")
$PY -m implant_dims.hpo "${ARGS[@]}"
$PY -m implant_dims.analyze_tuning_results "${ARGS[@]}"
