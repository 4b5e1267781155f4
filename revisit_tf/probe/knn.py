"""k-nearest-neighbour accuracy on cached features.

Place in the data flow (stage 6): a probe without training, often reported
next to linear evaluation. Features are L2-normalised, similarity is the
cosine (dot product of unit vectors), each query takes the majority label of
its ``k`` most similar training rows; a tie between labels goes to the
smallest label, as scikit-learn's ``KNeighborsClassifier(weights="uniform")``
does.

Contract: ``knn_predict(train_x [N, D], train_y [N], query_x [M, D], k)`` ->
int32 ``[M]`` votes; ``knn_top1(train_x, train_y, query_x, query_y [M], k)``
-> top-1 in [0, 1] (the fraction of votes equal to ``query_y``); queries are
processed in blocks of ``block_size`` so memory stays ``O(block_size * N)``.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from revisit_tf.probe import arrays, validation


@functools.cache
def _compiled_vote():
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.float32),  # train, unit rows [N, D]
            tf.TensorSpec([None], tf.int32),  # train labels [N]
            tf.TensorSpec([None, None], tf.float32),  # queries, unit rows [B, D]
            tf.TensorSpec([], tf.int32),  # k
            tf.TensorSpec([], tf.int32),  # C
        ]
    )
    def vote(train, labels, queries, k, num_classes):
        sims = tf.matmul(queries, train, transpose_b=True)  # [B, N]
        _, idx = tf.math.top_k(sims, k=k)  # [B, k]
        counts = tf.reduce_sum(
            tf.one_hot(tf.gather(labels, idx), num_classes), axis=1
        )  # [B, C]
        return tf.argmax(counts, axis=1, output_type=tf.int32)  # first max wins

    return vote


def _unit_rows(x: np.ndarray) -> np.ndarray:
    # float32, in an aligned buffer that arrays.as_tensor shares with TF.
    out = arrays.aligned_empty(x.shape, np.float32)
    np.copyto(out, x, casting="unsafe")
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _vote_blocks(train_x, train_y, query_x, k, num_classes, block_size):
    """The vote of every (validated) query, int32 ``[M]``, ``block_size`` at a time."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(train_y):
        raise ValueError(f"k must be an int in [1, {len(train_y)}]; got {k!r}.")
    train = arrays.as_tensor(_unit_rows(train_x), tf.float32)
    labels = tf.constant(train_y)
    queries = _unit_rows(query_x)
    vote = _compiled_vote()
    parts = [
        vote(train, labels, tf.constant(queries[i : i + block_size]), k, num_classes)
        .numpy()
        .astype(np.int32)
        for i in range(0, len(queries), block_size)
    ]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    *,
    k: int = 20,
    num_classes: int | None = None,
    block_size: int = 1024,
) -> np.ndarray:
    """The cosine ``k``-NN majority vote of every query.

    Args:
        train_x: ``[N, D]`` reference features.
        train_y: ``[N]`` labels.
        query_x: ``[M, D]`` features to classify.
        k: neighbours, ``1 <= k <= N``.
        num_classes: C (default ``1 + max`` training label).
        block_size: queries per block.

    Returns:
        int32 ``[M]``: the label with most votes among each query's ``k``
        most similar training rows (ties: the smallest label).

    Raises:
        ValueError: malformed arrays, different D, or a bad ``k``.
    """
    train_x = validation.check_features(train_x, "train_x")
    query_x = validation.check_features(
        query_x, "query_x", num_features=train_x.shape[1]
    )
    num_classes = validation.check_num_classes(num_classes)
    train_y = validation.check_labels(train_y, "train_y", len(train_x), num_classes)
    num_classes = num_classes or validation.infer_num_classes(train_y)
    return _vote_blocks(train_x, train_y, query_x, k, num_classes, block_size)


def knn_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    query_y: np.ndarray,
    *,
    k: int = 20,
    num_classes: int | None = None,
    block_size: int = 1024,
) -> float:
    """Top-1 accuracy of a cosine ``k``-NN majority vote (``knn_predict``).

    Args:
        train_x: ``[N, D]`` reference features.
        train_y: ``[N]`` labels.
        query_x: ``[M, D]`` features to classify.
        query_y: ``[M]`` labels.
        k: neighbours, ``1 <= k <= N``.
        num_classes: C (default ``1 + max`` label).
        block_size: queries per block.

    Returns:
        The fraction of queries whose vote equals their label.

    Raises:
        ValueError: malformed arrays, different D, or a bad ``k``.
    """
    train_x = validation.check_features(train_x, "train_x")
    query_x = validation.check_features(
        query_x, "query_x", num_features=train_x.shape[1]
    )
    num_classes = validation.check_num_classes(num_classes)
    train_y = validation.check_labels(train_y, "train_y", len(train_x), num_classes)
    query_y = validation.check_labels(query_y, "query_y", len(query_x), num_classes)
    num_classes = num_classes or validation.infer_num_classes(train_y, query_y)
    pred = _vote_blocks(train_x, train_y, query_x, k, num_classes, block_size)
    return int(np.sum(pred == query_y)) / len(query_y)
