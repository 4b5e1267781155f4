"""`revisit-report` without the console script: `python tools/report.py --help`."""

from revisit_tf.cli import report_main

if __name__ == "__main__":
    report_main()
