#!/usr/bin/env bash
# Create ./.venv with everything timm-mkd needs, and Debian's Fashion-MNIST for the tests/demo.
# Idempotent: re-running only installs what is missing.
#   TIMM_VERSION=1.0.27 bash scripts/setup_env.sh   # a specific timm release
#   TIMM_VERSION=latest bash scripts/setup_env.sh   # the newest on PyPI (default: whatever satisfies >=1.0.27)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || $PY -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the versions the tests run against (skipped when both already import).
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || $PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q -e '.[test,plot]'
case "${TIMM_VERSION:-}" in
    "") ;;
    latest) $PIP install -q --upgrade timm ;;
    *) $PIP install -q "timm==${TIMM_VERSION}" ;;
esac
.venv/bin/python -c "import torch, timm, timm_mkd; print('torch', torch.__version__, '| timm', timm.__version__, '| timm-mkd', timm_mkd.__version__)"
