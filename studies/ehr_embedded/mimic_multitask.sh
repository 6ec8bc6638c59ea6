#!/usr/bin/env bash
# Multi-label on the MIMIC-IV demo (split seed 0; studies/ehr_embedded/RESULTS.md, "Multi-label on MIMIC"): one encoder trained
# on long_stay and icu_after_24h together (configs/ehr_embedded/mimic_finetune_encoder_multitask.yaml, store from
# mimic_create_embeddings_multitask.yaml) against one encoder per task (mimic_finetune_encoder.yaml on the long_stay
# and on an icu_after_24h store), seeds 0, 1, 2 each, and the counts + LR baseline on every store (per task on the
# multi-label one; it must equal the single-task baselines on the rows each task labels). Needs runs/ehr_embedded/mimic
# from studies/ehr_embedded/mimic_results.sh (meds, vocab, long_stay). Writes runs/ehr_embedded/mimic/multitask_study/
# and its summary.{md,json} (one row per (model, task), mean +- sd rows over seeds).
#   studies/ehr_embedded/mimic_multitask.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
R=runs/ehr_embedded/mimic
O=$R/multitask_study
ICU=(data.labels_filepath=$R/meds/labels/icu_after_24h data.embedding_output_dir=$R/icu_after_24h)
[ -f "$R/multitask/report.json" ] || run "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings_multitask.yaml"
[ -f "$R/icu_after_24h/report.json" ] || run "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings.yaml" "${ICU[@]}"
run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/multitask \
    output_dir=$O/baseline_multitask
run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/long_stay \
    output_dir=$O/baseline_long_stay
run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/icu_after_24h \
    output_dir=$O/baseline_icu_after_24h
B=reports/baseline_held_out.json
E=reports/eval_held_out.json
rows=("counts + LR, per task on the multi-label store: long_stay=$O/baseline_multitask/$B#long_stay"
      "counts + LR, long_stay store=$O/baseline_long_stay/$B"
      "counts + LR, per task on the multi-label store: icu_after_24h=$O/baseline_multitask/$B#icu_after_24h"
      "counts + LR, icu_after_24h store=$O/baseline_icu_after_24h/$B")
for seed in 0 1 2; do
    run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder_multitask.yaml" training.seed=$seed \
        training.output_dir=$O/multitask_seed$seed
    run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" training.seed=$seed \
        training.output_dir=$O/long_stay_seed$seed
    run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" data.embedding_output_dir=$R/icu_after_24h \
        training.seed=$seed training.output_dir=$O/icu_after_24h_seed$seed
done
for seed in 0 1 2; do rows+=("multi-task encoder: long_stay=$O/multitask_seed$seed/$E#long_stay"); done
for seed in 0 1 2; do rows+=("single-task encoder: long_stay=$O/long_stay_seed$seed/$E"); done
for seed in 0 1 2; do rows+=("multi-task encoder: icu_after_24h=$O/multitask_seed$seed/$E#icu_after_24h"); done
for seed in 0 1 2; do rows+=("single-task encoder: icu_after_24h=$O/icu_after_24h_seed$seed/$E"); done
run "$PY" -m ehr_embedded.summarize "$O/summary" "${rows[@]}"
