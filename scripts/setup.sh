#!/usr/bin/env bash
# Creates .venv with Python 3.11 (or $PYTHON) and installs tfx_xmatch with the given extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
extras="${1:-}"
# The pinned stack (TF 2.20, ScaNN 1.4.2) has wheels for Python 3.10-3.12 only.
supported='import sys; sys.exit(not (3, 10) <= sys.version_info[:2] < (3, 13))'
if [ -z "$PYTHON" ]; then
  echo "setup.sh: no python3.11 or python3 on PATH; install Python 3.11, or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PYTHON" -c "$supported" 2>/dev/null; then
  echo "setup.sh: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); tfx_xmatch needs 3.10-3.12 (3.11 recommended): set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "$supported" 2>/dev/null; then
  echo "setup.sh: .venv has Python $(.venv/bin/python -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'), outside 3.10-3.12: making it again with $PYTHON" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  # A failed `venv` (no ensurepip, say) leaves no half-made .venv for the next run to reuse.
  "$PYTHON" -m venv .venv || { rm -rf .venv; exit 1; }
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
