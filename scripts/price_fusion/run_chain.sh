#!/usr/bin/env bash
# The whole price_fusion chain with one config: embed -> train -> evaluate -> predict -> gbt -> ensemble.
#   scripts/price_fusion/run_chain.sh configs/price_fusion/demo.yaml [key=value ...]
# With the demo config, create the sample data first:
#   .venv/bin/python -m price_fusion.sample_data runs/price_fusion/sample_data --tiny-clip
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CONFIG="${1:?usage: $0 CONFIG.yaml [key=value ...]}"; shift
RUN_NAME="$("$PY" -c "from common.config import load_config; from price_fusion.config import PriceFusionConfig as C; import sys; print(load_config(C, sys.argv[1], sys.argv[2:]).run_name)" "$CONFIG" "$@")"
for stage in embed train evaluate predict; do
  "$PY" -m price_fusion.$stage --config "$CONFIG" "$@"
done
"$PY" -m price_fusion.gbt --config "$CONFIG" "$@" run_name="${RUN_NAME}_gbt"
"$PY" -m price_fusion.ensemble --config "$CONFIG" "$@" \
  "ensemble.inputs=[runs/price_fusion/${RUN_NAME}/predictions/test_out.csv,runs/price_fusion/${RUN_NAME}_gbt/predictions/test_out.csv]" \
  "ensemble.output=runs/price_fusion/${RUN_NAME}_ensemble/test_out.csv"
