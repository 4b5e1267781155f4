"""Exemplar's objective: semi-hard triplet loss on the copies of each image (stage 4).

Reference 4.2: every source image of the per-replica batch is one surrogate
class whose members are its ``K`` augmented copies (``batch["image"]``
``[B, K, h, w, C]``; the model's ``logits`` ``[B * K, D]`` are the
embeddings, image-major). The surrogate label of row ``b * K + k`` is ``b``,
the index of its source image in the batch, exactly as the original; the
loss needs no label from the input pipeline. Mining happens among the rows
of one replica, as the original on TPU cores (reference 7.3).

Contract: ``train.losses`` (``loss_fn(batch, outputs) -> [B]``,
``metric_fn(batch, outputs) -> {name: [B]}``).
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.train import losses

# Embedding normalisations (reference 4.2, 11.2 item 1).
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
        ``[N, D]`` (float32 for half-precision embeddings).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}."
        )
    x = losses.full_precision(embeddings)
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


def surrogate_labels(batch: losses.Batch, num_rows: tf.Tensor) -> tf.Tensor:
    """Row ``b * K + k`` -> ``b``: the source image's index (reference 4.2)."""
    b = losses.examples_in(batch)
    return tf.repeat(tf.range(b), num_rows // b)


def semihard_pair_losses(
    labels: tf.Tensor, embeddings: tf.Tensor, margin: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-anchor sums of semi-hard triplet losses and the positive-pair count.

    For every ordered positive pair ``(a, p)`` (same label, ``a != p``), the
    negative is the closest ``n`` (different label) with
    ``D[a, n] > D[a, p]`` or, if none is farther than the positive, the
    farthest negative of ``a``; the pair loss is
    ``max(margin + D[a, p] - D[a, n], 0)`` on squared distances ``D``.

    Returns:
        ``(sum_p loss(a, p) [N], number of positive pairs)``.
    """
    n = tf.shape(embeddings)[0]
    dist = pairwise_squared_distances(embeddings)  # [N, N]
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
    pair_loss = tf.where(positive, pair_loss, tf.zeros_like(pair_loss))
    num_pairs = tf.reduce_sum(tf.cast(positive, dist.dtype))
    return tf.reduce_sum(pair_loss, axis=1), tf.maximum(num_pairs, 1.0)


def triplet_semihard(
    batch: losses.Batch,
    outputs: losses.Outputs,
    *,
    margin: float = 0.5,
    normalization: str = "per_vector",
) -> tf.Tensor:
    """Semi-hard triplet loss (FaceNet; reference 4.2), as per-example shares.

    The replica's loss is the mean over all its positive pairs. To fit the
    loop's per-example contract it is returned as ``B`` shares whose mean is
    that loss: example ``b`` gets ``B * sum_{a in b} sum_p loss(a, p) /
    num_positive_pairs``. The loop's average over the global batch then
    yields the mean of the replicas' losses (the original averaged gradients
    over cores).

    Args:
        batch: ``{"image": [B, K, h, w, C], ...}`` (only ``B`` is read).
        outputs: ``{"logits": [B * K, D]}``, the embeddings.
        margin: 0.5 in the original config (on squared distances).
        normalization: see :func:`normalize_embeddings`; ``"per_vector"``
            (default) or the original's ``"batch_axis"``.

    Returns:
        ``[B]``.
    """
    e = normalize_embeddings(outputs["logits"], normalization)
    labels = surrogate_labels(batch, tf.shape(e)[0])
    per_anchor, num_pairs = semihard_pair_losses(labels, e, margin)
    b = losses.examples_in(batch)
    per_example = tf.reduce_sum(tf.reshape(per_anchor, [b, -1]), axis=1)
    return per_example * tf.cast(b, per_example.dtype) / num_pairs


def nearest_neighbour_metrics(
    batch: losses.Batch, outputs: losses.Outputs
) -> dict[str, tf.Tensor]:
    """Exemplar's pretext accuracy: is each row's nearest other row a copy?

    ``accuracy`` of example ``b`` is the fraction of its ``K`` rows whose
    closest other embedding (squared Euclidean, per-vector normalised) is a
    copy of the same image; chance is ``(K - 1) / (N - 1)`` for ``N`` rows.
    The original reports no metric for Exemplar (reference 4.2).
    """
    e = normalize_embeddings(outputs["logits"], "per_vector")
    n = tf.shape(e)[0]
    labels = surrogate_labels(batch, n)
    dist = pairwise_squared_distances(e)
    dist = tf.where(tf.eye(n, dtype=tf.bool), tf.constant(float("inf"), e.dtype), dist)
    nearest = tf.argmin(dist, axis=1)
    correct = tf.cast(tf.equal(tf.gather(labels, nearest), labels), tf.float32)
    return {"accuracy": losses.per_example_mean(correct, batch)}
