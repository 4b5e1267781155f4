#!/usr/bin/env bash
# One accelerator check in one short run (goal: under 8 minutes on one GPU):
# a training step of every trunk at k = 4, 224 px in bfloat16 + XLA and
# float32 + XLA against keras.applications.ResNet50 (bfloat16 + XLA), the
# Rotation and Jigsaw steps with their pretext batch built in the step, and
# the L-BFGS probe on 1.28M x 2048 random features for one l2. Writes
# OUT/accelerator.json and OUT/accelerator.md (a markdown table) and prints
# the table. Rows run in priority order; those that no longer fit the time
# budget (--time_budget_s, default 420) are listed as skipped.
#
#   tools/accelerator_check.sh [OUT] [benchmark options...]
#   tools/accelerator_check.sh /tmp/check --reduced      # CPU, tiny (tests)
#
# Python: $PYTHON_BIN, else .venv/bin/python (tools/setup_env.sh), else
# python3; it needs TensorFlow with GPU support for the real check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-accelerator_check}
[ $# -gt 0 ] && shift
PY=${PYTHON_BIN:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
"$PY" -c 'import tensorflow as tf; print("devices:", [d.name for d in tf.config.list_physical_devices()])' 2>/dev/null
exec timeout "${CHECK_TIMEOUT_S:-470}" "$PY" -c \
  'import sys; from revisit_tf.benchmarks import main; sys.exit(main(sys.argv[1:]))' \
  accelerator --output "$OUT/accelerator.json" --table "$OUT/accelerator.md" "$@"
