#!/usr/bin/env bash
# The test command (README, .ci/run): set up the environment, lint, run pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
echo "== ruff check / ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== pytest"
.venv/bin/python -m pytest -q --durations=10 "$@"
