"""SimCLR's objective: NT-Xent over the views of the global batch (stage 4).

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations" (SimCLR), section 2.1 and Algorithm 1. Every source image
of the batch has ``K`` augmented views (``batch["image"]``
``[B, K, H, W, C]``; SimCLR uses ``K = 2``) and the model's ``logits``
``[B * K, D]`` are the projections ``z``, image-major (row ``b * K + k`` is
view ``k`` of example ``b``). An anchor's positives are the other views of
its source image; its negatives are *all other rows of the global batch*,
gathered from every replica (SimCLR tf2 ``objective.py``,
``tpu_cross_replica_concat``). Using only the replica's own rows as
negatives, as several ports do, changes the loss and its gradient with the
number of replicas.

Cross-replica gathering: ``ReplicaContext.all_gather``. Its gradient is an
all-reduce SUM of the upstream gradients followed by each replica's slice,
so the gradient that flows back through the gathered candidates reaches the
replica that produced them. SimCLR tf2's zero-padded scatter plus
``all_reduce(SUM)`` gives the same values and gradients (its gradient is an
all-reduce SUM as well; both are checked on 2 MirroredStrategy replicas in
``tests/test_contrastive.py``) but all-reduces a zero-padded buffer
``num_replicas`` times the size of the local rows; ``all_gather`` is used
because it is the cheaper of the two.

Contract: ``train.losses`` (``loss_fn(batch, outputs) -> [B]``,
``metric_fn(batch, outputs) -> {name: [B]}``), called inside
``strategy.run`` (or with no strategy, in the default replica context).
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.train import losses

# Subtracted from an anchor's similarity with itself so that softmax gives it
# zero weight (SimCLR tf2 ``objective.LARGE_NUM``); finite, unlike -inf, so
# that no 0 * inf appears in the masked sums or their gradients.
_LARGE_NUM = 1e9


def cross_replica_concat(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The rows of every replica, concatenated replica-major, and this replica's offset.

    Every replica must hold the same number of rows ``n`` (the loop's
    per-replica batch), so that local row ``i`` is global row
    ``replica_id * n + i``. Differentiable: the gradient of the gathered
    rows is summed over replicas and sliced back to the replica that owns
    them (``ReplicaContext.all_gather``'s gradient).

    Args:
        rows: ``[n, ...]`` on this replica.

    Returns:
        ``(global_rows [num_replicas * n, ...], offset)``: ``offset`` is the
        int32 global index of local row 0. With one replica (default
        strategy) ``rows`` itself and 0.

    Raises:
        ValueError: called in a cross-replica context (inside
            ``strategy.scope()`` but outside ``strategy.run``).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError(
            "cross_replica_concat needs a replica context: call the loss inside "
            "strategy.run (or with no strategy), not in a cross-replica context."
        )
    if ctx.num_replicas_in_sync == 1:
        return rows, tf.constant(0, tf.int32)
    gathered = ctx.all_gather(rows, axis=0)
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return gathered, replica_id * tf.shape(rows)[0]


def _views_per_example(batch: losses.Batch, num_rows: tf.Tensor) -> tf.Tensor:
    """``K``, the views per source example; static check that ``K >= 2``."""
    image = batch.get("image")
    if image is not None and image.shape.rank is not None and image.shape.rank > 1:
        k = image.shape[1]
        if k is not None and k < 2:
            raise ValueError(
                "Contrastive losses need K >= 2 views per example "
                f"(batch['image'] [B, K, ...]); got shape {image.shape}."
            )
    return num_rows // losses.examples_in(batch)


def global_similarities(
    batch: losses.Batch, outputs: losses.Outputs, *, key: str = "logits"
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Cosine similarities of the local anchors with every row of the global batch.

    Args:
        batch: ``{"image": [B, K, ...], ...}`` (only ``B`` and ``K`` are read).
        outputs: ``{key: [B * K, D]}``, the projections, image-major.
        key: the projections' key in ``outputs``.

    Returns:
        ``(similarity [B * K, N], is_self [B * K, N], positive [B * K, N])``
        for the ``N = num_replicas * B * K`` global rows: ``z_i . z_j`` of the
        l2-normalised rows (float32, or float64 for float64 projections),
        the anchor's own column, and the other views of its source image.
    """
    z = tf.math.l2_normalize(losses.full_precision(outputs[key]), axis=-1)
    n = tf.shape(z)[0]
    k = _views_per_example(batch, n)
    candidates, offset = cross_replica_concat(z)  # [N, D], replica-major
    similarity = tf.matmul(z, candidates, transpose_b=True)  # [n, N]
    anchor = offset + tf.range(n)  # global row of each local anchor
    column = tf.range(tf.shape(candidates)[0])
    is_self = tf.equal(anchor[:, None], column[None, :])
    # Global row j is view j % K of global example j // K: every replica's
    # rows are image-major and the replicas are concatenated in order.
    same_example = tf.equal(anchor[:, None] // k, column[None, :] // k)
    positive = tf.logical_and(same_example, tf.logical_not(is_self))
    return similarity, is_self, positive


def nt_xent(
    batch: losses.Batch,
    outputs: losses.Outputs,
    *,
    temperature: float = 0.1,
    key: str = "logits",
) -> tf.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) with global negatives, per source example.

    For anchor ``i`` (one view) the logits are ``z_i . z_j / temperature``
    over all global rows ``j != i``, and

        loss_i = -1 / (K - 1) * sum_{p in positives(i)} log softmax_j(logits_i)[p],

    the positives being the other ``K - 1`` views of its source image. For
    ``K = 2`` this is exactly the paper's ``l(i, j)``. Example ``b`` gets the
    mean of its ``K`` anchors' losses, so the loop's average over the global
    batch (``compute_average_loss(..., global_batch_size=N_examples)``) is the
    paper's ``L = 1 / (2N) * sum_k [l(2k-1, 2k) + l(2k, 2k-1)]`` over all
    ``2N`` anchors.

    Note: SimCLR tf2's ``add_contrastive_loss`` returns ``loss_a + loss_b``,
    the *sum* of the two directions' means, i.e. 2x this value (for
    ``K = 2``), which scales the gradients by 2 as well. Its
    ``hidden_norm=True`` and ``LARGE_NUM`` self-masking are what is done
    here; its views are view-major halves, ours are image-major rows.

    Args:
        batch: ``{"image": [B, K, H, W, C], ...}`` with ``K >= 2`` (only the
            shape is read).
        outputs: ``{key: [B * K, D]}``, the projection-head outputs.
        temperature: ``tau``, > 0 (default 0.1; the paper's Table 5 compares
            0.05, 0.1, 0.5 and 1).
        key: the projections' key in ``outputs``.

    Returns:
        ``[B]`` float32 (float64 for float64 projections).

    Raises:
        ValueError: ``temperature <= 0`` or fewer than 2 views per example.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    similarity, is_self, positive = global_similarities(batch, outputs, key=key)
    # Not tf.cast(temperature, ...): that rounds through float32 first.
    logits = similarity / tf.constant(temperature, similarity.dtype)
    logits = tf.where(is_self, logits - _LARGE_NUM, logits)
    log_prob = tf.nn.log_softmax(logits, axis=1)  # [n, N]
    positives_log_prob = tf.reduce_sum(
        tf.where(positive, log_prob, tf.zeros_like(log_prob)), axis=1
    )  # [n]
    num_positives = tf.reduce_sum(tf.cast(positive, log_prob.dtype), axis=1)  # K - 1
    return losses.per_example_mean(-positives_log_prob / num_positives, batch)


def contrastive_metrics(
    batch: losses.Batch, outputs: losses.Outputs, *, key: str = "logits"
) -> dict[str, tf.Tensor]:
    """SimCLR's contrastive accuracy: is an anchor's nearest other row a positive?

    ``accuracy`` of example ``b`` is the fraction of its ``K`` anchors whose
    most similar other row (cosine similarity) among all rows of the global
    batch is another view of the same source image. (SimCLR tf2's
    ``train/contrast_acc`` is the same idea with only the other view's rows
    as candidates.) Chance is ``(K - 1) / (N - 1)`` for ``N`` global
    rows (``1 / (N - 1)`` for ``K = 2``).

    Args:
        batch: ``{"image": [B, K, ...], ...}`` (only the shape is read).
        outputs: ``{key: [B * K, D]}``, the projections.
        key: the projections' key in ``outputs``.

    Returns:
        ``{"accuracy": [B]}`` float32.
    """
    outputs = {key: tf.stop_gradient(outputs[key])}
    similarity, is_self, positive = global_similarities(batch, outputs, key=key)
    similarity = tf.where(is_self, similarity - _LARGE_NUM, similarity)
    nearest = tf.argmax(similarity, axis=1, output_type=tf.int32)  # [n]
    correct = tf.gather(positive, nearest, axis=1, batch_dims=1)  # [n]
    return {"accuracy": losses.per_example_mean(tf.cast(correct, tf.float32), batch)}
