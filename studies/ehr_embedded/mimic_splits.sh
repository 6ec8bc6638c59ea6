#!/usr/bin/env bash
# Five subject splits of the MIMIC-IV demo (studies/ehr_embedded/RESULTS.md): split seeds 0-4, each converted with its own
# seed (split 0 lives in runs/ehr_embedded/mimic, as mimic_results.sh writes it) and with the vocabulary rebuilt from
# its own train split; one counts baseline and one encoder (seed 0, configs/ehr_embedded/mimic_finetune_encoder.yaml)
# each. Writes runs/ehr_embedded/mimic_splits.{md,json} with the mean +- sd rows.
# Conversion and stage 1 depend only on the split seed, so a split whose store exists ($R/long_stay/report.json;
# create_embeddings writes the store atomically) is not rebuilt; delete the store to rebuild it.
#   studies/ehr_embedded/mimic_splits.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
rows=()
for s in 0 1 2 3 4; do
    R=runs/ehr_embedded/mimic_split$s
    [ "$s" = 0 ] && R=runs/ehr_embedded/mimic
    O=(data.data_dir=$R/meds data.labels_filepath=$R/meds/labels/long_stay data.vocab_embedding_path=$R/vocab
       data.embedding_output_dir=$R/long_stay)
    if [ ! -f "$R/long_stay/report.json" ]; then
        run "$PY" -m ehr_embedded.convert_mimic --config "$C/mimic_convert.yaml" seed=$s output_dir=$R/meds
        run "$PY" -m ehr_embedded.create_vocab_embeddings --config "$C/mimic_create_embeddings.yaml" "${O[@]}"
        run "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings.yaml" "${O[@]}"
    fi
    run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/long_stay \
        output_dir=$R/baseline_counts
    run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" data.embedding_output_dir=$R/long_stay \
        training.output_dir=$R/finetune_encoder
    rows+=("counts + LR=$R/baseline_counts/reports/baseline_held_out.json"
           "encoder=$R/finetune_encoder/reports/eval_held_out.json")
done
run "$PY" -m ehr_embedded.summarize runs/ehr_embedded/mimic_splits "${rows[@]}"
