#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Two processes (XMATCH_TEST_WORKERS, 0 for one), each taking whole files: a file's module
# fixtures are built once, and the two-replica tests of one file never run side by side; the
# longest files go first (tests/conftest.py).
exec .venv/bin/python -m pytest -q --durations=15 -n "${XMATCH_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "$@"
