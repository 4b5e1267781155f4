"""Tests of the pp ops (revisit_tf.pp.ops_image, revisit_tf.pp.ops_pretext).

Every op runs twice: eagerly on one example dict and inside
``tf.data.Dataset.from_tensors(...).map(fn)`` (big_vision's ``tfrun`` idea).
Deterministic ops are compared against values derived by hand or with numpy;
random ops are checked through invariants (membership in the set of allowed
outputs, both outcomes occurring, binomial rates).
"""

import itertools

import helpers
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.pp import get_preprocess_fn

pytestmark = pytest.mark.usefixtures("seeded")
run_both = helpers.run_pipeline  # pipeline string, eagerly and in tf.data


def dataset_spec(pipeline, data):
    """Element spec after mapping `pipeline` over a one-element dataset."""
    fn = get_preprocess_fn(pipeline, log_data=False)
    return tf.data.Dataset.from_tensors(data).map(fn).element_spec


def run_dynamic(pipeline, image, key="image"):
    """Runs `pipeline` in a tf.function whose input has unknown H and W."""
    fn = get_preprocess_fn(pipeline, log_data=False)
    spec = tf.TensorSpec([None] * (image.ndim - 1) + [image.shape[-1]], image.dtype)

    @tf.function(input_signature=[spec])
    def _run(x):
        return fn({key: x})

    return {k: np.asarray(v) for k, v in _run(tf.constant(image)).items()}


def distinct_image(h, w, c=3, dtype=np.uint8):
    """[h, w, c] image whose values are all distinct."""
    return np.arange(h * w * c).reshape(h, w, c).astype(dtype)


def windows(image, h, w):
    """All h x w sub-windows of a [H, W, C] numpy image."""
    big_h, big_w = image.shape[:2]
    return [
        image[i : i + h, j : j + w]
        for i, j in itertools.product(range(big_h - h + 1), range(big_w - w + 1))
    ]


def is_window(crop, image):
    return any(np.array_equal(crop, win) for win in windows(image, *crop.shape[:2]))


# --------------------------------------------------------------------------- #
# decode
# --------------------------------------------------------------------------- #


def test_decode_png_round_trip_and_static_channels():
    image = distinct_image(3, 4)
    encoded = tf.io.encode_png(image).numpy()
    for out in run_both("decode", {"image": encoded}):
        assert out["image"].dtype == np.uint8
        np.testing.assert_array_equal(out["image"], image)
    spec = dataset_spec("decode(channels=1)", {"image": encoded})
    assert spec["image"].shape.as_list() == [None, None, 1]


def test_decode_passes_uint8_through_unchanged():
    image = distinct_image(2, 3)
    for out in run_both("decode", {"image": image, "label": 7}):
        assert out["image"].dtype == np.uint8
        np.testing.assert_array_equal(out["image"], image)
        assert out["label"] == 7


def test_decode_rejects_float_input_and_bad_channels():
    with pytest.raises(ValueError, match="float32"):
        get_preprocess_fn("decode")({"image": tf.zeros([2, 2, 3])})
    with pytest.raises(ValueError, match="channels"):
        get_preprocess_fn("decode(channels=2)")


# --------------------------------------------------------------------------- #
# resize
# --------------------------------------------------------------------------- #


def bilinear_matrix(n_in, n_out, half_pixel):
    """[n_out, n_in] 1-D bilinear interpolation weights (textbook definition).

    half_pixel: output pixel i samples input coordinate (i + .5) n_in / n_out - .5
    (TF2); otherwise i n_in / n_out (TF1, align_corners=False). Coordinates are
    clamped to the image border.
    """
    weights = np.zeros([n_out, n_in])
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5 if half_pixel else i * n_in / n_out
        lo = int(np.floor(src))
        frac = src - lo
        for idx, wgt in ((lo, 1 - frac), (lo + 1, frac)):
            weights[i, min(max(idx, 0), n_in - 1)] += wgt
    return weights


def test_resize_2x2_to_4x4_hand_computed_modern_and_legacy():
    # 1-D, [a, b] -> 4 pixels.
    # TF2 half-pixel: sample points -0.25, 0.25, 0.75, 1.25 (clamped)
    #   -> [a, .75a + .25b, .25a + .75b, b].
    # TF1 legacy: sample points 0, 0.5, 1, 1.5 (clamped) -> [a, (a+b)/2, b, b].
    modern_1d = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    legacy_1d = np.array([[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    x = np.array([[1.0, 5.0], [3.0, 11.0]])
    image = x[..., None].astype(np.uint8)
    modern, legacy = modern_1d @ x @ modern_1d.T, legacy_1d @ x @ legacy_1d.T
    for out in run_both("resize(4)", {"image": image}):
        assert out["image"].dtype == np.float32
        np.testing.assert_allclose(out["image"][..., 0], modern, atol=1e-5)
    for out in run_both("resize(4, legacy=True)", {"image": image}):
        np.testing.assert_allclose(out["image"][..., 0], legacy, atol=1e-5)
    # The legacy grid is shifted: last row/column duplicated, not interpolated.
    assert not np.allclose(modern, legacy)


@pytest.mark.parametrize("legacy", [False, True])
def test_resize_matches_separable_bilinear_on_non_square(legacy):
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 5, 2)).astype(np.float32)
    wy = bilinear_matrix(3, 4, half_pixel=not legacy)
    wx = bilinear_matrix(5, 7, half_pixel=not legacy)
    expected = np.einsum("ip,pqc,jq->ijc", wy, x, wx)
    for out in run_both(f"resize((4, 7), legacy={legacy})", {"image": x}):
        assert out["image"].shape == (4, 7, 2)
        np.testing.assert_allclose(out["image"], expected, rtol=1e-5, atol=1e-3)


def test_resize_to_same_size_is_identity_and_keeps_value_range():
    image = distinct_image(3, 3) * 3  # values 0..78, uint8
    for method in ("bilinear", "nearest", "bicubic", "area"):
        for out in run_both(f"resize((3, 3), method={method!r})", {"image": image}):
            assert out["image"].dtype == np.float32
            np.testing.assert_allclose(out["image"], image, atol=1e-4)


def test_resize_stack_resizes_each_element_and_sets_static_shape():
    stack = np.stack([np.full([2, 2, 1], 10), np.full([2, 2, 1], 200)]).astype(np.uint8)
    for out in run_both("resize((3, 5))", {"image": stack}):
        assert out["image"].shape == (2, 3, 5, 1)
        np.testing.assert_allclose(out["image"][0], 10)
        np.testing.assert_allclose(out["image"][1], 200)
    assert dataset_spec("resize(6)", {"image": stack})["image"].shape == [2, 6, 6, 1]


@pytest.mark.parametrize(
    "pipeline",
    ["resize(-3)", "resize(0)", "resize((2, 3, 4))", "resize(2.5)", "resize(True)"],
)
def test_resize_rejects_bad_size(pipeline):
    with pytest.raises(ValueError, match="size"):
        get_preprocess_fn(pipeline)


def test_resize_rejects_unknown_method_and_legacy_lanczos():
    with pytest.raises(ValueError, match="method"):
        get_preprocess_fn("resize(4, method='cubic')")
    with pytest.raises(ValueError, match="legacy"):
        get_preprocess_fn("resize(4, method='lanczos3', legacy=True)")


# --------------------------------------------------------------------------- #
# resize_small
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "hw, size, expected",
    [
        ((4, 6), 3, (3, 4)),  # 6 * 3 / 4 = 4.5 -> 4 (round half to even)
        ((6, 4), 3, (4, 3)),
        ((3, 5), 2, (2, 3)),  # 3.33 -> 3
        ((3, 7), 2, (2, 5)),  # 4.67 -> 5
        ((5, 5), 8, (8, 8)),  # upscaling
        ((10, 14), 4, (4, 6)),  # 5.6 -> 6
    ],
)
def test_resize_small_output_size(hw, size, expected):
    image = np.full([*hw, 3], 200, np.uint8)
    pipeline = f"resize_small({size})"
    for out in run_both(pipeline, {"image": image}):
        assert out["image"].shape == (*expected, 3)
        assert out["image"].dtype == np.float32
        np.testing.assert_allclose(out["image"], 200, atol=1e-3)  # range kept
    # Unknown static shape goes through the tensor path: same size.
    assert run_dynamic(pipeline, image)["image"].shape == (*expected, 3)
    # Known static shape gives a static output shape.
    assert dataset_spec(pipeline, {"image": image})["image"].shape == [*expected, 3]


def test_resize_small_area_averages_blocks():
    # 2x4 -> shorter side 1 -> 1x2; area resize averages 2x2 blocks.
    x = np.array([[0, 2, 10, 20], [4, 6, 30, 40]], np.uint8)[..., None]
    for out in run_both("resize_small(1)", {"image": x}):
        np.testing.assert_allclose(out["image"][..., 0], [[3.0, 25.0]], atol=1e-4)


def test_resize_small_rejects_bad_size():
    with pytest.raises(ValueError, match="size"):
        get_preprocess_fn("resize_small(-1)")
    with pytest.raises(ValueError, match="size"):
        get_preprocess_fn("resize_small((2, 2))")


# --------------------------------------------------------------------------- #
# central_crop
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "hw, size, offset",
    [
        ((3, 5), (1, 3), (1, 1)),
        ((4, 5), (1, 2), (1, 1)),  # (4-1)//2 = 1, (5-2)//2 = 1
        ((5, 6), 2, (1, 2)),
        ((3, 3), 3, (0, 0)),
    ],
)
def test_central_crop_offsets(hw, size, offset):
    image = distinct_image(*hw)
    h, w = (size, size) if isinstance(size, int) else size
    expected = image[offset[0] : offset[0] + h, offset[1] : offset[1] + w]
    for out in run_both(f"central_crop({size})", {"image": image}):
        np.testing.assert_array_equal(out["image"], expected)
        assert out["image"].dtype == np.uint8
    np.testing.assert_array_equal(
        run_dynamic(f"central_crop({size})", image)["image"], expected
    )


def test_central_crop_stack_crops_every_element():
    stack = np.stack([distinct_image(4, 4), distinct_image(4, 4) + 100])
    for out in run_both("central_crop(2)", {"image": stack}):
        np.testing.assert_array_equal(out["image"], stack[:, 1:3, 1:3])
    assert dataset_spec("central_crop(2)", {"image": stack})["image"].shape == [
        2,
        2,
        2,
        3,
    ]


def test_central_crop_too_small_fails_statically_and_at_run_time():
    image = distinct_image(2, 5)
    with pytest.raises(ValueError, match="smaller than the crop"):
        get_preprocess_fn("central_crop(3)")({"image": image})
    with pytest.raises(tf.errors.InvalidArgumentError, match="central_crop"):
        run_dynamic("central_crop(3)", image)


# --------------------------------------------------------------------------- #
# random_crop
# --------------------------------------------------------------------------- #


def test_random_crop_is_a_window_and_every_window_occurs():
    image = distinct_image(4, 5)
    for out in run_both("random_crop((2, 3))", {"image": image}):
        assert out["image"].shape == (2, 3, 3)
        assert is_window(out["image"], image)
    assert is_window(run_dynamic("random_crop((2, 3))", image)["image"], image)
    spec = dataset_spec("random_crop((2, 3))", {"image": image})
    assert spec["image"].shape == [2, 3, 3]
    # A stack of 200 copies: one independent uniform offset per element, so
    # each of the 3 x 3 windows occurs (miss probability < 9 * (8/9)^200).
    stack = np.repeat(image[None], 200, axis=0)
    for out in run_both("random_crop((2, 3))", {"image": stack}):
        assert out["image"].shape == (200, 2, 3, 3)
        seen = {
            next(
                k
                for k, win in enumerate(windows(image, 2, 3))
                if np.array_equal(win, crop)
            )
            for crop in out["image"]
        }
        assert seen == set(range(9))


def test_random_crop_too_small_fails():
    with pytest.raises(ValueError, match="smaller than the crop"):
        get_preprocess_fn("random_crop(4)")({"image": distinct_image(3, 5)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="random_crop"):
        run_dynamic("random_crop(4)", distinct_image(3, 5))


# --------------------------------------------------------------------------- #
# inception_crop
# --------------------------------------------------------------------------- #


def test_inception_crop_without_resize_is_a_large_enough_window():
    image = distinct_image(8, 10, c=1, dtype=np.int32)
    for _ in range(5):
        for out in run_both("inception_crop", {"image": image}):
            crop = out["image"]
            assert crop.dtype == np.int32 and crop.shape[-1] == 1
            assert is_window(crop, image)
            # Covers >= min_object_covered = 10% of the image (reference 3.2).
            assert crop.shape[0] * crop.shape[1] >= 0.1 * 8 * 10


def test_inception_crop_with_size_resizes_and_crops_stack_elements():
    image = distinct_image(8, 10)
    for out in run_both("inception_crop(4)", {"image": image}):
        assert out["image"].shape == (4, 4, 3)
        assert out["image"].dtype == np.float32
        assert out["image"].min() >= 0 and out["image"].max() <= image.max()
    stack = np.stack([np.full([8, 10, 3], 7), np.full([8, 10, 3], 99)]).astype(np.uint8)
    for out in run_both("inception_crop((3, 5))", {"image": stack}):
        assert out["image"].shape == (2, 3, 5, 3)
        np.testing.assert_allclose(out["image"][0], 7, atol=1e-4)
        np.testing.assert_allclose(out["image"][1], 99, atol=1e-4)


def test_inception_crop_full_area_is_whole_image():
    # area_min = 1 forces the whole image (or the fallback, also whole image).
    image = distinct_image(5, 6)
    for out in run_both("inception_crop(area_min=1.0)", {"image": image}):
        np.testing.assert_array_equal(out["image"], image)


def test_inception_crop_argument_errors():
    with pytest.raises(ValueError, match="area_min"):
        get_preprocess_fn("inception_crop(area_min=0.5, area_max=0.2)")
    with pytest.raises(ValueError, match="aspect_ratio_range"):
        get_preprocess_fn("inception_crop(aspect_ratio_range=(2, 1))")
    with pytest.raises(ValueError, match="max_attempts"):
        get_preprocess_fn("inception_crop(max_attempts=0)")
    with pytest.raises(ValueError, match="needs `size`"):
        get_preprocess_fn("inception_crop")({"image": np.zeros([2, 4, 4, 3])})


# --------------------------------------------------------------------------- #
# flip_lr
# --------------------------------------------------------------------------- #


def test_flip_lr_gives_image_or_mirror_and_both_occur_per_element():
    image = distinct_image(2, 3)
    mirror = image[:, ::-1]
    for out in run_both("flip_lr", {"image": image}):
        assert np.array_equal(out["image"], image) or np.array_equal(
            out["image"], mirror
        )
    stack = np.repeat(image[None], 64, axis=0)
    for out in run_both("flip_lr", {"image": stack}):
        flipped = [np.array_equal(e, mirror) for e in out["image"]]
        kept = [np.array_equal(e, image) for e in out["image"]]
        assert all(f or k for f, k in zip(flipped, kept, strict=True))
        assert any(flipped) and any(kept)  # fails with probability 2 * 2^-64


# --------------------------------------------------------------------------- #
# to_gray
# --------------------------------------------------------------------------- #


def test_to_gray_uint8_integer_mean_and_float_exact_mean():
    pixels = np.array([[[1, 2, 2], [255, 255, 254]]], np.uint8)  # [1, 2, 3]
    expected_int = np.array([[1, 254]])  # 5/3 -> 1, 764/3 = 254.67 -> 254
    for out in run_both("to_gray", {"image": pixels}):
        assert out["image"].dtype == np.uint8 and out["image"].shape == (1, 2, 3)
        for c in range(3):
            np.testing.assert_array_equal(out["image"][..., c], expected_int)
    floats = pixels.astype(np.float32)
    for out in run_both("to_gray(1.0)", {"image": floats}):
        for c in range(3):
            np.testing.assert_allclose(
                out["image"][..., c], [[5 / 3, 764 / 3]], rtol=1e-6
            )


def test_to_gray_p0_identity_and_one_channel_unchanged():
    image = distinct_image(2, 2)
    for out in run_both("to_gray(0)", {"image": image}):
        np.testing.assert_array_equal(out["image"], image)
    one_channel = distinct_image(2, 3, c=1)
    for out in run_both("to_gray", {"image": one_channel}):
        np.testing.assert_array_equal(out["image"], one_channel)


def test_to_gray_rate_close_to_p_with_one_coin_per_element():
    # Every pixel has distinct channels, so "gray" <=> all channels equal.
    image = distinct_image(2, 2)
    stack = np.repeat(image[None], 400, axis=0)
    gray = np.repeat(image.mean(-1, keepdims=True).astype(np.uint8), 3, axis=-1)
    for p in (0.3, 1.0):
        for out in run_both(f"to_gray({p})", {"image": stack}):
            is_gray = np.array([np.array_equal(e, gray) for e in out["image"]])
            is_color = np.array([np.array_equal(e, image) for e in out["image"]])
            assert np.all(is_gray ^ is_color)  # whole element one or the other
            sigma = np.sqrt(400 * p * (1 - p))
            assert abs(is_gray.sum() - 400 * p) <= 5 * sigma  # 5 sigma (binomial)


def test_to_gray_rejects_bad_probability():
    for bad in ("to_gray(1.5)", "to_gray(-0.1)", "to_gray('x')"):
        with pytest.raises(ValueError, match="probability"):
            get_preprocess_fn(bad)


# --------------------------------------------------------------------------- #
# value_range
# --------------------------------------------------------------------------- #


def test_value_range_endpoints_and_custom_ranges():
    x = np.array([[[0], [255], [51]]], np.uint8)
    for out in run_both("value_range", {"image": x}):
        assert out["image"].dtype == np.float32
        np.testing.assert_allclose(out["image"].ravel(), [-1, 1, -0.6], atol=1e-6)
    for out in run_both("value_range(0, 1)", {"image": x}):
        np.testing.assert_allclose(out["image"].ravel(), [0, 1, 0.2], atol=1e-6)
    y = np.array([-1.0, 0.0, 1.0, 3.0], np.float32)
    pipeline = "value_range(0, 10, in_min=-1, in_max=1)"
    for out in run_both(pipeline, {"image": y}):
        np.testing.assert_allclose(out["image"], [0, 5, 10, 20], atol=1e-5)
    for out in run_both(pipeline[:-1] + ", clip_values=True)", {"image": y}):
        np.testing.assert_allclose(out["image"], [0, 5, 10, 10], atol=1e-5)


def test_value_range_rejects_degenerate_input_range():
    with pytest.raises(ValueError, match="in_min != in_max"):
        get_preprocess_fn("value_range(in_min=3, in_max=3)")


# --------------------------------------------------------------------------- #
# standardize
# --------------------------------------------------------------------------- #


def test_standardize_statistics_and_formula():
    x = np.random.default_rng(1).uniform(0, 255, size=(3, 4, 3)).astype(np.float32)
    expected = (x - x.mean()) / x.std()
    for out in run_both("standardize", {"image": x.astype(np.uint8)}):
        assert out["image"].dtype == np.float32
        assert abs(out["image"].mean()) < 1e-5
        assert abs(out["image"].std() - 1) < 1e-4
    for out in run_both("standardize", {"image": x}):
        np.testing.assert_allclose(out["image"], expected, rtol=1e-4, atol=1e-4)


def test_standardize_floor_on_constant_and_low_variance_images():
    constant = np.full([2, 3, 2], 9, np.uint8)  # n = 12
    for out in run_both("standardize", {"image": constant}):
        np.testing.assert_array_equal(out["image"], 0)
    # std = sqrt(2 * 0.01^2 / 12) ~ 0.004 < 1/sqrt(12): divided by the floor.
    tiny = np.full([2, 3, 2], 5.0, np.float32)
    tiny[0, 0, 0], tiny[0, 0, 1] = 5.01, 4.99
    expected = (tiny - tiny.mean()) * np.sqrt(12)
    for out in run_both("standardize", {"image": tiny}):
        np.testing.assert_allclose(out["image"], expected, atol=1e-4)


def test_standardize_stack_uses_per_element_statistics():
    rng = np.random.default_rng(2)
    stack = np.stack(
        [rng.normal(0, 1, [3, 3, 3]), rng.normal(100, 30, [3, 3, 3])]
    ).astype(np.float32)
    expected = np.stack([(e - e.mean()) / e.std() for e in stack])
    for out in run_both("standardize", {"image": stack}):
        np.testing.assert_allclose(out["image"], expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- #
# rotate4
# --------------------------------------------------------------------------- #


def test_rotate4_golden_3x3():
    x = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.uint8)[..., None]
    # Counter-clockwise by 90 degrees: the right column becomes the top row.
    golden = [
        [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        [[3, 6, 9], [2, 5, 8], [1, 4, 7]],
        [[9, 8, 7], [6, 5, 4], [3, 2, 1]],
        [[7, 4, 1], [8, 5, 2], [9, 6, 3]],
    ]
    for out in run_both("rotate4", {"image": x, "label": np.int64(17)}):
        np.testing.assert_array_equal(out["image"][..., 0], golden)
        assert out["label"].dtype == np.int32
        np.testing.assert_array_equal(out["label"], [0, 1, 2, 3])


@pytest.mark.parametrize("channels", [1, 3])
def test_rotate4_matches_numpy_rot90(channels):
    x = distinct_image(4, 4, c=channels, dtype=np.float32)
    for out in run_both("rotate4", {"image": x}):
        assert out["image"].shape == (4, 4, 4, channels)
        for r in range(4):
            np.testing.assert_array_equal(out["image"][r], np.rot90(x, r, axes=(0, 1)))
    assert dataset_spec("rotate4", {"image": x})["image"].shape == [4, 4, 4, channels]


def test_rotate4_composes_and_four_rotations_are_identity():
    x = distinct_image(3, 3)
    fn = get_preprocess_fn("rotate4", log_data=False)
    views = fn({"image": x})["image"].numpy()
    for r in range(4):
        again = fn({"image": views[r]})["image"].numpy()
        for s in range(4):
            np.testing.assert_array_equal(again[s], views[(r + s) % 4])
    # Four successive 90 degree rotations give back the input.
    np.testing.assert_array_equal(fn({"image": views[1]})["image"][3], x)


def test_rotate4_rejects_non_square_and_stacks():
    with pytest.raises(ValueError, match="square"):
        get_preprocess_fn("rotate4")({"image": distinct_image(2, 3)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="square"):
        run_dynamic("rotate4", distinct_image(2, 3))
    with pytest.raises(ValueError, match=r"\[K, H, W, C\]"):
        get_preprocess_fn("rotate4")({"image": np.zeros([2, 2, 3, 3, 1])})
    with pytest.raises(ValueError, match="signature"):
        get_preprocess_fn("rotate4(1)")


def test_rotate4_on_a_batch_equals_each_image_rotated():
    images = np.stack(
        [distinct_image(3, 3), distinct_image(3, 3) + 100]
    )  # [2, 3, 3, 3]
    fn = get_preprocess_fn("rotate4")
    batch = fn({"image": images})
    assert batch["image"].shape == (2, 4, 3, 3, 3)
    for b in range(2):
        one = fn({"image": images[b]})
        np.testing.assert_array_equal(batch["image"][b], one["image"])
        np.testing.assert_array_equal(batch["label"][b], [0, 1, 2, 3])


# --------------------------------------------------------------------------- #
# keep, key/key_result and the no-mutation contract
# --------------------------------------------------------------------------- #


def test_keep_selects_keys_and_names_missing_ones():
    data = {"image": distinct_image(2, 2), "label": 3, "extra": 1.5}
    for out in run_both('keep("image", "label")', data):
        assert sorted(out) == ["image", "label"]
    with pytest.raises(ValueError, match="'mask'"):
        get_preprocess_fn('keep("image", "mask")')(data)
    with pytest.raises(ValueError, match="at least one key"):
        get_preprocess_fn("keep")


def test_key_result_writes_new_key_and_input_dict_is_not_mutated():
    image = distinct_image(3, 3)
    data = {"image": tf.constant(image), "label": tf.constant(1)}
    before = dict(data)
    out = get_preprocess_fn("value_range(0, 1, key_result='scaled')|rotate4")(data)
    assert data == before  # same keys, same tensor objects
    np.testing.assert_allclose(out["scaled"], image / 255, atol=1e-6)
    assert out["image"].shape == (4, 3, 3, 3)
    data_pair = {"a": image}
    for out in run_both("central_crop(1, key='a')", data_pair):
        assert sorted(out) == ["a"]
        np.testing.assert_array_equal(out["a"], image[1:2, 1:2])
    with pytest.raises(ValueError, match="missing key"):
        get_preprocess_fn("flip_lr")({"img": image})
