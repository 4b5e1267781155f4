"""Small shared test helpers (style guide 4.9: a few focused helpers, no god class)."""

import numpy as np
import tensorflow as tf

from revisit_tf.pp import get_preprocess_fn


def run_both(fn, data):
    """Runs ``fn`` eagerly and inside ``tf.data.Dataset.map``.

    Returns:
      ``(eager, in_dataset)``: the two results as dicts of numpy arrays.
    """
    tensors = {k: tf.convert_to_tensor(v) for k, v in data.items()}
    eager = fn(tensors)
    (in_dataset,) = list(tf.data.Dataset.from_tensors(tensors).map(fn))
    return (
        {k: np.asarray(v) for k, v in eager.items()},
        {k: np.asarray(v) for k, v in in_dataset.items()},
    )


def run_pipeline(pipeline, data):
    """Builds the pp string ``pipeline`` and runs it with :func:`run_both`."""
    return run_both(get_preprocess_fn(pipeline, log_data=False), data)


def two_replica_strategy():
    """MirroredStrategy on the 2 logical CPUs of conftest.py.

    ``ReductionToOneDevice`` instead of the default collective all-reduce: the
    collective ops of different MirroredStrategy objects in one process share
    instance keys and abort on a shape or dtype mismatch (tests/test_train_loop.py
    and others create their own strategies). The optimizer path is the same:
    a replica-context SUM all-reduce, then ``extended.update`` per replica.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2, "conftest should create 2 logical CPUs"
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def export_tiny_patch_model(path, *, num_classes: int) -> str:
    """A Jigsaw-style patch export: 3x3 patches of 8x8x1 from 24x24x1 images.

    A tiny ResNet50 v1 patch trunk (random init), the export cutting and
    standardising the patches itself (reference 8.3). Returns the path.
    """
    from revisit_tf.export import saved_model as export_lib
    from revisit_tf.models import factory

    trunk = factory.build_trunk(
        "resnet50_v1", width=0.25, units=(1, 1, 1, 1), num_classes=num_classes,
        patch_variant=True, input_shape=(8, 8, 1),
    )  # fmt: skip
    pp = get_preprocess_fn("crop_patches(3, 0, random=False)|standardize")
    patch_pp = get_preprocess_fn("standardize")
    return export_lib.export_saved_model(
        trunk,
        str(path),
        image_shape=(24, 24, 1),
        preprocess=lambda x: pp({"image": x})["image"],
        patch_preprocess=lambda x: patch_pp({"image": x})["image"],
    )
