#!/usr/bin/env bash
# After `python -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml`: train the advanced_moe variant
# and the mean of two_branch, advanced_moe and the trees head on the same grouped IKEA split and embeddings, score each
# on the held-out test labels (intervals over test names), and write the variants table studies/price_fusion/RESULTS.md
# quotes:
#   runs/price_fusion/ikea/reports/ikea_extras.{md,json}
#   studies/price_fusion/ikea_extras.sh [key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/_python.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run "$PY" -m studies.price_fusion.ikea --config configs/price_fusion/ikea.yaml ikea.extras=true "$@"
