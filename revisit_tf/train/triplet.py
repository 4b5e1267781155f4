"""Exemplar's objective: semi-hard triplet loss on the copies of each image (stage 4).

Reference 4.2: every source image of the per-replica batch is one surrogate
class whose members are its ``K`` augmented copies (``batch["image"]``
``[B, K, h, w, C]``; the model's ``logits`` ``[B * K, D]`` are the
embeddings, image-major). The surrogate label of row ``b * K + k`` is ``b``,
the index of its source image in the batch, exactly as the original; the
loss needs no label from the input pipeline. Mining happens among the rows
of one replica, as the original on TPU cores (reference 7.3), or, with
``ghost_group_size=G`` (``pp.groups``), among the ``G`` rows (``G / K`` whole
images' copies) of each group of a replica: what one of ``rows / G`` replicas
(the original's 8 cores: 8 images x 8 copies = 64 rows each) computes.

Contract: ``train.losses`` (``loss_fn(batch, outputs) -> [B]``,
``metric_fn(batch, outputs) -> {name: [B]}``).
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.pp import groups as groups_lib
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
    ghost_group_size: int | None = None,
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
        ghost_group_size: None (mining and normalisation over the replica's
            ``B * K`` rows), or ``G``: over each group of ``G`` consecutive
            rows (``G / K`` images) separately, each group's loss the mean
            over its own positive pairs and returned as its images' shares,
            so the loop's global-batch average is the mean of the groups'
            losses, as for ``B * K / G`` replicas (``pp.groups``). ``G`` must
            be a multiple of ``K`` and divide ``B * K``.

    Returns:
        ``[B]``.
    """
    if ghost_group_size is None:
        b = losses.examples_in(batch)
        return _triplet_shares(outputs["logits"], b, margin, normalization)
    grouped, k = _ghost_groups(batch, outputs["logits"], ghost_group_size)
    images = ghost_group_size // k

    def group_shares(e: tf.Tensor) -> tf.Tensor:  # [G, D] -> [G / K]
        return _triplet_shares(e, images, margin, normalization)

    shares = tf.map_fn(
        group_shares,
        grouped,
        fn_output_signature=tf.TensorSpec([images], grouped.dtype),
    )  # [groups, G / K]
    return tf.reshape(shares, [-1])


def _triplet_shares(
    embeddings: tf.Tensor, num_examples: tf.Tensor | int, margin: float, norm: str
) -> tf.Tensor:
    """``[B * K, D]`` -> ``[B]`` shares of one batch's (or group's) triplet loss."""
    e = normalize_embeddings(embeddings, norm)
    b = num_examples
    labels = tf.repeat(tf.range(b), tf.shape(e)[0] // b)  # surrogate_labels
    per_anchor, num_pairs = semihard_pair_losses(labels, e, margin)
    per_example = tf.reduce_sum(tf.reshape(per_anchor, [b, -1]), axis=1)
    return per_example * tf.cast(b, per_example.dtype) / num_pairs


def _ghost_groups(
    batch: losses.Batch, embeddings: tf.Tensor, group_size: int
) -> tuple[tf.Tensor, int]:
    """``[B * K, D]`` -> ``([B * K / G, G, D], K)``, checking ``G`` (``pp.groups``).

    ``K`` comes from ``batch["image"]`` ``[B, K, h, w, C]``; ``G`` must hold
    whole images (a multiple of ``K``) and divide ``B * K`` (checked now for
    a static batch, at run time otherwise).
    """
    group_size = groups_lib.check_ghost_group_size(group_size)
    if "image" not in batch:
        raise ValueError(
            f"Ghost groups need batch['image'] [B, K, h, w, C] to count the copies "
            f"per image; batch keys {sorted(batch)}."
        )
    k = groups_lib.rows_per_example(batch["image"].shape)
    e = losses.full_precision(embeddings)
    rows = e.shape[0]
    checks = []
    if rows is not None:
        groups_lib.check_groups(
            group_size, rows=rows, rows_per_example=k, what="the Exemplar batch"
        )
    else:
        groups_lib.check_groups(
            group_size, rows=group_size, rows_per_example=k, what="the Exemplar batch"
        )
        checks.append(
            tf.debugging.assert_equal(
                tf.math.floormod(tf.shape(e)[0], group_size),
                0,
                message=f"ghost_group_size={group_size} must divide the rows of the "
                "Exemplar batch",
            )
        )
    with tf.control_dependencies(checks):
        grouped = tf.reshape(e, [-1, group_size, tf.shape(e)[1]])
    return tf.ensure_shape(grouped, [None, group_size, e.shape[1]]), k


def nearest_neighbour_metrics(
    batch: losses.Batch,
    outputs: losses.Outputs,
    *,
    ghost_group_size: int | None = None,
) -> dict[str, tf.Tensor]:
    """Exemplar's pretext accuracy: is each row's nearest other row a copy?

    ``accuracy`` of example ``b`` is the fraction of its ``K`` rows whose
    closest other embedding (squared Euclidean, per-vector normalised) is a
    copy of the same image; chance is ``(K - 1) / (N - 1)`` for ``N`` rows.
    The original reports no metric for Exemplar (reference 4.2). With
    ``ghost_group_size=G`` the neighbours are searched within each group of
    ``G`` rows (as :func:`triplet_semihard`); chance ``(K - 1) / (G - 1)``.
    """
    if ghost_group_size is None:
        e = normalize_embeddings(outputs["logits"], "per_vector")
        labels = surrogate_labels(batch, tf.shape(e)[0])
        correct = _nearest_is_copy(labels, e)
    else:
        grouped, k = _ghost_groups(batch, outputs["logits"], ghost_group_size)
        labels = tf.repeat(tf.range(ghost_group_size // k), k)

        def group_correct(e: tf.Tensor) -> tf.Tensor:  # [G, D] -> [G]
            return _nearest_is_copy(labels, normalize_embeddings(e, "per_vector"))

        correct = tf.reshape(
            tf.map_fn(
                group_correct,
                grouped,
                fn_output_signature=tf.TensorSpec([ghost_group_size], tf.float32),
            ),
            [-1],
        )
    return {"accuracy": losses.per_example_mean(correct, batch)}


def _nearest_is_copy(labels: tf.Tensor, e: tf.Tensor) -> tf.Tensor:
    """1.0 where row ``i``'s nearest other row has its label; float32 ``[N]``."""
    n = tf.shape(e)[0]
    dist = pairwise_squared_distances(e)
    dist = tf.where(tf.eye(n, dtype=tf.bool), tf.constant(float("inf"), e.dtype), dist)
    nearest = tf.argmin(dist, axis=1)
    return tf.cast(tf.equal(tf.gather(labels, nearest), labels), tf.float32)
