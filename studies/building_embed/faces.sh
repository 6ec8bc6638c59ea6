#!/usr/bin/env bash
# The ORL faces studies of studies/building_embed/RESULTS.md ("Real identities: ORL faces"): packs the faces
# ($REAL_DATA_DIR/faces_orl_att or ../shared/data/faces_orl_att) into tars of the 3D Street View layout, runs the data
# stages and train.multisplit (frozen vs trained head vs PCA + LDA over identity-disjoint splits).
#   studies/building_embed/faces.sh [efficientnet|pixels|both]
#     efficientnet: configs/building_embed/faces_efficientnet.toml, 10 splits (multisplit.seed 0), the same splits at
#                   training seeds 1 and 2, and 15 other splits (multisplit.seed 1, 3 repeats)
#     pixels:       configs/building_embed/faces_pixels.toml (weight-free 32 x 32 pixel descriptor), 10 splits
# Writes data/building_embed/faces/ and runs/building_embed/<run name>/summary.{json,md} (the tables), run names
# faces_efficientnet, faces_efficientnet_train_seed{1,2}, faces_efficientnet_seed1, faces_pixels.
# Extra key=value arguments go to every stage. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
WHICH=${1:-both}
case "$WHICH" in
    efficientnet|pixels|both) if [ $# -gt 0 ]; then shift; fi ;;
    *=*) WHICH=both ;;
    *) echo "faces.sh: expected efficientnet, pixels or both, got '$1'" >&2; exit 2 ;;
esac
FACES=data/building_embed/faces

data_stages() {
    run "$PY" -m building_embed.preprocess.process_tar --config "$1" "${@:2}"
    run "$PY" -m building_embed.generate.generate_embeddings --config "$1" "${@:2}"
    run "$PY" -m building_embed.preprocess.merge_and_split --config "$1" "${@:2}"
}

run "$PY" -m studies.building_embed.pack_faces "$FACES"
if [ "$WHICH" = efficientnet ] || [ "$WHICH" = both ]; then
    C=configs/building_embed/faces_efficientnet.toml
    data_stages "$C" "$@"
    run "$PY" -m building_embed.train.multisplit --config "$C" "$@"
    for seed in 1 2; do
        run "$PY" -m building_embed.train.multisplit --config "$C" global.seed=$seed \
            global.run_name=faces_efficientnet_train_seed$seed "$@"
    done
    run "$PY" -m building_embed.train.multisplit --config "$C" multisplit.seed=1 multisplit.repeats=3 \
        global.run_name=faces_efficientnet_seed1 "$@"
fi
if [ "$WHICH" = pixels ] || [ "$WHICH" = both ]; then
    C=configs/building_embed/faces_pixels.toml
    data_stages "$C" "$@"
    run "$PY" -m building_embed.train.multisplit --config "$C" "$@"
fi
