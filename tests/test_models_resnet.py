"""Tests for the ResNet50 v1 and v2 trunks (``revisit_tf.models.resnet``).

Golden values come from the reference (``original-system.md`` 5.4: parameter
counts and endpoint shape tables) or from closed-form arithmetic written out
here from the architecture description (5.1), never from running the code.
Numerics of the fixed padding are checked against a NumPy re-implementation.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.models import ENDPOINTS, build_resnet, count_params
from revisit_tf.models.resnet import apply_bottleneck_v1, apply_bottleneck_v2

BN_EPS = 1e-3  # reference section 5: TF1 batch-norm epsilon.
TINY = {"width": 0.25, "units": (1, 1, 1, 1)}


# --------------------------------------------------------------------------
# Independent closed forms (reference 5.1 / 5.4).
# --------------------------------------------------------------------------


def expected_params(
    k, units, num_classes, in_channels=3, strides=(1, 2, 2, 2), version="v1"
):
    """Trainable parameters of ResNet v1 / v2 by arithmetic over reference 5.1.

    v1. Stem: 7x7 conv in_channels -> 16k (no bias) + BN (scale, offset).
    Unit with input c, output F, bottleneck b = F/4: 1x1 c->b, 3x3 b->b,
    1x1 b->F, each + BN; projection 1x1 c->F + BN when stride > 1 or c != F.
    v2. Stem: the 7x7 conv only (no BN). Unit: pre-activation BN over c;
    1x1 c->b + BN, 3x3 b->b + BN, 1x1 b->F (no BN); projection 1x1 c->F
    (no BN) when stride > 1 or c != F. Head: BN over 512k after the last unit.
    Both: dense 512k -> n with bias.
    """
    v2 = version == "v2"
    stem = int(16 * k)
    total = 7 * 7 * in_channels * stem + (0 if v2 else 2 * stem)
    c = stem
    for i, (num_units, stage_stride) in enumerate(zip(units, strides, strict=True)):
        f = int(64 * k * 2**i)
        b = f // 4
        for j in range(num_units):
            stride = stage_stride if j == 0 else 1
            if v2:
                total += 2 * c  # preact_bn
            total += c * b + 2 * b  # conv1 + bn1
            total += 3 * 3 * b * b + 2 * b  # conv2 + bn2
            total += b * f + (0 if v2 else 2 * f)  # conv3 (+ bn3 for v1)
            if stride > 1 or c != f:
                total += c * f + (0 if v2 else 2 * f)  # proj_conv (+ proj_bn)
            c = f
    if v2:
        total += 2 * c  # post_bn
    if num_classes is not None:
        total += c * num_classes + num_classes
    return total


def expected_shapes(size, k, stem_stride=2, strides=(1, 2, 2, 2)):
    """Endpoint shapes (without batch) by stride arithmetic (reference 5.4).

    A conv/pool with kernel K, fixed padding (K-1)/2 on both sides and stride
    s maps S to floor((S - 1) / s) + 1 = ceil(S / s).
    """
    s = math.ceil(math.ceil(size / stem_stride) / 2)  # stem conv, then max pool
    shapes = {"after_root": (s, s, int(16 * k))}
    for i, stride in enumerate(strides):
        s = math.ceil(s / stride)
        shapes[f"block{i + 1}"] = (s, s, int(64 * k * 2**i))
    shapes["pre_logits"] = (int(512 * k),)
    return shapes


def static_shapes(model):
    return {key: tuple(t.shape[1:]) for key, t in model.output.items()}


# --------------------------------------------------------------------------
# NumPy reference ops.
# --------------------------------------------------------------------------


def np_conv(x, w, stride, pad):
    """Cross-correlation of NHWC ``x`` with HWIO ``w``, zero pad ``pad``=(b, a)."""
    x = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]), np.float64)
    for di in range(kh):
        for dj in range(kw):
            patch = x[
                :,
                di : di + stride * (ho - 1) + 1 : stride,
                dj : dj + stride * (wo - 1) + 1 : stride,
            ]
            out += np.einsum("nhwc,cf->nhwf", patch, w[di, dj])
    return out


def np_maxpool(x, size, stride, pad):
    x = np.pad(x, ((0, 0), pad, pad, (0, 0)))  # zero padding, reference 11.2 #19
    ho = (x.shape[1] - size) // stride + 1
    wo = (x.shape[2] - size) // stride + 1
    windows = [
        x[
            :,
            di : di + stride * (ho - 1) + 1 : stride,
            dj : dj + stride * (wo - 1) + 1 : stride,
        ]
        for di in range(size)
        for dj in range(size)
    ]
    return np.max(np.stack(windows), axis=0)


def np_relu(x):
    return np.maximum(x, 0.0)


def randomize_weights(model, rng):
    """Random kernels, BN parameters and (positive) moving variances."""
    for v in model.weights:
        shape = tuple(v.shape)
        if v.path.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif v.path.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        v.assign(value.astype("float32"))


def bn_params(model, name):
    layer = model.get_layer(name)
    return [
        np.asarray(w, np.float64)
        for w in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    ]


def np_bn(x, params):
    gamma, beta, mean, var = params
    return (x - mean) / np.sqrt(var + BN_EPS) * gamma + beta


def kernel(model, name):
    return np.asarray(model.get_layer(name).kernel, np.float64)


# --------------------------------------------------------------------------
# Full-size ResNet50 v1, k = 4 (built once).
# --------------------------------------------------------------------------


# Reference 5.4 table, 224x224 input, k = 4, 1000-way head (v1 and v2 alike).
REFERENCE_SHAPES_224_K4 = {
    "after_root": (56, 56, 64),
    "block1": (56, 56, 256),
    "block2": (28, 28, 512),
    "block3": (14, 14, 1024),
    "block4": (7, 7, 2048),
    "pre_logits": (2048,),
    "logits": (1000,),
}


@pytest.fixture(scope="module")
def resnet50_k4():
    return build_resnet(width=4, num_classes=1000)


def test_resnet50_k4_param_count_matches_reference(resnet50_k4):
    # Reference 5.4 table; the standard ResNet-50 count.
    assert count_params(resnet50_k4) == 25_557_032


def test_resnet50_k4_endpoint_shapes_match_reference_table(resnet50_k4):
    # Reference 5.4 table, 224x224 input, k = 4.
    assert static_shapes(resnet50_k4) == REFERENCE_SHAPES_224_K4
    assert resnet50_k4.name == "resnet50_v1"
    assert resnet50_k4.inputs[0].shape == (None, 224, 224, 3)


def test_resnet50_k4_layer_names_are_deterministic(resnet50_k4):
    names = {layer.name for layer in resnet50_k4.layers}
    root = {"image", "root_pad", "root_conv", "root_bn", "root_relu"}
    root |= {"root_pool_pad", "root_pool", "pre_logits", "logits"}
    assert root <= names
    for i, num_units in enumerate((3, 4, 6, 3), start=1):
        for j in range(1, num_units + 1):
            for suffix in ("conv1", "conv2", "conv3", "bn1", "bn2", "bn3"):
                assert f"block{i}_unit{j}_{suffix}" in names
            has_proj = f"block{i}_unit{j}_proj_conv" in names
            assert has_proj == (j == 1)
            assert (f"block{i}_unit{j}_proj_bn" in names) == (j == 1)
        assert f"block{i}_unit{num_units + 1}_conv1" not in names


# --------------------------------------------------------------------------
# Parameter counts by closed form.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, k, count",
    [
        ("v1", 4, 25_557_032),
        ("v1", 8, 98_004_072),
        ("v1", 12, 217_342_120),
        ("v1", 16, 383_571_176),
        ("v2", 4, 25_549_352),
        ("v2", 8, 97_988_712),
        ("v2", 12, 217_319_080),
        ("v2", 16, 383_540_456),
    ],
)
def test_closed_form_reproduces_reference_table(version, k, count):
    # Validates the test's own formula against reference 5.4 for every width.
    assert expected_params(k, (3, 4, 6, 3), 1000, version=version) == count


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 1, "units": (1, 1, 1, 1), "num_classes": 4},
        {"width": 0.5, "units": (2, 1, 1, 2), "num_classes": None},
        {
            "width": 0.25,
            "units": (1, 2, 1, 1),
            "num_classes": 7,
            "input_shape": (28, 28, 1),
            "stem_stride": 1,
            "strides": (1, 2, 2, 1),
        },
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_small_variant_param_count_matches_closed_form(kwargs, version):
    kwargs = {"input_shape": (32, 32, 3), **kwargs}
    model = build_resnet(version=version, **kwargs)
    expected = expected_params(
        kwargs["width"],
        kwargs["units"],
        kwargs["num_classes"],
        in_channels=kwargs["input_shape"][-1],
        strides=kwargs.get("strides", (1, 2, 2, 2)),
        version=version,
    )
    assert count_params(model) == expected
    # BN moving statistics exist but are not trainable.
    num_bn = sum(isinstance(la, keras.layers.BatchNormalization) for la in model.layers)
    assert len(model.non_trainable_weights) == 2 * num_bn


# --------------------------------------------------------------------------
# Endpoint shapes for other sizes / strides.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, stem_stride, strides",
    [
        (28, 2, (1, 2, 2, 2)),  # 28 -> 7 -> 7, 4, 2, 1
        (32, 2, (1, 2, 2, 2)),  # 32 -> 8 -> 8, 4, 2, 1
        (28, 1, (1, 2, 2, 2)),  # stem stride 1: 28 -> 14 -> 14, 7, 4, 2
        (30, 1, (1, 2, 2, 1)),  # odd halvings: 15, 8, 4, 4
    ],
)
def test_small_variant_endpoint_shapes(size, stem_stride, strides):
    model = build_resnet(
        **TINY,
        input_shape=(size, size, 1),
        stem_stride=stem_stride,
        strides=strides,
        num_classes=3,
    )
    expected = expected_shapes(size, 0.25, stem_stride, strides)
    expected["logits"] = (3,)
    assert static_shapes(model) == expected
    assert tuple(model.output) == (*ENDPOINTS, "logits")


def test_forward_pass_shapes_match_static_shapes():
    model = build_resnet(**TINY, input_shape=(28, 28, 1), stem_stride=1)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype("float32")
    out = model(x, training=False)
    assert set(out) == set(ENDPOINTS)
    for key, shape in expected_shapes(28, 0.25, stem_stride=1).items():
        assert tuple(out[key].shape) == (2, *shape), key
        assert np.all(np.isfinite(out[key]))


def test_patch_task_endpoint_shapes_scale_to_reference_k8():
    # Reference 5.4: 64x64 patches, stem stride 1, strides (2, 2, 1), k = 8.
    # Built at k = 0.5 (= 8 / 16) to stay fast; channels scale linearly with k.
    reference_k8 = {
        "after_root": (32, 32, 128),
        "block1": (32, 32, 512),
        "block2": (16, 16, 1024),
        "block3": (8, 8, 2048),
        "block4": (8, 8, 4096),
        "pre_logits": (4096,),
    }
    model = build_resnet(
        width=0.5,
        units=(1, 1, 1, 1),
        input_shape=(64, 64, 3),
        stem_stride=1,
        strides=(1, 2, 2, 1),
    )
    scaled = {
        key: (*shape[:-1], shape[-1] * 16)
        for key, shape in static_shapes(model).items()
    }
    assert scaled == reference_k8


def test_unknown_spatial_size_is_supported():
    model = build_resnet(**TINY, input_shape=(None, None, 3), num_classes=2)
    assert static_shapes(model)["block4"] == (None, None, 128)
    out = model(np.zeros((1, 20, 36, 3), "float32"))
    assert tuple(out["block4"].shape) == (1, 1, 2, 128)  # 20->5->1, 36->9->2
    assert tuple(out["logits"].shape) == (1, 2)


# --------------------------------------------------------------------------
# Fixed padding numerics.
# --------------------------------------------------------------------------


def _np_bottleneck_v1(model, x, name, stride, conv2_pad):
    """Reference 5.1 bottleneck v1 unit (inference-mode BN) in NumPy."""
    shortcut = np_bn(
        np_conv(x, kernel(model, f"{name}_proj_conv"), stride, (0, 0)),
        bn_params(model, f"{name}_proj_bn"),
    )
    y = np_conv(x, kernel(model, f"{name}_conv1"), 1, (0, 0))
    y = np_relu(np_bn(y, bn_params(model, f"{name}_bn1")))
    y = np_conv(y, kernel(model, f"{name}_conv2"), stride, conv2_pad)
    y = np_relu(np_bn(y, bn_params(model, f"{name}_bn2")))
    y = np_conv(y, kernel(model, f"{name}_conv3"), 1, (0, 0))
    y = np_bn(y, bn_params(model, f"{name}_bn3"))
    return np_relu(y + shortcut)


def test_strided_unit_uses_symmetric_fixed_padding():
    rng = np.random.default_rng(1)
    inputs = keras.Input((8, 8, 6))  # even size: fixed and "same" padding differ
    outputs = apply_bottleneck_v1(inputs, filters=16, stride=2, name="u")
    model = keras.Model(inputs, outputs)
    randomize_weights(model, rng)
    x = rng.normal(size=(2, 8, 8, 6)).astype("float32")

    got = np.asarray(model(x, training=False))
    fixed = _np_bottleneck_v1(model, x.astype(np.float64), "u", 2, (1, 1))
    same = _np_bottleneck_v1(model, x.astype(np.float64), "u", 2, (0, 1))

    assert got.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(got, fixed, rtol=1e-4, atol=1e-4)
    # Keras/TF "same" (0 before, 1 after) would give a different unit output.
    assert np.max(np.abs(fixed - same)) > 0.1
    # The 3x3 conv itself against tf.nn with explicit symmetric paddings.
    conv2_in = rng.normal(size=(2, 8, 8, 4)).astype("float32")
    w2 = np.asarray(model.get_layer("u_conv2").kernel)
    tf_fixed = tf.nn.conv2d(
        conv2_in, w2, strides=2, padding=[[0, 0], [1, 1], [1, 1], [0, 0]]
    )
    keras_conv2 = model.get_layer("u_conv2")(model.get_layer("u_conv2_pad")(conv2_in))
    np.testing.assert_allclose(keras_conv2, tf_fixed, rtol=1e-5, atol=1e-5)


def test_stem_uses_fixed_padding_and_zero_padded_max_pool():
    rng = np.random.default_rng(2)
    model = build_resnet(**TINY, input_shape=(12, 12, 3), weight_decay=0.0)
    randomize_weights(model, rng)
    x = rng.normal(size=(2, 12, 12, 3)).astype("float32")

    def np_root(conv_pad, pool_pad):
        y = np_conv(x.astype(np.float64), kernel(model, "root_conv"), 2, conv_pad)
        y = np_relu(np_bn(y, bn_params(model, "root_bn")))
        return np_maxpool(y, 3, 2, pool_pad)

    got = np.asarray(model(x, training=False)["after_root"])
    expected = np_root((3, 3), (1, 1))  # reference 5.1: pad 3/3, pool pad 1/1
    assert got.shape == expected.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # "same" placement (2 before / 3 after, then 0 / 1) gives other values.
    assert np.max(np.abs(expected - np_root((2, 3), (0, 1)))) > 0.1


# --------------------------------------------------------------------------
# Weight decay (reference section 6).
# --------------------------------------------------------------------------


def test_weight_decay_is_half_wd_times_squared_kernels():
    wd = 3e-4
    units = (1, 2, 1, 1)
    model = build_resnet(
        width=0.25, units=units, input_shape=(16, 16, 3), num_classes=5, weight_decay=wd
    )
    rng = np.random.default_rng(3)
    randomize_weights(model, rng)

    kernels = [v for v in model.trainable_weights if v.path.endswith("/kernel")]
    # stem + 3 per unit + 4 projections + logits
    assert len(kernels) == 1 + 3 * sum(units) + 4 + 1
    expected = wd / 2 * sum(np.sum(np.asarray(v, np.float64) ** 2) for v in kernels)
    assert len(model.losses) == len(kernels)
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)

    # BN parameters and the logits bias are not regularized: changing them
    # leaves the loss unchanged.
    for v in model.weights:
        if not v.path.endswith("/kernel"):
            v.assign(np.asarray(v) + 5.0)
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)


def test_zero_weight_decay_adds_no_losses():
    model = build_resnet(**TINY, input_shape=(16, 16, 3), num_classes=2, weight_decay=0)
    assert model.losses == []


# --------------------------------------------------------------------------
# Serialization.
# --------------------------------------------------------------------------


def _assert_same_outputs(a, b, x):
    out_a, out_b = a(x, training=False), b(x, training=False)
    assert set(out_a) == set(out_b) == {*ENDPOINTS, "logits"}
    for key in out_a:
        np.testing.assert_allclose(out_a[key], out_b[key], rtol=1e-6, atol=1e-6)


def test_config_round_trip_and_keras_file(tmp_path):
    model = build_resnet(
        **TINY, input_shape=(16, 16, 3), num_classes=3, weight_decay=2e-4, name="tiny"
    )
    randomize_weights(model, np.random.default_rng(4))
    x = np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype("float32")

    config = json.loads(json.dumps(model.get_config()))
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    _assert_same_outputs(model, clone, x)
    assert [la.name for la in clone.layers] == [la.name for la in model.layers]

    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.name == "tiny"
    _assert_same_outputs(model, loaded, x)
    # Regularizers survive: same weight-decay term.
    np.testing.assert_allclose(
        float(sum(loaded.losses)), float(sum(model.losses)), rtol=1e-6
    )


# --------------------------------------------------------------------------
# Argument validation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 0.3}, r"width=0\.3.*stem"),
        ({"width": 1 / 32}, r"width=0\.03125"),
        ({"width": 0}, r"width must be a positive number, got 0"),
        ({"width": -1}, r"got -1"),
        ({"width": "4"}, r"width must be a positive number, got '4'"),
        ({"version": "v3"}, r"Unknown ResNet version 'v3'"),
        ({"last_relu": False}, r"last_relu=False.*v1.*v2 and RevNet"),
        (
            {"version": "v1", "last_relu": False},
            r"last_relu=False.*v1.*v2 and RevNet",
        ),
        ({"version": "V2"}, r"Unknown ResNet version 'V2'"),
        (
            {"units": (3, 4, 6)},
            r"units must be a sequence of 4 positive ints.*\(3, 4, 6\)",
        ),
        ({"units": (3, 4, 0, 3)}, r"units.*\(3, 4, 0, 3\)"),
        ({"units": 3}, r"units must be a sequence"),
        ({"strides": (1, 2, 2)}, r"strides must be a sequence of 4 positive ints"),
        ({"strides": (1, 2, 0, 2)}, r"strides.*\(1, 2, 0, 2\)"),
        ({"strides": (1, 2, 1.5, 2)}, r"strides.*1\.5"),
        ({"stem_stride": 0}, r"stem_stride must be a positive int, got 0"),
        ({"num_classes": 0}, r"num_classes must be a positive int or None, got 0"),
        ({"num_classes": True}, r"num_classes.*True"),
        ({"input_shape": (32, 32)}, r"input_shape must be \(height, width, channels\)"),
        ({"input_shape": (32, 32, None)}, r"channels must be a known positive int"),
        ({"input_shape": (32, 0, 3)}, r"input_shape width .* got 0"),
        ({"weight_decay": -1e-4}, r"weight_decay must be a finite float >= 0"),
        ({"name": "a/b"}, r"name must be a non-empty str"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_resnet(**{"input_shape": (32, 32, 3), **kwargs})


def test_fractional_widths_with_integer_channels_are_accepted():
    model = build_resnet(width=0.0625, units=(1, 1, 1, 1), input_shape=(16, 16, 3))
    # 16k = 1 stem channel, stage outputs 4, 8, 16, 32.
    assert static_shapes(model)["after_root"][-1] == 1
    assert static_shapes(model)["pre_logits"] == (32,)


def test_bottleneck_rejects_filters_not_divisible_by_four():
    with pytest.raises(ValueError, match=r"multiple of 4, got 6"):
        apply_bottleneck_v1(keras.Input((8, 8, 4)), filters=6, stride=1, name="u")


# --------------------------------------------------------------------------
# Synchronized batch norm.
# --------------------------------------------------------------------------


def _bn_layers(model):
    return [
        la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)
    ]


def test_sync_batchnorm_flag_and_bn_hyperparameters():
    plain = build_resnet(**TINY, input_shape=(16, 16, 3))
    synced = build_resnet(**TINY, input_shape=(16, 16, 3), sync_batchnorm=True)
    # root + 3 per unit + 4 projections
    assert len(_bn_layers(synced)) == 1 + 3 * 4 + 4
    assert all(la.synchronized for la in _bn_layers(synced))
    assert not any(la.synchronized for la in _bn_layers(plain))
    # Reference 5: TF1 defaults momentum 0.99, epsilon 1e-3.
    assert {(la.momentum, la.epsilon) for la in _bn_layers(plain)} == {(0.99, 1e-3)}


def test_sync_batchnorm_uses_global_batch_statistics_across_replicas():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2  # tests/conftest.py splits the CPU in two
    strategy = tf.distribute.MirroredStrategy(devices)
    shape = (16, 16, 3)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, *shape)).astype("float32")
    x[4:] = 3.0 * x[4:] + 2.0  # the two replicas see differently scaled halves

    reference = build_resnet(**TINY, input_shape=shape)
    with strategy.scope():
        synced = build_resnet(**TINY, input_shape=shape, sync_batchnorm=True)
        local = build_resnet(**TINY, input_shape=shape, sync_batchnorm=False)
    synced.set_weights(reference.get_weights())
    local.set_weights(reference.get_weights())
    # Training-mode BN on the full batch of 8 on one device.
    expected = np.asarray(reference(x, training=True)["pre_logits"])

    def run_distributed(model):
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: x[
                4 * ctx.replica_id_in_sync_group : 4
                * (ctx.replica_id_in_sync_group + 1)
            ]
        )

        @tf.function
        def step(batch):
            return strategy.run(
                lambda b: model(b, training=True)["pre_logits"], args=(batch,)
            )

        return np.concatenate(strategy.experimental_local_results(step(values)))

    np.testing.assert_allclose(run_distributed(synced), expected, rtol=1e-3, atol=1e-3)
    # Without synchronization each replica normalizes its own half.
    assert np.max(np.abs(run_distributed(local) - expected)) > 1e-2


# --------------------------------------------------------------------------
# ResNet50 v2 (pre-activation), reference 5.1 / 5.4 / 11.2 items 19-20.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_v2_k4():
    return build_resnet(version="v2", width=4, num_classes=1000)


def test_resnet50_v2_k4_param_count_matches_reference(resnet50_v2_k4):
    # Reference 5.4 table.
    assert count_params(resnet50_v2_k4) == 25_549_352


def test_resnet50_v2_k4_endpoint_shapes_and_layer_names(resnet50_v2_k4):
    # Reference 5.4: the same endpoint table as v1.
    assert static_shapes(resnet50_v2_k4) == REFERENCE_SHAPES_224_K4
    assert resnet50_v2_k4.name == "resnet50_v2"
    names = {layer.name for layer in resnet50_v2_k4.layers}
    root = {"image", "root_pad", "root_conv", "root_pool_pad", "root_pool"}
    root |= {"post_bn", "post_relu", "pre_logits", "logits"}
    assert root <= names
    assert not names & {"root_bn", "root_relu"}  # v2 stem: conv only
    for i, num_units in enumerate((3, 4, 6, 3), start=1):
        for j in range(1, num_units + 1):
            unit = f"block{i}_unit{j}"
            for suffix in ("preact_bn", "preact_relu", "conv1", "conv2", "conv3"):
                assert f"{unit}_{suffix}" in names
            assert {f"{unit}_bn1", f"{unit}_bn2", f"{unit}_add"} <= names
            assert f"{unit}_bn3" not in names
            assert f"{unit}_proj_bn" not in names
            assert (f"{unit}_proj_conv" in names) == (j == 1)


def _np_bottleneck_v2(model, x, name, stride, project):
    """Reference 5.1 bottleneck v2 unit (inference-mode BN) in NumPy."""
    a = np_relu(np_bn(x, bn_params(model, f"{name}_preact_bn")))
    if project:
        shortcut = np_conv(a, kernel(model, f"{name}_proj_conv"), stride, (0, 0))
    else:
        shortcut = x
    y = np_conv(a, kernel(model, f"{name}_conv1"), 1, (0, 0))
    y = np_relu(np_bn(y, bn_params(model, f"{name}_bn1")))
    y = np_conv(y, kernel(model, f"{name}_conv2"), stride, (1, 1))
    y = np_relu(np_bn(y, bn_params(model, f"{name}_bn2")))
    y = np_conv(y, kernel(model, f"{name}_conv3"), 1, (0, 0))
    return y + shortcut


@pytest.mark.parametrize(
    "in_channels, filters, stride, project",
    [(6, 16, 2, True), (16, 16, 1, False), (8, 16, 1, True)],
)
def test_bottleneck_v2_matches_numpy(in_channels, filters, stride, project):
    rng = np.random.default_rng(10)
    inputs = keras.Input((8, 8, in_channels))
    outputs = apply_bottleneck_v2(inputs, filters=filters, stride=stride, name="u")
    model = keras.Model(inputs, outputs)
    names = {la.name for la in model.layers}
    assert ("u_proj_conv" in names) == project
    randomize_weights(model, rng)
    x = rng.normal(size=(2, 8, 8, in_channels)).astype("float32")
    got = np.asarray(model(x, training=False))
    expected = _np_bottleneck_v2(model, x.astype(np.float64), "u", stride, project)
    assert got.shape == expected.shape == (2, 8 // stride, 8 // stride, filters)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.min(got) < 0  # no activation after the residual sum


def test_bottleneck_v2_rejects_filters_not_divisible_by_four():
    with pytest.raises(ValueError, match=r"multiple of 4, got 6"):
        apply_bottleneck_v2(keras.Input((8, 8, 4)), filters=6, stride=1, name="u")


def test_v2_stem_has_no_bn_relu_and_zero_padded_max_pool():
    model = build_resnet(
        version="v2", **TINY, input_shape=(12, 12, 3), weight_decay=0.0
    )
    rng = np.random.default_rng(11)
    randomize_weights(model, rng)
    # Positive input and a non-positive kernel: every conv output is <= 0, so
    # the zero-padded border wins the max where a -inf padding would not.
    w = -np.abs(rng.normal(0.0, 0.3, (7, 7, 3, 4))).astype("float32")
    model.get_layer("root_conv").kernel.assign(w)
    x = rng.uniform(0.1, 1.0, size=(2, 12, 12, 3)).astype("float32")

    conv = np_conv(x.astype(np.float64), w.astype(np.float64), 2, (3, 3))
    assert np.max(conv) < 0
    zero_padded = np_maxpool(conv, 3, 2, (1, 1))
    neg_inf = np.pad(conv, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    inf_padded = np_maxpool(neg_inf, 3, 2, (0, 0))

    got = np.asarray(model(x, training=False)["after_root"])
    assert got.shape == zero_padded.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(got, zero_padded, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(zero_padded - inf_padded)) > 0.1
    assert np.all(got[:, 0] == 0) and np.all(got[:, :, 0] == 0)  # border windows
    assert np.min(got) < 0  # interior windows stay negative: no ReLU in the stem


def _tiny_v2(last_relu, seed=12, **kwargs):
    model = build_resnet(
        version="v2",
        **TINY,
        input_shape=(16, 16, 3),
        last_relu=last_relu,
        num_classes=3,
        **kwargs,
    )
    randomize_weights(model, np.random.default_rng(seed))
    return model


def test_v2_last_relu_false_is_the_minus_variant():
    with_relu, without = _tiny_v2(True), _tiny_v2(False)
    assert "post_relu" in {la.name for la in with_relu.layers}
    assert "post_relu" not in {la.name for la in without.layers}
    without.set_weights(with_relu.get_weights())  # same weights, no post_relu
    x = np.random.default_rng(13).normal(size=(4, 16, 16, 3)).astype("float32")
    a = np.asarray(with_relu(x, training=False)["pre_logits"])
    b = np.asarray(without(x, training=False)["pre_logits"])
    assert np.min(a) >= 0
    assert np.min(b) < 0
    # Mean of ReLU >= ReLU of mean >= mean.
    assert np.all(a >= b - 1e-6)


def test_v2_block4_is_the_raw_sum_before_post_bn():
    model = _tiny_v2(True)
    # Graph: block4 is the last unit's Add, which feeds post_bn.
    last_add = model.get_layer("block4_unit1_add")
    assert model.output["block4"] is last_add.output
    assert model.get_layer("post_bn").input is last_add.output
    # Values: pre_logits = mean over space of ReLU(BN(block4)).
    x = np.random.default_rng(14).normal(size=(2, 16, 16, 3)).astype("float32")
    out = model(x, training=False)
    block4 = np.asarray(out["block4"], np.float64)
    assert np.min(block4) < 0  # not activated
    expected = np_relu(np_bn(block4, bn_params(model, "post_bn"))).mean(axis=(1, 2))
    np.testing.assert_allclose(out["pre_logits"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("last_relu", [True, False])
def test_v2_config_round_trip(last_relu):
    model = _tiny_v2(last_relu, weight_decay=2e-4)
    x = np.random.default_rng(15).normal(size=(2, 16, 16, 3)).astype("float32")
    config = json.loads(json.dumps(model.get_config()))
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    _assert_same_outputs(model, clone, x)
    assert [la.name for la in clone.layers] == [la.name for la in model.layers]
    assert clone.name == "resnet14_v2"
    np.testing.assert_allclose(
        float(sum(clone.losses)), float(sum(model.losses)), rtol=1e-6
    )


def test_v2_weight_decay_sync_batchnorm_and_bn_hyperparameters():
    wd = 3e-4
    model = build_resnet(
        version="v2",
        **TINY,
        input_shape=(16, 16, 3),
        num_classes=5,
        weight_decay=wd,
        sync_batchnorm=True,
    )
    randomize_weights(model, np.random.default_rng(16))
    kernels = [v for v in model.trainable_weights if v.path.endswith("/kernel")]
    # stem + 3 per unit + 4 projections + logits
    assert len(kernels) == 1 + 3 * 4 + 4 + 1
    assert len(model.losses) == len(kernels)
    expected = wd / 2 * sum(np.sum(np.asarray(v, np.float64) ** 2) for v in kernels)
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)
    # 3 BN per unit (preact, bn1, bn2) + post_bn; none in the stem.
    bns = _bn_layers(model)
    assert len(bns) == 3 * 4 + 1
    assert all(la.synchronized for la in bns)
    assert {(la.momentum, la.epsilon) for la in bns} == {(0.99, 1e-3)}
    plain = build_resnet(version="v2", **TINY, input_shape=(16, 16, 3))
    assert not any(la.synchronized for la in _bn_layers(plain))


def test_v2_small_variant_endpoint_shapes_and_forward_pass():
    model = build_resnet(
        version="v2",
        **TINY,
        input_shape=(30, 30, 1),
        stem_stride=1,
        strides=(1, 2, 2, 1),
        num_classes=3,
    )
    expected = expected_shapes(30, 0.25, 1, (1, 2, 2, 1))
    expected["logits"] = (3,)
    assert static_shapes(model) == expected
    out = model(np.ones((2, 30, 30, 1), "float32"), training=False)
    for key, shape in expected.items():
        assert tuple(out[key].shape) == (2, *shape), key
