"""Patch and pretext ops of issue 4 on hand-made images, eagerly and in tf.data."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import run_both

from revisit_tf.pp import get_preprocess_fn


def _coordinate_image(h, w, c=1):
    """Pixel value = y * w + x (float32), so a patch reveals its position."""
    img = np.arange(h * w, dtype=np.float32).reshape(h, w, 1)
    return np.repeat(img, c, axis=-1)


def _patch_origins(patches, w):
    """(top, left) of each patch from its top-left value; checks contiguity."""
    origins = []
    for p in patches:
        top, left = divmod(int(p[0, 0, 0]), w)
        ph, pw = p.shape[:2]
        expected = (top + np.arange(ph))[:, None] * w + (left + np.arange(pw))[None]
        np.testing.assert_array_equal(p[..., 0], expected)
        origins.append((top, left))
    return origins


@pytest.mark.parametrize("random", [True, False])
def test_crop_patches_positions_inside_cells(random):
    # 32x31 image, 3x3 grid: cells 10x10 (rows/cols beyond 30 dropped), jitter 3.
    img = _coordinate_image(32, 31)
    fn = get_preprocess_fn(f"crop_patches(3, 3, random={random})")
    for out in run_both(fn, {"image": img}):
        patches = out["image"]
        assert patches.shape == (9, 7, 7, 1)
        for k, (top, left) in enumerate(_patch_origins(patches, 31)):
            i, j = divmod(k, 3)  # row-major: 0 top-left, 4 centre, 8 bottom-right
            assert i * 10 <= top <= i * 10 + 3 and j * 10 <= left <= j * 10 + 3
            if not random:  # central offset (cell - patch) // 2 = 1
                assert (top - i * 10, left - j * 10) == (1, 1)


def test_crop_patches_jitter_covers_every_offset_independently():
    img = _coordinate_image(12, 12)  # cells 4x4, patches 2x2, offsets 0..2
    fn = get_preprocess_fn("crop_patches(3, 2)")
    ds = tf.data.Dataset.from_tensors({"image": img}).repeat(60).map(fn)
    offsets = []
    for out in ds:
        for k, (top, left) in enumerate(_patch_origins(out["image"].numpy(), 12)):
            i, j = divmod(k, 3)
            offsets.append((top - 4 * i, left - 4 * j))
    offsets = np.array(offsets)
    assert offsets.min() == 0 and offsets.max() == 2
    assert {tuple(o) for o in offsets} == {(a, b) for a in range(3) for b in range(3)}
    # Independent per patch: the 9 patches of one image rarely share an offset.
    per_image = offsets.reshape(60, 9, 2)
    assert np.mean([len({tuple(o) for o in im}) > 1 for im in per_image]) > 0.9


def test_crop_patches_without_jitter_tiles_the_image_and_handles_stacks():
    img = _coordinate_image(9, 9, c=3)
    fn = get_preprocess_fn("crop_patches(3)")
    out, _ = run_both(fn, {"image": np.stack([img, img + 100])})
    assert out["image"].shape == (2, 9, 3, 3, 3)
    np.testing.assert_array_equal(out["image"][0, 4], img[3:6, 3:6])
    np.testing.assert_array_equal(out["image"][1, 8], img[6:9, 6:9] + 100)


def test_crop_patches_errors():
    with pytest.raises(ValueError, match="jitter"):
        get_preprocess_fn("crop_patches(3, -1)")
    fn = get_preprocess_fn("crop_patches(3, 4)")
    with pytest.raises(ValueError, match="no patch"):
        fn({"image": tf.zeros([12, 12, 1])})
    dynamic = tf.data.Dataset.from_generator(
        lambda: iter([np.zeros((9, 9, 1), np.float32)]),
        output_signature=tf.TensorSpec([None, None, 1], tf.float32),
    )
    with pytest.raises(ValueError, match="static image size"):
        dynamic.map(lambda x: get_preprocess_fn("crop_patches(3)")({"image": x}))


def test_patches_standardized_per_patch():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (30, 30, 3)).astype(np.float32)
    img[:10] *= 0.1  # the top row of cells has a very different scale
    fn = get_preprocess_fn("crop_patches(3, 2)|standardize")
    for out in run_both(fn, {"image": img}):
        p = out["image"].reshape(9, -1)
        np.testing.assert_allclose(p.mean(1), 0, atol=1e-4)
        np.testing.assert_allclose(p.std(1), 1, atol=1e-3)


def test_gray_decision_per_image_before_the_grid_and_per_patch_after():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (18, 18, 3)).astype(np.uint8)
    n = 600

    def gray_flags(pipeline):
        ds = tf.data.Dataset.from_tensors({"image": img}).repeat(n)
        ds = ds.map(get_preprocess_fn(pipeline)).batch(n)
        patches = next(iter(ds))["image"].numpy()  # [n, 9, h, w, 3]
        return (patches.max(-1) == patches.min(-1)).all(axis=(-1, -2))  # [n, 9]

    per_image = gray_flags("to_gray(0.66)|crop_patches(3, 2)")
    assert (per_image.all(1) | ~per_image.any(1)).all()  # all 9 alike
    # Binomial(600, 0.66): std 0.019; 0.06 is > 3 std.
    assert abs(per_image[:, 0].mean() - 0.66) < 0.06
    per_patch = gray_flags("crop_patches(3, 2)|to_gray(0.66)")
    assert abs(per_patch.mean() - 0.66) < 0.03  # 5400 coins
    assert not (per_patch.all(1) | ~per_patch.any(1)).all()


def test_jigsaw_perms_per_example_and_per_batch():
    patches = np.zeros((9, 4, 4, 1), np.float32)
    fn = get_preprocess_fn("jigsaw_perms(100, 8)")
    for out in run_both(fn, {"image": patches}):
        labels = out["label"]
        assert labels.shape == (8,) and labels.dtype == np.int32
        assert (
            len(set(labels.tolist())) == 8 and 0 <= labels.min() <= labels.max() < 100
        )
        assert out["image"].shape == patches.shape  # patches stay in order
    batch = np.zeros((5, 9, 4, 4, 1), np.float32)
    for out in run_both(fn, {"image": batch}):
        assert out["label"].shape == (5, 8)
        assert (out["label"] == out["label"][0]).all()  # one subset per batch
    # Uniform over the set: every index is drawn over many draws.
    ds = tf.data.Dataset.from_tensors({"image": patches}).repeat(200).map(fn)
    seen = np.concatenate([x["label"].numpy() for x in ds])
    assert set(seen.tolist()) == set(range(100))
    everything = get_preprocess_fn("jigsaw_perms(10, 10)")({"image": patches})
    assert sorted(everything["label"].numpy().tolist()) == list(range(10))


def test_jigsaw_and_rel_patch_ops_reject_bad_input():
    with pytest.raises(ValueError, match="subset_size"):
        get_preprocess_fn("jigsaw_perms(8, 9)")
    with pytest.raises(ValueError, match=r"patches \[9, h, w, C\]"):
        get_preprocess_fn("jigsaw_perms")({"image": tf.zeros([4, 4, 3])})
    with pytest.raises(ValueError, match=r"patches \[9, h, w, C\]"):
        get_preprocess_fn("rel_patch_pairs")({"image": tf.zeros([4, 2, 2, 3])})


def test_rel_patch_pairs_labels():
    fn = get_preprocess_fn("rel_patch_pairs")
    for out in run_both(fn, {"image": np.zeros((9, 3, 3, 1), np.float32)}):
        assert out["label"].tolist() == list(range(8))
    out = fn({"image": tf.zeros([3, 9, 3, 3, 1])})
    assert out["label"].numpy().tolist() == [list(range(8))] * 3


def test_exemplar_copies_shapes_range_and_surrogate_labels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 30, 3)).astype(np.uint8)
    fn = get_preprocess_fn('exemplar_copies(8, 24)|keep("image", "label")')
    for out in run_both(fn, {"image": img, "label": np.int64(3)}):
        assert out["image"].shape == (8, 24, 24, 3)
        assert out["image"].min() >= -1 and out["image"].max() <= 1
        assert len(set(out["label"].tolist())) == 1  # one id per source image
        # Independent augmentations: the copies differ.
        assert len({c.tobytes() for c in out["image"]}) == 8
    ds = tf.data.Dataset.from_tensors({"image": img}).repeat(20).map(fn)
    ids = [int(x["label"][0]) for x in ds]
    assert len(set(ids)) == 20  # distinct surrogate classes


def test_exemplar_gray_decision_is_shared_by_the_copies():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)
    fn = get_preprocess_fn("to_gray(0.66)|exemplar_copies(4, 8)|standardize")
    n = 300
    ds = tf.data.Dataset.from_tensors({"image": img}).repeat(n).map(fn).batch(n)
    copies = next(iter(ds))["image"].numpy()  # [n, 4, 8, 8, 3]
    gray = np.isclose(copies.max(-1), copies.min(-1), atol=1e-5).all(axis=(-1, -2))
    assert (gray.all(1) | ~gray.any(1)).all()
    assert abs(gray[:, 0].mean() - 0.66) < 0.085  # binomial std 0.027
    flat = copies.reshape(n * 4, -1)
    np.testing.assert_allclose(flat.mean(1), 0, atol=1e-4)
    np.testing.assert_allclose(flat.std(1), 1, atol=1e-3)


def test_inception_preprocess_eval_is_the_central_crop():
    img = (np.arange(16 * 16 * 3) % 251).reshape(16, 16, 3).astype(np.uint8)
    fn = get_preprocess_fn("inception_preprocess(14, train=False)")
    # offset int((16 - 0.875 * 16) / 2) = 1; a 14x14 crop resized to 14x14.
    expected = (img[1:15, 1:15].astype(np.float32) / 255 - 0.5) * 2
    for out in run_both(fn, {"image": img}):
        np.testing.assert_allclose(out["image"], expected, atol=1e-6)


def test_inception_preprocess_train_range_shape_and_randomness():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (50, 40, 3)).astype(np.uint8)
    fn = get_preprocess_fn("inception_preprocess(32)")
    eager, in_ds = run_both(fn, {"image": img})
    for out in (eager, in_ds):
        assert out["image"].shape == (32, 32, 3)
        assert out["image"].min() >= -1 and out["image"].max() <= 1
    assert not np.allclose(eager["image"], in_ds["image"])


def test_color_distort_brightness_shift_and_gray_saturation():
    img = np.full((4, 4, 3), 0.5, np.float32)
    img[..., 0] = 0.4
    fn = get_preprocess_fn("color_distort(0.1, (1.0, 1.0))")
    deltas = []
    for _ in range(30):
        out = fn({"image": img})["image"].numpy()
        shift = out - img
        np.testing.assert_allclose(shift, shift[0, 0, 0], atol=1e-6)  # one delta
        deltas.append(shift[0, 0, 0])
    assert max(np.abs(deltas)) <= 0.1 + 1e-6 and np.std(deltas) > 0.01
    gray = np.full((4, 4, 3), 0.3, np.float32)
    out = get_preprocess_fn("color_distort(0.0)")({"image": gray})["image"]
    np.testing.assert_allclose(out, gray, atol=1e-6)  # saturation: no-op on gray
    with pytest.raises(ValueError, match="saturation"):
        get_preprocess_fn("color_distort(0.1, (2, 1))")
