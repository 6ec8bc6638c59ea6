#!/usr/bin/env bash
# The recipe's goal measurement: the sample recipe (configs/implant_dims/sample.yaml: augmentation that
# keeps the pixel scale, 80 epochs, unfreezing at 30 / 50, the loss in millimetres, snapping to the whole catalogue)
# for seeds 0 1 2, each seed in its own run directory <run.out_dir>/<run.name>_seed<N>:
#   1. both classifiers, the two single-embedding regressors and the dual regressor (triple attention, dual/)
#   2. the baselines (caliper, caliper_catalogue, mean, ...) and compare's per-seed comparison.md
#   3. the table over seeds (python -m studies.implant_dims.recipe_table): test / unseen length and diameter MAE as
#      mean +- sd, dual minus caliper, single and mean predictor per image with bootstrap intervals over implants
#      (seed-averaged errors) and over implants and seeds, snapped results under the one rule;
#      <run.out_dir>/<run.name>_seeds/recipe_table.{md,json}
#   studies/implant_dims/recipe_seeds.sh [configs/implant_dims/sample.yaml] [dotted.key=value ...]
# SEEDS="0 1 2" by default. Every stage resumes, so a re-run after a kill continues where it stopped. About 16 minutes
# per seed on 2 CPU cores (augmentation turns off the frozen-feature cache).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-configs/implant_dims/sample.yaml}
shift || true
source scripts/_python.sh
SEEDS=${SEEDS:-"0 1 2"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
# the run name and folder the config (and any run.name= / run.out_dir= override) gives
read -r OUT_DIR NAME < <($PY - "$CONFIG" "$@" <<'PYEOF'
import sys
from common.config import load_config
from implant_dims.config import ImplantConfig
cfg = load_config(ImplantConfig, sys.argv[1], sys.argv[2:])
print(cfg.run.out_dir, cfg.run.name)
PYEOF
)
if grep -qs "data/implant_dims/sample/" "$CONFIG"; then
  [ -f data/implant_dims/sample/calibration.json ] || $PY -m implant_dims.sample_data data/implant_dims/sample
fi
runs=()
for seed in $SEEDS; do
  run=("run.seed=$seed" "run.name=${NAME}_seed$seed")
  for target in company model_type; do
    $PY -m implant_dims.train_classifier --config "$CONFIG" "$@" "${run[@]}" classifier.target=$target
  done
  for embedding in company model_type; do
    $PY -m implant_dims.train_regression --config "$CONFIG" "$@" "${run[@]}" regression.embedding=$embedding
  done
  $PY -m implant_dims.train_dual --config "$CONFIG" "$@" "${run[@]}"
  $PY -m implant_dims.baselines --config "$CONFIG" "$@" "${run[@]}"
  $PY -m studies.implant_dims.compare --config "$CONFIG" "$@" "${run[@]}"
  runs+=("$OUT_DIR/${NAME}_seed$seed")
done
$PY -m studies.implant_dims.recipe_table --out "$OUT_DIR/${NAME}_seeds" "${runs[@]}"
