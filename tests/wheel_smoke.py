"""Smoke chain run by tests/test_wheel_install.py inside a fresh environment.

Usage: ``python wheel_smoke.py WORKDIR [all]``, from a directory outside the source
tree. Trains Rotation from the shipped ``imagenet/rotation.gin`` with
``smoke.gin`` for 2 steps on ``tfds.testing.mock_data`` ImageNet, exports
and probes it through the binaries' mains (``cli.run``), and prints one JSON
line: where revisit_tf and its gin files were imported from, each stage's exit
code and the probe's rows.
"""

import json
import os
import sys

import tensorflow_datasets as tfds

from revisit_tf import cli, resources

BINDINGS = [
    "pretrain.steps = 2",
    "pretrain.checkpoint_every = 2",
    "linear_probe.train_split = 'train[:16]'",
    "linear_probe.val_split = 'train[16:24]'",
    "linear_probe.test_split = 'validation[:8]'",
    "linear_probe.batch_size = 8",
]
# At the floors (``all``): every one of the export's consumers (smoke.gin
# checks two; test_export_consumers checks all five at the pins).
ALL_CONSUMERS = (
    "export_model.parity_consumers = ('saved_model', 'graph_session', "
    "'tfsm_layer', 'hub_keras_layer', 'tflite')"
)


def main(workdir: str, consumers: str = "smoke") -> None:
    config = ["--gin_file", "imagenet/rotation.gin", "--gin_file", "smoke.gin"]
    for binding in BINDINGS + ([ALL_CONSUMERS] if consumers == "all" else []):
        config += ["--gin_bindings", binding]
    codes = {}
    with tfds.testing.mock_data(num_examples=32):
        codes["train"] = cli.run(cli.train_main, ["--workdir", workdir, *config])
        codes["export"] = cli.run(cli.export_main, ["--workdir", workdir])
        codes["probe"] = cli.run(cli.probe_main, ["--workdir", workdir])
    results = os.path.join(workdir, "probe", "results.jsonl")
    rows = []
    if os.path.exists(results):
        with open(results) as f:
            rows = [json.loads(line) for line in f]
    import revisit_tf
    from revisit_tf.export import read_metadata

    parity = {}
    if os.path.isdir(os.path.join(workdir, "export")):
        consumers = read_metadata(os.path.join(workdir, "export"))["parity"]
        parity = {k: v["status"] for k, v in consumers["consumers"].items()}

    print(
        "WHEEL_SMOKE "
        + json.dumps(
            {
                "revisit_tf": revisit_tf.__file__,
                "gin_dir": resources.gin_dir(),
                "codes": codes,
                "parity": parity,
                "rows": [
                    {k: r.get(k) for k in ("endpoint", "protocol", "test_top1")}
                    for r in rows
                ],
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
