"""`revisit-export` without the console script: `python tools/export.py --help`."""

from revisit_tf.cli import export_main

if __name__ == "__main__":
    export_main()
