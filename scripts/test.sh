#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs every package's suite (extra args go to pytest).
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh tests/common    # one suite
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m pytest "$@"
