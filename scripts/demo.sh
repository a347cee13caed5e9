#!/usr/bin/env bash
# Set up .venv and run the demo: rerank a bundled example with crossrank.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CROSSRANK_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e ".[dev]"
exec "$VENV/bin/crossrank" rerank "$@" "Which planet is known as the Red Planet?" \
  "Mars is called the Red Planet because iron oxide colours its surface." \
  "Jupiter is the largest planet in the solar system." \
  "火星因表面的氧化铁而被称为红色星球。"
