"""Patch-task preprocessing ops: grids of patches and their labels (stage 2, ``pp``).

Same op contract as ``ops_image`` (factory validated at build time,
``fn(data) -> new dict``). The patch tasks (Jigsaw, Relative Patch Location,
reference 4.3, 4.4) share one input, a 3x3 grid of patches ``[9, h, w, C]``
made by ``crop_patches`` (reference 3.3); their pretext ops only write labels:

* ``jigsaw_perms`` - label = indices of permutations of the permutation set
  (reference 4.3, 4.6). Applied per example it draws an independent subset
  for every image; applied to a *batch* (``pretrain.pp_train_batch``) it
  draws one subset shared by the whole per-replica batch, as the reference
  does every step.
* ``rel_patch_pairs`` - label = ``[0..7]``, the 8 (neighbour, centre) pairs
  in the reference's order (reference 4.4).

The patches are never physically permuted: the model (``models.pretext``)
gathers the per-patch embeddings in the order that each label's row of its
table names, which is equivalent because the trunk sees every patch alone
(reference 4.3), and costs one trunk pass per image instead of one per
permutation.

Original chain (reference 3.5) for Jigsaw/RPL training on ImageNet::

    decode|resize(292)|to_gray(0.66)|random_crop(255)|crop_patches(3, 21)|
    standardize|keep("image")     (+ jigsaw_perms(100, 8) per batch)

Place in the data flow: ``data`` -> ``pp`` (these ops) -> ``models.pretext``.
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.pp import rng, utils
from revisit_tf.pp.registry import OpFn, register
from revisit_tf.pp.utils import ImageFn

# Reference 4.4: the (neighbour, centre) pairs (i, 4), i in this order; the
# label of a pair is its position in this list.
REL_PATCH_NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
CENTRE_PATCH = 4


def patch_offsets(
    height: int, width: int, splits_per_side: int, jitter: int
) -> tuple[int, int, int, int]:
    """Grid arithmetic of reference 3.3.

    Returns:
        ``(cell_h, cell_w, patch_h, patch_w)``: ``cell = size // S``,
        ``patch = cell - jitter``.

    Raises:
        ValueError: when the patches would be empty.
    """
    cell_h, cell_w = height // splits_per_side, width // splits_per_side
    patch_h, patch_w = cell_h - jitter, cell_w - jitter
    if patch_h < 1 or patch_w < 1:
        raise ValueError(
            f"crop_patches: an image of {height}x{width} cut into "
            f"{splits_per_side}x{splits_per_side} cells of {cell_h}x{cell_w} leaves "
            f"no patch with jitter {jitter}; use a larger image or less jitter."
        )
    return cell_h, cell_w, patch_h, patch_w


@register("crop_patches")
@utils.in_key_out_key
def get_crop_patches(
    splits_per_side: int = 3, jitter: int = 0, random: bool = True
) -> ImageFn:
    """Cuts an ``S x S`` grid of patches (reference 3.3).

    Cells are ``(H // S) x (W // S)`` (pixels beyond ``S`` cells are
    dropped), visited row-major: patch ``i * S + j`` comes from the cell at
    row ``i``, column ``j`` (for S = 3: 0 top-left, 4 centre, 8 bottom-right).
    Each patch is ``(cell - jitter)`` pixels per side, taken at a uniformly
    random position inside its cell, independently per patch and per image
    (``random=True``, training), or at the central offset
    ``(cell - patch) // 2`` (``random=False``, evaluation). With
    ``jitter=0`` a patch is its whole cell.

    Args:
        splits_per_side: ``S`` (3 for the paper).
        jitter: cell size minus patch size, ``>= 0`` (reference: 21).
        random: random positions (training) or central ones (evaluation).

    Returns:
        An image function: ``[..., H, W, C]`` with static ``H, W`` (e.g. after
        a fixed-size crop) -> ``[..., S*S, h, w, C]``, same dtype.
    """
    op = "crop_patches"
    splits = utils.check_positive_int(op, "splits_per_side", splits_per_side)
    if not utils.is_int(jitter) or jitter < 0:
        raise ValueError(f"{op}: `jitter` must be an int >= 0, got {jitter!r}.")
    if not isinstance(random, bool):
        raise ValueError(f"{op}: `random` must be a bool, got {random!r}.")

    def _crop_patches(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank(op, image)
        height, width = image.shape[-3], image.shape[-2]
        if height is None or width is None:
            raise ValueError(
                f"{op}: needs a static image size (put a fixed-size crop or resize "
                f"first), got shape {image.shape}."
            )
        cell_h, cell_w, patch_h, patch_w = patch_offsets(height, width, splits, jitter)
        shape = tf.shape(image)
        flat = tf.reshape(image, tf.concat([[-1], shape[-3:]], axis=0))  # [N,H,W,C]
        n = tf.shape(flat)[0]
        num = splits * splits
        grid = tf.range(num)
        cell_top = (grid // splits) * cell_h  # [S*S]
        cell_left = (grid % splits) * cell_w
        if random:
            dy = rng.uniform([n, num], 0, cell_h - patch_h + 1, tf.int32)
            dx = rng.uniform([n, num], 0, cell_w - patch_w + 1, tf.int32)
        else:
            dy = tf.fill([n, num], (cell_h - patch_h) // 2)
            dx = tf.fill([n, num], (cell_w - patch_w) // 2)
        rows = (cell_top + dy)[..., None] + tf.range(patch_h)  # [N, S*S, h]
        cols = (cell_left + dx)[..., None] + tf.range(patch_w)  # [N, S*S, w]
        out = tf.gather(flat, rows, axis=1, batch_dims=1)  # [N, S*S, h, W, C]
        out = tf.gather(out, cols, axis=3, batch_dims=2)  # [N, S*S, h, w, C]
        out_shape = tf.concat([shape[:-3], [num, patch_h, patch_w], shape[-1:]], 0)
        out = tf.reshape(out, out_shape)
        static = image.shape.as_list()
        return tf.ensure_shape(out, [*static[:-3], num, patch_h, patch_w, static[-1]])

    return _crop_patches


def _patch_stack(op: str, data: dict, key: str, num_patches: int) -> tf.Tensor:
    """``data[key]`` as ``[..., P, h, w, C]`` with ``P == num_patches``."""
    utils.check_has_keys(op, data, [key])
    image = tf.convert_to_tensor(data[key])
    rank = image.shape.rank
    if rank not in (4, 5) or image.shape[-4] != num_patches:
        raise ValueError(
            f"{op}: expected patches [{num_patches}, h, w, C] (or a batch "
            f"[B, {num_patches}, h, w, C]) from crop_patches(3, ...), got shape "
            f"{image.shape}."
        )
    return image


@register("jigsaw_perms")
def get_jigsaw_perms(
    num_permutations: int = 100,
    subset_size: int = 8,
    *,
    num_patches: int = 9,
    key: str = "image",
    key_label: str = "label",
) -> OpFn:
    """Jigsaw labels: a random subset of permutation indices (reference 4.3).

    Draws ``subset_size`` distinct indices out of ``0..num_permutations-1``
    (a uniform shuffle, first ``subset_size``), the labels of the
    permutations the model applies to the patch embeddings. On one example
    (``[9, h, w, C]``) the subset is the image's own; on a batch
    (``[B, 9, h, w, C]``, i.e. in ``pretrain.pp_train_batch``) one subset is
    drawn and shared by all images of the per-replica batch, which is what
    the original does at every training step (reference 4.3, 11.2 item 11).
    ``subset_size = num_permutations`` uses every permutation (the
    reference's evaluation). The patches themselves are left in canonical
    order.

    Args:
        num_permutations: size of the permutation set (100; the head's
            number of classes).
        subset_size: permutations per image and step (reference: 8).
        num_patches: patches per image (9).
        key: patches key.
        key_label: receives int32 ``[subset_size]`` (``[B, subset_size]``).

    Returns:
        ``fn(data) -> data`` with the labels written.
    """
    op = "jigsaw_perms"
    num_permutations = utils.check_positive_int(
        op, "num_permutations", num_permutations
    )
    subset_size = utils.check_positive_int(op, "subset_size", subset_size)
    if subset_size > num_permutations:
        raise ValueError(
            f"{op}: `subset_size` ({subset_size}) must be <= num_permutations "
            f"({num_permutations})."
        )
    num_patches = utils.check_positive_int(op, "num_patches", num_patches)
    utils.check_key(op, "key", key)
    utils.check_key(op, "key_label", key_label)

    def _jigsaw_perms(data: dict) -> dict:
        image = _patch_stack(op, data, key, num_patches)
        subset = rng.permutation(num_permutations)
        subset = subset[:subset_size]  # [m]
        if image.shape.rank == 5:  # a batch: one subset for all its images
            subset = tf.tile(subset[None], [tf.shape(image)[0], 1])  # [B, m]
        result = dict(data)
        result[key_label] = subset
        return result

    return _jigsaw_perms


@register("rel_patch_pairs")
def get_rel_patch_pairs(*, key: str = "image", key_label: str = "label") -> OpFn:
    """Relative Patch Location labels ``[0, ..., 7]`` (reference 4.4).

    Label ``l`` stands for the pair (``REL_PATCH_NEIGHBOURS[l]``, centre 4),
    i.e. the neighbour's position: 0 top-left, 1 top, 2 top-right, 3 left,
    4 right, 5 bottom-left, 6 bottom, 7 bottom-right. All 8 pairs are used for
    every image, in training and evaluation, as the reference.

    Args:
        key: patches key, ``[9, h, w, C]`` (or a batch ``[B, 9, h, w, C]``).
        key_label: receives int32 ``[8]`` (``[B, 8]``).

    Returns:
        ``fn(data) -> data`` with the labels written.
    """
    op = "rel_patch_pairs"
    utils.check_key(op, "key", key)
    utils.check_key(op, "key_label", key_label)

    def _rel_patch_pairs(data: dict) -> dict:
        image = _patch_stack(op, data, key, 9)
        labels = tf.range(len(REL_PATCH_NEIGHBOURS), dtype=tf.int32)
        if image.shape.rank == 5:
            labels = tf.tile(labels[None], [tf.shape(image)[0], 1])
        result = dict(data)
        result[key_label] = labels
        return result

    return _rel_patch_pairs
