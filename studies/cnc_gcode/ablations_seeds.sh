#!/usr/bin/env bash
# Focal-gamma and modality ablations with 3 seeds each (mean ± std), over the measured-only pipelines that
# studies/cnc_gcode/measured_only_completed.sh (default) or studies/cnc_gcode/measured_only.sh trains (run it first).
#   studies/cnc_gcode/ablations_seeds.sh [gamma|modality|both]
#   CONFIG=configs/cnc_gcode/measured_only.yaml studies/cnc_gcode/ablations_seeds.sh     # the executing labelling
# The ablated pipelines are the measured-only rows of the first decoder value mode (measured_only.value_modes: regress).
# Writes <runs>/measured_only_seed0/reports/ablation_{gamma,modality}.{md,json,png}, where <runs> is
# runs/cnc_gcode/<run.name of CONFIG>/measured_only (or $RUNS).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
WHICH=${1:-both}
CONFIG=${CONFIG:-configs/cnc_gcode/measured_only_completed.yaml}
NAME=$($PY -c "import sys; from common.config import load_config; from cnc_gcode.config import CncConfig; \
print(load_config(CncConfig, sys.argv[1], []).run.name)" "$CONFIG")
RUNS=${RUNS:-runs/cnc_gcode/$NAME/measured_only}
RUN=(--config "$CONFIG" run.out_dir=$RUNS run.name=measured_only_seed0 decoder.value_mode=regress
     "data.channel_groups=[measured_motion,drives,spindle,process]" "ablation.seeds=[0,1,2]")
if [ "$WHICH" = gamma ] || [ "$WHICH" = both ]; then
  $PY -m studies.cnc_gcode.ablation_gamma "${RUN[@]}" "ablation.gammas=[ce,1.0,3.0]" ablation.epochs=4
fi
if [ "$WHICH" = modality ] || [ "$WHICH" = both ]; then
  $PY -m studies.cnc_gcode.ablation_modality "${RUN[@]}" \
    "ablation.groups=[position,velocity,acceleration,spindle,motor_current,proximity,pressure,accelerometer]" \
    "ablation.seed_runs=[$RUNS/measured_only_seed1,$RUNS/measured_only_seed2]"
fi
