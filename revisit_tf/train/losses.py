"""The task seam of the training stage: loss and metric functions (stage 4).

Contract (every pretext task, README "Adding a pretext task"):

* ``batch`` is one replica's batch exactly as the input pipeline made it:
  a dict of tensors whose leading axis is the per-replica batch ``B`` in
  *source examples* (Rotation ``image [B, 4, H, W, C]``, ``label [B, 4]``;
  Jigsaw ``image [B, 9, h, w, C]``, ``label [B, 8]``; inpainting
  ``image``/``target [B, H, W, C]``, ``mask [B, H, W, 1]``).
* ``outputs`` is the pretext model's output dict
  (``models.pretext.build_pretext_model``): ``logits`` and the head's other
  outputs, plus the trunk endpoints, whose rows are the trunk inputs
  flattened image-major (row ``b * K + k`` is view ``k`` of example ``b``).
* ``loss_fn(batch, outputs) -> [B]`` (float32, or the outputs' float64):
  one value per source example.
  The loop averages it with ``tf.nn.compute_average_loss(...,
  global_batch_size)`` over the *global* batch in source examples (as SimCLR
  tf2 and Model Garden), so summing gradients over replicas gives the global
  mean (reference 7.3: the TPU optimizer averaged gradients across cores).
  How the rows of one example (views, patches, pixels) combine is the loss
  function's business, never the loop's.
* ``metric_fn(batch, outputs) -> {name: [B]}`` float32: per-example values
  that the loop averages over the global batch and logs by name (names with
  ``accuracy`` are printed as percentages).

This module holds the helpers every task uses and the classification
objectives (Rotation, Jigsaw, Relative Patch Location, supervised:
reference 4.1, 4.3-4.5). Exemplar's triplet loss is in ``train.triplet``,
SimCLR's NT-Xent in ``train.contrastive`` and inpainting's masked L2 in
``train.reconstruction``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

Batch = Mapping[str, tf.Tensor]
Outputs = Mapping[str, tf.Tensor]
LossFn = Callable[[Batch, Outputs], tf.Tensor]
MetricFn = Callable[[Batch, Outputs], "dict[str, tf.Tensor]"]


def full_precision(x: tf.Tensor) -> tf.Tensor:
    """``x`` in float32 if it is half precision (mixed-precision outputs), else ``x``.

    Losses are computed in float32 under mixed precision; float32 and float64
    inputs are kept (the float64 replica-parity tests rely on it).
    """
    x = tf.convert_to_tensor(x)
    if x.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(x, tf.float32)
    return x


def examples_in(batch: Batch) -> tf.Tensor:
    """``B``, the number of source examples of ``batch`` (int32 scalar).

    The leading dimension of ``batch["image"]`` (of the first key in sorted
    order for a batch without images); every tensor of a batch shares it.
    """
    if not batch:
        raise ValueError("The batch is an empty dict; expected {'image': ...}.")
    key = "image" if "image" in batch else sorted(batch)[0]
    return tf.shape(batch[key])[0]


def per_example_mean(values: tf.Tensor, batch: Batch) -> tf.Tensor:
    """Averages per-row values over the rows of each source example.

    Args:
        values: ``[B * R, ...]`` (image-major rows, e.g. the ``B * 4``
            rotated copies, or ``[B, ...]`` for one row per example); any
            trailing axes are averaged too.
        batch: the batch the rows came from (gives ``B``).

    Returns:
        ``[B]`` (float32 for half-precision values).
    """
    values = full_precision(values)
    if not values.dtype.is_floating:
        values = tf.cast(values, tf.float32)
    return tf.reduce_mean(tf.reshape(values, [examples_in(batch), -1]), axis=1)


def xent_rows(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy per row: ``labels [N]`` (any int), ``logits [N, C]``.

    Returns:
        ``[N]`` in the logits' dtype (float32 for half-precision logits).
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    logits = full_precision(logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def correct_top1_rows(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where ``argmax(logits) == label``, else 0.0; float32 ``[N]``."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    return tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32)


def correct_top5_rows(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where the label is among the 5 largest logits, else 0.0; ``[N]``."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    k = min(5, int(logits.shape[-1])) if logits.shape[-1] is not None else 5
    return tf.cast(tf.math.in_top_k(labels, tf.cast(logits, tf.float32), k), tf.float32)


def softmax_xent(
    batch: Batch, outputs: Outputs, *, label_key: str = "label"
) -> tf.Tensor:
    """Mean softmax cross-entropy of each example's rows (reference 4.1, 4.3-4.5).

    ``outputs["logits"]`` ``[B * R, C]`` against ``batch[label_key]``
    ``[B, R]`` (Rotation R = 4, Jigsaw/RPL R = 8) or ``[B]`` (supervised);
    averaging each example's R rows and then the examples gives the
    original's mean over all ``B * R`` predictions.

    Returns:
        float32 ``[B]``.
    """
    rows = xent_rows(batch[label_key], outputs["logits"])
    return per_example_mean(rows, batch)


def accuracy_metrics(
    batch: Batch, outputs: Outputs, *, label_key: str = "label"
) -> dict[str, tf.Tensor]:
    """``{"accuracy": [B]}``: each example's fraction of correct top-1 rows."""
    rows = correct_top1_rows(batch[label_key], outputs["logits"])
    return {"accuracy": per_example_mean(rows, batch)}


def classification_metrics(
    batch: Batch, outputs: Outputs, *, label_key: str = "label"
) -> dict[str, tf.Tensor]:
    """``{"accuracy": top-1, "top5_accuracy": top-5}`` per example (reference 4.5)."""
    labels, logits = batch[label_key], outputs["logits"]
    return {
        "accuracy": per_example_mean(correct_top1_rows(labels, logits), batch),
        "top5_accuracy": per_example_mean(correct_top5_rows(labels, logits), batch),
    }
