#!/usr/bin/env bash
# Creates .venv (if missing) and installs revisit_tf with its pinned stack and
# test extras; installs Debian's dataset-fashion-mnist when its files are
# missing. Idempotent: a second run only checks. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Python 3.11-3.13 (setup.cfg python_requires; TensorFlow 2.20/2.21 wheels).
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'; then
  echo "revisit_tf needs Python 3.11, 3.12 or 3.13; $PYTHON is $("$PYTHON" -V 2>&1)." >&2
  echo "Set PYTHON=/path/to/python3.1x." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing revisit_tf and its pinned dependencies (constraints.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check "pip==26.3"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "== installing Debian's dataset-fashion-mnist"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi
