#!/usr/bin/env bash
# Focal-gamma and modality ablations with 3 seeds each (mean ± std), over the measured-only pipeline that
# scripts/cnc_gcode/measured_only.sh trains (run it first).
#   scripts/cnc_gcode/ablations_seeds.sh [gamma|modality|both]
# Writes runs/cnc_gcode/measured_only/measured_only/measured_only_seed0/reports/ablation_{gamma,modality}.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
WHICH=${1:-both}
RUN=(--config configs/cnc_gcode/measured_only.yaml run.out_dir=runs/cnc_gcode/measured_only/measured_only
     run.name=measured_only_seed0 "data.channel_groups=[measured_motion,drives,spindle,process]" "ablation.seeds=[0,1,2]")
if [ "$WHICH" = gamma ] || [ "$WHICH" = both ]; then
  $PY -m cnc_gcode.ablation_gamma "${RUN[@]}" "ablation.gammas=[ce,1.0,3.0]" ablation.epochs=4
fi
if [ "$WHICH" = modality ] || [ "$WHICH" = both ]; then
  $PY -m cnc_gcode.ablation_modality "${RUN[@]}" \
    "ablation.groups=[position,velocity,acceleration,spindle,motor_current,proximity,pressure,accelerometer]" \
    "ablation.seed_runs=[runs/cnc_gcode/measured_only/measured_only/measured_only_seed1,runs/cnc_gcode/measured_only/measured_only/measured_only_seed2]"
fi
