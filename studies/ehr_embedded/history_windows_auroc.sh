#!/usr/bin/env bash
# Held-out AUROC of the history windows on the MIMIC-IV demo long_stay task, five subject splits.
# For each window variant and each split (split seed 0 = runs/ehr_embedded/mimic, seeds 1-4 =
# runs/ehr_embedded/mimic_split{1..4}; their meds/ and vocab/ are read, never rebuilt) it builds the long_stay store
# with configs/ehr_embedded/mimic_create_embeddings.yaml plus the variant's overrides, then the counts baseline
# (mimic_baseline.yaml, max_length 256) and one encoder (seed 0, mimic_finetune_encoder.yaml, max_length 256):
#   last256_adm  last 256 events + admission kept       sequences.max_length=256 sequences.context_codes=[HOSPITAL_ADMISSION]
#   days30_adm   last 30 days (at most 256) + admission  ... + sequences.max_history_hours=720
#   h24_adm      last 24 h (at most 256) + admission     ... + sequences.max_history_hours=24
# Writes runs/ehr_embedded/mimic_history_auroc/<variant>/split<s>/{store,baseline_counts,finetune_encoder} and one
# summary runs/ehr_embedded/mimic_history_auroc/summary.{md,json}: per variant the counts + LR and encoder rows of
# the five splits and their mean +- sd rows, plus, as reference, the count-window runs of mimic_splits.sh (last 256
# events of the shipped store, no admission kept; their report files are read, not re-run).
# A store whose report.json exists, and a run whose held-out report exists, is skipped (a run directory without its
# report, e.g. from a killed run, is deleted and re-run), so re-running only finishes what is missing.
#   studies/ehr_embedded/history_windows_auroc.sh       (no arguments; VARIANTS="last256_adm
#                                                        days30_adm" restricts the variants run and summarised)
# About 40 minutes on 2 CPU cores for all three variants (15 stores of ~20 s, 15 baselines of ~30-45 s, 15 encoders
# of ~1.5-3.5 min) with OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
C=configs/ehr_embedded
OUT=runs/ehr_embedded/mimic_history_auroc
VARIANTS=(${VARIANTS:-last256_adm days30_adm h24_adm})
ADM='sequences.context_codes=[HOSPITAL_ADMISSION]'
declare -A OVERRIDES=(
    [last256_adm]="sequences.max_length=256 $ADM"
    [days30_adm]="sequences.max_length=256 sequences.max_history_hours=720 $ADM"
    [h24_adm]="sequences.max_length=256 sequences.max_history_hours=24 $ADM"
)
declare -A NAMES=(
    [last256_adm]="last 256 events + admission"
    [days30_adm]="last 30 days (<=256) + admission"
    [h24_adm]="last 24 h (<=256) + admission"
)
split_root() { if [ "$1" = 0 ]; then echo runs/ehr_embedded/mimic; else echo "runs/ehr_embedded/mimic_split$1"; fi; }
stamp() { echo "[$(date -u +%T)] $*"; }

rows=()
for s in 0 1 2 3 4; do
    R=$(split_root $s)
    rows+=("last 256 events (mimic_splits.sh), counts + LR=$R/baseline_counts/reports/baseline_held_out.json")
done
for s in 0 1 2 3 4; do
    R=$(split_root $s)
    rows+=("last 256 events (mimic_splits.sh), encoder=$R/finetune_encoder/reports/eval_held_out.json")
done

for v in "${VARIANTS[@]}"; do
    [ -n "${OVERRIDES[$v]:-}" ] || { echo "unknown variant $v" >&2; exit 2; }
    read -r -a OV <<< "${OVERRIDES[$v]}"
    for s in 0 1 2 3 4; do
        R=$(split_root $s)
        D=$OUT/$v/split$s
        mkdir -p "$D"
        if [ ! -f "$D/store/report.json" ]; then
            stamp "$v split $s: store"
            run "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings.yaml" \
                data.data_dir=$R/meds data.labels_filepath=$R/meds/labels/long_stay data.vocab_embedding_path=$R/vocab \
                data.embedding_output_dir=$D/store "${OV[@]}"
        fi
        if [ ! -f "$D/baseline_counts/reports/baseline_held_out.json" ]; then
            stamp "$v split $s: counts baseline"
            rm -rf "$D/baseline_counts"
            run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" embedding_output_dir=$D/store \
                output_dir=$D/baseline_counts
        fi
        if [ ! -f "$D/finetune_encoder/reports/eval_held_out.json" ]; then
            stamp "$v split $s: encoder"
            rm -rf "$D/finetune_encoder"
            run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" data.embedding_output_dir=$D/store \
                training.output_dir=$D/finetune_encoder
        fi
    done
done

for v in "${VARIANTS[@]}"; do
    for s in 0 1 2 3 4; do
        rows+=("${NAMES[$v]}, counts + LR=$OUT/$v/split$s/baseline_counts/reports/baseline_held_out.json")
    done
    for s in 0 1 2 3 4; do
        rows+=("${NAMES[$v]}, encoder=$OUT/$v/split$s/finetune_encoder/reports/eval_held_out.json")
    done
done
stamp "summarize"
run "$PY" -m ehr_embedded.summarize $OUT/summary "${rows[@]}"
stamp "done"
