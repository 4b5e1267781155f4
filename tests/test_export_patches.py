"""Patch-based export (reference 8.3) and feature-map pooling (reference 8.2)."""

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.export import saved_model as export_lib
from revisit_tf.models import factory
from revisit_tf.pp import get_preprocess_fn


@pytest.mark.parametrize(
    "hwc, window",
    # Reference 8.2's ResNet50 k=4 example at 224 px.
    [((56, 56, 64), 5), ((56, 56, 256), 10), ((28, 28, 512), 7), ((14, 14, 1024), 5),
     ((7, 7, 2048), 4), ((7, 7, 8192), 7), ((4, 4, 500), 1)],
)  # fmt: skip
def test_pool_to_budget_windows(hwc, window):
    x = tf.zeros([1, *hwc])
    out = export_lib.pool_to_budget(x)
    side = (hwc[0] - window) // window + 1
    assert out.shape == (1, side, side, hwc[2])
    assert side * side * hwc[2] <= 9000 or window == hwc[0]


def test_pool_to_budget_is_valid_max_pooling():
    x = tf.reshape(tf.range(7 * 7 * 400, dtype=tf.float32), [1, 7, 7, 400])
    # 19,600 features: window ceil(sqrt(19600 / 9000)) = 2, a 3x3 output;
    # row and column 6 do not fill a window and are dropped (reference 8.2).
    out = export_lib.pool_to_budget(x).numpy()
    ref = x.numpy()[0, :6, :6].reshape(3, 2, 3, 2, 400).max(axis=(1, 3))
    np.testing.assert_array_equal(out[0], ref)


@pytest.fixture(scope="module")
def patch_export(tmp_path_factory):
    tf.random.set_seed(0)
    trunk = factory.build_trunk(
        "resnet50_v1",
        width=0.25,
        units=(1, 1, 1, 1),
        num_classes=8,
        patch_variant=True,
        input_shape=(8, 8, 1),
    )
    pp = get_preprocess_fn("crop_patches(3, 0, random=False)|standardize")
    patch_pp = get_preprocess_fn("standardize")
    path = export_lib.export_saved_model(
        trunk,
        str(tmp_path_factory.mktemp("export") / "export"),
        image_shape=(24, 24, 1),
        preprocess=lambda x: pp({"image": x})["image"],
        patch_preprocess=lambda x: patch_pp({"image": x})["image"],
    )
    return trunk, path


def test_patch_export_averages_endpoints_over_the_patches(patch_export):
    trunk, path = patch_export
    images = tf.random.uniform([3, 24, 24, 1], seed=1)
    loaded = export_lib.load(path)
    rep = loaded.signatures["representation"](images=images)
    # Independent computation: cut the 3x3 grid of 8x8 cells by hand,
    # standardize each, run the trunk, average every endpoint per image.
    cells = images.numpy().reshape(3, 3, 8, 3, 8, 1).transpose(0, 1, 3, 2, 4, 5)
    cells = cells.reshape(27, 8, 8, 1)
    mean = cells.mean(axis=(1, 2, 3), keepdims=True)
    std = np.maximum(cells.std(axis=(1, 2, 3), keepdims=True), 1 / 8)
    out = trunk((cells - mean) / std, training=False)
    for name in ("pre_logits", "logits", "block4", "after_root"):
        expected = out[name].numpy().reshape(3, 9, *out[name].shape[1:]).mean(1)
        np.testing.assert_allclose(rep[name], expected, rtol=1e-4, atol=1e-5)
    serve = loaded.signatures["serving_default"](images=images)
    np.testing.assert_allclose(serve["default"], rep["pre_logits"], atol=1e-6)


def test_patch_signature_takes_patches_in_unit_range(patch_export):
    _, path = patch_export
    loaded = export_lib.load(path)
    images = tf.random.uniform([2, 24, 24, 1], seed=2)
    patches = tf.reshape(
        tf.transpose(tf.reshape(images, [2, 3, 8, 3, 8, 1]), [0, 1, 3, 2, 4, 5]),
        [2, 9, 8, 8, 1],
    )
    by_patch = loaded.signatures["patches"](patches=patches)
    by_image = loaded.signatures["serving_default"](images=images)
    for name in ("default", "pre_logits", "block2"):
        np.testing.assert_allclose(by_patch[name], by_image[name], atol=1e-5)
    meta = export_lib.read_metadata(path)
    assert meta["patches"]["shape"] == [None, 9, 8, 8, 1]
    assert sorted(meta["signatures"]) == [
        "patches",
        "representation",
        "serving_default",
    ]
    assert meta["input"]["shape"] == [None, 24, 24, 1]


# Every shipped patch-task config (Jigsaw, RPL): the demo's and ImageNet's.
PATCH_CONFIGS = [
    "demo/fashion_mnist_jigsaw.gin",
    "demo/fashion_mnist_rel_patch_location.gin",
    "imagenet/jigsaw.gin",
    "imagenet/rel_patch_location.gin",
]


def _before_standardize(pipeline: str) -> str:
    """The part of ``a|b|standardize|c`` that runs before ``standardize``."""
    ops = pipeline.split("|")
    assert "standardize" in ops, pipeline
    return "|".join(ops[: ops.index("standardize")]) or "value_range(0, 255, 0, 255)"


@pytest.mark.parametrize("config", PATCH_CONFIGS)
def test_patch_export_standardises_the_units_training_did(config):
    """Training standardises 0..255 values (decode gives uint8); the export
    receives [0, 1] images. The two must reach ``standardize`` in the same
    units, or its floor 1/sqrt(n) acts differently (issue 14, item 5)."""
    import gin
    from revisit_tf import cli

    cli.parse_gin([config], [])
    pp_train = gin.query_parameter("pretrain.pp_train")
    pp_export = gin.query_parameter("export_model.pp_export")
    pp_patches = gin.query_parameter("export_model.pp_export_patches")
    side = 40 if config.startswith("demo/") else 300
    # A white image: whatever the crops, every value entering standardize is
    # the units' maximum.
    white_u8 = tf.fill([side, side, 1], tf.constant(255, tf.uint8))
    train_in = get_preprocess_fn(_before_standardize(pp_train.replace("decode|", "")))
    export_in = get_preprocess_fn(_before_standardize(pp_export))
    patches_in = get_preprocess_fn(_before_standardize(pp_patches))
    train_max = float(tf.reduce_max(train_in({"image": white_u8})["image"]))
    export_max = float(
        tf.reduce_max(export_in({"image": tf.ones([side, side, 1])})["image"])
    )
    patches_max = float(
        tf.reduce_max(patches_in({"image": tf.ones([1, 9, 8, 8, 1])})["image"])
    )
    assert train_max == pytest.approx(255.0)
    assert export_max == pytest.approx(train_max), pp_export
    assert patches_max == pytest.approx(train_max), pp_patches
    gin.clear_config()


def test_low_contrast_patch_is_standardised_as_in_training():
    """Patches of values 100 or 101 (std ~0.5): in training's 0..255 units
    the std is above standardize's floor 1/sqrt(64) = 0.125, so the patch
    comes out with std 1; in [0, 1] units the std is 0.5/255, below the
    floor, and the old export gave std 0.5/255/0.125 = 0.016."""
    rng = np.random.default_rng(0)
    image_u8 = (100 + rng.integers(0, 2, [24, 24, 1])).astype(np.uint8)
    train = get_preprocess_fn("crop_patches(3, 0, random=False)|standardize")
    export = get_preprocess_fn(
        "value_range(0, 255, 0, 1)|crop_patches(3, 0, random=False)|standardize"
    )
    old = get_preprocess_fn("crop_patches(3, 0, random=False)|standardize")
    want = train({"image": tf.cast(image_u8, tf.float32)})["image"].numpy()
    got = export({"image": tf.constant(image_u8 / 255.0, tf.float32)})["image"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(want.std(axis=(1, 2, 3)), 1.0, atol=1e-5)
    before = old({"image": tf.constant(image_u8 / 255.0, tf.float32)})["image"].numpy()
    raw_std = (image_u8 / 255.0).reshape(3, 8, 3, 8).transpose(0, 2, 1, 3)
    raw_std = raw_std.reshape(9, 64).std(axis=1)
    np.testing.assert_allclose(before.std(axis=(1, 2, 3)), raw_std / 0.125, rtol=1e-3)
    assert before.std(axis=(1, 2, 3)).max() < 0.02  # the bug this guards against
