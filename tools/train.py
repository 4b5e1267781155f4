"""`revisit-train` without the console script: `python tools/train.py --help`."""

from revisit_tf.cli import train_main

if __name__ == "__main__":
    train_main()
