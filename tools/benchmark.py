"""``python tools/benchmark.py trunks|probe ...`` = ``revisit-benchmark``."""

import sys

from revisit_tf.benchmarks import main

sys.exit(main())
