#!/usr/bin/env bash
# The whole price_fusion chain with one config: embed -> train -> evaluate -> predict -> gbt -> ensemble.
#   scripts/price_fusion/run_chain.sh configs/price_fusion/demo.yaml [key=value ...]
# Every override reaches every stage; the ensemble reads and writes under the resolved runs_dir:
# <runs_dir>/<run_name>_ensemble/test_out.csv. With the demo config, create the sample data first:
#   python -m price_fusion.sample_data runs/price_fusion/sample_data --tiny-clip
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/_python.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CONFIG="${1:?usage: $0 CONFIG.yaml [key=value ...]}"; shift
# the runs folder and run name the config and overrides resolve to (one per line)
RESOLVED="$("$PY" -c "from common.config import load_config; from price_fusion.config import PriceFusionConfig as C
import sys; c = load_config(C, sys.argv[1], sys.argv[2:]); print(c.runs_dir); print(c.run_name)" "$CONFIG" "$@")"
RUNS="${RESOLVED%%$'\n'*}"
RUN_NAME="${RESOLVED#*$'\n'}"
for stage in embed train evaluate predict; do
  run "$PY" -m price_fusion.$stage --config "$CONFIG" "$@"
done
run "$PY" -m price_fusion.gbt --config "$CONFIG" "$@" run_name="${RUN_NAME}_gbt"
run "$PY" -m price_fusion.ensemble --config "$CONFIG" "$@" \
  "ensemble.inputs=[$RUNS/${RUN_NAME}/predictions/test_out.csv,$RUNS/${RUN_NAME}_gbt/predictions/test_out.csv]" \
  "ensemble.output=$RUNS/${RUN_NAME}_ensemble/test_out.csv"
