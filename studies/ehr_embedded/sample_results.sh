#!/usr/bin/env bash
# The sample-data figures of studies/ehr_embedded/RESULTS.md ("Shipped sample configs"): every shipped sample config, then one
# table. Writes runs/ehr_embedded/sample/summary.{md,json}. About 5 minutes on 2 CPU cores.
#   studies/ehr_embedded/sample_results.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
R=runs/ehr_embedded/sample
run "$PY" -m ehr_embedded.sample_data "$R/meds"
scripts/ehr_embedded/run_embedded_pipeline.sh "$C/create_embeddings.yaml" "$C/pretrain_decoder_embedded.yaml" \
    "$C/finetune_encoder_embedded.yaml"
run "$PY" -m ehr_embedded.finetune --config "$C/finetune_decoder_embedded.yaml"
run "$PY" -m ehr_embedded.baseline --config "$C/baseline.yaml"
run "$PY" -m ehr_embedded.summarize "$R/summary" \
    "TransformerEncoderEmbedded=$R/finetune_encoder/reports/eval_held_out.json" \
    "TransformerDecoderEmbedded from pretraining=$R/finetune_decoder/reports/eval_held_out.json" \
    "count features + LR=$R/baseline_counts/reports/baseline_held_out.json"
