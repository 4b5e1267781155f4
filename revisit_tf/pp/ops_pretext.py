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
  Inception-preprocessed copies plus one random surrogate-class id per source
  image, repeated ``K`` times (the shipped configs use ``copies`` alone: the
  triplet loss takes the surrogate class from the batch structure).
* ``inpaint_mask`` - context-encoder inpainting (Pathak et al. 2016): blanks a
  central (or random) rectangle; writes the masked image, the ``target``
  (unmasked image) and the ``mask`` ``[H, W, 1]``. Not a stacking op.
* The generic multi-view machinery (``copies``, ``surrogate_label``) lives
  in ``ops_views``; ``exemplar_copies`` is built on it.
* The patch tasks (``crop_patches``, ``jigsaw_perms``, ``rel_patch_pairs``)
  live in ``ops_patches``.

Place in the data flow: ``data`` -> ``pp`` (``decode|crop/resize|...``, then
the pretext op, then ``value_range``/``standardize``/``keep``) -> ``models``.
"""

from __future__ import annotations

import math

import tensorflow as tf

from revisit_tf.pp import ops_views, rng, utils
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

    On a batch ``[B, H, W, C]`` (the batch part of a split pipeline,
    ``pp.device``, run on the accelerator) it writes ``[B, 4, H, W, C]`` and
    labels ``[B, 4]``: exactly the per-image results, batched.

    Args:
        key: key of the input image ``[H, W, C]`` (or batch ``[B, H, W, C]``),
            ``H == W``; the stack ``[4, H, W, C]`` (``[B, 4, H, W, C]``) is
            written back to it.
        key_label: key that receives the int32 ``[4]`` (``[B, 4]``) labels.

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
        rank = utils.check_image_rank("rotate4", image, max_rank=4)
        height, width = image.shape[-3], image.shape[-2]
        if height is not None and width is not None and height != width:
            raise ValueError(
                f"rotate4: the image must be square to stack its rotations, got "
                f"shape {image.shape}; crop or resize to a square first."
            )
        shape = tf.shape(image)
        check = tf.debugging.assert_equal(
            shape[-3], shape[-2], message="rotate4: the image must be square (H == W)"
        )
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        # rot90 of a batch [B, H, W, C] rotates every image alike.
        views = [tf.image.rot90(image, k=r) for r in range(NUM_ROTATIONS)]
        labels = tf.range(NUM_ROTATIONS, dtype=tf.int32)  # [4]
        result = dict(data)
        result[key] = tf.stack(views, axis=rank - 3)  # [(B,) 4, H, W, C]
        if rank == 4:
            labels = tf.tile(labels[None], [shape[0], 1])  # [B, 4]
        result[key_label] = labels
        return result

    return _rotate4


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

    This op is exactly ``copies(num_copies, "inception_preprocess(size,
    legacy=legacy)")|surrogate_label`` (``ops_views``), with the rank check
    of a single source image; for the same TF seeds its images are
    bit-identical to the former stand-alone implementation (same random ops
    in the same order).

    Labels: the reference's surrogate class is the index of the source image
    in the batch (reference 4.2). The shipped triplet loss
    (``train.triplet``) derives exactly that from the batch structure (row
    ``b * K + k`` is a copy of image ``b``) and reads no label, so
    ``copies(K, "inception_preprocess(s)")`` alone is the shipped pipeline.
    This op still writes a random int64 id per source image, repeated
    ``num_copies`` times (``surrogate_label``), for losses that compare
    labels for equality.

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
    if not isinstance(legacy, bool):
        raise ValueError(f"{op}: `legacy` must be a bool, got {legacy!r}.")
    utils.check_key(op, "key", key)
    utils.check_key(op, "key_label", key_label)
    copies_fn = ops_views.get_copies(
        num_copies, f"inception_preprocess({hw!r}, legacy={legacy!r}, key={key!r})"
    )
    label_fn = ops_views.get_surrogate_label(key=key, key_label=key_label)

    def _exemplar_copies(data: dict) -> dict:
        utils.check_has_keys(op, data, [key])
        image = tf.convert_to_tensor(data[key])
        utils.check_image_rank(op, image, max_rank=3)
        views = copies_fn({**data, key: image})  # data[key]: [K, h, w, C]
        return label_fn(views)  # data[key_label]: int64 [K]

    return _exemplar_copies


@register("inpaint_mask")
def get_inpaint_mask(
    size: float = 0.5,
    random: bool = False,
    fill: float = 0.0,
    *,
    key: str = "image",
    key_target: str = "target",
    key_mask: str = "mask",
) -> OpFn:
    """Context-encoder inpainting: blanks a rectangle that must be predicted.

    Pathak et al. 2016 ("Context Encoders: Feature Learning by Inpainting",
    section 3.3): a central square of half the side (a quarter of the
    area) is removed and the network reconstructs it; ``random=True`` gives
    the randomly placed block variant. On one image ``[H, W, C]`` with
    static ``H, W``, the region is ``h x w = round(size * H) x round(size *
    W)`` (Python ``round``, half to even) at the top-left offset ``((H - h)
    // 2, (W - w) // 2)``, or, with ``random``, at an offset uniform over
    all ``(H - h + 1) * (W - w + 1)`` valid positions, drawn per image.

    Put it after ``value_range(-1, 1)``: the blanked pixels become ``fill``,
    and ``fill = 0`` is then mid-grey (the mean colour), as in the context
    encoder, whereas on [0, 1] or uint8 images it would be black.

    Args:
        size: side fraction in (0, 1) (reference: 0.5).
        random: random instead of central placement.
        fill: value written into the region.
        key: float image ``[H, W, C]``; receives the masked image.
        key_target: receives the unmasked image, float32 ``[H, W, C]``.
        key_mask: receives float32 ``[H, W, 1]``, 1.0 inside the region.

    Returns:
        ``fn(data) -> data`` with ``data[key] = image * (1 - mask) + fill *
        mask``, ``data[key_target]`` and ``data[key_mask]`` (float32, static
        shapes).

    Raises:
        ValueError: bad arguments or equal keys (build time); an integer
            image, a rank other than 3, unknown ``H, W`` or a region of zero
            size (trace time).
    """
    op = "inpaint_mask"
    if not utils.is_number(size) or not 0 < size < 1:
        raise ValueError(f"{op}: `size` must be a number in (0, 1), got {size!r}.")
    if not isinstance(random, bool):
        raise ValueError(f"{op}: `random` must be a bool, got {random!r}.")
    if not utils.is_number(fill) or not math.isfinite(fill):
        raise ValueError(f"{op}: `fill` must be a finite number, got {fill!r}.")
    keys = {"key": key, "key_target": key_target, "key_mask": key_mask}
    for name, value in keys.items():
        utils.check_key(op, name, value)
    if len(set(keys.values())) != len(keys):
        raise ValueError(
            f"{op}: `key`, `key_target` and `key_mask` must differ, got {keys}."
        )
    size, fill = float(size), float(fill)

    def _inpaint_mask(data: dict) -> dict:
        utils.check_has_keys(op, data, [key])
        image = tf.convert_to_tensor(data[key])
        utils.check_image_rank(op, image, max_rank=3)
        if not image.dtype.is_floating:
            raise ValueError(
                f"{op}: expected a float image, got dtype {image.dtype.name}; put "
                "value_range(-1, 1) before it (fill 0 = mid-grey)."
            )
        height, width = image.shape[0], image.shape[1]
        if height is None or width is None:
            raise ValueError(
                f"{op}: needs a static height and width, got shape {image.shape}; "
                "crop or resize to a fixed size first."
            )
        h, w = round(size * height), round(size * width)
        if h < 1 or w < 1:
            raise ValueError(
                f"{op}: region round({size} * {height}) x round({size} * {width}) "
                f"= {h}x{w} is empty; use a larger image or size."
            )
        if random:
            top = rng.uniform([], 0, height - h + 1, dtype=tf.int32)
            left = rng.uniform([], 0, width - w + 1, dtype=tf.int32)
        else:
            top, left = (height - h) // 2, (width - w) // 2
        rows = tf.range(height)
        cols = tf.range(width)
        in_rows = (rows >= top) & (rows < top + h)  # [H]
        in_cols = (cols >= left) & (cols < left + w)  # [W]
        mask = tf.cast(in_rows[:, None, None] & in_cols[None, :, None], tf.float32)
        target = tf.cast(image, tf.float32)  # [H, W, C]
        result = dict(data)
        result[key_target] = target
        result[key_mask] = mask  # [H, W, 1]
        result[key] = target * (1.0 - mask) + fill * mask
        return result

    return _inpaint_mask
