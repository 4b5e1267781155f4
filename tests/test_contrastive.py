"""SimCLR's NT-Xent and contrastive accuracy vs NumPy, and on 2 replicas."""

import json
import math
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.train import contrastive
from revisit_tf.train import strategy as strategy_lib


def _batch(b, k):
    """Only the shape of ``image [B, K, h, w, C]`` is read by the losses."""
    return {"image": tf.zeros([b, k, 1, 1, 1])}


def _numpy_nt_xent(z, k, temperature):
    """Chen et al. 2020, eq. 1, with loops: per-example mean of its anchors' l(i)."""
    z = z.astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    per_anchor = np.zeros(n)
    for i in range(n):
        denominator = sum(
            math.exp(z[i] @ z[j] / temperature) for j in range(n) if j != i
        )
        positives = [p for p in range(n) if p != i and p // k == i // k]
        per_anchor[i] = -np.mean(
            [
                math.log(math.exp(z[i] @ z[p] / temperature) / denominator)
                for p in positives
            ]
        )
    return per_anchor.reshape(-1, k).mean(axis=1)


def _numpy_accuracy(z, k):
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    correct = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        nearest = max(others, key=lambda j: z[i] @ z[j])
        correct[i] = nearest // k == i // k
    return correct.reshape(-1, k).mean(axis=1)


def _clustered(rng, b, k, d, noise):
    """Views = one centre per example + noise: some anchors find a positive."""
    centres = rng.normal(size=(b, 1, d))
    return (centres + noise * rng.normal(size=(b, k, d))).reshape(b * k, d)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_numpy(k, temperature):
    rng = np.random.default_rng(k)
    z = _clustered(rng, 5, k, 4, noise=0.7)
    expected = _numpy_nt_xent(z, k, temperature)
    got64 = contrastive.nt_xent(
        _batch(5, k), {"logits": tf.constant(z)}, temperature=temperature
    )
    assert got64.dtype == tf.float64 and got64.shape == (5,)
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-12)
    got32 = contrastive.nt_xent(
        _batch(5, k), {"logits": tf.constant(z, tf.float32)}, temperature=temperature
    )
    assert got32.dtype == tf.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=2e-5)


def test_nt_xent_in_tf_function_half_precision_and_other_key():
    z = _clustered(np.random.default_rng(0), 4, 2, 6, noise=0.5)
    batch = _batch(4, 2)
    expected = _numpy_nt_xent(z, 2, 0.1)
    fn = tf.function(lambda b, o: contrastive.nt_xent(b, o, key="proj"))
    got = fn(batch, {"proj": tf.constant(z, tf.float32)})
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5)
    half = contrastive.nt_xent(batch, {"logits": tf.constant(z, tf.float16)})
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half.numpy(), expected, rtol=2e-2)


def test_nt_xent_is_invariant_to_scaling_the_projections():
    z = _clustered(np.random.default_rng(1), 4, 3, 5, noise=1.0)
    batch = _batch(4, 3)
    base = contrastive.nt_xent(batch, {"logits": tf.constant(z)}).numpy()
    for scale in (1e-3, 7.0, 1e4):
        scaled = contrastive.nt_xent(batch, {"logits": tf.constant(scale * z)})
        np.testing.assert_allclose(scaled.numpy(), base, rtol=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_nt_xent_perfect_alignment_closed_form(k):
    # Example b's views are all e_b (one-hot): positives have similarity 1, the
    # K (B - 1) negatives 0, so loss = -log(e^(1/t) / ((K-1) e^(1/t) + K(B-1)))
    # = log(K - 1 + K (B - 1) e^(-1/t)) for every example.
    b, t = 4, 0.2
    z = np.repeat(np.eye(b), k, axis=0)
    got = contrastive.nt_xent(_batch(b, k), {"logits": tf.constant(z)}, temperature=t)
    expected = math.log(k - 1 + k * (b - 1) * math.exp(-1 / t))
    np.testing.assert_allclose(got.numpy(), np.full(b, expected), rtol=1e-12)


def test_nt_xent_gradient_is_finite_and_matches_finite_differences():
    z0 = _clustered(np.random.default_rng(2), 2, 2, 3, noise=0.8)  # 4 rows
    batch = _batch(2, 2)

    def loss(z):
        return tf.reduce_mean(
            contrastive.nt_xent(batch, {"logits": z}, temperature=0.5)
        )

    z = tf.Variable(z0)
    with tf.GradientTape() as tape:
        value = loss(z)
    grad = tape.gradient(value, z).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-3
    eps = 1e-6
    numeric = np.zeros_like(z0)
    for idx in np.ndindex(*z0.shape):
        step = np.zeros_like(z0)
        step[idx] = eps
        numeric[idx] = (loss(tf.constant(z0 + step)) - loss(tf.constant(z0 - step))) / (
            2 * eps
        )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_contrastive_accuracy_matches_numpy():
    rng = np.random.default_rng(3)
    for k in (2, 3):
        z = _clustered(rng, 6, k, 4, noise=0.9)
        expected = _numpy_accuracy(z, k)
        assert 0 < expected.mean() < 1  # both outcomes occur
        got = contrastive.contrastive_metrics(
            _batch(6, k), {"logits": tf.constant(z, tf.float32)}
        )
        assert set(got) == {"accuracy"} and got["accuracy"].dtype == tf.float32
        np.testing.assert_array_equal(
            got["accuracy"].numpy(), expected.astype("float32")
        )


def test_errors():
    z = {"logits": tf.ones([4, 3])}
    with pytest.raises(ValueError, match="temperature"):
        contrastive.nt_xent(_batch(2, 2), z, temperature=0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        contrastive.nt_xent(_batch(4, 1), z)
    cross_replica = tf.distribute.OneDeviceStrategy("/cpu:0").scope()
    with cross_replica, pytest.raises(ValueError, match="replica context"):
        contrastive.nt_xent(_batch(2, 2), z)


# --- 2 replicas --------------------------------------------------------------

GLOBAL_EXAMPLES = 6  # 3 per replica
DIM = 5
TEMPERATURE = 0.2


_ALL_GATHER_CONCAT = contrastive.cross_replica_concat  # before any patching


def _scatter_all_reduce_concat(rows):
    """SimCLR tf2's ``tpu_cross_replica_concat``: all_reduce(SUM) of a scatter."""
    ctx = tf.distribute.get_replica_context()
    n = ctx.num_replicas_in_sync
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    ext = tf.scatter_nd([[replica_id]], [rows], tf.concat([[n], tf.shape(rows)], 0))
    ext = ctx.all_reduce(tf.distribute.ReduceOp.SUM, ext)  # [n, rows, D]
    return tf.reshape(ext, [-1, rows.shape[-1]]), replica_id * tf.shape(rows)[0]


def _local_gradient_concat(rows):
    """Right values, but gradient only through the replica's own rows.

    What a gather without a cross-replica gradient does: the other replicas'
    anchors never push on this replica's rows as candidates.
    """
    gathered, offset = _ALL_GATHER_CONCAT(tf.stop_gradient(rows))
    n = tf.shape(rows)[0]
    return tf.concat([gathered[:offset], rows, gathered[offset + n :]], 0), offset


def _local_only_concat(rows):
    """Per-replica negatives only (the failure of several ports)."""
    return rows, tf.constant(0, tf.int32)


def _step(proj, k):
    """One replica: loss share, gradient w.r.t. all projections, accuracy."""

    def fn(batch):
        rows = tf.reshape(batch["index"][:, None] * k + tf.range(k)[None, :], [-1])
        with tf.GradientTape() as tape:
            z = tf.gather(proj, rows)  # [B_local * K, D], image-major
            per_example = contrastive.nt_xent(
                batch, {"logits": z}, temperature=TEMPERATURE
            )
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_EXAMPLES
            )
        grad = tf.convert_to_tensor(tape.gradient(loss, proj))
        accuracy = contrastive.contrastive_metrics(batch, {"logits": z})["accuracy"]
        return loss, grad, accuracy, batch["index"]

    return fn


def _global_batch(k):
    return {
        "image": np.zeros((GLOBAL_EXAMPLES, k, 1, 1, 1), np.float32),
        "index": np.arange(GLOBAL_EXAMPLES, dtype=np.int32),
    }


def _mirrored_report():
    """Runs in a subprocess with 2 logical CPUs; returns JSON-able differences."""
    rng = np.random.default_rng(0)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    mirrored = strategy_lib.make_strategy("mirrored", devices=devices)
    report = {"replicas": mirrored.num_replicas_in_sync}
    variants = {
        "all_gather": _ALL_GATHER_CONCAT,
        "all_reduce_scatter": _scatter_all_reduce_concat,
        "local_gradient": _local_gradient_concat,
        "local_negatives": _local_only_concat,
    }
    for k in (2, 3):
        z0 = _clustered(rng, GLOBAL_EXAMPLES, k, DIM, noise=0.9).astype(np.float32)
        batch = _global_batch(k)
        # One device, the whole global batch.
        proj1 = tf.Variable(z0)
        loss1, grad1, acc1, _ = _step(proj1, k)(
            tf.nest.map_structure(tf.constant, batch)
        )
        loss1, grad1, acc1 = float(loss1), grad1.numpy(), acc1.numpy()
        with mirrored.scope():
            proj2 = tf.Variable(z0)
        dataset = tf.data.Dataset.from_tensor_slices(batch).batch(GLOBAL_EXAMPLES)
        dist_batch = next(iter(mirrored.experimental_distribute_dataset(dataset)))
        for name, concat in variants.items():
            for mode in (
                ("eager", "function") if name == "all_gather" else ("function",)
            ):
                with mock.patch.object(contrastive, "cross_replica_concat", concat):

                    def run(b):
                        return mirrored.run(_step(proj2, k), (b,))  # noqa: B023

                    if mode == "function":
                        run = tf.function(run)
                    loss, grad, acc, index = run(dist_batch)
                loss2 = float(mirrored.reduce("SUM", loss, None))
                grad2 = mirrored.reduce("SUM", grad, None).numpy()
                acc2 = np.zeros(GLOBAL_EXAMPLES)
                for a, i in zip(
                    mirrored.experimental_local_results(acc),
                    mirrored.experimental_local_results(index),
                    strict=True,
                ):
                    acc2[i.numpy()] = a.numpy()
                report[f"k={k} {name} {mode}"] = {
                    "loss_one": loss1,
                    "loss_two": loss2,
                    "loss_abs_diff": abs(loss2 - loss1),
                    "grad_max_abs_diff": float(np.abs(grad2 - grad1).max()),
                    "grad_max_abs": float(np.abs(grad1).max()),
                    "accuracy_max_abs_diff": float(np.abs(acc2 - acc1).max()),
                    "replica_examples": [
                        len(i) for i in mirrored.experimental_local_results(index)
                    ],
                }
    return report


_SCRIPT = """
import json, sys
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import test_contrastive as t
print("RESULT" + json.dumps(t._mirrored_report()))
"""


@pytest.fixture(scope="module")
def mirrored_report():
    """2-replica numbers, computed once in a subprocess.

    A subprocess because collective ops of different strategies in one
    process share instance keys, which must keep one dtype (all_gather's
    gradient gathers int32 sizes), as in ``test_train_loop``.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    report = json.loads(line[len("RESULT") :])
    assert report.pop("replicas") == 2
    return report


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize(
    "variant",
    ["all_gather eager", "all_gather function", "all_reduce_scatter function"],
)
def test_two_replicas_match_one_device(mirrored_report, k, variant):
    """Global negatives: same global loss, gradient and accuracy as 1 device."""
    r = mirrored_report[f"k={k} {variant}"]
    assert r["replica_examples"] == [GLOBAL_EXAMPLES // 2] * 2
    assert r["loss_abs_diff"] < 1e-6 * r["loss_one"]
    assert r["grad_max_abs_diff"] < 1e-6
    assert r["grad_max_abs"] > 1e-2
    assert r["accuracy_max_abs_diff"] == 0


@pytest.mark.parametrize("k", [2, 3])
def test_two_replica_checks_can_fail(mirrored_report, k):
    # Per-replica negatives only: each anchor sees half the negatives, so the
    # loss and the gradient both change.
    local = mirrored_report[f"k={k} local_negatives function"]
    assert local["loss_abs_diff"] > 0.05
    assert local["grad_max_abs_diff"] > 1e-3
    # Gathered values without a cross-replica gradient: the loss is right, the
    # gradient is not.
    frozen = mirrored_report[f"k={k} local_gradient function"]
    assert frozen["loss_abs_diff"] < 1e-6 * frozen["loss_one"]
    assert frozen["grad_max_abs_diff"] > 1e-3
