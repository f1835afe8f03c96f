#!/usr/bin/env bash
# Quick start, command 2: set up (once) and run the whole test suite (lint + tests, browser tests included).
#   ./test.sh            default tier (well under 15 minutes on 2 CPU cores)
#   ./test.sh --slow     also the slow tier (full-size SD1.5 architecture, long sampler statistics)
set -euo pipefail
cd "$(dirname "$0")"
DIFUSI_EXTRAS=test source ./tools/setup-venv.sh
./tools/setup-chromium.sh
ruff check src tests bench tools
if [ "${1:-}" = "--slow" ]; then
  shift
  exec python -m pytest -m "" "$@"
fi
exec python -m pytest "$@"
