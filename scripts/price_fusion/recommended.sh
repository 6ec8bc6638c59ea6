#!/usr/bin/env bash
# The package's recommended output for a catalogue: K-fold fusion (each fold early-stopped on an inner grouped split),
# the trees + kNN head and the median / kNN / ridge baselines, all on the same grouped folds, blended with simplex
# weights fitted on their honest out-of-fold predictions (never worse there than the best of them):
#   scripts/price_fusion/recommended.sh CONFIG.yaml [key=value ...]       (after python -m price_fusion.embed)
# writes runs/price_fusion/<run_name>_recommended/test_out.csv and .weights.json (weights, out-of-fold SMAPE of each).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CONFIG="${1:?usage: $0 CONFIG.yaml [key=value ...]}"; shift
K="${KFOLD:-5}"
RUN_NAME="$("$PY" -c "from common.config import load_config; from price_fusion.config import PriceFusionConfig as C; import sys; print(load_config(C, sys.argv[1], sys.argv[2:]).run_name)" "$CONFIG" "$@")"
RUNS=runs/price_fusion
"$PY" -m price_fusion.train --config "$CONFIG" "$@" run_name="${RUN_NAME}_kfold" train.kfold="$K"
"$PY" -m price_fusion.predict --config "$CONFIG" "$@" run_name="${RUN_NAME}_kfold"
"$PY" -m price_fusion.gbt --config "$CONFIG" "$@" run_name="${RUN_NAME}_gbt" gbt.folds="$K"
"$PY" -m price_fusion.baselines --config "$CONFIG" "$@" run_name="${RUN_NAME}_baselines" baselines.folds="$K"
DIRS=("$RUNS/${RUN_NAME}_kfold/predictions" "$RUNS/${RUN_NAME}_gbt/predictions"
      "$RUNS/${RUN_NAME}_baselines/median/predictions" "$RUNS/${RUN_NAME}_baselines/knn/predictions"
      "$RUNS/${RUN_NAME}_baselines/ridge/predictions")
join() { local IFS=,; echo "$*"; }
"$PY" -m price_fusion.ensemble --config "$CONFIG" "$@" ensemble.method=fitted \
  "ensemble.inputs=[$(join "${DIRS[@]/%//test_out.csv}")]" \
  "ensemble.oof_inputs=[$(join "${DIRS[@]/%//oof_predictions.csv}")]" \
  "ensemble.output=$RUNS/${RUN_NAME}_recommended/test_out.csv"
