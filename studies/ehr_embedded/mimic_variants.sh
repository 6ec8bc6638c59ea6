#!/usr/bin/env bash
# What was tried on MIMIC-IV demo long_stay split 0 (studies/ehr_embedded/RESULTS.md, "What was tried"): the encoder of
# configs/ehr_embedded/mimic_finetune_encoder.yaml (seed 0) with one of its model choices changed at a time, beside the
# counts baseline. Needs the split-0 store (mimic_results.sh or mimic_splits.sh). Writes
# runs/ehr_embedded/mimic_variants.{md,json}. About 15 minutes on 2 CPU cores.
#   studies/ehr_embedded/mimic_variants.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
R=runs/ehr_embedded/mimic
rows=("count features + LR=$R/baseline_counts/reports/baseline_held_out.json"
      "encoder, defaults (balanced scales, max pooling)=$R/finetune_encoder/reports/eval_held_out.json")
for variant in "balanced_mean:model.pooling=mean" "attention:model.pooling=attention" \
               "trainable:model.code_embedding=trainable"; do
    name=${variant%%:*}
    run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" training.output_dir=$R/encoder_$name \
        "${variant#*:}"
    rows+=("encoder, ${variant#*:}=$R/encoder_$name/reports/eval_held_out.json")
done
run "$PY" -m ehr_embedded.summarize runs/ehr_embedded/mimic_variants "${rows[@]}"
