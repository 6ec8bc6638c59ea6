#!/usr/bin/env bash
# The sample experiment's core on data whose per-image magnification varies by 8 % (as in panoramic radiographs,
# where the projection geometry changes the scale), instead of 2 %: both classifiers, the single-embedding
# (model type) and dual regressors, the baselines (the caliper among them) and the comparison table.
#   studies/implant_dims/magnification_experiment.sh [dotted.key=value ...]     (~15 minutes on 2 idle CPU cores)
# The magnification enlarges the whole implant (outline, thread pitch and depth, collar); the records' mm_per_pixel
# is the detector's spacing, which does not know it: only the thread pitch can tell the magnification apart.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
DATA=data/implant_dims/sample_mag8
# (re)render when missing or written by a renderer from before the calibration split (the same images otherwise)
[ -f $DATA/calibration.json ] || $PY -m implant_dims.sample_data $DATA --magnification-sd 0.08
ARGS=(--config configs/implant_dims/sample.yaml run.name=sample_mag8 "data.train_json=$DATA/augmented_train.json"
      "data.val_json=$DATA/augmented_val.json" "data.test_json=$DATA/test.json" "data.unseen_json=$DATA/unseen_test.json"
      "data.catalogue_csv=$DATA/catalogue.csv" "data.calibration_json=$DATA/calibration.json" "$@")
for target in company model_type; do
  $PY -m implant_dims.train_classifier "${ARGS[@]}" classifier.target=$target
done
$PY -m implant_dims.train_regression "${ARGS[@]}" regression.embedding=model_type
$PY -m implant_dims.train_dual "${ARGS[@]}"
$PY -m implant_dims.baselines "${ARGS[@]}"
$PY -m studies.implant_dims.compare "${ARGS[@]}"
