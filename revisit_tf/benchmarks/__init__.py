"""Benchmarks: ``revisit-benchmark <name> [options]``.

Not a stage of the data flow: each benchmark times one stage against a
baseline measured in the same run (these machines are noisy, so speed is
reported as a ratio), prints a table and writes JSON. Speed is never asserted
in tests.

* ``trunks`` (``revisit_tf.benchmarks.trunks``): training-step images/s of
  each trunk vs ``keras.applications.ResNet50``.
* ``probe`` (``revisit_tf.benchmarks.probe``): the L-BFGS probe vs
  scikit-learn's ``LogisticRegression`` on the same features.
* ``input`` (``revisit_tf.benchmarks.input``): host images/s per core of each
  pretext's ImageNet pipeline on generated JPEGs, and the cores per
  accelerator that implies.
* ``accelerator`` (``revisit_tf.benchmarks.accelerator``): the one-run GPU
  check of ``tools/accelerator_check.sh`` (trunks in bfloat16/float32 with
  and without XLA, Rotation/Jigsaw steps with the pretext built in the step,
  the probe); ``--reduced`` on a CPU.

Each module exposes ``main(argv: list[str] | None) -> int``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = ("trunks", "probe", "input", "accelerator")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches ``revisit-benchmark <name> ...`` to ``benchmarks.<name>.main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        given = f"unknown benchmark {argv[0]!r}; " if argv and argv[0][0] != "-" else ""
        print(
            f"usage: revisit-benchmark {{{','.join(BENCHMARKS)}}} [options]\n"
            f"{given}expected one of {BENCHMARKS}; "
            "`revisit-benchmark NAME --help` lists the options.",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"revisit_tf.benchmarks.{argv[0]}")
    return module.main(argv[1:])
