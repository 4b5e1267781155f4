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


def correct_top5(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where the label is among the 5 largest logits, else 0.0; ``[N]``."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    k = min(5, int(logits.shape[-1])) if logits.shape[-1] is not None else 5
    return tf.cast(tf.math.in_top_k(labels, tf.cast(logits, tf.float32), k), tf.float32)


def classification_metrics(labels: tf.Tensor, logits: tf.Tensor) -> dict:
    """``{"accuracy": top-1, "top5_accuracy": top-5}`` per row (reference 4.5)."""
    return {
        "accuracy": correct_top1(labels, logits),
        "top5_accuracy": correct_top5(labels, logits),
    }


# Embedding normalisations of the Exemplar loss (reference 4.2, 11.2 item 1).
NORMALIZATIONS = ("per_vector", "batch_axis", "none")


def normalize_embeddings(embeddings: tf.Tensor, normalization: str) -> tf.Tensor:
    """L2-normalises ``[N, D]`` embeddings.

    Args:
        embeddings: ``[N, D]``.
        normalization: ``"per_vector"`` (each row to unit norm, what the
            triplet loss assumes; default), ``"batch_axis"`` (each embedding
            *dimension* to unit norm across the batch, ``axis=0``: the
            original's behaviour, reference 11.2 item 1) or ``"none"``.

    Returns:
        float32 ``[N, D]``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}."
        )
    x = tf.cast(embeddings, tf.float32)
    if normalization == "per_vector":
        return tf.math.l2_normalize(x, axis=-1)
    if normalization == "batch_axis":
        return tf.math.l2_normalize(x, axis=0)
    return x


def pairwise_squared_distances(embeddings: tf.Tensor) -> tf.Tensor:
    """``D[i, j] = |e_i|^2 + |e_j|^2 - 2 e_i.e_j``, clipped at 0, zero diagonal.

    Reference 4.2 step 1 (the TF1 ``metric_learning.pairwise_distance`` with
    ``squared=True``).
    """
    sq = tf.reduce_sum(tf.square(embeddings), axis=1)
    dist = (
        sq[:, None]
        + sq[None, :]
        - 2.0 * tf.matmul(embeddings, embeddings, transpose_b=True)
    )
    dist = tf.maximum(dist, 0.0)
    return dist * (1.0 - tf.eye(tf.shape(embeddings)[0], dtype=dist.dtype))


def triplet_semihard(
    labels: tf.Tensor,
    embeddings: tf.Tensor,
    *,
    margin: float = 0.5,
    normalization: str = "per_vector",
) -> tf.Tensor:
    """Semi-hard triplet loss (FaceNet; reference 4.2), as per-row shares.

    For every ordered positive pair ``(a, p)`` (same label, ``a != p``), the
    negative is the closest ``n`` (different label) with
    ``D[a, n] > D[a, p]`` or, if none is farther than the positive, the
    farthest negative of ``a``; the pair loss is
    ``max(margin + D[a, p] - D[a, n], 0)`` on squared distances ``D``, and the
    batch loss is the mean over positive pairs. Mining happens within the
    rows given (one replica's batch, as the original on TPU cores).

    To fit the loop's per-row interface, the batch loss is returned as ``N``
    shares whose mean is the batch loss: row ``a`` gets
    ``N * sum_p loss(a, p) / num_positive_pairs``. The loop's
    ``compute_average_loss`` over ``global_rows = N * replicas`` then yields
    the mean of the replicas' batch losses (the original averaged gradients
    over cores).

    Args:
        labels: ``[N]`` surrogate classes (any integer dtype; only equality
            matters).
        embeddings: ``[N, D]`` (the trunk's ``logits``).
        margin: 0.5 in the original config.
        normalization: see :func:`normalize_embeddings`; ``"per_vector"``
            (default) or the original's ``"batch_axis"``.

    Returns:
        float32 ``[N]``.
    """
    labels = tf.reshape(labels, [-1])
    e = normalize_embeddings(embeddings, normalization)
    n = tf.shape(e)[0]
    dist = pairwise_squared_distances(e)  # [N, N]
    same = tf.equal(labels[:, None], labels[None, :])  # [N, N]
    negative = tf.logical_not(same)
    positive = tf.logical_and(same, tf.logical_not(tf.eye(n, dtype=tf.bool)))
    # farther[a, p, n]: n is a negative of a, farther from a than p.
    farther = tf.logical_and(negative[:, None, :], dist[:, None, :] > dist[:, :, None])
    inf = tf.constant(float("inf"), dist.dtype)
    outside = tf.reduce_min(tf.where(farther, dist[:, None, :], inf), axis=2)  # [a, p]
    # The farthest negative of a; a row without negatives (whole batch one
    # class) gets its row minimum (0), as the TF1 masked_maximum.
    inside = tf.where(
        tf.reduce_any(negative, axis=1),
        tf.reduce_max(tf.where(negative, dist, -inf), axis=1),
        tf.reduce_min(dist, axis=1),
    )  # [a]
    has_outside = tf.reduce_any(farther, axis=2)
    neg_dist = tf.where(has_outside, outside, inside[:, None])  # [a, p]
    pair_loss = tf.maximum(margin + dist - neg_dist, 0.0)
    pair_loss = tf.where(positive, pair_loss, 0.0)
    num_pairs = tf.maximum(tf.reduce_sum(tf.cast(positive, tf.float32)), 1.0)
    return tf.reduce_sum(pair_loss, axis=1) * tf.cast(n, tf.float32) / num_pairs


def nearest_neighbour_correct(labels: tf.Tensor, embeddings: tf.Tensor) -> tf.Tensor:
    """Exemplar's pretext accuracy: is each row's nearest other row a positive?

    1.0 where the closest other embedding (squared Euclidean, per-vector
    normalised) has the same label, i.e. a copy of the same source image is
    retrieved first; chance is ``(K - 1) / (N - 1)`` for ``K`` copies among
    ``N`` rows. The original reports no metric for Exemplar (reference 4.2).

    Returns:
        float32 ``[N]``.
    """
    labels = tf.reshape(labels, [-1])
    e = normalize_embeddings(embeddings, "per_vector")
    dist = pairwise_squared_distances(e)
    n = tf.shape(e)[0]
    dist = tf.where(tf.eye(n, dtype=tf.bool), tf.constant(float("inf")), dist)
    nearest = tf.argmin(dist, axis=1)
    return tf.cast(tf.equal(tf.gather(labels, nearest), labels), tf.float32)
