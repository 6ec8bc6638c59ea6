#!/usr/bin/env bash
# Model choice by subject-grouped cross-validation on the MIMIC-IV demo long_stay task (the tuning split
# has 53 admissions of 20 subjects). Needs the five split stores studies/ehr_embedded/mimic_splits.sh builds
# (split 0 in runs/ehr_embedded/mimic, splits 1-4 in runs/ehr_embedded/mimic_split{1..4}) and split 0's default
# encoder (runs/ehr_embedded/mimic/finetune_encoder, mimic_results.sh).
#   (a) counts + LR on every split, C chosen on tuning and by 5-fold grouped CV over train + tuning;
#   (b) an Optuna search for the encoder on split 0 whose trials are scored by 3-fold grouped CV (16 trials of
#       3 x 8 epochs, a CPU-sized space: model_dim 32 / 64, 1 / 2 layers), then fetch_best_and_train (final run
#       selected on the tuning split, as always);
#   (c) runs/ehr_embedded/mimic_cv_search.{md,json}: held_out AUROC with 95% CIs, mean +- sd over splits for the
#       baselines, and the CV-tuned encoder against the default one.
# 29 minutes on one core (the search 21 of them). Rerunning reuses the study (optuna.total_trials caps it) and
# its fold stores; delete runs/ehr_embedded/mimic/{optuna_cv.db,optuna/mimic_cv_k3,finetune_encoder_cv_tuned} to
# start over (the Optuna sampler is not seeded, so a new search samples other trials).
#   studies/ehr_embedded/mimic_cv_search.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
rows_tuning=()
rows_cv=()
for s in 0 1 2 3 4; do
    R=runs/ehr_embedded/mimic_split$s
    [ "$s" = 0 ] && R=runs/ehr_embedded/mimic
    run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/long_stay \
        output_dir=$R/baseline_counts
    run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$R/long_stay \
        output_dir=$R/baseline_counts_grouped_cv selection=grouped_cv cv_folds=5
    rows_tuning+=("counts + LR, C on tuning=$R/baseline_counts/reports/baseline_held_out.json")
    rows_cv+=("counts + LR, C by 5-fold grouped CV=$R/baseline_counts_grouped_cv/reports/baseline_held_out.json")
done

R=runs/ehr_embedded/mimic
SEARCH=(optuna.storage=sqlite:///$R/optuna_cv.db optuna.study=mimic_cv_k3 optuna.cv_folds=3 optuna.cv_seed=0
        optuna.epochs=8 optuna.trials=16 optuna.total_trials=16 "optuna.model_dims=[32, 64]" "optuna.n_layers=[1, 2]"
        training.output_dir=$R/finetune_encoder_cv_tuned)
run "$PY" -m ehr_embedded.optuna_worker --config "$C/mimic_finetune_encoder.yaml" "${SEARCH[@]}"
run "$PY" -m ehr_embedded.fetch_best_and_train --config "$C/mimic_finetune_encoder.yaml" "${SEARCH[@]}"

run "$PY" -m ehr_embedded.summarize runs/ehr_embedded/mimic_cv_search "${rows_tuning[@]}" "${rows_cv[@]}" \
    "encoder split 0, default params=$R/finetune_encoder/reports/eval_held_out.json" \
    "encoder split 0, params by 3-fold grouped CV search=$R/finetune_encoder_cv_tuned/reports/eval_held_out.json"
