#!/usr/bin/env bash
# Linear probes on exported patient representations (studies/ehr_embedded/RESULTS.md, "Representations and linear probe"):
# for each finished finetune run, `represent` writes <run>/representations/{train,tuning,held_out}.parquet, then
# `linear_probe` fits a standardised logistic regression with C chosen on the tuning split (<run>/probe_tuning/) and,
# beside it, with C chosen by 5-fold subject-grouped CV on train (<run>/probe_grouped_cv/). One table per dataset,
# next to the finetuned head and the counts baseline of the same split:
#   runs/ehr_embedded/sample/probe_summary.{md,json}   the sample runs (studies/ehr_embedded/sample_results.sh)
#   runs/ehr_embedded/mimic_probe.{md,json}            MIMIC-IV demo long_stay, the five subject splits of
#                                                      studies/ehr_embedded/mimic_splits.sh (+ split 0's decoders)
# The pretrain_decoder runs are probed too: a frozen next-event model that never saw the label, the way foundation
# models are compared. Needs those runs; retrains no network (the mean-embedding baseline, a logistic regression, is
# fitted on every split; about 12 minutes on 2 CPU cores).
#   studies/ehr_embedded/probe_results.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"

probe() {  # RUN_DIR: representations, then both probes
    run "$PY" -m ehr_embedded.represent run_dir="$1"
    run "$PY" -m ehr_embedded.linear_probe run_dir="$1" output_dir="$1/probe_tuning"
    run "$PY" -m ehr_embedded.linear_probe run_dir="$1" output_dir="$1/probe_grouped_cv" selection=grouped_cv cv_folds=5
}

R=runs/ehr_embedded/sample
rows=()
for name in finetune_encoder finetune_decoder; do
    probe "$R/$name"
    rows+=("$name: finetuned head=$R/$name/reports/eval_held_out.json"
           "$name: linear probe, C on tuning=$R/$name/probe_tuning/linear_probe.json"
           "$name: linear probe, C by 5-fold subject CV=$R/$name/probe_grouped_cv/linear_probe.json")
done
probe "$R/pretrain_decoder"  # frozen next-event decoder, never trained on the label: the foundation-model probe
rows+=("pretrain_decoder (frozen): linear probe, C on tuning=$R/pretrain_decoder/probe_tuning/linear_probe.json"
       "pretrain_decoder (frozen): linear probe, C by 5-fold subject CV=$R/pretrain_decoder/probe_grouped_cv/linear_probe.json")
run "$PY" -m ehr_embedded.summarize "$R/probe_summary" "${rows[@]}" \
    "count features + LR=$R/baseline_counts/reports/baseline_held_out.json"

rows=()
for s in 0 1 2 3 4; do
    R=runs/ehr_embedded/mimic_split$s
    [ "$s" = 0 ] && R=runs/ehr_embedded/mimic
    probe "$R/finetune_encoder"
    # the frozen representation the transformers start from, on every split (mimic_results.sh's split-0 command)
    run "$PY" -m ehr_embedded.baseline --config configs/ehr_embedded/mimic_baseline.yaml features=mean_embedding \
        embedding_output_dir=$R/long_stay output_dir=$R/baseline_mean_embedding
    rows+=("counts + LR=$R/baseline_counts/reports/baseline_held_out.json"
           "mean MiniLM code embedding + LR=$R/baseline_mean_embedding/reports/baseline_held_out.json"
           "encoder, finetuned head=$R/finetune_encoder/reports/eval_held_out.json"
           "encoder, linear probe (C on tuning)=$R/finetune_encoder/probe_tuning/linear_probe.json"
           "encoder, linear probe (C by subject CV)=$R/finetune_encoder/probe_grouped_cv/linear_probe.json")
done
R=runs/ehr_embedded/mimic
for name in finetune_decoder pretrain_decoder pretrain_decoder_windows; do
    probe "$R/$name"
    [ "$name" = finetune_decoder ] && rows+=("split 0 $name, finetuned head=$R/$name/reports/eval_held_out.json")
    rows+=("split 0 $name, linear probe (C on tuning)=$R/$name/probe_tuning/linear_probe.json"
           "split 0 $name, linear probe (C by subject CV)=$R/$name/probe_grouped_cv/linear_probe.json")
done
run "$PY" -m ehr_embedded.summarize runs/ehr_embedded/mimic_probe "${rows[@]}"
