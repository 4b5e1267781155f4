"""Ghost groups: the per-core batch of the original, emulated within a replica.

The original trained on 8 TPU cores (reference 7.4) and computed everything
that depends on the batch per core (reference 7.3): batch-norm statistics,
the Jigsaw permutation subset (reference 4.3, 11.2 item 11) and Exemplar's
triplet mining and its axis-0 normalisation (reference 4.2, 11.2 item 1). A
core saw ``global batch / 8`` source images, i.e. 32 to 144 trunk inputs. On
one device our per-replica batch is the whole global batch, 8x larger. A
*ghost group size* ``G`` splits each per-replica batch into groups of ``G``
consecutive **rows** and computes those batch-dependent quantities per group,
so a run on R replicas with ``G`` rows per group computes what a run on
``R * rows / G`` replicas (cores) would.

What a row is: one **trunk input**, i.e. one row of the image-major batch
``[B * K, h, w, C]`` that ``models.pretext.build_pretext_model`` flattens
``image [B, K, h, w, C]`` into (Rotation K = 4 rotated copies, Exemplar K = 8
crops, Jigsaw/RPL K = 9 patches, supervised K = 1). A group always holds whole
source examples (``G`` is a multiple of ``K``), in order: group ``g`` holds the
images ``g * G / K .. (g + 1) * G / K - 1`` of the per-replica batch and all
their rows, exactly what one core of the original held.
Each consumer reads the same ``G``:

* trunk batch norm (``models.layers.BatchNormalization``): groups of ``G``
  rows of its input (the trunk's rows);
* Jigsaw/RPL head batch norm (``models.heads.patch_head``): the same images,
  i.e. ``G / K * m`` head rows (``m`` labels per image);
* a batch pp op (``pretrain.pp_train_batch``, Jigsaw's ``jigsaw_perms``):
  applied to each group of ``G / K`` source images separately
  (:func:`per_group`), so each group draws its own permutation subset;
* Exemplar's loss and metric (``train.triplet``): mining and normalisation
  among the ``G`` embeddings (``G / K`` images) of a group.

``None`` (the default everywhere) is one group per replica: today's code path,
unchanged. Gin: ``pretext/ghost_groups.gin`` binds every consumer to the macro
``GHOST_GROUP_SIZE``; the ImageNet configs give the ``G`` of 8 cores.

Place in the data flow: used by ``pp`` (batch ops), ``models`` and ``train``;
no gin, no flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from revisit_tf.pp import utils


def check_ghost_group_size(value: object, arg: str = "ghost_group_size") -> int | None:
    """Returns ``value`` as an int (or None) or raises a ValueError naming it.

    Args:
        value: None (no ghost groups) or a positive int ``G`` (rows per group).
        arg: the argument's name in the message.
    """
    if value is None:
        return None
    if not utils.is_int(value) or value < 1:
        raise ValueError(
            f"{arg} must be None or a positive int (rows per group), got {value!r}."
        )
    return int(value)


def rows_per_example(image_shape: Sequence[int | None]) -> int:
    """``K``: trunk rows per source example of a batched image shape.

    Args:
        image_shape: a batched image shape ``[B, K, ..., h, w, C]`` or
            ``[B, h, w, C]``.

    Returns:
        The product of the axes between the batch axis and ``h, w, C``
        (1 for ``[B, h, w, C]``), as ``build_pretext_model`` flattens them.

    Raises:
        ValueError: an unknown view axis.
    """
    views = list(image_shape)[1:-3]
    if any(v is None for v in views):
        raise ValueError(
            f"Ghost groups need a static number of views per example; the batch "
            f"image has shape {list(image_shape)}."
        )
    return math.prod(views) if views else 1


def check_groups(
    group_size: int,
    *,
    rows: int,
    rows_per_example: int = 1,
    what: str = "the per-replica batch",
) -> int:
    """Checks that ``group_size`` splits ``rows`` into whole examples' groups.

    Args:
        group_size: ``G``, rows per group.
        rows: rows of the batch (``B * K``).
        rows_per_example: ``K``; ``G`` must be a multiple of it.
        what: names the batch in the message.

    Returns:
        The number of groups, ``rows // G``.

    Raises:
        ValueError: naming ``G``, ``K`` and the rows.
    """
    if group_size % rows_per_example:
        raise ValueError(
            f"ghost_group_size={group_size} is not a multiple of the "
            f"{rows_per_example} rows (views, crops or patches) per source image "
            f"of {what}: a group must hold whole images (e.g. "
            f"{rows_per_example * max(1, group_size // rows_per_example)})."
        )
    if rows % group_size:
        raise ValueError(
            f"ghost_group_size={group_size} does not divide the {rows} rows of "
            f"{what} ({rows // rows_per_example} images x {rows_per_example} "
            "rows): use a per-replica batch that is a multiple of "
            f"{group_size // rows_per_example} images."
        )
    return rows // group_size


def per_group(
    fn: Callable[[dict], dict], group_size: int | None, *, key: str = "image"
) -> Callable[[dict], dict]:
    """Applies a batch op to each group of ``group_size`` rows separately.

    The batch ``{k: [B, ...]}`` is cut into ``B * K / G`` groups of ``G / K``
    consecutive source examples (``K`` = :func:`rows_per_example` of
    ``data[key]``), ``fn`` runs on each group in order and the results are
    concatenated on axis 0. Inside a ``pp.rng.seeded`` block the groups' draws
    take successive seeds, so the result equals calling ``fn`` on each group
    one after the other in the same block: each group draws its own random
    values (Jigsaw: its own permutation subset, reference 4.3, 7.3). With one
    group (``G = B * K``) or ``group_size=None`` it is ``fn`` itself.

    Args:
        fn: ``dict -> dict`` on a batch, every output batched on axis 0.
        group_size: ``G`` rows per group, or None (returns ``fn``).
        key: the batch entry that gives ``B`` and ``K`` (``[B, K, h, w, C]``).

    Returns:
        The grouped ``dict -> dict``; it needs a static batch size (training
        batches drop the remainder).

    Raises:
        ValueError: (when traced) a dynamic batch size, or a ``G`` that is no
            multiple of ``K`` or does not divide ``B * K``.
    """
    group_size = check_ghost_group_size(group_size)
    if group_size is None:
        return fn

    def grouped(data: dict) -> dict:
        utils.check_has_keys("ghost groups", data, [key])
        image = tf.convert_to_tensor(data[key])
        batch = image.shape[0]
        if batch is None:
            raise ValueError(
                f"Ghost groups of a batch op need a static batch size; {key!r} "
                f"has shape {image.shape} (batch with drop_remainder=True)."
            )
        k = rows_per_example(image.shape)
        n = check_groups(group_size, rows=batch * k, rows_per_example=k)
        if n == 1:
            return fn(data)
        per = batch // n  # source examples per group
        outs = []
        for g in range(n):
            part = {
                name: value[g * per : (g + 1) * per] for name, value in data.items()
            }
            outs.append(fn(part))
        return {name: tf.concat([o[name] for o in outs], axis=0) for name in outs[0]}

    return grouped


def check_training_batch(
    group_size: int | None,
    *,
    example_image_shape: Sequence[int | None],
    global_batch_size: int,
    num_replicas: int = 1,
) -> int:
    """Checks ``G`` against a training run's per-replica batch before it starts.

    Args:
        group_size: ``G`` rows per group, or None (one group per replica).
        example_image_shape: one example's image ``[K, ..., h, w, C]`` or
            ``[h, w, C]`` (``models.pretext.example_spec``).
        global_batch_size: source images per step over all replicas.
        num_replicas: replicas in sync.

    Returns:
        Groups per replica (1 for None).

    Raises:
        ValueError: naming ``G``, ``K``, the per-replica batch and the
            replicas, when ``G`` is no multiple of ``K`` or does not divide
            the replica's ``B * K`` rows.
    """
    group_size = check_ghost_group_size(group_size)
    if group_size is None:
        return 1
    k = rows_per_example([None, *example_image_shape])
    per_replica = global_batch_size // max(1, num_replicas)
    return check_groups(
        group_size,
        rows=per_replica * k,
        rows_per_example=k,
        what=f"the per-replica batch (global batch {global_batch_size} on "
        f"{num_replicas} replica(s))",
    )
