"""Pretext heads and the assembler: parameter counts, gathering, all trunks."""

import functools
import json

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
    kwargs.setdefault("num_classes", 16)
    kwargs.setdefault("patch_variant", architecture != "vgg19")
    return functools.partial(
        factory.build_trunk,
        architecture,
        width=0.25,
        units=None if architecture == "vgg19" else (1, 1, 1, 1),
        **kwargs,
    )


def _patch_spec(patch, num_labels):
    return {
        "image": tf.TensorSpec([9, *patch]),
        "label": tf.TensorSpec([num_labels], tf.int32),
    }


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
@pytest.mark.parametrize("task", ["jigsaw", "rel_patch_location"])
def test_patch_model_on_every_trunk(architecture, task):
    patch = (32, 32, 3)  # VGG19's five 2x2 pools need >= 32 px
    trunk_fn = _tiny_trunk(architecture)
    if task == "jigsaw":
        perms = permutations.get_permutations(100)
        head_fn = functools.partial(heads.jigsaw_head, permutations=perms, hidden=32)
        labels = np.array([[0, 99, 5], [7, 7, 3]], np.int32)
        num_classes = 100
    else:
        head_fn = functools.partial(heads.rel_patch_head, hidden=32)
        labels = np.tile(np.arange(8, dtype=np.int32), (2, 1))
        num_classes = 8
    model = pretext.build_pretext_model(
        _patch_spec(patch, labels.shape[1]), trunk_fn=trunk_fn, head_fn=head_fn
    )
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
    files = pretext.workdir_files(model)
    if task == "jigsaw":
        assert sorted(files) == ["permutations.bin", "permutations.json"]
        table = np.frombuffer(files["permutations.bin"], "<i4")
        assert list(table[:2]) == [100, 9]
        np.testing.assert_array_equal(table[2:].reshape(100, 9) - 1, perms)
        info = json.loads(files["permutations.json"])
        assert info["num_permutations"] == 100 and info["min_hamming"] >= 2
    else:
        assert files == {}


def test_patch_model_trains_through_the_loop_with_labels_as_input():
    model = pretext.build_pretext_model(
        _patch_spec((8, 8, 1), 8),
        trunk_fn=_tiny_trunk("resnet50_v1"),
        head_fn=functools.partial(heads.rel_patch_head, hidden=16),
    )
    batch = {
        "image": tf.random.normal([3, 9, 8, 8, 1]),
        "label": tf.tile(tf.range(8)[None], [3, 1]),
    }
    loss, task_loss, grads, metrics = loop_lib.loss_and_gradients(
        model,
        losses.softmax_xent,
        batch,
        global_batch_size=3,
        metric_fn=losses.classification_metrics,
    )
    assert np.isfinite(float(loss)) and float(loss) > float(task_loss)
    # ~ln(8) at initialisation (small head init).
    assert abs(float(task_loss) - np.log(8)) < 0.3
    assert all(g is not None for g in grads)
    assert set(metrics) == {"accuracy", "top5_accuracy"}
    assert 0 <= float(metrics["accuracy"]) <= 3  # a sum of per-example fractions


def test_assembler_flattens_views_and_nests_the_trunk():
    """[B, K, H, W, C] -> [B * K, ...] image-major, trunk under its fixed name."""
    model = pretext.build_pretext_model(
        {"image": tf.TensorSpec([4, 8, 8, 1]), "label": tf.TensorSpec([4], tf.int32)},
        trunk_fn=_tiny_trunk("resnet50_v1", num_classes=4, patch_variant=False),
        name="rotation",
    )
    assert model.name == "rotation" and sorted(model.input) == ["image", "label"]
    trunk = pretext.get_trunk(model)
    assert trunk.name == pretext.TRUNK_NAME
    images = np.random.default_rng(1).normal(size=(2, 4, 8, 8, 1)).astype(np.float32)
    out = model({"image": images, "label": np.zeros([2, 4], np.int32)})
    assert out["logits"].shape == (8, 4)
    alone = trunk(images[1, 2][None])["logits"]  # view 2 of image 1 is row 6
    np.testing.assert_allclose(out["logits"][6], alone[0], atol=1e-5)


def test_assembler_errors_are_clear():
    with pytest.raises(ValueError, match="'image'"):
        pretext.build_pretext_model(
            {"label": tf.TensorSpec([4], tf.int32)}, trunk_fn=_tiny_trunk("vgg19")
        )
    with pytest.raises(ValueError, match="no 'logits' output"):
        pretext.build_pretext_model(
            {"image": tf.TensorSpec([8, 8, 1])},
            trunk_fn=_tiny_trunk("resnet50_v1", num_classes=None),
        )
    with pytest.raises(ValueError, match="label"):  # a patch head needs its labels
        pretext.build_pretext_model(
            {"image": tf.TensorSpec([9, 8, 8, 1])},
            trunk_fn=_tiny_trunk("resnet50_v1"),
            head_fn=heads.rel_patch_head,
        )
    trunk = _tiny_trunk("resnet50_v1")(input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="no nested trunk"):
        pretext.get_trunk(trunk)


def test_projection_head_shapes_parameters_and_float32_output():
    spec = {"image": tf.TensorSpec([2, 8, 8, 3])}
    model = pretext.build_pretext_model(
        spec,
        trunk_fn=_tiny_trunk("resnet50_v1", num_classes=None, patch_variant=False),
        head_fn=functools.partial(heads.projection_head, output_dim=12),
    )
    d = model.output["pre_logits"].shape[-1]
    out = model({"image": tf.random.normal([3, 2, 8, 8, 3])})
    assert out["logits"].shape == (6, 12) and out["logits"].dtype == tf.float32
    head = _trainable(model) - _trainable(pretext.get_trunk(model))
    # Dense D->D without bias (BN follows), BN scale+offset, Dense D->12.
    assert head == d * d + 2 * d + d * 12 + 12


# 28 px: block4 is 1x1 (strides 2, 2, 2, 2, 2 with ceil), 5 stages to 32 px,
# then a resize to 28; 32 px: block2 is 4x4, 3 stages to exactly 32 px.
@pytest.mark.parametrize(
    "image, endpoint, stages, resized",
    [((28, 28, 1), "block4", 5, True), ((32, 32, 3), "block2", 3, False)],
)
def test_inpainting_decoder_reaches_the_image_size(image, endpoint, stages, resized):
    model = pretext.build_pretext_model(
        {"image": tf.TensorSpec(image), "mask": tf.TensorSpec([*image[:2], 1])},
        trunk_fn=_tiny_trunk("resnet50_v1", num_classes=None, patch_variant=False),
        head_fn=functools.partial(heads.inpainting_decoder, endpoint=endpoint),
    )
    ups = [layer for layer in model.layers if layer.name.startswith("decoder_up")]
    assert len([u for u in ups if u.name.endswith(tuple("0123456789"))]) == stages
    names = [layer.name for layer in model.layers]
    assert ("decoder_resize" in names) == resized
    out = model({"image": tf.zeros([2, *image]), "mask": tf.zeros([2, *image[:2], 1])})
    assert out["logits"].shape == (2, *image)
    with pytest.raises(ValueError, match="up-sampling stages"):
        pretext.build_pretext_model(
            {"image": tf.TensorSpec(image)},
            trunk_fn=_tiny_trunk("resnet50_v1", num_classes=None, patch_variant=False),
            head_fn=functools.partial(
                heads.inpainting_decoder, endpoint=endpoint, filters=(8,)
            ),
        )


def test_pretext_model_json_round_trip():
    model = pretext.build_pretext_model(
        _patch_spec((8, 8, 1), 8),
        trunk_fn=_tiny_trunk("resnet50_v1"),
        head_fn=functools.partial(heads.rel_patch_head, hidden=16),
    )
    clone = keras.Model.from_config(model.get_config())
    assert _trainable(clone) == _trainable(model)
    combine = clone.get_layer("combine")
    np.testing.assert_array_equal(combine.table, heads.REL_PATCH_TABLE)
    assert pretext.get_trunk(clone).name == pretext.TRUNK_NAME
