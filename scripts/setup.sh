#!/usr/bin/env bash
# Set up AIGC Studio in ./.venv: a virtual environment, the CPU build of PyTorch, the package.
#   scripts/setup.sh            package + test tools
#   scripts/setup.sh --corpora  also the Debian packages with the named data sets (fortunes, fortunes-zh,
#                               dataset-fashion-mnist; sonic-pi-samples, the drum hits, and opencv-doc, the
#                               clip set vtest, without recommends)
# AIGC_TORCH chooses the torch requirement (default torch==2.13.0, the CPU build on this machine kind;
# on a CUDA machine use e.g. AIGC_TORCH=torch). Every other package is installed at the release in
# requirements.lock (the versions the test suite passed with; scripts/lock.sh refreshes it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--corpora" ]; then
    if [ ! -f /usr/share/games/fortunes/tang300 ] || [ ! -f /usr/share/games/fortunes/zippy ] \
        || [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        echo "installing the Debian packages fortunes, fortunes-zh and dataset-fashion-mnist..." >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes fortunes-zh dataset-fashion-mnist >/dev/null
    fi
    if [ ! -f /usr/share/sonic-pi/samples/bd_808.flac ]; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        echo "installing the Debian package sonic-pi-samples (the drum hits of --data drums)..." >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends sonic-pi-samples >/dev/null
    fi
    if [ ! -f /usr/share/doc/opencv-doc/examples/data/vtest.avi ]; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        echo "installing the Debian package opencv-doc (vtest.avi, the clips of --data vtest; 96 MB)..." >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends opencv-doc >/dev/null
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating the virtual environment .venv..." >&2
    "$PYTHON" -m venv .venv
fi
echo "installing PyTorch (${AIGC_TORCH:-torch==2.13.0}) and the aigc package at the releases of requirements.lock..." >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock "${AIGC_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
.venv/bin/python - <<'PY'
import sys
from importlib.metadata import version
print(f"set up .venv: aigc {version('aigc')} with torch {version('torch')}, transformers {version('transformers')}, "
      f"diffusers {version('diffusers')} (every package but torch at its release in requirements.lock)", file=sys.stderr)
PY
