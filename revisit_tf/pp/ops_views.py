"""Multi-view ops: run a sub-pipeline several times and stack (stage 2, ``pp``).

Contract: the same op contract as ``ops_image`` (a registered factory that
validates its arguments at build time and returns ``fn(data) -> new dict``).
The ops here turn one example into ``K`` *views* of it:

* ``copies(num_copies, pipeline)`` builds the pp string ``pipeline`` once
  (at build time) and applies it ``num_copies`` times independently to the
  same data dict, stacking every value the sub-pipeline produced or changed
  along a new leading axis. This is how SimCLR's two augmented views (Chen
  et al. 2020, section 2.1 and appendix A) and Exemplar's ``K`` copies
  (Dosovitskiy et al. 2014; the paper's section 3, reference 4.2) are
  written as gin strings, e.g.
  ``'decode|copies(2, "inception_crop(224, area_min=0.08)|flip_lr")|...'``.
* ``surrogate_label`` writes one random surrogate-class id per source image,
  repeated over the ``K`` views (an instance-discrimination label for losses
  that read labels; the shipped ones take positives from the batch
  structure).

Place in the data flow: ``data`` -> ``pp`` (``decode``, then ``copies`` with
the per-view augmentations, then ``surrogate_label`` / ``value_range`` /
``keep``) -> ``models``; the trainer flattens ``[B, K, ...]`` to
``[B * K, ...]`` (image-major order, reference 4.1).
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from revisit_tf.pp import rng, utils
from revisit_tf.pp.registry import OpFn, register

# Surrogate-class ids are drawn from [0, 2**62): two source images of one
# batch share an id with probability < B**2 / 2**63 (~4e-16 for B = 64).
_EXEMPLAR_ID_RANGE = 2**62


def _as_tensor(value):
    """Tensors (and nested dicts) as they are, anything else converted."""
    if tf.is_tensor(value) or isinstance(value, Mapping):
        return value
    return tf.convert_to_tensor(value)


@register("copies")
def get_copies(num_copies: int, pipeline: str) -> OpFn:
    """Applies the pp string ``pipeline`` ``num_copies`` times and stacks.

    Contract:

    * ``pipeline`` is built once, when this op is built, with
      ``builder.get_preprocess_fn``; any error of the sub-pipeline (syntax,
      unknown op, bad argument) is raised *then*, as a ``ValueError`` that
      names ``copies`` and carries the inner builder's message (which names
      the inner op).
    * At run time the built sub-pipeline is called ``num_copies`` times on the
      same input dict. Its random ops are separate graph ops per call, so
      every copy draws independently (eagerly and inside
      ``tf.data.Dataset.map``).
    * For every key of the sub-pipeline's output: if the value is the
      identical object that the input held under that key in every copy
      (the sub-pipeline did not touch it), it passes through unstacked;
      otherwise the ``num_copies`` values are stacked along a new axis 0
      (``[...] -> [num_copies, ...]``), e.g. ``image [H, W, C] -> [K, h, w,
      C]``, and a key the sub-pipeline *wrote* (such as a label) is stacked
      too. Keys the sub-pipeline dropped (``keep``) are dropped.
    * Every copy must give the same shape per key (give the crop a size:
      ``inception_crop(224)``, not ``inception_crop``), otherwise stacking
      fails (``ValueError`` at trace time for static shapes, else an
      ``InvalidArgumentError`` at run time).

    Quoting: the sub-pipeline is a string argument inside a pipeline string
    that is itself usually a gin string, so use the other quote type for it
    (``pp_train = 'decode|copies(2, "inception_crop(28)|flip_lr")'``) or
    escape the inner quotes (``\\"``). A ``|`` inside the quoted argument does
    not split the outer pipeline.

    Example:

        pp = get_preprocess_fn(
            'decode|copies(2, "inception_crop(28)|flip_lr")|value_range(-1, 1)'
        )
        # {"image": uint8 [H, W, C]} -> {"image": float32 [2, 28, 28, C]}

    Args:
        num_copies: number of independent applications ``K``, int >= 1.
        pipeline: a non-empty pp string (see ``builder``).

    Returns:
        ``fn(data) -> data`` as described above.

    Raises:
        ValueError: bad ``num_copies``, a non-string or empty ``pipeline``,
            or any build-time error of the sub-pipeline.
    """
    op = "copies"
    num_copies = utils.check_positive_int(op, "num_copies", num_copies)
    if not isinstance(pipeline, str) or not pipeline.strip():
        raise ValueError(
            f"{op}: `pipeline` must be a non-empty pp string such as "
            f"'inception_crop(224)|flip_lr', got {pipeline!r}."
        )
    # Imported here: the builder imports this module to register its ops.
    from revisit_tf.pp import builder

    try:
        sub_fn = builder.get_preprocess_fn(pipeline, log_data=False)
    except ValueError as err:
        raise ValueError(
            f"{op}: cannot build the sub-pipeline `pipeline`={pipeline!r}: {err}"
        ) from err

    def _copies(data: dict) -> dict:
        if not isinstance(data, Mapping):
            raise ValueError(f"{op}: expected a dict of tensors, got {type(data)!r}.")
        # Tensors once, up front, so that an untouched value is the identical
        # object in every copy (a no-op for tensors, i.e. inside tf.data).
        data = {k: _as_tensor(v) for k, v in data.items()}
        try:
            outs = [sub_fn(data) for _ in range(num_copies)]
        except ValueError as err:
            raise ValueError(f"{op}: sub-pipeline {pipeline!r} failed: {err}") from err
        keys = list(outs[0])
        result = {}
        for k in keys:
            values = [out[k] for out in outs]
            if k in data and all(v is data[k] for v in values):
                result[k] = data[k]  # untouched: passes through unstacked
            else:
                result[k] = tf.stack(values, axis=0)  # [num_copies, ...]
        return result

    return _copies


@register("surrogate_label")
def get_surrogate_label(*, key: str = "image", key_label: str = "label") -> OpFn:
    """Writes one random surrogate-class id per source image, for its K views.

    The Exemplar surrogate class (reference 3.5, 4.2) is the index of the
    source image in the batch, which a per-example op cannot know; instead
    one id is drawn uniformly from ``[0, 2**62)`` per example and repeated
    over the ``K`` views. A loss that compares labels for equality then
    sees exactly the views of one image as positives; two images collide
    with probability ``< B**2 / 2**63``. The shipped triplet and NT-Xent
    losses (``train.triplet``, ``train.contrastive``) need no label: they take
    the positives from the batch structure (row ``b * K + k`` is a view of
    image ``b``).

    Args:
        key: key of the stack of views ``[K, ...]`` (rank >= 4, e.g.
            ``[K, H, W, C]`` from ``copies``); only its leading axis is read.
        key_label: receives int64 ``[K]``, all entries equal.

    Returns:
        ``fn(data) -> data`` with ``data[key_label]`` int64 ``[K]`` (static
        ``K`` when ``data[key]`` has a static leading axis).

    Raises:
        ValueError: bad keys (build time); a missing key or an input of rank
            < 4 (trace time).
    """
    op = "surrogate_label"
    utils.check_key(op, "key", key)
    utils.check_key(op, "key_label", key_label)

    def _surrogate_label(data: dict) -> dict:
        utils.check_has_keys(op, data, [key])
        views = tf.convert_to_tensor(data[key])
        rank = views.shape.rank
        if rank is None or rank < 4:
            raise ValueError(
                f"{op}: expected a stack of views [K, H, W, C] under {key!r} (put "
                f"it after `copies`), got shape {views.shape}."
            )
        surrogate = rng.uniform([], 0, _EXEMPLAR_ID_RANGE, dtype=tf.int64)
        num_views = views.shape[0]
        if num_views is None:
            num_views = tf.shape(views)[0]
        result = dict(data)
        result[key_label] = tf.fill([num_views], surrogate)  # [K]
        return result

    return _surrogate_label
