#!/usr/bin/env bash
# The test command (README, .ci/run): set up the environment, lint, run pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
# The study's slurm executor is tested against a real single-node SLURM
# (tests/slurm_cluster.py starts and stops it); here it must not be skipped.
bash tools/setup_slurm.sh
# The kill tier injects SIGKILL inside TensorFlow's renames with strace.
if ! command -v strace >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq strace >/dev/null || (apt-get update -qq && apt-get install -y -qq strace >/dev/null)
fi
export REVISIT_TF_REQUIRE_SLURM=1
echo "== ruff check / ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== pytest"
# Two worker processes, one test file each at a time (a file's module
# fixtures and its order stay in one process): the kill tier's subprocesses
# and TF's single-threaded tracing leave a core idle in a serial run.
.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
