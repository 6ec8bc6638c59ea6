#!/usr/bin/env bash
# How much of each target a window can see, per labelling: for the 60 programs of the measured-only tables,
# cut with --window-end executing and with completed at --settle-samples 0..4, the share of test X/Y/Z targets within
# 0.1 mm of the window's last measured position, and of F targets within 2 % of the measured path speed (a) at the
# last step and (b) on the last speed plateau of the window (studies.cnc_gcode.measured_only.plateau_speed): what a plain
# reading of the velocity channels can know of F.
#   studies/cnc_gcode/measured_only_observability.sh [out_dir, default /tmp/cnc_observability]
# Prints one line per labelling; the data go to out_dir.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/cnc_observability}
source scripts/_python.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY -m cnc_gcode.sample_data "$OUT/executing" --programs 60 --max-per-line 2 > /dev/null
for n in 0 1 2 3 4; do
  $PY -m cnc_gcode.sample_data "$OUT/completed_$n" --programs 60 --window-end completed --settle-samples $n > /dev/null
done
$PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path

from cnc_gcode.data import load_windows
from studies.cnc_gcode.measured_only import feed_seen, observable, plateau_share
from cnc_gcode.tokenizer import Vocabulary

vocab = Vocabulary()
for folder in sorted(Path(sys.argv[1]).iterdir()):
    w = load_windows(folder / "test.npz", vocab)
    axis, reached = observable(vocab, w)
    n_f, last_step = feed_seen(vocab, w)
    print(f"{folder.name}: {len(w)} test windows; X/Y/Z within 0.1 mm of the last measured position "
          f"{reached.sum()}/{axis.sum()} = {reached.sum() / axis.sum():.3f}; F within 2 % of the path speed at the "
          f"last step {last_step:.3f}, on the last plateau {plateau_share(vocab, w):.3f} (of {n_f})")
PYEOF
