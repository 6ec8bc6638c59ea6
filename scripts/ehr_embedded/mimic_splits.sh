#!/usr/bin/env bash
# Five subject splits of the MIMIC-IV demo (ehr_embedded/README.md): split 0 comes from mimic_results.sh; splits
# 1-4 are converted with their own seed and rebuild the vocabulary from their own train split; one counts baseline
# and one encoder (seed 0) each. Writes runs/ehr_embedded/mimic_splits.{md,json} with the mean +- sd rows.
#   scripts/ehr_embedded/mimic_results.sh && scripts/ehr_embedded/mimic_splits.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
C=configs/ehr_embedded
rows=("counts + LR=runs/ehr_embedded/mimic/baseline_counts/reports/baseline_held_out.json"
      "encoder=runs/ehr_embedded/mimic/finetune_encoder/reports/eval_held_out.json")
for s in 1 2 3 4; do
    R=runs/ehr_embedded/mimic_split$s
    "$PY" -m ehr_embedded.convert_mimic --config "$C/mimic_convert.yaml" seed=$s output_dir=$R/meds
    O=(data.data_dir=$R/meds data.labels_filepath=$R/meds/labels/long_stay data.vocab_embedding_path=$R/vocab
       data.embedding_output_dir=$R/long_stay)
    "$PY" -m ehr_embedded.create_vocab_embeddings --config "$C/mimic_create_embeddings.yaml" "${O[@]}"
    "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings.yaml" "${O[@]}"
    "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/long_stay \
        output_dir=$R/baseline_counts
    "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" data.embedding_output_dir=$R/long_stay \
        training.output_dir=$R/finetune_encoder
    rows+=("counts + LR=$R/baseline_counts/reports/baseline_held_out.json"
           "encoder=$R/finetune_encoder/reports/eval_held_out.json")
done
"$PY" -m ehr_embedded.summarize runs/ehr_embedded/mimic_splits "${rows[@]}"
