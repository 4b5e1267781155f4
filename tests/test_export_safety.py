"""Export safety (issue 12, items 5-7): input range, config drift, no lost export.

* Range: every exported function refuses float images outside [0, 1] (e.g.
  0..255 floats, which give features off by tens), naming the range it saw.
* Drift: ``experiments.export_model`` refuses a trunk whose architecture
  differs from the one ``pretrain`` recorded, and an export preprocessing
  that differs from the existing export's, unless ``force``.
* Interruption: the on-disk state at every point of an export (taken at its
  fault points) is recovered by the next run: an export moved aside is put
  back, and the leftovers of killed exports are removed.

The trunks are tiny (8x8 or 28x28 inputs, width 0.25, one unit per stage), so
every test runs in seconds.
"""

import functools
import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from helpers import export_tiny_patch_model
from test_export import (
    assert_outputs_close,
    build_tiny_trunk,
    expected_outputs,
    export,
    make_images,
)

from revisit_tf import experiments, faults
from revisit_tf.export import read_metadata
from revisit_tf.export import saved_model as export_lib
from revisit_tf.models import factory, pretext
from revisit_tf.probe.features import SavedModelFeatures


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build_tiny_trunk(seed=1)
    path = export(model, tmp_path_factory.mktemp("export") / "trunk")
    return model, path


# --- Item 5: input range ---------------------------------------------------


def observed_range_text(images: np.ndarray) -> str:
    """The range as the export's error message states it (4 decimals)."""
    return f"[{images.min():.4f}, {images.max():.4f}]"


@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (2.0, -1.0), (1.0, 0.01)])
def test_images_outside_zero_one_are_refused_by_every_function(exported, scale, shift):
    _, path = exported
    loaded = tf.saved_model.load(path)
    images = make_images() * scale + shift  # 0..255, -1..1, 0.01..1.01
    x = tf.constant(images)
    calls = {
        "serving_default": lambda: loaded.signatures["serving_default"](images=x),
        "representation": lambda: loaded.signatures["representation"](images=x),
        "__call__": lambda: loaded(x),
        "__call__ training": lambda: loaded(x, training=True),
    }
    for name, call in calls.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            call()
        message = info.value.message
        assert "float32 in [0, 1]" in message, name
        assert observed_range_text(images) in message, name
        assert "divide uint8 images by 255" in message.lower(), name


def test_images_in_range_and_within_tolerance_pass(exported):
    model, path = exported
    loaded = tf.saved_model.load(path)
    images = make_images()
    images[0, 0, 0] = [0.0, 1.0, 1.0 + 5e-4]  # the ends, and rounding noise
    assert_outputs_close(
        loaded.serving_default(tf.constant(images)), expected_outputs(model, images)
    )


def test_patches_signature_refuses_out_of_range_patches(tmp_path):
    path = export_tiny_patch_model(tmp_path / "export", num_classes=4)
    loaded = tf.saved_model.load(path)
    patches = np.random.default_rng(0).uniform(0, 255, (2, 9, 8, 8, 1)).astype("f4")
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures["patches"](patches=tf.constant(patches))
    assert observed_range_text(patches) in info.value.message
    assert "[0, 1]" in info.value.message
    ok = loaded.signatures["patches"](patches=tf.constant(patches / 255.0))
    assert ok["default"].shape[0] == 2


def test_probe_features_refuse_a_pipeline_without_value_range(exported):
    model, path = exported
    images = np.round(make_images(8) * 255)  # decoded uint8 values, as floats
    labels = np.arange(8)
    raw = tf.data.Dataset.from_tensor_slices(
        {"image": images.astype(np.uint8), "label": labels}
    ).batch(4)
    features = SavedModelFeatures(path, ["pre_logits"])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\]"):
        features.extract(raw)
    scaled = raw.map(lambda b: {**b, "image": tf.cast(b["image"], tf.float32) / 255})
    feats, got = features.extract(scaled)
    np.testing.assert_array_equal(got, labels)
    expected = expected_outputs(model, (images / 255).astype("f4"))["pre_logits"]
    np.testing.assert_allclose(feats["pre_logits"], expected, atol=1e-5, rtol=0)


# --- Item 6: config drift ---------------------------------------------------


def small_trunk(*, input_shape, stem_stride=2, width=0.25):
    return factory.build_trunk(
        "resnet50_v1", width=width, units=(1, 1, 1, 1), num_classes=4,
        stem_stride=stem_stride, input_shape=input_shape,
    )  # fmt: skip


@pytest.fixture
def trained_workdir(tmp_path, monkeypatch):
    """A workdir where ``pretrain`` ran (training itself skipped) on 28x28x1."""

    def no_training(**kwargs):
        return {}

    monkeypatch.setattr(experiments.loop_lib, "train", no_training)
    workdir = str(tmp_path / "run")
    experiments.pretrain(
        workdir,
        dataset="fashion_mnist_idx",
        pp_train='decode|value_range(-1, 1)|keep("image", "label")',
        global_batch_size=8,
        model_fn=functools.partial(
            pretext.build_pretext_model, trunk_fn=small_trunk, head_fn=None
        ),
        loss_fn=lambda batch, outputs: tf.zeros([1]),
        train_split="train[:16]",
        steps=1,
    )
    monkeypatch.undo()
    return workdir


def export_run(workdir, **kwargs):
    arguments = {
        "trunk_fn": small_trunk,
        "image_shape": (28, 28, 1),
        "random_init": True,
        "seed": 0,
        # Drift and move-aside checks, not the consumers (test_export_consumers
        # runs every one): the gate with the SavedModel consumer alone.
        "parity_consumers": ("saved_model",),
        **kwargs,
    }
    return experiments.export_model(workdir, **arguments)


def test_pretrain_records_the_trunk_and_an_unchanged_export_passes(trained_workdir):
    record_path = os.path.join(trained_workdir, "trunk_config.json")
    with open(record_path) as f:
        record = json.load(f)
    assert record["input_shape"] == [28, 28, 1]
    path = export_run(trained_workdir)
    assert read_metadata(path)["user_metadata"]["pp_export"] == (
        "value_range(-1, 1, 0, 1)"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"trunk_fn": functools.partial(small_trunk, stem_stride=1)}, "strides"),
        ({"trunk_fn": functools.partial(small_trunk, width=0.5)}, "filters"),
        (
            {"pp_export": "resize(32)|value_range(-1, 1, 0, 1)"},
            r"input shape \[28, 28, 1\].* \[32, 32, 1\]",
        ),
    ],
)
def test_export_refuses_a_trunk_that_differs_from_the_trained_one(
    trained_workdir, kwargs, match
):
    with pytest.raises(export_lib.ConfigDriftError, match=match):
        export_run(trained_workdir, **kwargs)
    assert not os.path.exists(os.path.join(trained_workdir, "export"))


def test_force_exports_a_drifted_trunk_with_a_warning(trained_workdir, caplog):
    drifted = functools.partial(small_trunk, stem_stride=1)
    with caplog.at_level(logging.WARNING):
        path = export_run(trained_workdir, trunk_fn=drifted, force=True)
    assert "strides" in caplog.text and "force" in caplog.text
    assert read_metadata(path)["user_metadata"]["pp_export"]


def test_random_init_in_a_fresh_workdir_exports_without_a_warning(tmp_path, caplog):
    workdir = str(tmp_path / "old")
    os.makedirs(workdir)
    with caplog.at_level(logging.WARNING):
        path = export_run(workdir)
    assert os.path.isdir(path)
    # random_init in a workdir that never trained: said, but not as a warning.
    assert "trunk_config.json" not in caplog.text


def test_an_old_trained_workdir_exports_with_a_warning(tmp_path, caplog, monkeypatch):
    """Trained before the trunk record existed: exported, with a warning."""
    workdir = str(tmp_path / "old")
    os.makedirs(workdir)
    monkeypatch.setattr(
        experiments.checkpoint_lib, "restore_trunk", lambda workdir, model: "ckpt-1"
    )
    with caplog.at_level(logging.WARNING):
        path = export_run(workdir, random_init=False)
    assert os.path.isdir(path)
    assert "trunk_config.json" in caplog.text
    assert "cannot be checked" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pp_export": "standardize"}, r"pp_export.*value_range.*standardize"),
        ({"pp_export_patches": "standardize"}, "pp_export_patches"),
        ({"random_init": False}, "random_init"),
    ],
)
def test_export_refuses_preprocessing_that_differs_from_the_existing_export(
    tmp_path, kwargs, match, monkeypatch
):
    workdir = str(tmp_path / "run")
    first = export_run(workdir)
    before = read_metadata(first)
    monkeypatch.setattr(
        experiments.checkpoint_lib, "restore_trunk", lambda workdir, model: "ckpt-1"
    )
    with pytest.raises(export_lib.ConfigDriftError, match=match):
        export_run(workdir, **kwargs)
    assert read_metadata(first) == before
    assert sorted(os.listdir(workdir)) == ["export"]


def test_force_replaces_an_export_made_with_other_preprocessing(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    export_run(workdir)
    with caplog.at_level(logging.WARNING):
        path = export_run(workdir, pp_export="standardize", force=True)
    assert read_metadata(path)["user_metadata"]["pp_export"] == "standardize"
    assert "pp_export" in caplog.text


# --- Item 7: no lost export, no leftovers -----------------------------------


def fake_leftover(path: str, mtime: float | None = None) -> None:
    """A directory as a killed writer leaves it (a half-written SavedModel)."""
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "w") as f:
        f.write("half written")
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_export_moved_aside_by_a_killed_run_is_restored_before_anything_else(
    tmp_path, monkeypatch
):
    images = make_images()
    first = build_tiny_trunk(seed=1)
    path = str(tmp_path / "trunk")
    export(first, path, metadata={"run": 1})
    # Killed between the two renames: the export is only "trunk.old-*".
    os.rename(path, f"{path}.old-1b2c3d")
    fake_leftover(f"{path}.tmp-4e5f6a")

    def save_then_fail(obj, export_dir, signatures=None, options=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(build_tiny_trunk(seed=2), path, metadata={"run": 2})
    monkeypatch.undo()

    assert read_metadata(path)["user_metadata"] == {"run": 1}
    loaded = export_lib.load(path)
    assert_outputs_close(
        loaded.serving_default(tf.constant(images)), expected_outputs(first, images)
    )


def test_the_newest_moved_aside_export_is_restored(tmp_path):
    path = str(tmp_path / "trunk")
    export(build_tiny_trunk(seed=1), path, metadata={"run": 1})
    os.rename(path, f"{path}.old-aaaa")
    os.utime(f"{path}.old-aaaa", (1e9, 1e9))
    export(build_tiny_trunk(seed=1), path, metadata={"run": 2})
    os.rename(path, f"{path}.old-bbbb")
    os.utime(f"{path}.old-bbbb", (2e9, 2e9))
    fake_leftover(f"{path}.old-cccc", mtime=3e9)  # newest, but not an export

    restored = export_lib.recover_interrupted_export(path)

    assert restored == f"{path}.old-bbbb"
    assert read_metadata(path)["user_metadata"] == {"run": 2}


def test_a_successful_export_removes_the_leftovers_of_killed_ones(tmp_path):
    path = str(tmp_path / "trunk")
    export(build_tiny_trunk(seed=1), path, metadata={"run": 1})
    fake_leftover(f"{path}.tmp-12345-0a1b2c3d")
    fake_leftover(f"{path}.old-12345-0a1b2c3d")
    fake_leftover(str(tmp_path / "trunk2.tmp-1"))  # another path's: kept

    export(build_tiny_trunk(seed=2), path, metadata={"run": 2})

    assert sorted(os.listdir(tmp_path)) == ["trunk", "trunk2.tmp-1"]
    assert read_metadata(path)["user_metadata"] == {"run": 2}


def test_temporary_names_are_random_not_derived_from_the_pid(tmp_path, monkeypatch):
    names = []
    real_save = tf.saved_model.save

    def recording_save(obj, export_dir, signatures=None, options=None):
        names.append(os.path.basename(export_dir))
        return real_save(obj, export_dir, signatures=signatures, options=options)

    monkeypatch.setattr(tf.saved_model, "save", recording_save)
    model = build_tiny_trunk(seed=1)
    export(model, tmp_path / "trunk")
    export(model, tmp_path / "trunk")
    suffixes = [name.removeprefix("trunk.tmp-") for name in names]
    assert len(suffixes) == 2 and suffixes[0] != suffixes[1]
    for suffix in suffixes:
        assert str(os.getpid()) not in suffix
        assert len(suffix) >= 16 and int(suffix, 16) >= 0  # >= 64 random bits


def test_every_kill_point_of_an_export_is_recovered_by_the_next_run(tmp_path):
    """Snapshots of the disk at each fault point = the state a SIGKILL leaves."""
    images = make_images()
    first, second = build_tiny_trunk(seed=1), build_tiny_trunk(seed=2)
    live = tmp_path / "live"
    path = str(live / "trunk")
    export(first, path, metadata={"run": 1})
    snapshots = {}

    def snapshot(name):
        snapshots[name] = str(tmp_path / f"at-{name}")
        shutil.copytree(live, snapshots[name], symlinks=True)

    faults.install(snapshot)
    try:
        export(second, path, metadata={"run": 2})
    finally:
        faults.install(None)

    assert list(snapshots) == [
        "export.tmp_written",
        "export.old_moved_aside",
        "export.new_moved_in",
        "export.leftovers_removed",
    ]
    for name, directory in snapshots.items():
        killed_at = os.path.join(directory, "trunk")
        restored = export_lib.recover_interrupted_export(killed_at)
        expected_run = (
            1 if name in ("export.tmp_written", "export.old_moved_aside") else 2
        )
        assert (restored is not None) == (name == "export.old_moved_aside"), name
        assert read_metadata(killed_at)["user_metadata"] == {"run": expected_run}
        model = first if expected_run == 1 else second
        loaded = export_lib.load(killed_at)
        assert_outputs_close(
            loaded.serving_default(tf.constant(images)),
            expected_outputs(model, images),
        )
        # The next run replaces it and leaves nothing else behind.
        export(second, killed_at, metadata={"run": 3})
        assert os.listdir(directory) == ["trunk"], name
