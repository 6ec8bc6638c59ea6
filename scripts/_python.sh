# Sourced by every wrapper under scripts/ and every sbatch file (those from the submit directory, $SLURM_SUBMIT_DIR):
# sets PY, the Python that runs the stages, and `run`, which runs one stage command.
#
# PY is the first of (README.md, "From the laptop to a cluster", states this rule for users):
#   1. $PYTHON when set: a path, or a command name on PATH;
#   2. the active environment: $VIRTUAL_ENV/bin/python (an activated venv), else $CONDA_PREFIX/bin/python (an
#      activated conda env; not conda's `base`, which `conda init` activates in every shell);
#   3. <repo>/.venv/bin/python, where <repo> is the folder holding this scripts/ folder (./scripts/test.sh and
#      ./scripts/demo.sh create it);
#   4. python3 on PATH when it has torch (a cluster module, a container image).
# None of them: one line on stderr and exit 2. A PYTHON or an active environment without an executable python is an
# error too (exit 2), not a silent fall-through to the next rule.
#
# `run CMD ...` runs CMD; with DRY_RUN=1 it prints `DRY_RUN: CMD ...` (shell-quoted, one line on stdout) instead, so a
# test can read every stage command a wrapper would run. Commands that only read the config run for real either way.

_py_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_py_fail() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

if [[ -n "${PYTHON:-}" ]]; then
    PY="$(command -v -- "$PYTHON")" || _py_fail "PYTHON=$PYTHON is not an executable: set it to a Python interpreter"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
    [[ -x "$PY" ]] \
        || _py_fail "the active venv VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python: deactivate it or set PYTHON"
elif [[ -n "${CONDA_PREFIX:-}" && "${CONDA_DEFAULT_ENV:-}" != base ]]; then
    PY="$CONDA_PREFIX/bin/python"
    [[ -x "$PY" ]] \
        || _py_fail "the active conda env CONDA_PREFIX=$CONDA_PREFIX has no bin/python: deactivate it or set PYTHON"
elif [[ -x "$_py_root/.venv/bin/python" ]]; then
    PY="$_py_root/.venv/bin/python"
elif command -v python3 >/dev/null \
        && python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then
    PY="$(command -v python3)"
else
    _py_fail "no Python to run the stages: set PYTHON=/path/to/python, activate the environment the project is" \
        "installed in (venv or conda), or create $_py_root/.venv (./scripts/test.sh does)"
fi
unset _py_root

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf 'DRY_RUN:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# For a wrapper whose stages, configs and paths are fixed: refuse arguments rather than drop them unread.
takes_no_arguments() {
    (($# == 0)) || _py_fail "takes no arguments (got: $*); its configs and paths are fixed: run its stages by hand" \
        "to change them"
}
