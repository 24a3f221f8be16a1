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
.venv/bin/pip install -q -e '.[dev,local]'
exec .venv/bin/pytest "$@"
