#!/usr/bin/env bash
# The demo: sets up .venv if needed, runs each package's end-to-end pipeline on generated sample data
# and prints one table of metrics and output locations (default output: demo_output/).
#   ./scripts/demo.sh [--out DIR] [--packages price_fusion,cnc_gcode] [--seed N]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" scripts/demo.py "$@"
