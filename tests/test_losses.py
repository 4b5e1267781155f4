"""Exemplar's semi-hard triplet loss and the pretext metrics vs NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.train import losses


def _numpy_triplet(labels, emb, margin, normalization):
    """Reference 4.2, steps 1-4, written with plain loops."""
    emb = emb.astype(np.float64)
    if normalization == "per_vector":
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    elif normalization == "batch_axis":
        emb = emb / np.linalg.norm(emb, axis=0, keepdims=True)
    n = len(labels)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                d = emb[i] @ emb[i] + emb[j] @ emb[j] - 2 * emb[i] @ emb[j]
                dist[i, j] = max(d, 0.0)
    total, pairs = 0.0, 0
    for a in range(n):
        negatives = [k for k in range(n) if labels[k] != labels[a]]
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [dist[a, k] for k in negatives if dist[a, k] > dist[a, p]]
            neg = min(farther) if farther else max(dist[a, k] for k in negatives)
            total += max(margin + dist[a, p] - neg, 0.0)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("normalization", ["per_vector", "batch_axis", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_semihard_matches_numpy(normalization, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(1000)[:6], 4)  # 6 images x 4 copies
    emb = rng.normal(size=(24, 5)).astype(np.float32)
    if normalization == "none":
        emb *= 0.3  # keep some pairs inside the margin
    per_row = losses.triplet_semihard(
        tf.constant(labels), tf.constant(emb), margin=0.5, normalization=normalization
    ).numpy()
    assert per_row.shape == (24,)
    expected = _numpy_triplet(labels, emb, 0.5, normalization)
    assert expected > 0
    np.testing.assert_allclose(per_row.mean(), expected, rtol=1e-5)


def test_triplet_uses_the_outside_negative_when_there_is_one():
    # 1-d embeddings (normalization off): anchor 0 at 0, positive at 0.5
    # (D = 0.25), negatives at 0.6 (D = 0.36, semi-hard) and 2 (D = 4).
    labels = np.array([0, 0, 1, 2])
    emb = np.array([[0.0], [0.5], [0.6], [2.0]], np.float32)
    per_row = losses.triplet_semihard(
        tf.constant(labels), tf.constant(emb), margin=0.5, normalization="none"
    ).numpy()
    # Pairs (0,1): 0.5 + 0.25 - 0.36 = 0.39. (1,0): D=0.25; negatives of 1 at
    # D 0.01 and 2.25 -> 2.25 is farther: max(0.5 + 0.25 - 2.25, 0) = 0.
    np.testing.assert_allclose(per_row.mean(), 0.39 / 2, rtol=1e-5)


def test_triplet_gradient_is_finite_and_first_order_correct():
    rng = np.random.default_rng(0)
    labels = tf.constant(np.repeat(np.arange(4), 3))
    emb = tf.Variable(rng.normal(size=(12, 8)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.triplet_semihard(labels, emb))
    grad = tape.gradient(loss, emb)
    assert np.isfinite(grad.numpy()).all()
    # A small step along -grad lowers the loss at the first-order rate
    # |grad|^2 (the mined negatives do not change for so small a step).
    step = 1e-3
    emb.assign_sub(step * grad)
    after = tf.reduce_mean(losses.triplet_semihard(labels, emb))
    expected = -step * float(tf.reduce_sum(grad**2))
    assert float(after) - float(loss) == pytest.approx(expected, rel=0.1)


def test_bad_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        losses.triplet_semihard(tf.zeros([4]), tf.ones([4, 2]), normalization="l2")


def test_nearest_neighbour_metric_matches_numpy():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 3)
    emb = rng.normal(size=(15, 4)).astype(np.float32)
    got = losses.nearest_neighbour_correct(tf.constant(labels), tf.constant(emb))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = ((unit[:, None] - unit[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expected = (labels[d.argmin(1)] == labels).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_classification_metrics_top1_and_top5():
    logits = tf.constant(np.arange(10, dtype=np.float32)[None].repeat(3, 0))
    labels = tf.constant([9, 5, 0])  # ranks 1, 5, 10
    out = losses.classification_metrics(labels, logits)
    np.testing.assert_array_equal(out["accuracy"].numpy(), [1, 0, 0])
    np.testing.assert_array_equal(out["top5_accuracy"].numpy(), [1, 1, 0])
