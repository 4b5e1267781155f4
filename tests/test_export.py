"""Tests of stage 5, ``revisit_tf.export``: parity, reuse, fine-tuning, atomicity.

Every test uses a tiny functional trunk (8x8x3 input) with the endpoint layout
of the real trunks, L2-regularized kernels and batch norm whose moving
statistics are far from what a batch gives, so inference and training mode
produce different numbers and an export in the wrong mode cannot pass.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras

from revisit_tf.export import (
    export_saved_model,
    load,
    read_metadata,
)

IMAGE_SHAPE = (8, 8, 3)
WEIGHT_DECAY = 1e-2  # L2 factor of every kernel regularizer below.
ATOL = 1e-5


def to_minus_one_one(images):
    return images * 2.0 - 1.0


def build_tiny_trunk(seed: int, *, vgg_like: bool = False) -> keras.Model:
    """A 2-stage trunk: {after_root, block1, pre_logits, logits}.

    ``vgg_like`` makes ``pre_logits`` a rank-4 ``[N, 1, 1, 5]`` map as in VGG.
    """
    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(WEIGHT_DECAY)
    layers = keras.layers
    images = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Conv2D(
        4, 3, padding="same", use_bias=False, kernel_regularizer=l2, name="root_conv"
    )(images)
    x = layers.BatchNormalization(name="root_bn")(x)
    after_root = layers.ReLU(name="after_root")(x)  # [N, 8, 8, 4]
    x = layers.Conv2D(
        6,
        3,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_regularizer=l2,
        name="block1_conv",
    )(after_root)
    x = layers.BatchNormalization(name="block1_bn")(x)
    block1 = layers.ReLU(name="block1")(x)  # [N, 4, 4, 6]
    if vgg_like:
        pre_logits = layers.Conv2D(
            5, 4, padding="valid", kernel_regularizer=l2, name="pre_logits"
        )(block1)  # [N, 1, 1, 5]
        logits = layers.Flatten(name="logits")(
            layers.Conv2D(3, 1, kernel_regularizer=l2, name="logits_conv")(pre_logits)
        )
    else:
        pre_logits = layers.GlobalAveragePooling2D(name="pre_logits")(block1)
        logits = layers.Dense(3, kernel_regularizer=l2, name="logits")(pre_logits)
    model = keras.Model(
        images,
        {
            "after_root": after_root,
            "block1": block1,
            "pre_logits": pre_logits,
            "logits": logits,
        },
        name="tiny_trunk",
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            (c,) = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.5, 1.0, size=c))
            layer.moving_variance.assign(rng.uniform(2.0, 4.0, size=c))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=c))
            layer.beta.assign(rng.normal(0.0, 0.1, size=c))
    return model


def make_images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, *IMAGE_SHAPE)).astype("f4")


def expected_outputs(model: keras.Model, images: np.ndarray) -> dict:
    """In-memory inference outputs plus the pooled ``default`` feature vector."""
    outputs = {
        k: v.numpy() for k, v in model(to_minus_one_one(images), training=False).items()
    }
    pre_logits = outputs["pre_logits"]
    if pre_logits.ndim == 4:
        pre_logits = pre_logits.mean(axis=(1, 2))
    return {**outputs, "default": pre_logits}


def assert_outputs_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(
            np.asarray(actual[key]), value, atol=ATOL, rtol=0, err_msg=key
        )


def export(model: keras.Model, path, **kwargs) -> str:
    return export_saved_model(
        model, path, image_shape=IMAGE_SHAPE, preprocess=to_minus_one_one, **kwargs
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path) of one export shared by the read-only tests."""
    model = build_tiny_trunk(seed=1)
    path = export(model, tmp_path_factory.mktemp("export") / "trunk")
    return model, path


@pytest.fixture
def images():
    return make_images()


def test_bn_statistics_make_training_and_inference_differ(exported, images):
    model, _ = exported
    weights = model.get_weights()
    try:
        training = model(to_minus_one_one(images), training=True)["block1"]
    finally:
        model.set_weights(weights)  # The call above moved the BN averages.
    inference = model(to_minus_one_one(images), training=False)["block1"]
    assert np.abs(training.numpy() - inference.numpy()).max() > 0.1


def test_signatures_take_float32_images_and_name_every_endpoint(exported):
    model, path = exported
    loaded = tf.saved_model.load(path)
    assert sorted(loaded.signatures) == ["representation", "serving_default"]
    endpoints = ["after_root", "block1", "logits", "pre_logits"]
    expected_keys = {
        "serving_default": sorted([*endpoints, "default"]),
        "representation": endpoints,
    }
    for name, keys in expected_keys.items():
        signature = loaded.signatures[name]
        args, kwargs = signature.structured_input_signature
        assert args == ()
        assert list(kwargs) == ["images"]
        assert kwargs["images"].dtype == tf.float32
        assert kwargs["images"].shape.as_list() == [None, 8, 8, 3]
        assert sorted(signature.structured_outputs) == keys
    outputs = loaded.signatures["serving_default"].structured_outputs
    assert outputs["default"].shape.as_list() == [None, 6]
    assert outputs["block1"].shape.as_list() == [None, 4, 4, 6]


def test_saved_model_load_matches_model(exported, images):
    model, path = exported
    expected = expected_outputs(model, images)
    representation = {k: v for k, v in expected.items() if k != "default"}
    loaded = tf.saved_model.load(path)
    x = tf.constant(images)

    assert_outputs_close(loaded.signatures["serving_default"](images=x), expected)
    assert_outputs_close(loaded.signatures["representation"](images=x), representation)
    assert_outputs_close(loaded.serving_default(x), expected)
    assert_outputs_close(loaded.representation(x), representation)
    np.testing.assert_allclose(loaded(x), expected["default"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        loaded(x, training=False), expected["default"], atol=ATOL, rtol=0
    )


def test_load_checks_metadata_and_matches_model(exported, images):
    model, path = exported
    loaded = load(path)
    expected = expected_outputs(model, images)
    assert_outputs_close(loaded.serving_default(tf.constant(images)), expected)


@pytest.mark.parametrize("call_endpoint", ["serving_default", "representation"])
def test_tfsm_layer_matches_model(exported, images, call_endpoint):
    model, path = exported
    expected = expected_outputs(model, images)
    if call_endpoint == "representation":
        del expected["default"]
    layer = keras.layers.TFSMLayer(path, call_endpoint=call_endpoint)
    assert_outputs_close(layer(images), expected)


def test_hub_keras_layer_matches_model(exported, images):
    model, path = exported
    expected = expected_outputs(model, images)
    features = hub.KerasLayer(path)(tf.constant(images))
    np.testing.assert_allclose(features, expected["default"], atol=ATOL, rtol=0)
    layer = hub.KerasLayer(
        path, signature="representation", signature_outputs_as_dict=True
    )
    del expected["default"]
    assert_outputs_close(layer(tf.constant(images)), expected)


def test_call_in_training_mode_uses_batch_stats_and_updates_averages(exported, images):
    model, path = exported
    weights = model.get_weights()
    try:
        expected = model(to_minus_one_one(images), training=True)["pre_logits"]
    finally:
        model.set_weights(weights)
    loaded = tf.saved_model.load(path)
    moving = [v for v in loaded.variables if "moving_mean" in v.name]
    assert len(moving) == 2
    before = [v.numpy() for v in moving]

    features = loaded(tf.constant(images), training=True)

    np.testing.assert_allclose(features, expected, atol=ATOL, rtol=0)
    for v, old in zip(moving, before, strict=True):
        assert np.abs(v.numpy() - old).max() > 1e-4, v.name


def test_variables_and_regularization_losses_mirror_the_model(exported):
    model, path = exported
    loaded = tf.saved_model.load(path)

    assert len(loaded.variables) == len(model.variables)
    assert sorted(v.name for v in loaded.trainable_variables) == sorted(
        f"{v.path}:0" for v in model.trainable_variables
    )
    np.testing.assert_allclose(
        sorted(v.numpy().sum() for v in loaded.variables),
        sorted(v.numpy().sum() for v in model.variables),
        rtol=1e-6,
    )
    losses = [fn() for fn in loaded.regularization_losses]
    assert len(losses) == 3  # root_conv, block1_conv and logits kernels.
    assert all(loss.shape == () for loss in losses)
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    by_hand = sum(WEIGHT_DECAY * np.sum(np.square(v.numpy())) for v in kernels)
    np.testing.assert_allclose(sum(losses), by_hand, rtol=1e-5)
    np.testing.assert_allclose(sum(losses), sum(model.losses), rtol=1e-5)


def test_hub_keras_layer_fine_tunes_trunk_with_weight_decay(exported, images):
    model, path = exported
    trunk = hub.KerasLayer(path, trainable=True)
    classifier = tf_keras.Sequential(
        [tf_keras.Input(IMAGE_SHAPE), trunk, tf_keras.layers.Dense(2)]
    )
    # Before training the model's losses are exactly the trunk's weight decay.
    np.testing.assert_allclose(
        sum(float(loss) for loss in classifier.losses),
        float(sum(model.losses)),
        rtol=1e-5,
    )
    before = {v.name: v.numpy() for v in trunk.weights}
    learning_rate, steps = 0.1, 2
    classifier.compile(
        optimizer=tf_keras.optimizers.SGD(learning_rate),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.fit(
        images, np.array([0, 1, 0, 1]), batch_size=4, epochs=steps, verbose=0
    )

    after = {v.name: v.numpy() for v in trunk.weights}
    for name in before:
        if name.startswith("logits/"):
            continue  # The pretext head is not on the feature path.
        assert np.abs(after[name] - before[name]).max() > 1e-6, name
    # The head kernel only feels its decay wd*|W|^2: W <- W * (1 - lr*2*wd).
    np.testing.assert_allclose(
        after["logits/kernel:0"],
        before["logits/kernel:0"] * (1 - learning_rate * 2 * WEIGHT_DECAY) ** steps,
        rtol=1e-5,
    )


def test_rank4_feature_endpoint_is_averaged_to_a_vector(tmp_path, images):
    model = build_tiny_trunk(seed=3, vgg_like=True)
    path = export(model, tmp_path / "vgg")
    loaded = tf.saved_model.load(path)
    expected = expected_outputs(model, images)
    assert expected["pre_logits"].shape == (4, 1, 1, 5)

    assert_outputs_close(loaded.serving_default(tf.constant(images)), expected)
    np.testing.assert_allclose(
        loaded(tf.constant(images)),
        expected["pre_logits"][:, 0, 0, :],
        atol=ATOL,
        rtol=0,
    )


def test_metadata_records_expected_input(exported):
    _, path = exported
    meta = read_metadata(path)
    assert meta["input"] == {
        "key": "images",
        "dtype": "float32",
        "shape": [None, 8, 8, 3],
        "value_range": [0.0, 1.0],
    }
    assert meta["feature_endpoint"] == "pre_logits"
    assert meta["endpoints"]["block1"] == {"shape": [None, 4, 4, 6], "dtype": "float32"}
    assert sorted(meta["signatures"]) == ["representation", "serving_default"]


def test_load_rejects_paths_that_are_not_exports(tmp_path):
    plain = tmp_path / "plain"
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(plain))
    with pytest.raises(ValueError, match="not a revisit_tf export"):
        load(plain)
    with pytest.raises(FileNotFoundError, match="missing"):
        load(tmp_path / "missing")


def test_second_export_replaces_first(tmp_path, images):
    first, second = build_tiny_trunk(seed=1), build_tiny_trunk(seed=2)
    path = tmp_path / "trunk"
    export(first, path, metadata={"run": 1})
    returned = export(second, path, metadata={"run": 2})

    assert returned == str(path)
    assert os.listdir(tmp_path) == ["trunk"]
    assert read_metadata(path)["user_metadata"] == {"run": 2}
    loaded = load(path)
    assert_outputs_close(
        loaded.serving_default(tf.constant(images)), expected_outputs(second, images)
    )


def test_overwrite_false_refuses_an_existing_export(tmp_path):
    model = build_tiny_trunk(seed=1)
    path = tmp_path / "trunk"
    export(model, path, overwrite=False, metadata={"run": 1})
    with pytest.raises(FileExistsError, match="overwrite=False"):
        export(model, path, overwrite=False, metadata={"run": 2})
    assert os.listdir(tmp_path) == ["trunk"]
    assert read_metadata(path)["user_metadata"] == {"run": 1}


def assert_first_export_intact(tmp_path, path, first, images):
    """Only the first export is left, unchanged, and no temporary directory."""
    assert os.listdir(tmp_path) == ["trunk"]
    assert read_metadata(path)["user_metadata"] == {"run": 1}
    loaded = load(path)  # Kept alive: its functions only weakly hold variables.
    assert_outputs_close(
        loaded.serving_default(tf.constant(images)), expected_outputs(first, images)
    )


def test_failed_save_keeps_previous_export_and_leaves_no_temp_dir(
    tmp_path, images, monkeypatch
):
    first, second = build_tiny_trunk(seed=1), build_tiny_trunk(seed=2)
    path = tmp_path / "trunk"
    export(first, path, metadata={"run": 1})

    def save_then_fail(obj, export_dir, signatures=None, options=None):
        tf.io.gfile.makedirs(export_dir)
        with open(os.path.join(export_dir, "saved_model.pb"), "w") as f:
            f.write("half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(second, path, metadata={"run": 2})
    monkeypatch.undo()

    assert_first_export_intact(tmp_path, path, first, images)


def test_failed_final_rename_puts_previous_export_back(tmp_path, images, monkeypatch):
    first, second = build_tiny_trunk(seed=1), build_tiny_trunk(seed=2)
    path = tmp_path / "trunk"
    export(first, path, metadata={"run": 1})
    real_rename = tf.io.gfile.rename

    def rename_but_not_the_new_export(src, dst, overwrite=False):
        if ".tmp-" in os.path.basename(src):
            raise OSError(f"cannot rename {src}")
        return real_rename(src, dst, overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", rename_but_not_the_new_export)
    with pytest.raises(OSError, match="cannot rename"):
        export(second, path, metadata={"run": 2})
    monkeypatch.undo()

    assert_first_export_intact(tmp_path, path, first, images)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image_shape": (8, 8)}, ValueError, r"image_shape .*\(8, 8\)"),
        ({"image_shape": (8, 8, None)}, ValueError, "C a positive int"),
        ({"image_shape": (0, 8, 3)}, ValueError, r"\(0, 8, 3\)"),
        (
            {"image_shape": (16, 16, 3), "preprocess": None},
            ValueError,
            "does not fit the input shape",
        ),
        ({"preprocess": "x * 2 - 1"}, ValueError, "preprocess must be a callable"),
        ({"feature_endpoint": "fc7"}, ValueError, r"'fc7'.*available.*block1"),
        ({"metadata": {"step": object()}}, TypeError, "JSON-serializable"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path, kwargs, error, match):
    model = build_tiny_trunk(seed=1)
    arguments = {
        "image_shape": IMAGE_SHAPE,
        "preprocess": to_minus_one_one,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        export_saved_model(model, tmp_path / "trunk", **arguments)
    assert os.listdir(tmp_path) == []


def test_models_without_an_endpoint_dict_are_rejected(tmp_path):
    images = keras.Input(IMAGE_SHAPE)
    features = keras.layers.GlobalAveragePooling2D()(images)
    with pytest.raises(ValueError, match="must return a dict"):
        export_saved_model(
            keras.Model(images, features), tmp_path / "a", image_shape=IMAGE_SHAPE
        )
    clash = keras.Model(images, {"default": features, "pre_logits": features})
    with pytest.raises(ValueError, match="reserves"):
        export_saved_model(clash, tmp_path / "b", image_shape=IMAGE_SHAPE)
    with pytest.raises(ValueError, match="keras.Model"):
        export_saved_model(lambda x: x, tmp_path / "c", image_shape=IMAGE_SHAPE)
    assert os.listdir(tmp_path) == []
