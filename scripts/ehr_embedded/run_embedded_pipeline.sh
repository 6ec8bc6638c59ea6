#!/usr/bin/env bash
# The original's three-config pipeline:
#   scripts/ehr_embedded/run_embedded_pipeline.sh CREATE_EMBEDDINGS.yaml PRETRAIN.yaml|none FINETUNE.yaml
# e.g. (sample data):
#   python -m ehr_embedded.sample_data runs/ehr_embedded/sample/meds
#   scripts/ehr_embedded/run_embedded_pipeline.sh configs/ehr_embedded/create_embeddings.yaml \
#       configs/ehr_embedded/pretrain_decoder_embedded.yaml configs/ehr_embedded/finetune_encoder_embedded.yaml
# Stage 1 (vocabulary embeddings, then sequences) reads the first config, pretrain the second (`none` skips it),
# finetune the third; finetune ends with evaluate on held_out.
# Every stage resumes (training.resume=auto), so re-running after a failure continues where it stopped.
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: $0 CREATE_EMBEDDINGS.yaml PRETRAIN.yaml|none FINETUNE.yaml" >&2
    exit 2
fi
for cfg in "$1" "$3"; do
    [ -f "$cfg" ] || { echo "error: config file $cfg not found" >&2; exit 2; }
done
source "$(dirname "${BASH_SOURCE[0]}")/../_python.sh"
run "$PY" -m ehr_embedded.create_vocab_embeddings --config "$1"
run "$PY" -m ehr_embedded.create_embeddings --config "$1"
if [ "$2" != "none" ]; then
    [ -f "$2" ] || { echo "error: config file $2 not found" >&2; exit 2; }
    run "$PY" -m ehr_embedded.pretrain --config "$2"
fi
run "$PY" -m ehr_embedded.finetune --config "$3"
