"""Ghost groups (``pp.groups``): per-group batch norm, Jigsaw subsets, Exemplar loss.

Each consumer is checked two ways: with one group per batch it is today's
computation exactly, and with ``G`` rows per group it equals the computation
split into ``rows / G`` parts (replicas), compared with independent NumPy
values where possible (reference 4.2, 4.3, 7.3, 7.4, 11.2 items 1 and 11).
"""

from __future__ import annotations

import functools
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import gin
from revisit_tf import cli
from revisit_tf.models import factory, heads, layers, pretext
from revisit_tf.pp import get_preprocess_fn, groups, rng
from revisit_tf.train import triplet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=0.25, units=(1, 1, 1, 1), stem_stride=1, num_classes=4)


# --------------------------------------------------------------------------
# Batch norm.
# --------------------------------------------------------------------------


def _bn(group_size=None, **kwargs):
    bn = layers.BatchNormalization(
        axis=-1, momentum=0.9, epsilon=1e-3, ghost_group_size=group_size, **kwargs
    )
    return bn


def _numpy_bn(x, gamma, beta, eps):
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta, mean, var


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(8, 3, 2, 5), (12, 6)])
def test_ghost_batchnorm_equals_numpy_per_group(dtype, shape):
    """G = N / 2 (N / 3): each group normalised alone; moving stats from group 0."""
    rng_np = np.random.default_rng(0)
    x = rng_np.normal(size=shape).astype(dtype)
    x[shape[0] // 2 :] = 3.0 * x[shape[0] // 2 :] + 2.0  # groups differ
    g = 4
    bn = _bn(g, dtype=dtype)
    bn.build(shape)
    gamma = rng_np.uniform(0.5, 1.5, shape[-1])
    beta = rng_np.normal(size=shape[-1])
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    y = np.asarray(bn(tf.constant(x), training=True))
    expected, stats = [], []
    for i in range(shape[0] // g):
        out, mean, var = _numpy_bn(
            x[i * g : (i + 1) * g].astype("float64"), gamma, beta, 1e-3
        )
        expected.append(out)
        stats.append((mean, var))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(y, np.concatenate(expected), rtol=tol, atol=tol)
    mean0, var0 = stats[0]  # the first group, as replica 0 / core 0
    np.testing.assert_allclose(bn.moving_mean, 0.1 * mean0, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.moving_variance, 0.9 + 0.1 * var0, rtol=tol, atol=tol)
    # Inference is unchanged: the moving statistics.
    plain = _bn(None, dtype=dtype)
    plain.build(shape)
    plain.set_weights(bn.get_weights())
    np.testing.assert_array_equal(bn(x, training=False), plain(x, training=False))


def test_ghost_batchnorm_one_group_is_the_plain_layer_exactly():
    x = tf.constant(np.random.default_rng(1).normal(size=(8, 4, 4, 3)), tf.float32)
    plain, ghost = _bn(None), _bn(8)
    for bn in (plain, ghost):
        bn.build(x.shape)
    outs = []
    for bn in (plain, ghost):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(y * tf.range(3, dtype=tf.float32))
        outs.append((y, tape.gradient(loss, [x, bn.gamma, bn.beta])))
    (y0, g0), (y1, g1) = outs
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain.moving_mean, ghost.moving_mean)
    np.testing.assert_array_equal(plain.moving_variance, ghost.moving_variance)


def test_ghost_batchnorm_config_and_errors():
    assert "ghost_group_size" not in _bn(None).get_config()  # configs unchanged
    config = _bn(16).get_config()
    assert config["ghost_group_size"] == 16
    assert layers.BatchNormalization.from_config(config).ghost_group_size == 16
    bn = _bn(3)
    with pytest.raises(ValueError, match=r"ghost_group_size=3 does not divide the 8"):
        bn(tf.zeros([8, 2, 2, 1]), training=True)
    with pytest.raises(ValueError, match="exclude each other"):
        _bn(4, synchronized=True)
    with pytest.raises(ValueError, match="positive int.*got 0"):
        _bn(0)
    with pytest.raises(ValueError, match="exclude each other"):
        factory.build_trunk("resnet50_v1", sync_batchnorm=True, ghost_group_size=8)

    # A dynamic batch (the export's training-mode trace): checked at run time.
    dynamic = _bn(4)
    dynamic.build((None, 3))
    fn = tf.function(
        lambda t: dynamic(t, training=True),
        input_signature=[tf.TensorSpec([None, 3])],
    )
    assert fn(tf.ones([8, 3])).shape == (8, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must divide"):
        fn(tf.ones([6, 3]))


def _trunk(arch, group_size, input_shape=(8, 8, 3), **kwargs):
    return factory.build_trunk(
        arch, input_shape=input_shape, ghost_group_size=group_size, **TINY, **kwargs
    )


@pytest.mark.parametrize(
    "arch,kwargs",
    [("resnet50_v1", {}), ("revnet50", {"memory_saving": True}), ("vgg19", {})],
)
def test_every_trunk_batchnorm_gets_the_group_size_and_round_trips(arch, kwargs):
    trunk = _trunk(arch, 4, **kwargs)
    bns = [
        la
        for la in trunk._flatten_layers(include_self=False)
        if isinstance(la, keras.layers.BatchNormalization)
    ]
    assert bns and {la.ghost_group_size for la in bns} == {4}
    again = keras.Model.from_config(trunk.get_config())
    assert {
        la.ghost_group_size
        for la in again._flatten_layers(include_self=False)
        if isinstance(la, keras.layers.BatchNormalization)
    } == {4}
    # Off by default: the trunk's config is today's.
    assert "ghost_group_size" not in str(_trunk(arch, None, **kwargs).get_config())


def _grads_and_outputs(model, x):
    with tf.GradientTape() as tape:
        out = model(x, training=True)["logits"]
        loss = tf.reduce_sum(out * tf.range(1, 5, dtype=out.dtype))
    return out, tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize("arch", ["resnet50_v1", "revnet50"])
def test_trunk_with_one_group_equals_the_plain_trunk_exactly(arch):
    x = tf.constant(np.random.default_rng(2).normal(size=(8, 8, 8, 3)), tf.float32)
    plain = _trunk(arch, None)
    ghost = _trunk(arch, 8)
    ghost.set_weights(plain.get_weights())
    (o0, g0), (o1, g1) = _grads_and_outputs(plain, x), _grads_and_outputs(ghost, x)
    np.testing.assert_array_equal(o0, o1)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        plain.non_trainable_weights, ghost.non_trainable_weights, strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_ghost_trunk_equals_two_unsynchronised_replicas():
    """G = B / 2 on one device == 2 MirroredStrategy replicas (per-replica BN).

    Outputs, the summed gradients (the loop sums replica gradients) and the
    moving statistics (replica 0's copy, the one checkpoints save) agree. In
    float64 (Keras' BN path): float32 gradients of BN over 4 rows differ by
    ~1e-3 between runs (multi-threaded reduction order), float64 by ~1e-12.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2  # tests/conftest.py splits the CPU in two
    strategy = tf.distribute.MirroredStrategy(devices)
    x = np.random.default_rng(3).normal(size=(8, 8, 8, 3))
    x[4:] = 3.0 * x[4:] + 2.0
    ghost = _trunk("resnet50_v1", 4, dtype_policy="float64")
    with strategy.scope():
        local = _trunk("resnet50_v1", None, dtype_policy="float64")
    local.set_weights(ghost.get_weights())
    out, grads = _grads_and_outputs(ghost, tf.constant(x))

    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[
            4 * ctx.replica_id_in_sync_group : 4 * (ctx.replica_id_in_sync_group + 1)
        ]
    )

    @tf.function
    def step(batch):
        return strategy.run(lambda b: _grads_and_outputs(local, b), args=(batch,))

    rep_out, rep_grads = step(values)
    outs = strategy.experimental_local_results(rep_out)
    np.testing.assert_allclose(out, np.concatenate(outs), rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, rep_grads, strict=True):
        summed = sum(np.asarray(v) for v in strategy.experimental_local_results(rg))
        np.testing.assert_allclose(g, summed, rtol=1e-9, atol=1e-10)
    for a, b in zip(
        ghost.non_trainable_weights, local.non_trainable_weights, strict=True
    ):
        replica0 = strategy.experimental_local_results(b.value)[0]
        np.testing.assert_allclose(a, replica0, rtol=1e-12, atol=1e-12)


def test_patch_head_batchnorm_groups_the_same_images():
    spec = {
        "image": tf.TensorSpec([9, 8, 8, 3]),
        "label": tf.TensorSpec([8], tf.int32),
    }
    perms = np.array([np.roll(np.arange(9), i) for i in range(10)])
    trunk_fn = functools.partial(_trunk, "resnet50_v1", 18)
    model = pretext.build_pretext_model(
        spec,
        trunk_fn=trunk_fn,
        head_fn=functools.partial(
            heads.jigsaw_head, permutations=perms, hidden=8, ghost_group_size=18
        ),
    )
    head_bn = model.get_layer("patch_head").get_layer("fc7_bn")
    assert head_bn.ghost_group_size == 2 * 8  # 18 patches = 2 images x 8 perms
    plain = pretext.build_pretext_model(
        spec,
        trunk_fn=functools.partial(_trunk, "resnet50_v1", None),
        head_fn=functools.partial(heads.jigsaw_head, permutations=perms, hidden=8),
    )
    assert type(plain.get_layer("patch_head").get_layer("fc7_bn")) is (
        keras.layers.BatchNormalization
    )
    with pytest.raises(ValueError, match="not a multiple of the 9 patches"):
        pretext.build_pretext_model(
            spec,
            trunk_fn=trunk_fn,
            head_fn=functools.partial(
                heads.jigsaw_head, permutations=perms, hidden=8, ghost_group_size=16
            ),
        )


# --------------------------------------------------------------------------
# The Jigsaw permutation subset (a batch op per group).
# --------------------------------------------------------------------------


def _patch_batch(b=6):
    return {"image": tf.zeros([b, 9, 2, 2, 1])}


def test_jigsaw_subset_per_group_equals_the_op_on_each_group():
    op = get_preprocess_fn("jigsaw_perms(100, 8)", log_data=False)
    seed = tf.constant([7, 11], tf.int64)
    batch = _patch_batch(6)
    with rng.seeded(seed):
        grouped = groups.per_group(op, 18)(batch)["label"]  # 3 groups of 2 images
    with rng.seeded(seed):
        separately = [
            op({"image": batch["image"][i : i + 2]})["label"] for i in (0, 2, 4)
        ]
    np.testing.assert_array_equal(grouped, np.concatenate(separately))
    labels = np.asarray(grouped).reshape(3, 2, 8)
    assert (labels == labels[:, :1]).all()  # one subset per group
    assert len({tuple(g[0]) for g in labels}) == 3  # each group draws its own
    for subset in labels[:, 0]:
        assert len(set(subset)) == 8 and subset.min() >= 0 and subset.max() < 100
    # One group (G = all 54 rows) is the op itself, exactly.
    with rng.seeded(seed):
        whole = groups.per_group(op, 54)(batch)["label"]
    with rng.seeded(seed):
        np.testing.assert_array_equal(whole, op(batch)["label"])
    assert groups.per_group(op, None) is op


def test_jigsaw_subset_per_group_inside_tf_data():
    op = groups.per_group(get_preprocess_fn("jigsaw_perms(100, 8)", log_data=False), 9)
    ds = tf.data.Dataset.from_tensors(_patch_batch(4)).map(op)
    labels = next(iter(ds))["label"].numpy()
    assert labels.shape == (4, 8)
    assert len({tuple(row) for row in labels}) > 1  # one group per image


def test_group_errors_name_the_values():
    op = get_preprocess_fn("jigsaw_perms(100, 8)", log_data=False)
    with pytest.raises(
        ValueError, match=r"ghost_group_size=12 is not a multiple of the 9"
    ):
        groups.per_group(op, 12)(_patch_batch(6))
    with pytest.raises(ValueError, match=r"ghost_group_size=36 does not divide the 54"):
        groups.per_group(op, 36)(_patch_batch(6))
    with pytest.raises(ValueError, match=r"per-replica batch \(global batch 64 on 8"):
        groups.check_training_batch(
            128,
            example_image_shape=[8, 4, 4, 3],
            global_batch_size=64,
            num_replicas=8,
        )
    assert (
        groups.check_training_batch(
            64, example_image_shape=[8, 4, 4, 3], global_batch_size=64
        )
        == 8
    )
    assert (
        groups.check_training_batch(
            None, example_image_shape=[4, 4, 3], global_batch_size=3
        )
        == 1
    )


# --------------------------------------------------------------------------
# Exemplar: mining and axis-0 normalisation per group.
# --------------------------------------------------------------------------


def _numpy_semihard(e, labels, margin):
    """Reference 4.2, written with loops: the mean over positive pairs."""
    d = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    total, pairs = 0.0, 0
    n = len(e)
    for a in range(n):
        negs = [j for j in range(n) if labels[j] != labels[a]]
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [d[a, j] for j in negs if d[a, j] > d[a, p]]
            neg = min(farther) if farther else max(d[a, j] for j in negs)
            total += max(margin + d[a, p] - neg, 0.0)
            pairs += 1
    return total / pairs


def _exemplar(b=6, k=4, dim=5, seed=4):
    e = np.random.default_rng(seed).normal(size=(b * k, dim))
    return {"image": tf.zeros([b, k, 2, 2, 1], tf.float64)}, {"logits": tf.constant(e)}


@pytest.mark.parametrize("normalization", ["batch_axis", "per_vector"])
def test_exemplar_loss_per_group_equals_groups_as_replicas(normalization):
    batch, outputs = _exemplar()
    e = outputs["logits"]
    g = 8  # 2 images x 4 copies, 3 groups
    loss = triplet.triplet_semihard(
        batch, outputs, margin=0.5, normalization=normalization, ghost_group_size=g
    )
    separately = [
        triplet.triplet_semihard(
            {"image": batch["image"][i : i + 2]},
            {"logits": e[4 * i : 4 * i + g]},
            margin=0.5,
            normalization=normalization,
        )
        for i in (0, 2, 4)
    ]
    np.testing.assert_array_equal(loss, np.concatenate(separately))
    # The loop's global-batch mean = the mean of the groups' (replicas') losses.
    axis = 0 if normalization == "batch_axis" else 1
    expected = []
    for i in range(3):
        part = np.asarray(e[i * g : (i + 1) * g])
        part = part / np.linalg.norm(part, axis=axis, keepdims=True)
        expected.append(_numpy_semihard(part, np.repeat(np.arange(2), 4), 0.5))
    assert float(tf.reduce_mean(loss)) == pytest.approx(np.mean(expected), rel=1e-9)


def test_exemplar_one_group_is_today_exactly_with_gradients():
    batch, outputs = _exemplar()
    e = outputs["logits"]
    results = []
    for group_size in (None, 24):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = triplet.triplet_semihard(
                batch,
                {"logits": e},
                normalization="batch_axis",
                ghost_group_size=group_size,
            )
            total = tf.reduce_mean(loss)
        results.append((loss, tape.gradient(total, e)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_exemplar_gradients_and_metric_per_group():
    batch, outputs = _exemplar()
    e = outputs["logits"]
    with tf.GradientTape() as tape:
        tape.watch(e)
        total = tf.reduce_mean(
            triplet.triplet_semihard(
                batch, {"logits": e}, normalization="batch_axis", ghost_group_size=8
            )
        )
    grad = tape.gradient(total, e)
    # Replicas: each averages over the global batch (6), gradients summed.
    parts = []
    for i in (0, 2, 4):
        part = e[4 * i : 4 * i + 8]
        with tf.GradientTape() as tape:
            tape.watch(part)
            share = triplet.triplet_semihard(
                {"image": batch["image"][i : i + 2]},
                {"logits": part},
                normalization="batch_axis",
            )
            replica_loss = tf.reduce_sum(share) / 6
        parts.append(tape.gradient(replica_loss, part))
    np.testing.assert_allclose(grad, np.concatenate(parts), rtol=1e-12, atol=1e-15)
    metric = triplet.nearest_neighbour_metrics(batch, outputs, ghost_group_size=8)
    per_group = [
        triplet.nearest_neighbour_metrics(
            {"image": batch["image"][i : i + 2]}, {"logits": e[4 * i : 4 * i + 8]}
        )["accuracy"]
        for i in (0, 2, 4)
    ]
    np.testing.assert_array_equal(metric["accuracy"], np.concatenate(per_group))


def test_exemplar_group_errors():
    batch, outputs = _exemplar()
    with pytest.raises(
        ValueError, match=r"ghost_group_size=6 is not a multiple of the 4"
    ):
        triplet.triplet_semihard(batch, outputs, ghost_group_size=6)
    with pytest.raises(ValueError, match=r"ghost_group_size=16 does not divide the 24"):
        triplet.triplet_semihard(batch, outputs, ghost_group_size=16)


# --------------------------------------------------------------------------
# Gin: one macro, and the G of each ImageNet config (8 cores, reference 7.7).
# --------------------------------------------------------------------------

# Rows per source image (trunk inputs) of each task and the G of 8 cores.
ROWS_PER_IMAGE = {
    "rotation": 4,
    "exemplar": 8,
    "jigsaw": 9,
    "rel_patch_location": 9,
    "supervised": 1,
}
EIGHT_CORE_G = {
    "rotation": 32,
    "exemplar": 64,
    "jigsaw": 144,
    "rel_patch_location": 144,
    "supervised": 32,
}


@pytest.mark.parametrize("task", sorted(EIGHT_CORE_G))
def test_imagenet_config_documents_the_eight_core_group_size(task):
    path = os.path.join(REPO, "gin", "imagenet", f"{task}.gin")
    with open(path) as f:
        text = f.read()
    documented = re.findall(r"GHOST_GROUP_SIZE = (\d+)", text)
    assert documented == [str(EIGHT_CORE_G[task])], documented
    cli.parse_gin(
        [f"imagenet/{task}.gin", "pretext/ghost_groups.gin"],
        [f"GHOST_GROUP_SIZE = {EIGHT_CORE_G[task]}"],
    )
    batch = gin.query_parameter("pretrain.global_batch_size")
    assert batch // 8 * ROWS_PER_IMAGE[task] == EIGHT_CORE_G[task]
    for binding in (
        "build_trunk.ghost_group_size",
        "pretrain.ghost_group_size",
        "triplet_semihard.ghost_group_size",
        "jigsaw_head.ghost_group_size",
    ):
        assert str(gin.query_parameter(binding)) == "%GHOST_GROUP_SIZE", binding
    assert gin.query_parameter("%GHOST_GROUP_SIZE") == EIGHT_CORE_G[task]
