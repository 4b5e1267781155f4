"""`revisit-probe` without the console script: `python tools/probe.py --help`."""

from revisit_tf.cli import probe_main

if __name__ == "__main__":
    probe_main()
