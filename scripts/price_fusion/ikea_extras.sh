#!/usr/bin/env bash
# After `python -m price_fusion.ikea --config configs/price_fusion/ikea.yaml`: train the MoE variant and the trees
# head on the same IKEA split and embeddings, ensemble the three, and score each on the held-out test labels.
#   scripts/price_fusion/ikea_extras.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R=runs/price_fusion/ikea
COMMON=(--config configs/price_fusion/ikea.yaml "data.train_csv=$R/data/train.csv" "data.test_csv=$R/data/test.csv"
        "data.embeddings_dir=$R/embeddings" "data.image_dir=$R/data")
"$PY" -m price_fusion.train "${COMMON[@]}" run_name=ikea_moe model.name=advanced_moe
"$PY" -m price_fusion.predict "${COMMON[@]}" run_name=ikea_moe
"$PY" -m price_fusion.gbt "${COMMON[@]}" run_name=ikea_gbt
OUTS=("$R/predictions/test_out.csv" runs/price_fusion/ikea_moe/predictions/test_out.csv
      runs/price_fusion/ikea_gbt/predictions/test_out.csv)
"$PY" -m price_fusion.ensemble "${COMMON[@]}" "ensemble.inputs=[$(IFS=,; echo "${OUTS[*]}")]" \
  ensemble.output=runs/price_fusion/ikea_ensemble/test_out.csv
for f in "${OUTS[@]}" runs/price_fusion/ikea_ensemble/test_out.csv; do
  "$PY" -m price_fusion.evaluate "${COMMON[@]}" "evaluate.predictions=$f" "evaluate.labels=$R/data/test_labels.csv" 2>&1 \
    | grep "held-out products" | sed "s|^|$f: |"
done
# Weights fitted on out-of-fold predictions: a 5-fold fusion run (its test prediction averages the 5 fold models)
# blended with the trees head, both scored on the held-out test labels.
"$PY" -m price_fusion.train "${COMMON[@]}" run_name=ikea_kfold train.kfold=5
"$PY" -m price_fusion.predict "${COMMON[@]}" run_name=ikea_kfold
"$PY" -m price_fusion.ensemble "${COMMON[@]}" ensemble.method=fitted \
  "ensemble.inputs=[runs/price_fusion/ikea_kfold/predictions/test_out.csv,runs/price_fusion/ikea_gbt/predictions/test_out.csv]" \
  "ensemble.oof_inputs=[runs/price_fusion/ikea_kfold/predictions/oof_predictions.csv,runs/price_fusion/ikea_gbt/predictions/oof_predictions.csv]" \
  ensemble.output=runs/price_fusion/ikea_fitted/test_out.csv
for f in runs/price_fusion/ikea_kfold/predictions/test_out.csv runs/price_fusion/ikea_fitted/test_out.csv; do
  "$PY" -m price_fusion.evaluate "${COMMON[@]}" "evaluate.predictions=$f" "evaluate.labels=$R/data/test_labels.csv" 2>&1 \
    | grep "held-out products" | sed "s|^|$f: |"
done
