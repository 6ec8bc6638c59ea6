#!/usr/bin/env bash
# UMich with real labels (studies/cnc_gcode/RESULTS.md, "UMich real logs" -> "Sequence-number labels and a G-code evaluation"):
#   studies/cnc_gcode/umich_results.sh            # about 4 minutes from nothing, one thread
# 1. phases relabelled through the line -> phase map of experiment 01, encoder on measured channels (seeds 0, 1, 2):
#    runs/cnc_gcode/umich_seqmap{,_seed1,_seed2}/reports/encoder_results_test.json, data/cnc_gcode/umich_seqmap/manifest.json
# 2. tree baselines on the same test windows: runs/cnc_gcode/umich_seqmap/reports/baseline_umich.{json,md}
# 3. program lines reconstructed from 01 and token accuracy on held-out runs:
#    runs/cnc_gcode/umich_lines/reports/{umich_program.ngc,umich_lines.json,umich_lines.md}
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
SEQMAP=configs/cnc_gcode/umich_seqmap.yaml
$PY -m studies.cnc_gcode.ingest_umich --config "$SEQMAP"
$PY -m cnc_gcode.train_encoder --config "$SEQMAP"
for seed in 1 2; do
  $PY -m cnc_gcode.train_encoder --config "$SEQMAP" run.seed=$seed run.name=umich_seqmap_seed$seed
done
$PY -m studies.cnc_gcode.baseline_umich --config "$SEQMAP"
$PY -m studies.cnc_gcode.umich_lines --config configs/cnc_gcode/umich_lines.yaml
