#!/usr/bin/env bash
# Submit the building_embed stages in order, each held by --dependency=afterok:<previous job id(s)>:
#   process_tar -> generate_embeddings -> merge_and_split -> compute_visual_neighbors -> train -> convert_to_hf
# With --optuna N, train is replaced by an N-task optuna_worker array (one worker per task, one shared study) and
# fetch_best_and_train, which waits for the whole array (afterok on an array job = every task ended ok):
#   ... -> compute_visual_neighbors -> optuna_worker[0-(N-1)] -> fetch_best_and_train -> convert_to_hf
#
#   CONFIG=configs/building_embed/config.toml scripts/building_embed/slurm/submit_pipeline.sh [--optuna N] [key=value ...]
#
# CONFIG (default configs/building_embed/sample.toml) and every key=value override reach every stage (sbatch exports
# the environment). Prints one "stage job_id" line per job; SBATCH (default sbatch) names the submit command.
set -euo pipefail
shopt -s inherit_errexit  # a failed sbatch inside $(submit ...) stops the chain instead of submitting the rest
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SBATCH="${SBATCH:-sbatch}"
export CONFIG="${CONFIG:-configs/building_embed/sample.toml}"
OPTUNA_WORKERS=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --optuna) OPTUNA_WORKERS="${2:?--optuna needs the number of workers}"; shift 2 ;;
        --optuna=*) OPTUNA_WORKERS="${1#--optuna=}"; shift ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) break ;;
    esac
done
if ! [[ "$OPTUNA_WORKERS" =~ ^[0-9]+$ ]]; then
    echo "submit_pipeline.sh: --optuna $OPTUNA_WORKERS: expected a number of workers (0 = no search)" >&2
    exit 2
fi
mkdir -p runs/building_embed

# submit STAGE DEPENDENCY [sbatch options...] -- prints the job id (sbatch --parsable: "id" or "id;cluster").
submit() {
    local stage="$1" dep="$2"; shift 2
    local args=(--parsable)
    [[ -n "$dep" ]] && args+=("--dependency=afterok:$dep")
    local out
    out="$("$SBATCH" "${args[@]}" "$@" "$HERE/$stage.sbatch" "${OVERRIDES[@]}")"
    local id="${out%%;*}"
    if ! [[ "$id" =~ ^[0-9]+$ ]]; then
        echo "submit_pipeline.sh: $stage: sbatch printed no job id (${out:-nothing}); nothing after it was submitted" >&2
        exit 1
    fi
    echo "$stage $id" >&2
    echo "$id"
}

OVERRIDES=("$@")
jid="$(submit process_tar "")"
jid="$(submit generate_embeddings "$jid")"
jid="$(submit merge_and_split "$jid")"
jid="$(submit compute_visual_neighbors "$jid")"
if [[ "$OPTUNA_WORKERS" -gt 0 ]]; then
    jid="$(submit optuna_worker "$jid" "--array=0-$((OPTUNA_WORKERS - 1))")"
    jid="$(submit fetch_best_and_train "$jid")"
else
    jid="$(submit train "$jid")"
fi
jid="$(submit convert_to_hf "$jid")"
