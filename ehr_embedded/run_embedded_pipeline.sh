#!/usr/bin/env bash
# Same as scripts/ehr_embedded/run_embedded_pipeline.sh (kept there; this name matches the original's layout).
exec "$(dirname "$0")/../scripts/ehr_embedded/run_embedded_pipeline.sh" "$@"
