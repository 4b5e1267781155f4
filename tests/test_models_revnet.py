"""RevNet50: reversible units, inversion, zero-channel padding, memory saving."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.models import revnet

SMALL = {"width": 0.5, "units": (2, 2, 1, 1), "input_shape": (32, 32, 3)}


def _unit(channels=64, data_format="channels_last", **kwargs):
    unit = revnet.ReversibleUnit(channels, data_format=data_format, **kwargs)
    shape = (None, 8, 8, channels)
    if data_format == "channels_first":
        shape = (None, channels, 8, 8)
    unit.build(shape)
    return unit


def _numpy_residual(unit, x2, moments):
    """F(x2) in NumPy from the unit's weights (reference 5.2), NHWC."""
    y = x2.astype(np.float64)
    for bn, conv in (
        (unit.bn1, unit.conv1),
        (unit.bn2, unit.conv2),
        (unit.bn3, unit.conv3),
    ):
        if moments == "batch":
            mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
        else:
            mean = np.asarray(bn.moving_mean)
            var = np.asarray(bn.moving_variance)
        y = (y - mean) / np.sqrt(var + bn.epsilon) * np.asarray(bn.gamma) + np.asarray(
            bn.beta
        )
        y = np.maximum(y, 0)
        kernel = np.asarray(conv.kernel, np.float64)  # [k, k, Cin, Cout]
        k = kernel.shape[0]
        pad = (k - 1) // 2
        yp = np.pad(y, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out = np.zeros(y.shape[:3] + (kernel.shape[-1],))
        for i in range(k):
            for j in range(k):
                out += yp[:, i : i + y.shape[1], j : j + y.shape[2], :] @ kernel[i, j]
        y = out
    return y


@pytest.mark.parametrize("training", [False, True])
def test_unit_matches_numpy_definition(training):
    unit = _unit(32)
    # Non-trivial BN parameters and moving statistics.
    rng = np.random.default_rng(0)
    for bn in (unit.bn1, unit.bn2, unit.bn3):
        n = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 1.5, n))
        bn.beta.assign(rng.normal(0, 0.1, n))
        bn.moving_mean.assign(rng.normal(0, 0.1, n))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, n))
    x = rng.normal(size=(4, 8, 8, 32)).astype("float32")
    y = np.asarray(unit(x, training=training))
    x1, x2 = x[..., :16], x[..., 16:]
    f = _numpy_residual(unit, x2, "batch" if training else "moving")
    # Output = [y2, y1] = [x2, x1 + F(x2)]: the halves swap (reference 5.2).
    np.testing.assert_allclose(y[..., :16], x2, atol=0)
    np.testing.assert_allclose(y[..., 16:], x1 + f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("training", [False, True])
def test_unit_and_stage_invert_to_1e4(data_format, training):
    rng = np.random.default_rng(1)
    unit = _unit(64, data_format=data_format)
    shape = (8, 8, 8, 64) if data_format == "channels_last" else (8, 64, 8, 8)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    y = unit(x, training=training)
    assert np.abs(np.asarray(y) - np.asarray(x)).max() > 0.1  # not the identity
    np.testing.assert_allclose(unit.invert(y, training=training), x, atol=1e-4)

    stage = revnet.ReversibleStage(64, 3, data_format=data_format)
    y = stage(x, training=training)
    np.testing.assert_allclose(stage.invert(y, training=training), x, atol=1e-4)


def test_invert_does_not_move_statistics():
    unit = _unit(16)
    x = tf.random.normal((4, 8, 8, 16))
    y = unit(x, training=True)
    before = [np.asarray(v) for v in unit.non_trainable_weights]
    unit.invert(y, training=True)
    for b, v in zip(before, unit.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(b, np.asarray(v))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_zero_pad_channels_places_input_in_the_middle(data_format):
    x = np.arange(2 * 3 * 3 * 4, dtype="float32").reshape(2, 3, 3, 4) + 1
    layer = revnet.ZeroPadChannels(data_format)
    if data_format == "channels_first":
        y = np.asarray(layer(np.transpose(x, (0, 3, 1, 2))))
        y = np.transpose(y, (0, 2, 3, 1))
    else:
        y = np.asarray(layer(x))
    assert y.shape == (2, 3, 3, 8)
    np.testing.assert_array_equal(y[..., :2], 0)
    np.testing.assert_array_equal(y[..., 2:6], x)
    np.testing.assert_array_equal(y[..., 6:], 0)
    with pytest.raises(ValueError, match="even, known channel count, got 3"):
        odd = (None, 4, 4, 3) if data_format == "channels_last" else (None, 3, 4, 4)
        layer.compute_output_shape(odd)


def test_unit_rejects_bad_channels():
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        revnet.ReversibleUnit(12)
    unit = revnet.ReversibleUnit(16)
    with pytest.raises(ValueError, match="configured for 16 channels"):
        unit.build((None, 8, 8, 32))


def _gradients(model, images):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_sum(out["logits"] ** 2) + tf.add_n(model.losses)
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = step(images)
    return float(loss), [np.asarray(g) for g in grads]


def test_memory_saving_gives_the_plain_gradients_and_statistics():
    keras.utils.set_random_seed(3)
    plain = revnet.build_revnet(num_classes=10, **SMALL)
    saving = revnet.build_revnet(num_classes=10, memory_saving=True, **SMALL)
    saving.set_weights(plain.get_weights())
    initial = [np.asarray(v) for v in plain.non_trainable_variables]
    images = tf.random.normal((8, 32, 32, 3))
    loss1, grads1 = _gradients(plain, images)
    loss2, grads2 = _gradients(saving, images)
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    assert len(grads1) == len(grads2) == len(plain.trainable_variables)
    for g1, g2, v in zip(grads1, grads2, plain.trainable_variables, strict=True):
        scale = max(np.abs(g1).max(), 1e-12)
        assert np.abs(g1 - g2).max() / scale < 1e-4, v.path
    # Moving statistics move once per step in both modes (not twice in the
    # memory-saving one, whose backward pass recomputes the BNs).
    moved = 0
    for a, b, c in zip(
        plain.non_trainable_variables,
        saving.non_trainable_variables,
        initial,
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        moved += not np.allclose(np.asarray(a), c)
    assert moved == len(initial)


def _peak_training_memory(memory_saving, units):
    """Peak CPU allocator bytes of one compiled gradient step above the baseline."""
    keras.utils.set_random_seed(0)
    model = revnet.build_revnet(
        width=1,
        units=units,
        input_shape=(128, 128, 3),
        num_classes=10,
        memory_saving=memory_saving,
    )
    images = tf.random.normal((16, 128, 128, 3))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True)["logits"] ** 2)
        return tape.gradient(loss, model.trainable_variables)

    step(images)  # trace and warm up
    device = tf.config.list_logical_devices("CPU")[0].name
    tf.config.experimental.reset_memory_stats(device)
    base = tf.config.experimental.get_memory_info(device)["current"]
    grads = step(images)
    _ = grads[0].numpy()
    return tf.config.experimental.get_memory_info(device)["peak"] - base


_PEAKS_SCRIPT = """
import json, sys
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)
sys.path.insert(0, sys.argv[1])
from test_models_revnet import _peak_training_memory
units = [(1, 1, 1, 1), (3, 4, 6, 3)]
print(json.dumps([[_peak_training_memory(m, u) for u in units] for m in (0, 1)]))
"""


def test_memory_saving_lowers_peak_memory_and_keeps_it_flat_in_depth():
    # In a child with one inter-op thread: with several, TF's executor may run
    # independent ops side by side, and the peak of the same step then varies
    # by run (65.8 to 75.2 MB for the shallow plain model here).
    proc = subprocess.run(
        [sys.executable, "-c", _PEAKS_SCRIPT, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (shallow_plain, deep_plain), (shallow_saving, deep_saving) = json.loads(
        proc.stdout.strip().splitlines()[-1]
    )
    deep = (3, 4, 6, 3)
    plain = {(1, 1, 1, 1): shallow_plain, deep: deep_plain}
    saving = {(1, 1, 1, 1): shallow_saving, deep: deep_saving}
    print({"plain": plain, "memory_saving": saving})
    # Plain autodiff stores every unit's activations: peak grows with depth.
    assert plain[deep] > 1.2 * plain[(1, 1, 1, 1)]
    # Reversible backprop keeps one unit's worth per stage.
    assert saving[deep] < 0.85 * plain[deep]
    assert saving[deep] < 1.1 * saving[(1, 1, 1, 1)]
