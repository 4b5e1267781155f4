"""The release's SGD linear evaluation on re-augmented images (probe/augmented.py).

A tiny export (conv + batch norm with non-trivial moving statistics) and
in-memory array sources. References: the export's in-memory Keras model,
NumPy crops, reference 7.2's schedule computed by hand, and data whose
linear separability is known by construction.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import two_replica_strategy
from tensorflow.core.util import event_pb2

import gin
from revisit_tf import schedules
from revisit_tf.data import sources
from revisit_tf.export import saved_model as export_lib
from revisit_tf.probe import augmented

SOURCE = "augmented_probe_tiny"  # 3 separable classes, 20x20x3
IDS = "augmented_probe_ids"  # 8 examples, label = example id
PP_TRAIN = "random_crop(16)|value_range(0, 1)"
PP_EVAL = "central_crop(16)|value_range(0, 1)"
FAST = dict(
    dataset=SOURCE,
    train_split="train",
    eval_splits=("val", "test"),
    pp_train=PP_TRAIN,
    pp_eval=PP_EVAL,
    endpoints=("block1", "pre_logits"),
    num_classes=3,
    batch_size=16,
    eval_batch_size=16,
    lr=3.2,  # 0.2 at batch 16
    shuffle_buffer=64,
)


def _separable(n, seed):
    """Class c: uniform noise in [0, 127] plus 128 on channel c (uint8)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 128, size=(n, 20, 20, 3))
    images[np.arange(n), :, :, labels] += 128
    return images.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def _sources():
    saved = dict(sources._ARRAY_SOURCES), dict(sources._SPLIT_CONVENTIONS)
    tiny = {"train": _separable(96 + 32, 0), "test": _separable(48, 1)}
    ids = {
        "train": (
            np.random.default_rng(2).integers(0, 256, (8, 20, 20, 3), np.uint8),
            np.arange(8, dtype=np.int64),
        )
    }
    conv = sources.SplitConvention(num_held_out=32, test_split="test")
    sources.register_array_source(
        SOURCE, sources.ArraySource(lambda d: tiny, "/"), conv
    )
    sources.register_array_source(
        IDS, sources.ArraySource(lambda d: ids, "/"), sources.SplitConvention(1)
    )
    yield
    sources._ARRAY_SOURCES.clear()
    sources._ARRAY_SOURCES.update(saved[0])
    sources._SPLIT_CONVENTIONS.clear()
    sources._SPLIT_CONVENTIONS.update(saved[1])


def _tiny_trunk():
    """``block1`` 16x16x40 (10,240 features: pooled to 8x8x40, reference 8.2)
    and ``pre_logits`` = [channel means of the input, of ``block1``]."""
    keras.utils.set_random_seed(0)
    images = keras.Input((16, 16, 3))
    bn = keras.layers.BatchNormalization()
    block1 = keras.layers.ReLU()(bn(keras.layers.Conv2D(40, 3, padding="same")(images)))
    pre_logits = keras.layers.Concatenate()(
        [
            keras.layers.GlobalAveragePooling2D()(images),
            keras.layers.GlobalAveragePooling2D()(block1),
        ]
    )
    model = keras.Model(images, {"block1": block1, "pre_logits": pre_logits})
    # Moving statistics far from any batch's: training-mode BN would differ.
    bn.moving_mean.assign(np.full(40, 0.3, np.float32))
    bn.moving_variance.assign(np.full(40, 4.0, np.float32))
    return model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = _tiny_trunk()
    path = export_lib.export_saved_model(
        model,
        str(tmp_path_factory.mktemp("augmented") / "export"),
        image_shape=(16, 16, 3),
        preprocess=lambda x: x * 2.0 - 1.0,
        parity_consumers=(),
    )
    return model, path


@pytest.fixture(scope="module")
def linear_run(export, tmp_path_factory):
    """3 epochs of 6 steps, evaluated after each: (results, logdir)."""
    logdir = str(tmp_path_factory.mktemp("tb"))
    results = augmented.train_augmented_probe(
        export[1], epochs=3, decay_epochs=(1, 2), logdir=logdir, **FAST
    )
    return results, logdir


# (a) The trunk is frozen.


def test_trunk_features_do_not_depend_on_the_batch_and_match_inference(export):
    model, path = export
    trunk = augmented.FrozenTrunk(
        path, ["block1", "pre_logits"], image_shape=(16, 16, 3)
    )
    assert trunk.dims == {"block1": 8 * 8 * 40, "pre_logits": 43}
    x = tf.random.uniform([5, 16, 16, 3], seed=3)
    alone = trunk(x[:1])
    mixed = trunk(tf.concat([x[:1], tf.zeros([4, 16, 16, 3]) + 0.9], 0))
    shuffled = trunk(tf.concat([x[3:], x[:1], x[1:3]], 0))
    for e in trunk.endpoints:
        np.testing.assert_allclose(alone[e][0], mixed[e][0], atol=1e-6)
        np.testing.assert_allclose(alone[e][0], shuffled[e][2], atol=1e-6)
    expected = model(x * 2.0 - 1.0, training=False)
    np.testing.assert_allclose(
        trunk(x)["pre_logits"], expected["pre_logits"], atol=1e-5
    )
    pooled = tf.nn.max_pool2d(expected["block1"], 2, 2, "VALID")  # [5, 8, 8, 40]
    np.testing.assert_allclose(
        trunk(x)["block1"], tf.reshape(pooled, [5, -1]), atol=1e-5
    )


def test_training_leaves_the_export_variables_unchanged(export):
    trunk = augmented.FrozenTrunk(export[1], ["pre_logits"], image_shape=(16, 16, 3))
    before = [v.numpy().copy() for v in trunk.variables]
    assert len(before) >= 6  # conv kernel and bias, BN's four
    x = tf.random.uniform([4, 16, 16, 3], seed=4)
    features = trunk(x)["pre_logits"].numpy()
    augmented.train_augmented_probe(
        trunk, **{**FAST, "endpoints": ("pre_logits",)}, epochs=1
    )
    for b, v in zip(before, trunk.variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())
    np.testing.assert_array_equal(features, trunk(x)["pre_logits"].numpy())


# (b) Crops are re-drawn every time an image is seen; evaluation is fixed.


def test_training_crops_are_redrawn_every_step_and_eval_crops_are_central():
    ds = augmented.make_train_input(
        IDS, "trainval", PP_TRAIN, global_batch_size=8, seed=0
    )
    steps = []
    for batch in ds.take(3):  # one step = one epoch of the 8 examples
        order = np.argsort(batch["label"].numpy())
        steps.append(batch["image"].numpy()[order])
    assert steps[0].shape == (8, 16, 16, 3)
    for t in range(2):
        redrawn = [not np.array_equal(steps[t][i], steps[t + 1][i]) for i in range(8)]
        assert sum(redrawn) >= 6, redrawn  # an offset repeats with p = 1/25
    # Same seed, same stream (the crops are stateless in seed, epoch, index).
    again = next(iter(ds))
    np.testing.assert_array_equal(
        steps[0], again["image"].numpy()[np.argsort(again["label"].numpy())]
    )

    raw = sources.get_source(IDS, "trainval")
    expected = np.stack([ex["image"].numpy()[2:18, 2:18] / 255.0 for ex in raw])
    for _ in range(2):
        (batch,) = augmented.make_eval_input(IDS, "trainval", PP_EVAL, batch_size=8)
        np.testing.assert_array_equal(batch["index"].numpy(), np.arange(8))
        np.testing.assert_allclose(batch["image"].numpy(), expected, atol=1e-6)


# (c) The curve, (d) the schedule, (f) learning.


def test_curve_has_one_point_per_eval_epoch_and_goes_to_tensorboard(linear_run):
    results, logdir = linear_run
    assert sorted(results) == ["block1", "pre_logits"]
    for r in results.values():
        assert [p["epoch"] for p in r.curve] == [1, 2, 3]
        assert [p["step"] for p in r.curve] == [6, 12, 18]  # 96 // 16 per epoch
        assert r.steps == 18 and r.num_examples == {"train": 96, "val": 32, "test": 48}
        for p in r.curve:
            for key in ("val_top1", "val_top5", "test_top1", "test_top5"):
                assert 0.0 <= p[key] <= 1.0
            assert p["val_top1"] <= p["val_top5"] and math.isfinite(p["loss"])
        assert r.top1 == {s: r.curve[-1][f"{s}_top1"] for s in ("val", "test")}
        labels = np.arange(48) % 3  # the test split, in source order
        assert r.top1["test"] == np.mean(r.predictions["test"] == labels)
        assert r.settings["protocol"] == "sgd_augmented"

    scalars = {}
    for path in tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*"):
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            for v in event.summary.value:
                value = float(tf.make_ndarray(v.tensor))
                scalars.setdefault(v.tag, []).append((event.step, value))
    curve = results["pre_logits"].curve
    assert scalars["sgd_augmented/epoch"] == [(6, 1.0), (12, 2.0), (18, 3.0)]
    assert scalars["sgd_augmented/pre_logits/test_top1"] == [
        (p["step"], pytest.approx(p["test_top1"])) for p in curve
    ]
    assert len(scalars["sgd_augmented/block1/val_top5"]) == 3


def test_learning_rate_follows_the_reference_schedule(linear_run):
    # Reference 7.2 / 8.5 by hand: 0.1 * 512 / 256 = 0.2 until the step after
    # epoch 30's boundary, then 0.02, and 0.002 after epoch 50.
    per_epoch = 1_281_167 // 512  # trainval at batch 512: 2502 steps
    s = schedules.reference_schedule(
        global_batch_size=512,
        steps_per_epoch=per_epoch,
        total_steps=70 * per_epoch,
        decay_epochs=(30, 50),
    )
    for step, rate in [(0, 0.2), (30 * per_epoch, 0.2), (30 * per_epoch + 1, 0.02),
                       (50 * per_epoch, 0.02), (50 * per_epoch + 1, 0.002),
                       (70 * per_epoch - 1, 0.002)]:  # fmt: skip
        assert float(s(step)) == pytest.approx(rate, rel=1e-6), step
    # The probe's own rate (batch 16, lr 3.2 at 256: 0.2), x0.1 after the
    # boundaries 6 and 12 (epochs 1 and 2 of 6 steps): the curve's lr is that
    # of each epoch's last step, 0-based 5, 11 and 17.
    results, _ = linear_run
    lrs = [p["lr"] for p in results["pre_logits"].curve]
    assert lrs == pytest.approx([0.2, 0.02, 0.002], rel=1e-6)
    # One schedule for both stages, under the gin name the configs use.
    from revisit_tf import configurables  # noqa: F401
    from revisit_tf.train import optim

    assert optim.reference_schedule is schedules.reference_schedule
    assert optim.steps_per_epoch is schedules.steps_per_epoch
    gin.parse_config("reference_schedule.lr = 0.3")
    assert gin.query_parameter("reference_schedule.lr") == 0.3


def test_linear_heads_learn_separable_classes(linear_run):
    results, _ = linear_run
    # pre_logits holds the channel means: the class is linear in them.
    assert results["pre_logits"].top1["test"] > 0.9  # chance 1/3
    assert results["pre_logits"].top1["val"] > 0.9
    assert results["pre_logits"].params["kernel"].shape == (43, 3)
    assert results["block1"].params["kernel"].shape == (2560, 3)


# (e) Strategies.


def test_mirrored_strategy_matches_the_default_strategy(export):
    kwargs = {**FAST, "endpoints": ("pre_logits",), "epochs": 2, "decay_epochs": (1,)}
    one = augmented.train_augmented_probe(export[1], **kwargs)["pre_logits"]
    two = augmented.train_augmented_probe(
        export[1], strategy=two_replica_strategy(), **kwargs
    )["pre_logits"]
    for k, v in one.params.items():
        np.testing.assert_allclose(two.params[k], v, atol=1e-5, err_msg=k)
    for a, b in zip(one.curve, two.curve, strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["test_top1"] == pytest.approx(b["test_top1"], abs=1 / 48)


def test_mlp_head_trains_with_dropout(export):
    (r,) = augmented.train_augmented_probe(
        export[1],
        **{**FAST, "endpoints": ("pre_logits",)},
        head="mlp",
        hidden=16,
        epochs=1,
    ).values()
    assert r.settings["protocol"] == "mlp_augmented" and r.settings["hidden"] == 16
    assert r.params["hidden_kernel"].shape == (43, 16) and len(r.curve) == 1


# (g) Bad input fails early and names the problem.


@pytest.mark.parametrize(
    "change, message",
    [
        ({"endpoints": ("block9",)}, r"Endpoints \['block9'\] are not in"),
        ({"batch_size": 128}, "batch_size 128 exceeds the 96 examples"),
        ({"epochs": 0}, "epochs must be a finite number > 0"),
        ({"epochs": -1}, "epochs must be a finite number > 0"),
        ({"head": "svm"}, "head must be one of"),
        ({"decay_epochs": (50, 30)}, "decay_epochs must be increasing"),
        ({"eval_every_epochs": 0}, "eval_every_epochs must be an int >= 1"),
        ({"eval_splits": ()}, "eval_splits must name at least one split"),
        ({"pp_eval": "value_range(0, 1)"}, r"pp_eval makes \[20, 20, 3\]"),
        ({"pp_train": "random_crop(12)|value_range(0, 1)",
          "pp_eval": "central_crop(12)|value_range(0, 1)"},
         r"takes \[16, 16, 3\]"),
        ({"pp_train": f'{PP_TRAIN}|keep("image")'}, "drops the 'label'"),
        ({"lr": 0.0}, "lr must be > 0"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_training(export, change, message):
    with pytest.raises(ValueError, match=message):
        augmented.train_augmented_probe(export[1], **{**FAST, **change})


def test_bad_input_under_two_replicas_and_missing_export(tmp_path):
    with pytest.raises(ValueError, match="batch_size=15 is not a multiple of the 2"):
        augmented.train_augmented_probe(
            str(tmp_path), strategy=two_replica_strategy(), **{**FAST, "batch_size": 15}
        )
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        augmented.train_augmented_probe(str(tmp_path / "none"), **FAST)
