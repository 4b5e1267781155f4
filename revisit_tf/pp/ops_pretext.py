"""Pretext-task preprocessing ops: image -> stacked views + labels (stage 2, ``pp``).

Contract: same op contract as ``ops_image`` (factory validated at build
time, ``fn(data) -> new dict``), but a pretext op replaces one image
``[H, W, C]`` by a stack of ``K`` views ``[K, H', W', C]`` *and* writes the
pretext label ``[K]``; all pretext labels are made here, never in the model
or the training loop (style guide 4.3). The trainer later flattens
``[B, K, ...]`` to ``[B * K, ...]`` (reference 4.1: image-major order).

Ops:

* ``rotate4`` - RotNet (reference 3.4, 4.1): the 4 rotations by
  ``r * 90`` degrees counter-clockwise, labels ``[0, 1, 2, 3]``.

Place in the data flow: ``data`` -> ``pp`` (``decode|crop/resize|...``, then
the pretext op, then ``value_range``/``standardize``/``keep``) -> ``models``.
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.pp import utils
from revisit_tf.pp.registry import OpFn, register

NUM_ROTATIONS = 4  # Reference 3.4: 0, 90, 180, 270 degrees.


@register("rotate4")
def get_rotate4(*, key: str = "image", key_label: str = "label") -> OpFn:
    """Rotation pretext: 4 rotated copies of a square image and their labels.

    Copy ``r`` is ``tf.image.rot90(image, k=r)``, i.e. the image rotated by
    ``r * 90`` degrees counter-clockwise, identical to
    ``numpy.rot90(image, r, axes=(0, 1))`` (reference 3.4). The original
    label is discarded and replaced by ``[0, 1, 2, 3]``.

    Put every crop and resize *before* ``rotate4``. A geometric op after the
    rotation would act differently on the 4 copies (e.g. a random crop at a
    different place, a resize that is not rotation-equivariant such as the
    TF1 legacy kernel, which shifts content towards the top-left), and the
    network could read the rotation off that artefact instead of learning
    semantics: see the comment in big_vision's ``pp/ops_image.py`` ``resize``
    ("not equivariant with rotation and lead to the network to learn a
    shortcut in self-supervised rotation task") and tensorflow#6720.
    Value ops (``value_range``, ``standardize``) commute with rotation and may
    come after.

    Args:
        key: key of the input image ``[H, W, C]``, ``H == W``; the stack
            ``[4, H, W, C]`` is written back to it.
        key_label: key that receives the int32 ``[4]`` labels.

    Returns:
        ``fn(data) -> data`` with ``data[key]`` ``[4, H, W, C]`` (same dtype)
        and ``data[key_label] == [0, 1, 2, 3]``. A non-square image fails
        at trace time when its static shape is known, otherwise with a
        runtime ``InvalidArgumentError``.
    """
    utils.check_key("rotate4", "key", key)
    utils.check_key("rotate4", "key_label", key_label)

    def _rotate4(data: dict) -> dict:
        utils.check_has_keys("rotate4", data, [key])
        image = tf.convert_to_tensor(data[key])
        utils.check_image_rank("rotate4", image, max_rank=3)
        height, width = image.shape[0], image.shape[1]
        if height is not None and width is not None and height != width:
            raise ValueError(
                f"rotate4: the image must be square to stack its rotations, got "
                f"shape {image.shape}; crop or resize to a square first."
            )
        shape = tf.shape(image)
        check = tf.debugging.assert_equal(
            shape[0], shape[1], message="rotate4: the image must be square (H == W)"
        )
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        views = [tf.image.rot90(image, k=r) for r in range(NUM_ROTATIONS)]
        result = dict(data)
        result[key] = tf.stack(views, axis=0)  # [4, H, W, C]
        result[key_label] = tf.range(NUM_ROTATIONS, dtype=tf.int32)  # [4]
        return result

    return _rotate4
