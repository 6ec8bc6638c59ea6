#!/usr/bin/env bash
# The MIMIC-IV demo long_stay table of studies/ehr_embedded/RESULTS.md (split seed 0): conversion, stage 1, both baselines,
# three encoder seeds, the decoder pretrained on label cuts and on whole-timeline windows, then one table in
# runs/ehr_embedded/mimic/summary.{md,json}. Needs ../shared/data (see configs/ehr_embedded/mimic_convert.yaml).
#   studies/ehr_embedded/mimic_results.sh            (no arguments: its configs and paths are fixed)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
takes_no_arguments "$@"
C=configs/ehr_embedded
R=runs/ehr_embedded/mimic
run "$PY" -m ehr_embedded.convert_mimic --config "$C/mimic_convert.yaml"
run "$PY" -m ehr_embedded.create_vocab_embeddings --config "$C/mimic_create_embeddings.yaml"
run "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings.yaml"
run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml"
run "$PY" -m ehr_embedded.baseline --config "$C/mimic_baseline.yaml" features=mean_embedding \
    output_dir=$R/baseline_mean_embedding
run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml"
for seed in 1 2; do
    run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_encoder.yaml" training.seed=$seed \
        training.output_dir=$R/finetune_encoder_seed$seed
done
run "$PY" -m ehr_embedded.pretrain --config "$C/mimic_pretrain_decoder.yaml"
run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_decoder.yaml"
run "$PY" -m ehr_embedded.create_embeddings --config "$C/mimic_create_embeddings_windows.yaml"
run "$PY" -m ehr_embedded.pretrain --config "$C/mimic_pretrain_decoder_windows.yaml"
run "$PY" -m ehr_embedded.finetune --config "$C/mimic_finetune_decoder_windows.yaml"
run "$PY" -m ehr_embedded.summarize "$R/summary" \
    "count features (log1p) + LR=$R/baseline_counts/reports/baseline_held_out.json" \
    "mean MiniLM code embedding + LR=$R/baseline_mean_embedding/reports/baseline_held_out.json" \
    "TransformerEncoderEmbedded seed 0=$R/finetune_encoder/reports/eval_held_out.json" \
    "TransformerEncoderEmbedded seed 1=$R/finetune_encoder_seed1/reports/eval_held_out.json" \
    "TransformerEncoderEmbedded seed 2=$R/finetune_encoder_seed2/reports/eval_held_out.json" \
    "decoder pretrained on label cuts=$R/finetune_decoder/reports/eval_held_out.json" \
    "decoder pretrained on windows=$R/finetune_decoder_windows/reports/eval_held_out.json"
