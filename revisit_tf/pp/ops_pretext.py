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
* ``exemplar_copies`` - Exemplar (reference 3.5, 4.2): ``K`` independently
  Inception-preprocessed copies; label = one surrogate-class id per source
  image, repeated ``K`` times.
* The patch tasks (``crop_patches``, ``jigsaw_perms``, ``rel_patch_pairs``)
  live in ``ops_patches``.

Place in the data flow: ``data`` -> ``pp`` (``decode|crop/resize|...``, then
the pretext op, then ``value_range``/``standardize``/``keep``) -> ``models``.
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.pp import ops_image, utils
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


# Exemplar surrogate-class ids are drawn from [0, 2**62): two source images of
# one batch share an id with probability < B**2 / 2**63 (~4e-16 for B = 64).
_EXEMPLAR_ID_RANGE = 2**62


@register("exemplar_copies")
def get_exemplar_copies(
    num_copies: int = 8,
    size=224,
    *,
    legacy: bool = False,
    key: str = "image",
    key_label: str = "label",
) -> OpFn:
    """Exemplar pretext: ``num_copies`` Inception-augmented copies + labels.

    The original's ``crop_inception_preprocess_patches`` (reference 3.1, 3.5):
    the training branch of the Inception preprocessing (section 3.2: random
    crop, resize to ``size``, flip, colour distortion, [-1, 1]) runs
    ``num_copies`` times independently on the same source image. Put
    ``to_gray(0.66)`` *before* this op to share the grayscale decision among
    the copies as the reference does, and ``standardize`` after it for the
    per-copy standardization.

    Labels: the reference's surrogate class is the index of the source image
    in the batch (reference 4.2), which a per-example op cannot know. This op
    writes a random int64 id per source image, repeated ``num_copies`` times;
    the triplet loss only compares labels for equality, so positives are
    exactly the copies of one image, as in the reference.

    Args:
        num_copies: copies per image, int >= 2 (reference: 8).
        size: ``s`` or ``(h, w)`` of each copy (reference: 224).
        legacy: TF1 resize pixel mapping.
        key: image key, ``[H, W, C]`` uint8 (or float in [0, 1]).
        key_label: receives int64 ``[num_copies]``.

    Returns:
        ``fn(data) -> data`` with ``data[key]`` float32
        ``[num_copies, h, w, C]`` in [-1, 1].
    """
    op = "exemplar_copies"
    num_copies = utils.check_positive_int(op, "num_copies", num_copies)
    if num_copies < 2:
        raise ValueError(f"{op}: `num_copies` must be >= 2, got {num_copies}.")
    hw = utils.parse_size(op, "size", size)
    utils.check_key(op, "key", key)
    utils.check_key(op, "key_label", key_label)

    def _exemplar_copies(data: dict) -> dict:
        utils.check_has_keys(op, data, [key])
        image = tf.convert_to_tensor(data[key])
        utils.check_image_rank(op, image, max_rank=3)
        copies = [
            ops_image.inception_preprocess_image(image, hw, train=True, legacy=legacy)
            for _ in range(num_copies)
        ]
        surrogate = tf.random.uniform([], 0, _EXEMPLAR_ID_RANGE, dtype=tf.int64)
        result = dict(data)
        result[key] = tf.stack(copies, axis=0)  # [K, h, w, C]
        result[key_label] = tf.fill([num_copies], surrogate)  # [K]
        return result

    return _exemplar_copies
