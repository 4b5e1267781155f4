"""Bad input fails early with a message that names the value and the expected form.

One place that shows each user-facing error the spine promises: unknown op,
unknown dataset, missing data directory, wrong image shape, corrupt checkpoint.
(The stage tests check more cases of each.)
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf import cli, configurables, data, pp
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train.checkpoint import CheckpointError

DEMO = "demo/fashion_mnist_rotation.gin"


def test_unknown_op_fails_when_the_pipeline_is_built():
    with pytest.raises(ValueError, match=r"rotat4.*rotate4"):
        pp.get_preprocess_fn("decode|rotat4|value_range(-1, 1)")
    with pytest.raises(ValueError, match="resize"):
        pp.get_preprocess_fn("resize('big')")


def test_unknown_op_in_a_run_fails_before_training(tmp_path):
    cli.parse_gin([DEMO, "smoke.gin"], ["pretrain.pp_train = 'decode|flip|rotate4'"])
    with pytest.raises(ValueError, match=r"'flip'.*flip_lr"):
        configurables.pretrain(workdir=str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"fashion_mnst.*fashion_mnist"):
        data.get_source("fashion_mnst", "train")


def test_missing_data_directory(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.get_source("fashion_mnist_idx", "train", data_dir=missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.get_source("cifar10", "train", data_dir=str(tmp_path))


def test_wrong_image_shape(tmp_path):
    # rotate4 needs square images: caught when the pipeline is traced.
    rotate = pp.get_preprocess_fn("rotate4")
    with pytest.raises(ValueError, match="square"):
        rotate({"image": tf.zeros([28, 32, 1], tf.uint8), "label": tf.constant(0)})
    # The export only accepts the shape it was written for.
    cli.parse_gin([DEMO, "smoke.gin"], ["export_model.random_init = True"])
    path = configurables.export_model(workdir=str(tmp_path))
    loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    assert fn(images=tf.zeros([2, 28, 28, 1]))["default"].shape == (2, 128)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[N, 28, 28, 1\]"):
        fn(images=tf.zeros([2, 28, 28, 3]))


def test_corrupt_checkpoint_on_export(tmp_path):
    workdir = str(tmp_path)
    cli.train_main(
        ["--workdir", workdir, "--gin_file", DEMO, "--gin_file", "smoke.gin"]
    )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for name in os.listdir(ckpt_dir):
        if name.startswith("ckpt-4.data"):
            with open(os.path.join(ckpt_dir, name), "wb") as f:
                f.write(np.random.default_rng(0).bytes(64))
    cli.parse_gin([], [], workdir=workdir)
    with pytest.raises(CheckpointError, match="ckpt-4"):
        configurables.export_model(workdir=workdir)
    # Training falls back to the newest readable checkpoint (ckpt-2), moves
    # the unreadable one aside (nothing is deleted) and writes step 4 again;
    # then the export works.
    cli.train_main(
        ["--workdir", workdir, "--gin_file", DEMO, "--gin_file", "smoke.gin"]
    )
    moved = [
        n for _, _, ns in os.walk(os.path.join(ckpt_dir, "unreadable")) for n in ns
    ]
    assert any(n.startswith("ckpt-4.data") for n in moved)
    assert checkpoint_lib.checkpoint_steps(ckpt_dir)[0] == 4
    cli.parse_gin([], [], workdir=workdir)
    assert configurables.export_model(workdir=workdir).endswith("export")
