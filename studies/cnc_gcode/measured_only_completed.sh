#!/usr/bin/env bash
# Measured-only table on windows that end when their line completes: the same 60 programs as
# measured_only.sh, cut with `--window-end completed --settle-samples 2` (one window per line, ending two samples, the
# servo delay, after the line's last sample) instead of labelled with the line executing mid-move.
#   studies/cnc_gcode/measured_only_completed.sh [configs/cnc_gcode/measured_only_completed.yaml] [dotted.key=value ...]
# Writes runs/cnc_gcode/measured_only_completed/reports/measured_only.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-configs/cnc_gcode/measured_only_completed.yaml}
shift || true
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
DATA=data/cnc_gcode/measured_completed
# (re)make the data unless it is there with this labelling
grep -qs '"window_end": "completed"' $DATA/manifest.json && grep -qs '"settle_samples": 2' $DATA/manifest.json \
  || $PY -m cnc_gcode.sample_data $DATA --programs 60 --window-end completed --settle-samples 2
$PY -m studies.cnc_gcode.measured_only --config "$CONFIG" "$@"
