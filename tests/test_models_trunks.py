"""All trunks through the factory: reference parameter counts and shapes,
serialization, layouts, mixed precision, and training on 2 replicas."""

import fractions
import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.models import factory, pretext, vgg
from revisit_tf.models.resnet import count_params
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses, optim

ARCHS = ("resnet50_v1", "resnet50_v2", "revnet50", "vgg19")

# Reference section 5.4: trainable parameters at 224 px with a 1000-way head.
REFERENCE_PARAMS = {
    "resnet50_v1": {4: 25_557_032, 8: 98_004_072, 12: 217_342_120, 16: 383_571_176},
    "resnet50_v2": {4: 25_549_352, 8: 97_988_712, 12: 217_319_080, 16: 383_540_456},
    "revnet50": {4: 7_457_640, 8: 25_602_792, 12: 54_436_456, 16: 93_958_632},
    "vgg19": {4: 36_952_264, 8: 143_680_936, 12: 320_187_016, 16: 566_470_504},
}

# Reference section 5.4: endpoint shapes at 224 px, k = 4, default strides.
REFERENCE_SHAPES_224 = {
    "resnet50_v1": {
        "after_root": (56, 56, 64),
        "block1": (56, 56, 256),
        "block2": (28, 28, 512),
        "block3": (14, 14, 1024),
        "block4": (7, 7, 2048),
        "pre_logits": (2048,),
    },
    "revnet50": {
        "after_root": (56, 56, 256),
        "block1": (56, 56, 256),
        "block2": (28, 28, 512),
        "block3": (14, 14, 1024),
        "block4": (7, 7, 2048),
        "pre_logits": (2048,),
    },
    "vgg19": {
        "block1": (224, 224, 32),
        "block2": (112, 112, 64),
        "block3": (56, 56, 128),
        "block4": (28, 28, 256),
        "block5": (14, 14, 256),
        "fc6": (1, 1, 2048),
        # The reference's rank-4 [N, 1, 1, 2048], squeezed (vgg.py docstring).
        "pre_logits": (2048,),
    },
}
REFERENCE_SHAPES_224["resnet50_v2"] = REFERENCE_SHAPES_224["resnet50_v1"]

TINY = {"width": 0.5, "units": (1, 1, 1, 1), "input_shape": (32, 32, 3)}


def _tiny(arch, **kwargs):
    options = dict(TINY, num_classes=5)
    options.update(kwargs)
    return factory.build_trunk(arch, **options)


def _output_shapes(model):
    return {k: tuple(v.shape[1:]) for k, v in model.output.items()}


@pytest.fixture(scope="module")
def k4_models():
    """The four trunks at k = 4, 224 px, 1000 classes (built once)."""
    return {a: factory.build_trunk(a, width=4, num_classes=1000) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_k4_parameter_count_and_shapes_equal_reference(arch, k4_models):
    model = k4_models[arch]
    assert count_params(model) == REFERENCE_PARAMS[arch][4]
    shapes = _output_shapes(model)
    assert shapes.pop("logits") == (1000,)
    assert shapes == REFERENCE_SHAPES_224[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_equal_reference_for_all_widths(arch):
    """All 16 cells of the reference table, from models actually built.

    Every parameter tensor of these trunks is a product of at most two channel
    counts, each proportional to k, and the layer structure does not depend on
    k, so the count is a quadratic polynomial in k. Building the real model at
    three small widths fixes the polynomial exactly (rational arithmetic);
    evaluating it at k = 4, 8, 12, 16 gives the counts of the big models
    without allocating up to 566M weights. The k = 4 cell is also checked on
    the built model above, which checks the polynomial argument.
    """
    ks = [fractions.Fraction(1, 2), fractions.Fraction(1), fractions.Fraction(3, 2)]
    counts = [
        count_params(factory.build_trunk(arch, width=float(k), num_classes=1000))
        for k in ks
    ]

    def poly(k):  # Lagrange interpolation through the three points
        total = fractions.Fraction(0)
        for i, (ki, ci) in enumerate(zip(ks, counts, strict=True)):
            term = fractions.Fraction(ci)
            for j, kj in enumerate(ks):
                if j != i:
                    term *= (k - kj) / (ki - kj)
            total += term
        return total

    predicted = {k: poly(fractions.Fraction(k)) for k in (4, 8, 12, 16)}
    assert all(p.denominator == 1 for p in predicted.values())
    assert {k: int(p) for k, p in predicted.items()} == REFERENCE_PARAMS[arch]


def test_vgg_parameter_count_depends_on_input_size():
    # Reference 5.4: 49,309,096 at 64x64, k = 8 (fc6 kernel 2x2).
    model = factory.build_trunk(
        "vgg19", width=8, num_classes=1000, input_shape=(64, 64, 3)
    )
    assert count_params(model) == 49_309_096
    assert tuple(model.get_layer("fc6_conv").kernel.shape[:2]) == (2, 2)
    assert _output_shapes(model)["block5"] == (4, 4, 512)


def test_patch_variant_shapes_at_64px_equal_reference():
    # Reference 5.4: ResNet50 k = 8 on 64x64 patches, stem stride 1, (2, 2, 1).
    model = factory.build_trunk(
        "resnet50_v2", width=8, input_shape=(64, 64, 3), patch_variant=True
    )
    assert _output_shapes(model) == {
        "after_root": (32, 32, 128),
        "block1": (32, 32, 512),
        "block2": (16, 16, 1024),
        "block3": (8, 8, 2048),
        "block4": (8, 8, 4096),
        "pre_logits": (4096,),
    }
    # RevNet by the same stride arithmetic, at a small width (channels 64k).
    rev = factory.build_trunk(
        "revnet50", width=0.5, input_shape=(64, 64, 3), patch_variant=True
    )
    assert _output_shapes(rev) == {
        "after_root": (32, 32, 32),
        "block1": (32, 32, 32),
        "block2": (16, 16, 64),
        "block3": (8, 8, 128),
        "block4": (8, 8, 256),
        "pre_logits": (256,),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_any_size_spatial_arithmetic(arch):
    model = _tiny(arch, input_shape=(28, 28, 1))
    shapes = _output_shapes(model)
    if arch == "vgg19":  # "same" pools: ceil(28 / 2**i)
        assert [shapes[f"block{i}"][0] for i in range(1, 6)] == [28, 14, 7, 4, 2]
        assert shapes["fc6"] == (1, 1, 256)
    else:  # ceil(S / 4), then halved (rounding up) at each strided stage
        assert [shapes[k][0] for k in ("after_root", "block1", "block2")] == [7, 7, 4]
        assert [shapes["block3"][0], shapes["block4"][0]] == [2, 1]


def _random_batch(shape=(4, 32, 32, 3), seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype("float32")


def _assert_same_outputs(a, b, images, training=False, rtol=1e-5, atol=1e-5):
    out_a, out_b = a(images, training=training), b(images, training=training)
    assert set(out_a) == set(out_b)
    for key in out_a:
        np.testing.assert_allclose(
            np.asarray(out_a[key]), np.asarray(out_b[key]), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize(
    "arch, kwargs",
    [(a, {}) for a in ARCHS]
    + [("revnet50", {"memory_saving": True, "last_relu": False})],
)
def test_serialization_round_trips(arch, kwargs, tmp_path):
    model = _tiny(arch, **kwargs)
    images = _random_batch()
    # get_config -> JSON -> from_config, then the same weights.
    config = keras.saving.serialize_keras_object(model)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(model.get_weights())
    _assert_same_outputs(model, clone, images)
    # .keras file (architecture + weights, no custom_objects needed).
    path = str(tmp_path / f"{arch}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.name == model.name
    assert count_params(loaded) == count_params(model)
    _assert_same_outputs(model, loaded, images)
    if kwargs.get("memory_saving"):
        assert all(
            layer.memory_saving
            for layer in loaded.layers
            if layer.__class__.__name__ == "ReversibleStage"
        )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("training", [False, True])
def test_channels_first_computes_the_same_function(arch, training):
    last = _tiny(arch)
    first = _tiny(arch, data_format="channels_first")
    first.set_weights(last.get_weights())
    assert _output_shapes(first) == _output_shapes(last)  # endpoints stay NHWC
    tol = 1e-3 if training else 1e-4  # batch statistics of 4 images amplify noise
    _assert_same_outputs(
        last, first, _random_batch(), training=training, rtol=tol, atol=tol
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_bfloat16_keeps_head_and_endpoints_float32(arch):
    full = _tiny(arch)
    mixed = _tiny(arch, dtype_policy="mixed_bfloat16")
    mixed.set_weights(full.get_weights())
    assert all(v.dtype == "float32" for v in mixed.weights)
    assert mixed.get_layer("logits").compute_dtype == "float32"
    computes = {layer.compute_dtype for layer in mixed.layers if layer.weights}
    assert "bfloat16" in computes
    images = _random_batch()
    out_full, out_mixed = full(images), mixed(images)
    for key, value in out_mixed.items():
        assert value.dtype == "float32", key
    # bfloat16 has 8 mantissa bits: close, not equal.
    a = np.asarray(out_full["pre_logits"])
    b = np.asarray(out_mixed["pre_logits"])
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-3
    assert not np.array_equal(a, b)


def _batch(arch, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (8, 16, 16, 1)).astype("float32"),
        "label": rng.integers(0, 4, 8).astype("int32"),
    }


def _train(model, optimizer, strategy, batch, workdir, steps):
    def dataset_fn(ctx, start_step):
        del start_step  # one repeated batch: every position is the same
        per_replica = ctx.get_per_replica_batch_size(8)
        return tf.data.Dataset.from_tensor_slices(batch).batch(per_replica).repeat()

    return loop_lib.train(
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        dataset_fn=dataset_fn,
        total_steps=steps,
        global_batch_size=8,
        workdir=workdir,
        loss_fn=losses.softmax_xent,
        steps_per_loop=steps,
    )


def _build(strategy, arch, weights=None, **kwargs):
    """The supervised pretext model of ``arch`` (4 classes) and SGD."""
    trunk_fn = functools.partial(
        factory.build_trunk,
        arch,
        width=0.25 if arch != "vgg19" else 0.5,
        units=(1, 1, 1, 1),
        num_classes=4,
        stem_stride=1,
        sync_batchnorm=True,
        **kwargs,
    )
    spec = {
        "image": tf.TensorSpec([16, 16, 1]),
        "label": tf.TensorSpec([], tf.int32),
    }
    with strategy.scope():
        model = pretext.build_pretext_model(spec, trunk_fn=trunk_fn)
        if weights is not None:
            model.set_weights(weights)
        optimizer = optim.sgd(0.1)
    return model, optimizer


# Every trunk with REVISIT_TF_SLOW_TESTS=1; by default (CI's 30 minutes) one
# of each family: a ResNet, VGG, and RevNet's hand-written backward pass.
TRAIN_CONFIGS = (
    [(a, {}) for a in ARCHS] + [("revnet50", {"memory_saving": True})]
    if os.environ.get("REVISIT_TF_SLOW_TESTS") == "1"
    # One BN trunk (VGG19-BN's BN layers are the same synchronized layer) and
    # the RevNet with its own gradient; REVISIT_TF_SLOW_TESTS=1 runs them all.
    else [("resnet50_v2", {}), ("revnet50", {"memory_saving": True})]
)

_TWO_REPLICA_SCRIPT = """
import json, sys, tempfile
import keras, numpy as np, tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
keras.config.set_floatx("float64")
keras.config.set_dtype_policy("float64")
sys.path.insert(0, sys.argv[1])
import test_models_trunks as t
from revisit_tf.train import strategy as strategy_lib
devices = [d.name for d in tf.config.list_logical_devices("CPU")]
# One strategy object for every trunk: collective instance keys of separate
# MirroredStrategy objects in one process collide.
mirrored = strategy_lib.make_strategy("mirrored", devices=devices)
single = tf.distribute.get_strategy()
out = []
for arch, kwargs in t.TRAIN_CONFIGS:
    batch = {k: v.astype("float64") if v.dtype.kind == "f" else v
             for k, v in t._batch(arch).items()}
    model1, opt1 = t._build(single, arch, **kwargs)
    initial = model1.get_weights()
    model2, opt2 = t._build(mirrored, arch, weights=initial, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        m1 = t._train(model1, opt1, single, batch, tmp + "/one", 3)
        m2 = t._train(model2, opt2, mirrored, batch, tmp + "/two", 3)
    diffs, moved = [], 0
    for w0, w1, w2 in zip(initial, model1.get_weights(), model2.get_weights()):
        diffs.append(float(np.abs(w1 - w2).max() / max(np.abs(w1 - w0).max(), 1e-30)))
        moved += not np.allclose(w0, w1)
    out.append({"arch": arch, "kwargs": kwargs, "dtype": str(initial[0].dtype),
                "replicas": mirrored.num_replicas_in_sync,
                "steps": [m1["step"], m2["step"]], "losses": [m1["loss"], m2["loss"]],
                "max_rel_diff": max(diffs), "moved": moved, "weights": len(initial)})
print("RESULT" + json.dumps(out))
"""


def test_each_trunk_trains_on_two_replicas_with_synchronized_batchnorm():
    """Per trunk: 3 steps on 2 logical CPUs (sync BN) == 3 steps on 1 device.

    In float64, so that the comparison is tight (float32 BN statistics of a
    few values amplify reduction-order noise), in a subprocess with one
    MirroredStrategy for all trunks (see the script). Without synchronized BN
    the same comparison fails (tests/test_train_loop.py shows it for ResNet).
    """
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICA_SCRIPT, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    results = json.loads(line[len("RESULT") :])
    assert [(r["arch"], r["kwargs"]) for r in results] == [
        (a, k) for a, k in TRAIN_CONFIGS
    ]
    for r in results:
        assert r["replicas"] == 2 and r["steps"] == [3, 3], r
        assert r["dtype"] == "float64", r
        assert all(np.isfinite(r["losses"])), r
        assert r["losses"][0] == pytest.approx(r["losses"][1], rel=1e-9), r
        # |w_1dev - w_2rep| relative to how far training moved the weights.
        assert r["max_rel_diff"] < 1e-7, r
        assert r["moved"] > r["weights"] // 2, r


def test_mixed_float16_trains_with_loss_scaling(tmp_path):
    single = tf.distribute.get_strategy()
    model, optimizer = _build(single, "resnet50_v2", dtype_policy="mixed_float16")
    assert loop_lib.uses_float16(model)
    metrics = _train(model, optimizer, single, _batch("x"), str(tmp_path), 2)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert not loop_lib.uses_float16(
        _tiny("resnet50_v2", dtype_policy="mixed_bfloat16")
    )


def test_factory_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"'revnet'.*Did you mean 'revnet50'"):
        factory.build_trunk("revnet")
    with pytest.raises(ValueError, match="'resnet50_v1' has no option 'memory_saving'"):
        factory.build_trunk("resnet50_v1", memory_saving=True)
    with pytest.raises(ValueError, match="patch_variant=True sets stem_stride"):
        factory.build_trunk("revnet50", patch_variant=True, stem_stride=2)
    with pytest.raises(ValueError, match="last_relu=False is not supported"):
        factory.build_trunk("resnet50_v1", last_relu=False)
    with pytest.raises(ValueError, match="data_format must be one of"):
        _tiny("vgg19", data_format="NCHW")
    with pytest.raises(ValueError, match="dtype_policy must be None or one of"):
        _tiny("revnet50", dtype_policy="float16")
    with pytest.raises(ValueError, match=r"non-integer.*8 \* 0.1"):
        factory.build_trunk("vgg19", width=0.1)
    with pytest.raises(ValueError, match="must be a known positive int"):
        factory.build_trunk("vgg19", input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="too small for VGG19's five 2x2 pools"):
        vgg.build_vgg19(input_shape=(28, 28, 1), pool_padding="valid")


def test_vgg_ignores_resnet_only_options_as_the_original_factory():
    a = _tiny("vgg19", units=(3, 4, 6, 3), patch_variant=True)
    b = _tiny("vgg19", units=None)
    assert count_params(a) == count_params(b)
    assert _output_shapes(a) == _output_shapes(b)
