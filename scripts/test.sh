#!/usr/bin/env bash
# Set up a virtual environment (.venv) with every extra, then run lint, types and the whole
# test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k engine`.
# Skipped tests are listed with their reason (-rs): the Redis cache tests need `redis-server`
# and the web UI tests need `chromium` on PATH (.ci/run installs both with apt-get).
# CPU-only torch: see CROSSRANK_TORCH_INDEX in scripts/_venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
install_crossrank dev
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest -rs "$@"
