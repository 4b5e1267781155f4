"""Jigsaw/RPL head and pretext models: parameter counts, gathering, all trunks."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.models import factory, heads, pretext
from revisit_tf.pp import permutations
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses

ALL_ARCHITECTURES = ("resnet50_v1", "resnet50_v2", "revnet50", "vgg19")


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


@pytest.mark.parametrize(
    "input_dim, num_classes", [(9 * 1000, 100), (2 * 1000, 8), (9 * 16, 100)]
)
def test_patch_head_parameter_count(input_dim, num_classes):
    head = heads.build_patch_head(input_dim, num_classes)
    hidden = 4096  # reference 4.3
    fc7 = input_dim * hidden + hidden
    bn = 2 * hidden  # scale and offset (moving statistics are not trainable)
    fc8 = hidden * num_classes + num_classes
    assert _trainable(head) == fc7 + bn + fc8
    # Jigsaw: 37,285,988; RPL: 8,237,064 trainable parameters.
    assert len(head.non_trainable_weights) == 2


def test_patch_head_constants_and_weight_decay():
    head = heads.build_patch_head(12, 5, hidden=4000)
    fc7, bn, fc8 = (head.get_layer(n) for n in ("fc7", "fc7_bn", "fc8"))
    assert (bn.momentum, bn.epsilon) == (0.997, 1e-5)
    np.testing.assert_allclose(fc7.bias.numpy(), 0.1)
    np.testing.assert_allclose(fc8.bias.numpy(), 0.0)
    kernel = fc7.kernel.numpy()
    assert abs(kernel.std() - 0.005 * 0.88) < 3e-4  # truncated at 2 stddev
    assert np.abs(kernel).max() <= 0.01 + 1e-7
    assert head.get_layer("fc7_dropout").rate == 0.5
    # L2(5e-4 / 2) on both kernels only (reference 6).
    expected = 5e-4 / 2 * (np.sum(kernel**2) + np.sum(fc8.kernel.numpy() ** 2))
    np.testing.assert_allclose(float(tf.add_n(head.losses)), expected, rtol=1e-5)


@pytest.mark.parametrize("layout", ["interleaved", "block"])
def test_patch_combine_gathers_in_table_order(layout):
    rng = np.random.default_rng(0)
    table = rng.permuted(np.tile(np.arange(9), (5, 1)), axis=1)
    emb = rng.normal(size=(2 * 9, 4)).astype(np.float32)  # B=2 images, D=4
    labels = np.array([[3, 0, 4], [1, 1, 2]], np.int32)
    out = heads.PatchCombine(table=table, layout=layout)([emb, labels]).numpy()
    assert out.shape == (6, 36)
    per_image = emb.reshape(2, 9, 4)
    for b in range(2):
        for j in range(3):
            rows = per_image[b, table[labels[b, j]]]  # [k=9, D]
            expected = (
                rows.T.reshape(-1) if layout == "interleaved" else rows.reshape(-1)
            )
            np.testing.assert_array_equal(out[b * 3 + j], expected)


def test_patch_combine_validates_and_serializes():
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        heads.PatchCombine(table=[[0, 9]])
    with pytest.raises(ValueError, match="layout"):
        heads.PatchCombine(table=[[0, 1]], layout="mixed")
    layer = heads.PatchCombine(table=[[1, 4], [0, 4]], num_patches=9)
    clone = heads.PatchCombine.from_config(layer.get_config())
    assert clone.table == [[1, 4], [0, 4]] and clone.layout == "interleaved"


def _tiny_trunk(architecture, **kwargs):
    return functools.partial(
        factory.build_trunk,
        architecture,
        width=0.25,
        units=None if architecture == "vgg19" else (1, 1, 1, 1),
        num_classes=16,
        patch_variant=architecture != "vgg19",
        **kwargs,
    )


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
@pytest.mark.parametrize("task", ["jigsaw", "rel_patch_location"])
def test_patch_model_on_every_trunk(architecture, task):
    patch = (32, 32, 3)  # VGG19's five 2x2 pools need >= 32 px
    trunk_fn = _tiny_trunk(architecture)
    if task == "jigsaw":
        perms = permutations.get_permutations(100)
        model = pretext.build_jigsaw_model(
            patch, trunk_fn=trunk_fn, permutations=perms, hidden=32
        )
        labels = np.array([[0, 99, 5], [7, 7, 3]], np.int32)
        num_classes = 100
    else:
        model = pretext.build_rel_patch_model(patch, trunk_fn=trunk_fn, hidden=32)
        labels = np.tile(np.arange(8, dtype=np.int32), (2, 1))
        num_classes = 8
    images = np.random.default_rng(0).normal(size=(2, 9, *patch)).astype(np.float32)
    out = model({"image": images, "label": labels}, training=False)
    assert out["logits"].shape == (labels.size, num_classes)
    assert out["patch_embedding"].shape == (18, 16)
    assert out["pre_logits"].shape[0] == 18
    trunk = pretext.get_trunk(model)
    head = model.get_layer("patch_head")
    assert _trainable(model) == _trainable(trunk) + _trainable(head)
    assert head.input_shape[-1] == (2 if task != "jigsaw" else 9) * 16
    # The trunk sees each patch alone: its embedding of patch 4 of image 1.
    alone = trunk(images[1, 4][None], training=False)["logits"]
    np.testing.assert_allclose(out["patch_embedding"][13], alone[0], atol=1e-4)
    if task == "jigsaw":
        np.testing.assert_array_equal(pretext.get_table(model), perms)


def test_patch_model_trains_through_the_loop_with_labels_as_input():
    model = pretext.build_rel_patch_model(
        (8, 8, 1), trunk_fn=_tiny_trunk("resnet50_v1"), hidden=16
    )
    assert loop_lib.takes_labels(model)
    batch = {
        "image": tf.random.normal([3, 9, 8, 8, 1]),
        "label": tf.tile(tf.range(8)[None], [3, 1]),
    }
    spec = {k: tf.TensorSpec.from_tensor(v) for k, v in batch.items()}
    assert loop_lib.rows_per_example(spec) == 8
    loss, task_loss, grads, metrics = loop_lib.loss_and_gradients(
        model,
        losses.softmax_xent,
        batch,
        global_rows=24,
        metric_fn=losses.classification_metrics,
    )
    assert np.isfinite(float(loss)) and float(loss) > float(task_loss)
    # ~ln(8) at initialisation (small head init).
    assert abs(float(task_loss) - np.log(8)) < 0.3
    assert all(g is not None for g in grads)
    assert set(metrics) == {"accuracy", "top5_accuracy"}
    assert 0 <= float(metrics["accuracy"]) <= 24
    assert not loop_lib.takes_labels(pretext.get_trunk(model))


def test_get_trunk_of_a_plain_trunk_is_itself():
    trunk = _tiny_trunk("resnet50_v1")(input_shape=(8, 8, 1))
    assert pretext.get_trunk(trunk) is trunk and pretext.get_table(trunk) is None


def test_pretext_model_json_round_trip():
    model = pretext.build_rel_patch_model(
        (8, 8, 1), trunk_fn=_tiny_trunk("resnet50_v1"), hidden=16
    )
    clone = keras.Model.from_config(model.get_config())
    assert _trainable(clone) == _trainable(model)
    np.testing.assert_array_equal(pretext.get_table(clone), pretext.REL_PATCH_TABLE)
