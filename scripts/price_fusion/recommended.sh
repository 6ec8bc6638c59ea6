#!/usr/bin/env bash
# The package's recommended output for a catalogue: K-fold fusion (each fold early-stopped on an inner grouped split),
# the trees + kNN head and the median / kNN / ridge baselines, all on the same grouped folds, blended with simplex
# weights fitted on their honest out-of-fold predictions (never worse there than the best of them):
#   scripts/price_fusion/recommended.sh CONFIG.yaml [key=value ...]       (after python -m price_fusion.embed)
# writes <runs_dir>/<run_name>_recommended/test_out.csv and .weights.json (weights, out-of-fold SMAPE of each), with
# runs_dir and run_name those of the config and overrides (default runs/price_fusion). Every override reaches every
# stage. KFOLD sets K (default 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/_python.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CONFIG="${1:?usage: $0 CONFIG.yaml [key=value ...]}"; shift
K="${KFOLD:-5}"
# the runs folder and run name the config and overrides resolve to (one per line)
RESOLVED="$("$PY" -c "from common.config import load_config; from price_fusion.config import PriceFusionConfig as C
import sys; c = load_config(C, sys.argv[1], sys.argv[2:]); print(c.runs_dir); print(c.run_name)" "$CONFIG" "$@")"
RUNS="${RESOLVED%%$'\n'*}"
RUN_NAME="${RESOLVED#*$'\n'}"
run "$PY" -m price_fusion.train --config "$CONFIG" "$@" run_name="${RUN_NAME}_kfold" train.kfold="$K"
run "$PY" -m price_fusion.predict --config "$CONFIG" "$@" run_name="${RUN_NAME}_kfold"
run "$PY" -m price_fusion.gbt --config "$CONFIG" "$@" run_name="${RUN_NAME}_gbt" gbt.folds="$K"
run "$PY" -m price_fusion.baselines --config "$CONFIG" "$@" run_name="${RUN_NAME}_baselines" baselines.folds="$K"
DIRS=("$RUNS/${RUN_NAME}_kfold/predictions" "$RUNS/${RUN_NAME}_gbt/predictions"
      "$RUNS/${RUN_NAME}_baselines/median/predictions" "$RUNS/${RUN_NAME}_baselines/knn/predictions"
      "$RUNS/${RUN_NAME}_baselines/ridge/predictions")
join() { local IFS=,; echo "$*"; }
run "$PY" -m price_fusion.ensemble --config "$CONFIG" "$@" ensemble.method=fitted \
  "ensemble.inputs=[$(join "${DIRS[@]/%//test_out.csv}")]" \
  "ensemble.oof_inputs=[$(join "${DIRS[@]/%//oof_predictions.csv}")]" \
  "ensemble.output=$RUNS/${RUN_NAME}_recommended/test_out.csv"
