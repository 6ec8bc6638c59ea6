#!/usr/bin/env bash
# Ablation of the structural features (data.structural=legacy vs quantities) on the --quantities sample catalogue,
# whose price follows amount x unit x pack: for each setting embed, train (grouped validation split), predict, and
# the ridge baseline (text + struct, out of fold); then one table of validation / test / ridge SMAPE.
#   studies/price_fusion/structural_ablation.sh [OUT_DIR] [key=value ...]     (default OUT_DIR runs/price_fusion/ablation)
# Writes the data to OUT_DIR/data, the runs to OUT_DIR/runs (or the runs_dir override) and the table to
# OUT_DIR/structural_ablation.{json,md}. Overrides reach every stage; the data paths, data.structural and the run
# names (legacy, quantities, *_baselines) are the experiment's own and come after them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/_python.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=runs/price_fusion/ablation
if [[ $# -gt 0 && "$1" != *=* ]]; then OUT="$1"; shift; fi
COMMON=(--config configs/price_fusion/demo.yaml "runs_dir=$OUT/runs" train.resume=false "$@")
RUNS="$("$PY" -c "from common.config import load_config; from price_fusion.config import PriceFusionConfig as C
import sys; print(load_config(C, sys.argv[1], sys.argv[2:]).runs_dir)" "${COMMON[@]:1}")"
run "$PY" -m price_fusion.sample_data "$OUT/data" --quantities --tiny-clip
for mode in legacy quantities; do
  ARGS=("${COMMON[@]}" "run_name=$mode" "data.structural=$mode" "data.train_csv=$OUT/data/train.csv"
        "data.test_csv=$OUT/data/test.csv" "data.image_dir=$OUT/data/images" "data.embeddings_dir=$OUT/embeddings_$mode"
        "embed.clip_model=$OUT/data/tiny_clip")
  for stage in embed train predict; do
    run "$PY" -m price_fusion.$stage "${ARGS[@]}"
  done
  run "$PY" -m price_fusion.baselines "${ARGS[@]}" "run_name=${mode}_baselines" "baselines.methods=[median,ridge]" \
    baselines.folds=3 baselines.cv_folds=3 baselines.num_threads=1
done
run "$PY" - "$OUT" "$RUNS" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
from common import metrics
from common.io import atomic_write_text
out, runs = Path(sys.argv[1]), Path(sys.argv[2])
labels = pd.read_csv(out / "data" / "test_labels.csv", dtype={"sample_id": str}).set_index("sample_id")["price"]
rows = {}
for mode in ("legacy", "quantities"):
    run = runs / mode
    val = json.loads((run / "reports" / "train_summary.json").read_text())
    test = pd.read_csv(run / "predictions" / "test_out.csv", dtype={"sample_id": str}).set_index("sample_id")["price"]
    base = runs / f"{mode}_baselines"
    ridge = pd.read_csv(base / "ridge" / "predictions" / "test_out.csv", dtype={"sample_id": str}).set_index("sample_id")["price"]
    summary = json.loads((base / "reports" / "baselines_summary.json").read_text())
    rows[mode] = {"fusion_val_smape": val["smape"],
                  "fusion_test_smape": metrics.smape(labels[test.index].to_numpy(), test.to_numpy()),
                  "ridge_oof_smape": summary["ridge"]["oof_smape"],
                  "ridge_test_smape": metrics.smape(labels[ridge.index].to_numpy(), ridge.to_numpy())}
atomic_write_text(out / "structural_ablation.json", json.dumps(rows, indent=2))
lines = ["| data.structural | fusion val SMAPE (%) | fusion test SMAPE (%) | ridge out-of-fold SMAPE (%) "
         "| ridge test SMAPE (%) |", "|---|---|---|---|---|"]
lines += [f"| {m} | {r['fusion_val_smape']:.2f} | {r['fusion_test_smape']:.2f} | {r['ridge_oof_smape']:.2f} "
          f"| {r['ridge_test_smape']:.2f} |"
          for m, r in rows.items()]
atomic_write_text(out / "structural_ablation.md", "\n".join(lines) + "\n")
print("\n".join(lines))
PY
