#!/usr/bin/env bash
# Headline table: G-code from measured channels only vs all channels vs a nearest-neighbour baseline.
#   studies/cnc_gcode/measured_only.sh [configs/cnc_gcode/measured_only.yaml] [dotted.key=value ...]
# Writes runs/cnc_gcode/measured_only/reports/measured_only.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-configs/cnc_gcode/measured_only.yaml}
shift || true
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
[ -f data/cnc_gcode/measured/train.npz ] || $PY -m cnc_gcode.sample_data data/cnc_gcode/measured --programs 60 --max-per-line 2
$PY -m studies.cnc_gcode.measured_only --config "$CONFIG" "$@"
