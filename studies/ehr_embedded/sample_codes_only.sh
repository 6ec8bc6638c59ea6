#!/usr/bin/env bash
# Codes alone on the sample data (studies/ehr_embedded/RESULTS.md, "Codes only"): the encoder with
# model.use_values=false and model.use_time=false, so the label reaches it only through which codes occur. Seeds 0, 1, 2 of: the earlier model
# (input_scaling=none, pooling=mean), balanced input scales with mean pooling, the defaults (balanced, max pooling),
# and the defaults + trainable per-code embeddings; beside the count baseline on the same store. Writes
# runs/ehr_embedded/sample_codes_only/summary.{md,json} (with mean +- sd rows). About 10 minutes on 2 CPU cores.
#   studies/ehr_embedded/sample_codes_only.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
R=runs/ehr_embedded/sample_codes_only
run "$PY" -m ehr_embedded.sample_data "$R/meds"
S=(data.data_dir=$R/meds data.labels_filepath=$R/meds/labels/infection
   data.medical_lookup_filepath=$R/meds/lookups/medical_lookup.csv data.lab_lookup_filepath=$R/meds/lookups/lab_lookup.csv
   data.vocab_embedding_path=$R/vocab data.embedding_output_dir=$R/patients)
run "$PY" -m ehr_embedded.create_vocab_embeddings --config "$C/create_embeddings.yaml" "${S[@]}"
run "$PY" -m ehr_embedded.create_embeddings --config "$C/create_embeddings.yaml" "${S[@]}"
run "$PY" -m ehr_embedded.baseline --config "$C/baseline.yaml" embedding_output_dir=$R/patients \
    output_dir=$R/baseline_counts
rows=("count features + LR=$R/baseline_counts/reports/baseline_held_out.json")
declare -A label=([earlier]="earlier scales, mean pooling" [balanced_mean]="balanced scales, mean pooling"
                  [default]="balanced scales, max pooling (defaults)" [trainable]="defaults + trainable code embedding")
for variant in "earlier:model.input_scaling=none model.pooling=mean" "balanced_mean:model.pooling=mean" \
               "default:model.pooling=max" "trainable:model.code_embedding=trainable"; do
    name=${variant%%:*}
    read -r -a extra <<< "${variant#*:}"
    for seed in 0 1 2; do
        run "$PY" -m ehr_embedded.finetune --config "$C/finetune_encoder_embedded.yaml" data.embedding_output_dir=$R/patients \
            training.output_dir=$R/encoder_${name}_seed$seed training.seed=$seed model.use_values=false \
            model.use_time=false "${extra[@]}"
        rows+=("encoder, ${label[$name]}=$R/encoder_${name}_seed$seed/reports/eval_held_out.json")
    done
done
run "$PY" -m ehr_embedded.summarize "$R/summary" "${rows[@]}"
