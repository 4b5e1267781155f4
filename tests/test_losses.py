"""Task losses and metrics (train.losses contract, train.triplet) vs NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.train import losses, triplet


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


def _batch(num_images, copies):
    """A batch of ``num_images`` source examples with ``copies`` views each."""
    return {"image": tf.zeros([num_images, copies, 2, 2, 1])}


@pytest.mark.parametrize("normalization", ["per_vector", "batch_axis", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_semihard_matches_numpy(normalization, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(6), 4)  # 6 images x 4 copies, image-major
    emb = rng.normal(size=(24, 5)).astype(np.float32)
    if normalization == "none":
        emb *= 0.3  # keep some pairs inside the margin
    per_example = triplet.triplet_semihard(
        _batch(6, 4),
        {"logits": tf.constant(emb)},
        margin=0.5,
        normalization=normalization,
    ).numpy()
    assert per_example.shape == (6,)
    expected = _numpy_triplet(labels, emb, 0.5, normalization)
    assert expected > 0
    # The loop's average over the batch of examples is the replica's loss.
    np.testing.assert_allclose(per_example.mean(), expected, rtol=1e-5)
    # Each example's share is B x its anchors' pair losses / all pairs.
    per_anchor, pairs = triplet.semihard_pair_losses(
        tf.constant(labels),
        triplet.normalize_embeddings(tf.constant(emb), normalization),
        0.5,
    )
    np.testing.assert_allclose(
        per_example,
        6 * per_anchor.numpy().reshape(6, 4).sum(1) / float(pairs),
        rtol=1e-5,
    )


def test_triplet_uses_the_outside_negative_when_there_is_one():
    # 1-d embeddings (normalization off): anchor 0 at 0, positive at 0.5
    # (D = 0.25), negatives at 0.6 (D = 0.36, semi-hard) and 2 (D = 4).
    labels = tf.constant([0, 0, 1, 2])
    emb = tf.constant([[0.0], [0.5], [0.6], [2.0]])
    per_anchor, pairs = triplet.semihard_pair_losses(labels, emb, 0.5)
    # Pairs (0,1): 0.5 + 0.25 - 0.36 = 0.39. (1,0): D=0.25; negatives of 1 at
    # D 0.01 and 2.25 -> 2.25 is farther: max(0.5 + 0.25 - 2.25, 0) = 0.
    np.testing.assert_allclose(per_anchor.numpy(), [0.39, 0, 0, 0], atol=1e-6)
    assert float(pairs) == 2


def test_triplet_gradient_is_finite_and_first_order_correct():
    rng = np.random.default_rng(0)
    batch = _batch(4, 3)
    emb = tf.Variable(rng.normal(size=(12, 8)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(triplet.triplet_semihard(batch, {"logits": emb}))
    grad = tape.gradient(loss, emb)
    assert np.isfinite(grad.numpy()).all()
    # A small step along -grad lowers the loss at the first-order rate
    # |grad|^2 (the mined negatives do not change for so small a step).
    step = 1e-3
    emb.assign_sub(step * grad)
    after = tf.reduce_mean(triplet.triplet_semihard(batch, {"logits": emb}))
    expected = -step * float(tf.reduce_sum(grad**2))
    assert float(after) - float(loss) == pytest.approx(expected, rel=0.1)


def test_bad_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization"):
        triplet.triplet_semihard(
            _batch(2, 2), {"logits": tf.ones([4, 2])}, normalization="l2"
        )


def test_nearest_neighbour_metric_matches_numpy():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 3)
    emb = rng.normal(size=(15, 4)).astype(np.float32)
    got = triplet.nearest_neighbour_metrics(_batch(5, 3), {"logits": tf.constant(emb)})
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = ((unit[:, None] - unit[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    correct = (labels[d.argmin(1)] == labels).astype(np.float32)
    np.testing.assert_allclose(got["accuracy"].numpy(), correct.reshape(5, 3).mean(1))


def test_classification_metrics_top1_and_top5():
    logits = tf.constant(np.arange(10, dtype=np.float32)[None].repeat(3, 0))
    batch = {"image": tf.zeros([3, 2, 2, 1]), "label": tf.constant([9, 5, 0])}
    out = losses.classification_metrics(batch, {"logits": logits})  # ranks 1, 5, 10
    np.testing.assert_array_equal(out["accuracy"].numpy(), [1, 0, 0])
    np.testing.assert_array_equal(out["top5_accuracy"].numpy(), [1, 1, 0])


def test_softmax_xent_averages_each_examples_rows():
    """[B, R] labels and [B * R, C] logits -> [B]; the batch mean is the row mean."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3 * 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(3, 4)).astype(np.int32)
    batch = {"image": tf.zeros([3, 4, 2, 2, 1]), "label": tf.constant(labels)}
    got = losses.softmax_xent(batch, {"logits": tf.constant(logits)}).numpy()
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    rows = -log_p[np.arange(12), labels.reshape(-1)]
    np.testing.assert_allclose(got, rows.reshape(3, 4).mean(1), rtol=1e-5)
    np.testing.assert_allclose(got.mean(), rows.mean(), rtol=1e-5)
    acc = losses.accuracy_metrics(batch, {"logits": tf.constant(logits)})["accuracy"]
    expected = (logits.argmax(1) == labels.reshape(-1)).reshape(3, 4).mean(1)
    np.testing.assert_allclose(acc.numpy(), expected)


def test_per_example_mean_keeps_float64_and_casts_half():
    batch = {"image": tf.zeros([2, 1, 1, 1])}
    x64 = tf.constant([[1.0, 2.0], [3.0, 5.0]], tf.float64)
    assert losses.per_example_mean(x64, batch).dtype == tf.float64
    x16 = tf.cast(x64, tf.float16)
    out = losses.per_example_mean(x16, batch)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [1.5, 4.0])
