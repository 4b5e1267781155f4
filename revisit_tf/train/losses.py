"""Per-example losses and metrics (stage 4, training).

Losses return one value per network output row (``[N]``); the loop averages
them with ``tf.nn.compute_average_loss`` over the *global* number of rows, so
that summing gradients over replicas gives the global mean (reference 7.3: the
TPU optimizer averaged gradients across cores).
"""

from __future__ import annotations

import tensorflow as tf


def softmax_xent(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy per row.

    Args:
      labels: int ``[N]`` class indices (Rotation: 0..3).
      logits: float ``[N, C]``.

    Returns:
      ``[N]`` in the logits' dtype (float32 for half-precision logits).
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if logits.dtype in (tf.float16, tf.bfloat16):  # mixed precision: loss in fp32
        logits = tf.cast(logits, tf.float32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def correct_top1(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where ``argmax(logits) == label``, else 0.0; float32 ``[N]``."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    return tf.cast(tf.equal(tf.argmax(logits, axis=-1), labels), tf.float32)
