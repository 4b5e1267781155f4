"""Pretext batches built on the device equal those built on the host (pp.device).

The same seeded training stream (``data.make_train_dataset``) is built twice:
the whole pipeline in tf.data, and the host part in tf.data with the batch
part applied to each batch afterwards, as the training step does. Their
batches must be bit-identical (plain graph) and equal to float rounding when
the batch part is XLA-compiled; a whole ``pretrain`` run gives the same
losses either way.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf

import gin
from revisit_tf import cli, configurables
from revisit_tf.data.pipeline import make_train_dataset
from revisit_tf.pp import device, get_preprocess_fn, groups, rng

BATCH = 8


def _source(n=40, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), np.uint8)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(n)})


def _streams(pp, batch_pp="", *, ghost=None, seed=3, start_step=0):
    """(host-built batches, host-part batches, batch part) of one stream."""
    batch_fn = get_preprocess_fn(batch_pp) if batch_pp else None
    if batch_fn is not None:
        batch_fn = groups.per_group(batch_fn, ghost)
    common = dict(global_batch_size=BATCH, seed=seed, shuffle_buffer=10)
    common["start_step"] = start_step
    host = make_train_dataset(
        _source(), get_preprocess_fn(pp), batch_preprocess_fn=batch_fn, **common
    )
    parts = device.split(pp)
    split = make_train_dataset(
        _source(),
        device.host_example_fn(parts),
        batch_preprocess_fn=device.host_batch_fn,
        **common,
    )
    return host, split, device.device_batch_fn(parts, batch_fn)


def _first(ds, n=3):
    it = iter(ds)
    return [next(it) for _ in range(n)]


PATCHES = 'random_crop(36)|crop_patches(3, {})|standardize|keep("image")'
CASES = {
    "rotation": (
        'random_crop(32)|flip_lr|rotate4|value_range(-1, 1)|keep("image", "label")',
        "",
        None,
    ),
    "jigsaw": (PATCHES.format(3), "jigsaw_perms(10, 4)", None),
    "jigsaw_ghost": (PATCHES.format(3), "jigsaw_perms(10, 4)", 36),
    "rel_patch_location": (PATCHES.format(4), "rel_patch_pairs", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_device_built_batches_equal_host_built_ones(case):
    pp, batch_pp, ghost = CASES[case]
    host, split, device_fn = _streams(pp, batch_pp, ghost=ghost, start_step=2)
    graph = tf.function(device_fn)
    xla = tf.function(device_fn, jit_compile=True)
    host_batches, split_batches = _first(host), _first(split)
    # The host part sends the un-multiplied image (4x / 9-patch work is left).
    assert split_batches[0]["image"].shape[0] == BATCH
    assert split_batches[0]["image"].shape.rank == 4
    for expected, raw in zip(host_batches, split_batches, strict=True):
        for fn in (device_fn, graph, xla):
            got = fn(raw)
            assert sorted(got) == sorted(expected)
            for key in expected:
                want, have = expected[key].numpy(), got[key].numpy()
                assert have.dtype == want.dtype and have.shape == want.shape
                if fn is xla and want.dtype.kind == "f":
                    # XLA fuses value_range / standardize arithmetic.
                    np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6)
                else:
                    np.testing.assert_array_equal(have, want)
    # The patches really are jittered differently per image and batch (the
    # equality is not one of constant crops).
    if "crop_patches" in pp:
        a, b = host_batches[0]["image"].numpy(), host_batches[1]["image"].numpy()
        assert not np.array_equal(a, b)


def test_ghost_groups_draw_one_permutation_subset_each_on_the_device():
    pp, batch_pp, ghost = CASES["jigsaw_ghost"]
    _, split, device_fn = _streams(pp, batch_pp, ghost=ghost)
    labels = device_fn(_first(split, 1)[0])["label"].numpy()  # [8, 4]
    groups_of_images = ghost // 9  # 4 images per group
    first, second = labels[:groups_of_images], labels[groups_of_images:]
    assert (first == first[0]).all() and (second == second[0]).all()
    assert not np.array_equal(first[0], second[0])


def test_split_cuts_at_the_first_batch_pretext_op_and_names_what_cannot_move():
    parts = device.split(
        'decode|inception_preprocess(224)|rotate4|keep("image", "label")'
    )
    assert parts.host == "decode|inception_preprocess(224)"
    assert parts.device == 'rotate4|keep("image", "label")'
    assert parts.keep == ("image", "label")
    with pytest.raises(ValueError, match="none of the batch pretext ops"):
        device.split('decode|copies(8, "inception_preprocess(224)")|keep("image")')
    with pytest.raises(ValueError, match="'flip_lr' comes after 'rotate4'"):
        device.split("rotate4|flip_lr")
    # A per-row permutation is not a batch draw: a clear error, not wrong data.
    rows = rng.seeded_rows(tf.zeros([2], tf.int32), tf.zeros([2], tf.int32))
    with rows, pytest.raises(ValueError, match="permutation inside seeded_rows"):
        rng.permutation(4)
    # Float draws would differ under XLA: refused in the batch part.
    rows = rng.seeded_rows(tf.zeros([2], tf.int32), tf.zeros([2], tf.int32))
    with rows, pytest.raises(ValueError, match="float32 draw in the batch part"):
        rng.uniform([2, 3])


def test_unseeded_stream_still_builds_batches_on_the_device():
    pp = 'random_crop(36)|crop_patches(3, 3)|keep("image")'
    parts = device.split(pp)
    ds = make_train_dataset(
        _source(), device.host_example_fn(parts), global_batch_size=BATCH
    )
    out = device.device_batch_fn(parts)(_first(ds, 1)[0])
    assert sorted(out) == ["image"] and out["image"].shape == (BATCH, 9, 9, 9, 3)


def test_pretrain_trains_alike_with_the_pretext_on_device(tmp_path, caplog):
    """Two steps of the Jigsaw demo: same losses and weights either way."""
    results = {}
    for on_device in (False, True):
        cli.parse_gin(
            ["demo/fashion_mnist_jigsaw.gin", "smoke.gin"],
            [
                "pretrain.steps = 2",
                "pretrain.checkpoint_every = 2",
                "pretrain.seed = 5",
                f"pretrain.pretext_on_device = {on_device}",
            ],
        )
        assert gin.query_parameter("pretrain.pretext_on_device") is on_device
        workdir = str(tmp_path / str(on_device))
        caplog.clear()
        with caplog.at_level(logging.INFO):
            metrics = configurables.pretrain(workdir=workdir)
        assert ("Pretext on the device" in caplog.text) is on_device
        reader = tf.train.load_checkpoint(f"{workdir}/checkpoints")
        tensors = {
            k: reader.get_tensor(k)
            for k in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in k
        }
        results[on_device] = (metrics, tensors)
    (m1, w1), (m2, w2) = results[False], results[True]
    assert m1["step"] == m2["step"] == 2
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["accuracy"], m1["accuracy"])
    assert sorted(w1) == sorted(w2)
    floats = [k for k in w1 if np.asarray(w1[k]).dtype.kind == "f"]
    assert len(floats) > 20  # the trunk's and head's variables, moments
    for key in floats:
        np.testing.assert_allclose(w2[key], w1[key], rtol=1e-5, atol=1e-7, err_msg=key)
