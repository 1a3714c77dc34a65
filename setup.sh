#!/usr/bin/env bash
# One-shot set-up of cnm on a Debian/Ubuntu machine with Python >= 3.10:
#   bash setup.sh          # .venv with cnm, every back-end (ffcv, DALI, triton), matplotlib, tensorboard
#   bash setup.sh --dev    # ... plus the test tools
# FFCV needs system libraries (pkg-config, libturbojpeg, OpenCV): installed with apt when run as
# root, otherwise the exact command is printed and cnm is installed without the ffcv extra.
# Re-running is cheap: nothing is reinstalled while pyproject.toml and setup.sh are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${CNM_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH=${CNM_TORCH:-torch==2.13.0}   # pinned: a looser spec pulls a different (huge) build
extras="ffcv,dali,triton,plot,tensorboard"
[ "${1:-}" = "--dev" ] && extras="$extras,dev"

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  { echo "setup.sh: Python >= 3.10 is required ($("$PY" --version 2>&1) found)"; exit 1; }

apt_pkgs="pkg-config libturbojpeg0-dev libopencv-dev"
if ! { command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg && pkg-config --exists opencv4; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup.sh: installing FFCV's system packages: $apt_pkgs"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $apt_pkgs >/dev/null
  else
    echo "setup.sh: FFCV needs system packages; run:  sudo apt-get install -y $apt_pkgs"
    echo "setup.sh: continuing without the ffcv extra (the dali, resident and cpu loaders work)"
    extras=${extras/ffcv,/}
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.cnm-setup-$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH"
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  rm -f "$VENV"/.cnm-setup-*; touch "$stamp"
fi
echo "setup.sh: ready ($("$VENV/bin/cnm" --version)); extras: $extras"
