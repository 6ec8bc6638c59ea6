#!/usr/bin/env bash
# The out-of-domain guard's tables in studies/implant_dims/RESULTS.md: the sample data and run (both classifiers,
# the dual regressor, which stores the guard's statistics; each stage resumes or skips when done), then
# `python -m studies.implant_dims.ood_report`, which writes runs/implant_dims/<run.name>/ood_report/ood_report.{md,json}.
#   studies/implant_dims/ood_report.sh [configs/implant_dims/sample.yaml] [dotted.key=value ...]
# About 13 minutes on 2 CPU cores when nothing was trained yet; the report alone takes about 20 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-configs/implant_dims/sample.yaml}
shift || true
source scripts/_python.sh
# (re)render when missing or written before the calibration split (the other images come out the same)
[ -f data/implant_dims/sample/calibration.json ] || $PY -m implant_dims.sample_data data/implant_dims/sample
for target in company model_type; do
  $PY -m implant_dims.train_classifier --config "$CONFIG" classifier.target=$target "$@"
done
$PY -m implant_dims.train_dual --config "$CONFIG" "$@"
$PY -m studies.implant_dims.ood_report --config "$CONFIG" "$@"
