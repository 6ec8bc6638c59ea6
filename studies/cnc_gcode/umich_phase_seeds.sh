#!/usr/bin/env bash
# UMich phase from measured channels, encoder vs boosted trees over 3 seeds (studies/cnc_gcode/RESULTS.md, "UMich
# real logs" -> "Sequence-number labels"):
#   studies/cnc_gcode/umich_phase_seeds.sh        # a few minutes from nothing, one thread
# 1. ingest with the sequence-number labels (configs/cnc_gcode/umich_seqmap.yaml: machine coordinates)
# 2. train_encoder for seeds 0 1 2 with the physical inputs (robust scaling + depth channel, 40 epochs, best on val
#    accuracy): runs/cnc_gcode/umich_phase_seed{0,1,2}/reports/encoder_results_test.json
# 3. baseline_umich (majority, gradient-boosted trees on the flattened measured window) on the same test windows
# 4. ablation, one seed: the old inputs (z-score, positions relative to each run's minimum, no depth channel) with the
#    same training, and the trees on relative positions (96.6 %)
# 5. the table: runs/cnc_gcode/umich_phase/umich_phase_seeds.{md,json} (python -m studies.cnc_gcode.umich_phase_table)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
CFG=configs/cnc_gcode/umich_seqmap.yaml
RUNS=${RUNS:-runs/cnc_gcode}
DATA=${DATA:-data/cnc_gcode}
SEEDS=${SEEDS:-"0 1 2"}
new=("umich.out_dir=$DATA/umich_seqmap" "run.out_dir=$RUNS"
     "data.train_path=$DATA/umich_seqmap/train.npz" "data.val_path=$DATA/umich_seqmap/val.npz"
     "data.test_path=$DATA/umich_seqmap/test.npz")
old=("umich.out_dir=$DATA/umich_seqmap_relative" "run.out_dir=$RUNS" "umich.relative_positions=true"
     "data.train_path=$DATA/umich_seqmap_relative/train.npz" "data.val_path=$DATA/umich_seqmap_relative/val.npz"
     "data.test_path=$DATA/umich_seqmap_relative/test.npz")
$PY -m studies.cnc_gcode.ingest_umich --config "$CFG" "${new[@]}"
for seed in $SEEDS; do
  $PY -m cnc_gcode.train_encoder --config "$CFG" "${new[@]}" run.seed="$seed" run.name="umich_phase_seed$seed"
done
$PY -m studies.cnc_gcode.baseline_umich --config "$CFG" "${new[@]}" run.name=umich_phase
if [ "${ABLATION:-1}" = 1 ]; then
  $PY -m studies.cnc_gcode.ingest_umich --config "$CFG" "${old[@]}"
  $PY -m cnc_gcode.train_encoder --config "$CFG" "${old[@]}" run.seed=0 run.name=umich_phase_oldinputs_seed0 \
    encoder.input_scaling=zscore encoder.depth_channel=
  $PY -m studies.cnc_gcode.baseline_umich --config "$CFG" "${old[@]}" run.name=umich_phase_relative
fi
# shellcheck disable=SC2086
$PY -m studies.cnc_gcode.umich_phase_table --runs "$RUNS" --seeds $SEEDS
