"""Tests of the export's consumers, its parity gate, the ``.keras`` trunk and
the export's metadata (issue 13 items 1 and 2).

Every consumer is run here with its own public API (not through
``revisit_tf.export.consumers``) and compared with the in-memory trunk's
outputs, computed independently as ``trunk(images * 2 - 1, training=False)``.
The smoke trunk's batch norm statistics are moved far from what a batch gives,
so a consumer running the wrong mode or the wrong variables cannot pass.
"""

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras
from helpers import export_tiny_patch_model

from revisit_tf import experiments
from revisit_tf.export import consumers as consumers_lib
from revisit_tf.export import saved_model as export_lib
from revisit_tf.models import factory, pretext
from revisit_tf.train import losses

IMAGE_SHAPE = (16, 16, 3)
ATOL = 1e-5


def smoke_trunk(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    trunk = factory.build_trunk(
        "resnet50_v2", width=0.25, units=(1, 1, 1, 1), num_classes=4,
        input_shape=IMAGE_SHAPE,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    for layer in trunk.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            (c,) = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.3, 0.5, size=c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c))
    return trunk


def images(n: int = 3, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, *IMAGE_SHAPE)).astype("f4")


def expected(trunk: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """The in-memory trunk's outputs (inference mode) plus ``default``."""
    outputs = {k: v.numpy() for k, v in trunk(x * 2.0 - 1.0, training=False).items()}
    return {**outputs, "default": outputs["pre_logits"]}


def assert_close(actual, want) -> None:
    assert sorted(actual) == sorted(want)
    for key, value in want.items():
        got = np.asarray(actual[key])
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(got, value, atol=ATOL * scale, rtol=0, err_msg=key)


@pytest.fixture(scope="module", params=["local", "ram"])
def smoke_export(request, tmp_path_factory):
    """(trunk, path) of a gated export, on local disk and on ``ram://``."""
    trunk = smoke_trunk()
    if request.param == "local":
        path = str(tmp_path_factory.mktemp("consumers") / "export")
    else:
        path = f"ram://test_export_consumers/{os.getpid()}/export"
    export_lib.export_saved_model(
        trunk, path, image_shape=IMAGE_SHAPE, preprocess=lambda x: x * 2.0 - 1.0
    )
    return trunk, path


def test_the_trunk_differs_between_training_and_inference(smoke_export):
    trunk, _ = smoke_export
    weights = trunk.get_weights()
    try:
        training = trunk(images() * 2 - 1, training=True)["block4"].numpy()
    finally:
        trunk.set_weights(weights)
    inference = trunk(images() * 2 - 1, training=False)["block4"].numpy()
    assert np.abs(training - inference).max() > 0.05


def test_tf_saved_model_load_matches_the_model(smoke_export):
    trunk, path = smoke_export
    want = expected(trunk, images())
    loaded = tf.saved_model.load(path)
    x = tf.constant(images())
    assert_close(loaded.signatures["serving_default"](images=x), want)
    del want["default"]
    assert_close(loaded.signatures["representation"](images=x), want)
    np.testing.assert_allclose(loaded(x), want["pre_logits"], atol=ATOL, rtol=0)


def test_graph_mode_session_matches_the_model(smoke_export):
    """TF1-style loading in a fresh graph, as TF Serving and saved_model_cli."""
    trunk, path = smoke_export
    want = expected(trunk, images())
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta_graph.signature_def["serving_default"]
        fetches = {k: t.name for k, t in signature.outputs.items()}
        out = session.run(fetches, {signature.inputs["images"].name: images()})
    assert_close(out, want)


def test_tfsm_layer_matches_the_model(smoke_export):
    trunk, path = smoke_export
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    assert_close(layer(images()), expected(trunk, images()))


def test_hub_keras_layer_matches_the_model_and_fine_tunes(smoke_export):
    trunk, path = smoke_export
    want = expected(trunk, images())["default"]
    layer = hub.KerasLayer(path, trainable=True)
    np.testing.assert_allclose(
        layer(tf.constant(images()), training=False), want, atol=ATOL, rtol=0
    )
    classifier = tf_keras.Sequential(
        [tf_keras.Input(IMAGE_SHAPE), layer, tf_keras.layers.Dense(2)]
    )
    np.testing.assert_allclose(
        sum(float(loss) for loss in classifier.losses),
        float(sum(trunk.losses)),
        rtol=1e-5,
    )
    before = [v.numpy() for v in layer.trainable_weights]
    classifier.compile(
        optimizer=tf_keras.optimizers.SGD(0.1),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.fit(images(4), np.array([0, 1, 0, 1]), batch_size=4, verbose=0)
    after = [v.numpy() for v in layer.trainable_weights]
    assert max(np.abs(a - b).max() for a, b in zip(after, before, strict=True)) > 1e-6


def test_tflite_conversion_of_serving_default_matches_the_model(smoke_export):
    trunk, path = smoke_export
    converter = tf.lite.TFLiteConverter.from_saved_model(
        path, signature_keys=["serving_default"]
    )
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    runner = interpreter.get_signature_runner("serving_default")
    assert_close(runner(images=images()), expected(trunk, images()))


def test_the_gate_records_every_consumer_within_tolerance(smoke_export):
    _, path = smoke_export
    parity = export_lib.read_metadata(path)["parity"]
    assert parity["tolerance"] == consumers_lib.TOLERANCE
    assert sorted(parity["consumers"]) == sorted(consumers_lib.CONSUMERS)
    for name, report in parity["consumers"].items():
        assert report["status"] == "passed", name
        assert 0 <= report["max_abs_diff"] <= 1e-5, name
    assert parity["consumers"]["graph_session"]["functions"] == [
        "representation",
        "serving_default",
    ]


def test_patch_exports_pass_the_gate_with_their_patches_signature(tmp_path):
    keras.utils.set_random_seed(0)
    path = export_tiny_patch_model(tmp_path / "export", num_classes=8)
    consumers = export_lib.read_metadata(path)["parity"]["consumers"]
    assert all(r["status"] == "passed" for r in consumers.values()), consumers
    assert "patches" in consumers["saved_model"]["functions"]
    assert "patches" in consumers["graph_session"]["functions"]


def tree(path: str) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                out[os.path.relpath(os.path.join(directory, name), path)] = f.read()
    return out


def test_a_broken_export_fails_the_gate_and_keeps_the_previous_one(
    tmp_path, monkeypatch
):
    path = str(tmp_path / "export")
    kwargs = {"image_shape": IMAGE_SHAPE, "preprocess": lambda x: x * 2.0 - 1.0}
    export_lib.export_saved_model(
        smoke_trunk(), path, parity_consumers=("saved_model",), **kwargs
    )
    previous = tree(path)
    save = tf.saved_model.save

    def save_other_weights(root, directory, signatures):
        # What was written is not what the model computes: one variable moved.
        variable = root.variables[0]
        value = variable.numpy()
        variable.assign(value + 0.5)
        try:
            save(root, directory, signatures=signatures)
        finally:
            variable.assign(value)

    monkeypatch.setattr(export_lib.tf.saved_model, "save", save_other_weights)
    with pytest.raises(
        export_lib.ExportParityError, match=r"saved_model: .*max \|diff\|"
    ):
        export_lib.export_saved_model(smoke_trunk(seed=1), path, **kwargs)
    assert tree(path) == previous
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_a_mismatch_of_one_consumer_names_it_and_the_output(tmp_path, monkeypatch):
    run_tflite = consumers_lib.RUNNERS["tflite"]

    def off_tflite(path, inputs, cache):
        outputs = run_tflite(path, inputs, cache)
        outputs["serving_default"]["block3"] = (
            outputs["serving_default"]["block3"] + 1e-3
        )
        return outputs

    monkeypatch.setitem(consumers_lib.RUNNERS, "tflite", off_tflite)
    with pytest.raises(
        export_lib.ExportParityError, match=r"tflite: serving_default/block3: max"
    ):
        export_lib.export_saved_model(
            smoke_trunk(),
            str(tmp_path / "export"),
            image_shape=IMAGE_SHAPE,
            parity_consumers=("graph_session", "tflite"),
        )
    assert os.listdir(tmp_path) == []


def test_consumers_can_be_dropped_and_unknown_ones_are_refused(tmp_path):
    path = export_lib.export_saved_model(
        smoke_trunk(), str(tmp_path / "a"), image_shape=IMAGE_SHAPE,
        parity_consumers=("graph_session",),
    )  # fmt: skip
    assert list(export_lib.read_metadata(path)["parity"]["consumers"]) == [
        "graph_session"
    ]
    path = export_lib.export_saved_model(
        smoke_trunk(), str(tmp_path / "b"), image_shape=IMAGE_SHAPE,
        parity_consumers=(),
    )  # fmt: skip
    assert export_lib.read_metadata(path)["parity"] is None
    with pytest.raises(ValueError, match="consumers must be distinct names"):
        export_lib.export_saved_model(
            smoke_trunk(), str(tmp_path / "c"), image_shape=IMAGE_SHAPE,
            parity_consumers=("tf_serving",),
        )  # fmt: skip
    assert not os.path.exists(tmp_path / "c")


def test_tflite_is_skipped_with_a_warning_beyond_the_flatbuffer_limit(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(consumers_lib, "TFLITE_MAX_WEIGHT_BYTES", 1000)
    with caplog.at_level(logging.WARNING):
        path = export_lib.export_saved_model(
            smoke_trunk(), str(tmp_path / "export"), image_shape=IMAGE_SHAPE,
            parity_consumers=("saved_model", "tflite"),
        )  # fmt: skip
    report = export_lib.read_metadata(path)["parity"]["consumers"]
    assert report["tflite"]["status"] == "skipped"
    assert "2 GiB" in report["tflite"]["reason"]
    assert report["saved_model"]["status"] == "passed"
    assert "skipped tflite" in caplog.text


# --- export_model: the .keras trunk and the metadata of item 2


def small_trunk(*, input_shape):
    return factory.build_trunk(
        "resnet50_v2", width=0.25, units=(1, 1, 1, 1), num_classes=4,
        last_relu=False, input_shape=input_shape,
    )  # fmt: skip


OPERATIVE_CONFIG = b"pretrain.steps = 2\n"


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir after a real two-step Rotation smoke training on 28x28x1."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    experiments.pretrain(
        workdir,
        dataset="fashion_mnist_idx",
        pp_train='decode|rotate4|value_range(-1, 1)|keep("image", "label")',
        global_batch_size=4,
        model_fn=functools.partial(
            pretext.build_pretext_model,
            trunk_fn=small_trunk,
            head_fn=None,
            name="rotation",
        ),
        loss_fn=losses.softmax_xent,
        train_split="train[:8]",
        steps=2,
        steps_per_loop=2,
        checkpoint_every=2,
        seed=0,
    )
    with open(os.path.join(workdir, "operative_config.gin"), "wb") as f:
        f.write(OPERATIVE_CONFIG)  # What revisit-train writes after loop 1.
    return workdir


def export_run(workdir, **kwargs):
    return experiments.export_model(
        workdir, trunk_fn=small_trunk, image_shape=(28, 28, 1),
        parity_consumers=("graph_session",), **kwargs,
    )  # fmt: skip


def read_json(path):
    """The export's metadata as plain JSON: no TensorFlow, no workdir."""
    with open(os.path.join(path, "assets.extra", "revisit_tf_export.json")) as f:
        return json.load(f)


def test_trained_and_random_init_exports_carry_their_own_metadata(
    trained_workdir, tmp_path
):
    trained = read_json(export_run(trained_workdir))
    random_dir = str(tmp_path / "fresh")
    os.makedirs(random_dir)
    random = read_json(export_run(random_dir, random_init=True, seed=3))

    meta = trained["user_metadata"]
    assert meta["task"] == "rotation"
    assert meta["dataset"] == "fashion_mnist_idx"
    assert meta["train_split"] == "train[:8]"
    assert meta["random_init"] is False
    assert meta["checkpoint"]["step"] == 2
    assert meta["checkpoint"]["path"].endswith("ckpt-2")
    assert meta["trunk"]["architecture"] == "resnet50_v2"
    assert meta["trunk"]["version"] == "v2"
    assert meta["trunk"]["width"] == 0.25
    assert meta["trunk"]["units"] == [1, 1, 1, 1]
    assert meta["trunk"]["last_relu"] is False
    assert meta["operative_config"] == {
        "file": "assets.extra/operative_config.gin",
        "sha256": hashlib.sha256(OPERATIVE_CONFIG).hexdigest(),
    }
    export = os.path.join(trained_workdir, "export")
    with open(os.path.join(export, "assets.extra", "operative_config.gin"), "rb") as f:
        assert f.read() == OPERATIVE_CONFIG
    assert trained["revisit_tf_version"]
    assert trained["input"]["value_range"] == [0.0, 1.0]
    assert trained["input"]["shape"] == [None, 28, 28, 1]

    other = random["user_metadata"]
    assert other["random_init"] is True
    assert other["checkpoint"] is None
    assert other["seed"] == 3
    assert other["task"] is None and other["dataset"] is None
    assert other["operative_config"] is None
    assert other["trunk"] == meta["trunk"]


def test_keras_format_writes_the_trunk_and_it_loads_as_documented(trained_workdir):
    path = export_run(trained_workdir, export_format="keras")
    assert path == os.path.join(trained_workdir, "trunk.keras")
    assert not [n for n in os.listdir(trained_workdir) if ".tmp-" in n]
    trunk = small_trunk(input_shape=(28, 28, 1))
    experiments.checkpoint_lib.restore_trunk(trained_workdir, trunk)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 28, 28, 1)).astype("f4")
    want = {k: v.numpy() for k, v in trunk(x, training=False).items()}
    np.save(os.path.join(trained_workdir, "x.npy"), x)
    # Only what the docs (export.keras_trunk) say loading needs.
    script = textwrap.dedent(f"""
        import json, keras, numpy as np
        import revisit_tf.models
        trunk = keras.saving.load_model({path!r})
        x = np.load({os.path.join(trained_workdir, "x.npy")!r})
        out = trunk(x, training=False)
        print(json.dumps({{k: np.asarray(v).tolist() for k, v in out.items()}}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert_close(got, want)


def test_the_gate_catches_keras_variables_saved_as_copies(tmp_path, monkeypatch):
    """The bug behind issue 13: root.variables held KerasVariables, which the
    exporter copied, so a TF1 session restored variables no function reads."""
    build_root = export_lib._build_root

    def with_keras_variables(model, *args, **kwargs):
        root, signatures = build_root(model, *args, **kwargs)
        root.variables = list(model.variables)
        root.trainable_variables = list(model.trainable_variables)
        return root, signatures

    monkeypatch.setattr(export_lib, "_build_root", with_keras_variables)
    with pytest.raises(export_lib.ExportParityError, match="graph_session: failed"):
        export_lib.export_saved_model(
            smoke_trunk(), str(tmp_path / "export"), image_shape=IMAGE_SHAPE,
            parity_consumers=("graph_session",),
        )  # fmt: skip
    assert os.listdir(tmp_path) == []
