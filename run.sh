#!/usr/bin/env bash
# Quick start, command 1: set up (once) and generate an image with the embedded difusi-mini model.
#   ./run.sh                                   -> "a red circle on a blue background"
#   ./run.sh "a big yellow square at the top"  -> any prompt; extra args go to `difusi generate`
set -euo pipefail
cd "$(dirname "$0")"
DIFUSI_EXTRAS="${DIFUSI_EXTRAS:-graph}" source ./tools/setup-venv.sh
if [ $# -eq 0 ]; then set -- "a red circle on a blue background"; fi
exec difusi generate "$@"
