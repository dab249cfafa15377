#!/usr/bin/env bash
# Set up ./.venv (scripts/setup_env.sh) and run the test suite.
# Tests that need timm's train.py run when TIMM_TRAIN_PY points to it, and skip otherwise.
#   bash scripts/test.sh                      # timm as installed (>=1.0.27)
#   TIMM_VERSION=1.0.27 bash scripts/test.sh  # against a specific timm release
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -rs "$@"
