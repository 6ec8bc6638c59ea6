#!/usr/bin/env bash
# Full simulator pipeline on one machine: data -> encoder -> decoder -> evaluation -> ONNX.
#   scripts/cnc_gcode/train.sh [configs/cnc_gcode/sample.yaml] [dotted.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-configs/cnc_gcode/sample.yaml}
shift || true
source scripts/_python.sh
[ -f data/cnc_gcode/sample/train.npz ] || $PY -m cnc_gcode.sample_data data/cnc_gcode/sample --programs 350 --max-per-line 2
$PY -m cnc_gcode.train_encoder --config "$CONFIG" "$@"
$PY -m cnc_gcode.train_decoder --config "$CONFIG" "$@"
$PY -m cnc_gcode.evaluate --config "$CONFIG" "$@"
$PY -m cnc_gcode.export_onnx --config "$CONFIG" "$@"
