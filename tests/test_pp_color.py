"""Tests of the SimCLR colour and blur ops (revisit_tf.pp.ops_color).

Components are compared with NumPy / colorsys closed forms; the random ops
run eagerly and inside ``tf.data.Dataset.map`` (``helpers.run_both``).
"""

import colorsys

import helpers
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.pp import get_preprocess_fn, ops_color

pytestmark = pytest.mark.usefixtures("seeded")
run_both = helpers.run_pipeline  # pipeline string, eagerly and in tf.data


def rand_image(shape, lo=0.0, hi=1.0, seed=0):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def np_contrast(x, f):
    mean = x.mean(axis=(-3, -2), keepdims=True)
    return np.clip((x - mean) * f + mean, 0, 1)


def np_hsv_map(x, fn):
    """Applies fn(h, s, v) -> (h, s, v) per pixel of an RGB [H, W, 3] image."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:2]):
        out[idx] = colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*x[idx])))
    return np.clip(out, 0, 1)


# --------------------------------------------------------------------------- #
# color_jitter: components
# --------------------------------------------------------------------------- #


def test_brightness_scales_and_clips():
    x = rand_image((4, 5, 3))
    np.testing.assert_allclose(ops_color.brightness(x, 1.7), np.clip(x * 1.7, 0, 1))
    # The brightness-only path of the jitter (contrast factor 1, 1 channel).
    gray = x[..., :1]
    out = ops_color.apply_color_jitter(tf.constant(gray), [1.7, 1.0])
    np.testing.assert_allclose(out, np.clip(gray * 1.7, 0, 1), atol=1e-6)


def test_contrast_is_per_channel_mean_blend_and_clips():
    x = rand_image((4, 5, 3))
    for f in (0.3, 1.6):
        np.testing.assert_allclose(
            ops_color.contrast(x, f), np_contrast(x, f), atol=1e-6
        )
    # Contrast-only path of the RGB jitter (saturation 1 and hue 0 ~ identity).
    out = ops_color.apply_color_jitter(tf.constant(x), [1.0, 0.4, 1.0, 0.0])
    np.testing.assert_allclose(out, np_contrast(x, 0.4), atol=1e-5)


def test_saturation_and_hue_match_colorsys():
    x = rand_image((3, 4, 3), seed=1)
    np.testing.assert_allclose(
        ops_color.saturation(x, 1.5),
        np_hsv_map(x, lambda h, s, v: (h, min(s * 1.5, 1.0), v)),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        ops_color.hue(x, 0.3),
        np_hsv_map(x, lambda h, s, v: ((h + 0.3) % 1.0, s, v)),
        atol=1e-5,
    )
    out = ops_color.apply_color_jitter(tf.constant(x), [1.0, 1.0, 0.5, -0.1])
    expected = np_hsv_map(x, lambda h, s, v: ((h - 0.1) % 1.0, s * 0.5, v))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_jitter_order_is_applied_step_by_step():
    # Brightness 1.8 clips, so brightness->contrast != contrast->brightness.
    x = rand_image((6, 6, 1), seed=2)
    b_then_c = np_contrast(np.clip(x * 1.8, 0, 1), 0.5)
    c_then_b = np.clip(np_contrast(x, 0.5) * 1.8, 0, 1)
    assert np.abs(b_then_c - c_then_b).max() > 0.05
    for order, expected in (([0, 1], b_then_c), ([1, 0], c_then_b)):
        out = ops_color.apply_color_jitter(x, [1.8, 0.5], tf.constant(order))
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_jitter_ranges_follow_simclr_v2():
    np.testing.assert_allclose(
        ops_color.jitter_ranges(1.0), [(0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2)]
    )
    np.testing.assert_allclose(
        ops_color.jitter_ranges(0.5), [(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]
    )
    np.testing.assert_allclose(ops_color.jitter_ranges(2.0)[0], (0.0, 2.6))  # max(0, .)


def test_sample_color_jitter_orders_are_permutations_and_vary():
    factors, order = ops_color.sample_color_jitter(tf.constant(200), 4, 1.0, True)
    factors, order = factors.numpy(), order.numpy()
    assert factors.shape == (200, 4) and order.shape == (200, 4)
    assert all(sorted(row) == [0, 1, 2, 3] for row in order.tolist())
    assert len({tuple(row) for row in order.tolist()}) > 12  # of 24 orders
    assert (factors[:, :3] >= 0.2).all() and (factors[:, :3] <= 1.8).all()
    assert (np.abs(factors[:, 3]) <= 0.2).all()
    _, fixed = ops_color.sample_color_jitter(tf.constant(5), 2, 1.0, False)
    assert fixed.numpy().tolist() == [[0, 1]] * 5


# --------------------------------------------------------------------------- #
# color_jitter: the op
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("pipeline", ["color_jitter(0.0)", "color_jitter(1.0, p=0.0)"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (2, 5, 4, 1)])
def test_color_jitter_strength_or_p_zero_is_identity(pipeline, shape):
    x = rand_image(shape)
    for out in run_both(pipeline, {"image": x}):
        np.testing.assert_array_equal(out["image"], x)


def test_color_jitter_gray_stack_is_brightness_then_contrast_per_element():
    # Values in [0.3, 0.6] and s = 0.5: no clipping, so y = b (c (x - m) + m)
    # and b, c are recovered from each output's mean and std.
    x = np.repeat(rand_image((1, 6, 6, 1), 0.3, 0.6), 16, axis=0)
    pipeline = "color_jitter(0.5, p=1.0, random_order=False)"
    for out in run_both(pipeline, {"image": x}):
        y = out["image"]
        assert y.shape == x.shape and y.dtype == np.float32
        m, sd = x[0].mean(), x[0].std()
        b = y.mean(axis=(1, 2, 3)) / m
        c = y.std(axis=(1, 2, 3)) / (b * sd)
        assert ((b > 0.6 - 1e-4) & (b < 1.4 + 1e-4)).all()
        assert ((c > 0.6 - 1e-4) & (c < 1.4 + 1e-4)).all()
        expected = b[:, None, None, None] * (c[:, None, None, None] * (x - m) + m)
        np.testing.assert_allclose(y, expected, atol=1e-5)
        assert len(np.unique(np.round(b, 5))) == 16  # one draw per element


def test_color_jitter_rgb_range_shape_and_rate_of_p():
    x = rand_image((60, 4, 4, 3), seed=3)
    for out in run_both("color_jitter(1.0, p=0.5)", {"image": x}):
        y = out["image"]
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        unchanged = np.all(y == x, axis=(1, 2, 3))
        assert 12 <= unchanged.sum() <= 48  # Binomial(60, 0.5), ~4.6 sigma
    fn = get_preprocess_fn("color_jitter", log_data=False)
    spec = tf.data.Dataset.from_tensors({"image": x[0]}).map(fn).element_spec
    assert spec["image"].shape.as_list() == [4, 4, 3]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ("-0.1", "`strength` must be a number in"),
        ("3.0", "`strength` must be a number in"),
        ("True", "`strength`"),
        ("'1'", "`strength`"),
        ("1.0, p=1.5", "`p` must be a probability"),
        ("1.0, random_order=1", "`random_order` must be a bool"),
    ],
)
def test_color_jitter_argument_errors(args, match):
    with pytest.raises(ValueError, match=f"color_jitter: {match}"):
        get_preprocess_fn(f"color_jitter({args})")


def test_color_jitter_rejects_integer_images_and_four_channels():
    fn = get_preprocess_fn("color_jitter", log_data=False)
    with pytest.raises(ValueError, match="color_jitter: expected a float image"):
        fn({"image": tf.zeros([4, 4, 3], tf.uint8)})
    with pytest.raises(ValueError, match="color_jitter: expected 1 or 3 channels"):
        fn({"image": tf.zeros([4, 4, 4])})


# --------------------------------------------------------------------------- #
# gaussian_blur
# --------------------------------------------------------------------------- #


def np_gaussian(sigma, size):
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def np_blur(x, sigma, size):
    """Reflect-padded separable blur of [H, W, C] with NumPy."""
    g, r = np_gaussian(sigma, size), size // 2
    h, w = x.shape[:2]
    p = np.pad(x, [(r, r), (0, 0), (0, 0)], mode="reflect")
    x = sum(g[j] * p[j : j + h] for j in range(size))
    p = np.pad(x, [(0, 0), (r, r), (0, 0)], mode="reflect")
    return sum(g[j] * p[:, j : j + w] for j in range(size))


def test_blur_of_an_impulse_is_the_outer_product_kernel():
    x = np.zeros((15, 15, 1), np.float32)
    x[7, 7] = 1.0
    # kernel_fraction 0.5: int(7.5) = 7 taps.
    for out in run_both("gaussian_blur(1.0, (1.3, 1.3), 0.5)", {"image": x}):
        g = np_gaussian(1.3, 7)
        expected = np.zeros((15, 15))
        expected[4:11, 4:11] = np.outer(g, g)
        np.testing.assert_allclose(out["image"][..., 0], expected, atol=1e-7)


def test_blur_matches_numpy_reflect_padding_on_a_stack():
    x = rand_image((2, 6, 7, 2), seed=4)  # fraction 1: int(6) -> 7 taps, r = 3
    for out in run_both("gaussian_blur(1.0, (0.8, 0.8), 1.0)", {"image": x}):
        for element, y in zip(x, out["image"], strict=True):
            np.testing.assert_allclose(y, np_blur(element, 0.8, 7), atol=1e-6)


def test_blur_preserves_a_constant_image_and_its_sum():
    x = np.full((20, 24, 3), 0.37, np.float32)
    for out in run_both("gaussian_blur(1.0)", {"image": x}):
        np.testing.assert_allclose(out["image"], x, atol=1e-6)
        np.testing.assert_allclose(out["image"].sum(), x.sum(), rtol=1e-6)


def test_blur_p_zero_identity_and_p_half_blurs_some_elements():
    x = rand_image((60, 8, 8, 1), seed=5)
    for out in run_both("gaussian_blur(0.0)", {"image": x}):
        np.testing.assert_array_equal(out["image"], x)
    for out in run_both("gaussian_blur(0.5, kernel_fraction=0.5)", {"image": x}):
        unchanged = np.all(out["image"] == x, axis=(1, 2, 3))
        assert 12 <= unchanged.sum() <= 48  # Binomial(60, 0.5)


def test_blur_kernel_size_and_kernel_rows():
    assert ops_color.blur_kernel_size(224, 224, 0.1) == 23  # SimCLR ImageNet
    assert ops_color.blur_kernel_size(32, 32, 0.1) == 3  # floor of 3
    assert ops_color.blur_kernel_size(100, 60, 0.1) == 7  # int(6) -> 7, odd
    assert ops_color.blur_kernel_size(100, 50, 0.1) == 5
    k = ops_color.gaussian_kernel(tf.constant([0.5, 2.0]), 9).numpy()
    np.testing.assert_allclose(k, [np_gaussian(0.5, 9), np_gaussian(2.0, 9)], rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ("sigma=(0.0, 1.0)", "`sigma` must be"),
        ("sigma=(2.0, 1.0)", "`sigma` must be"),
        ("sigma=(-1.0, 1.0)", "`sigma` must be"),
        ("sigma=1.0", "`sigma` must be"),
        ("sigma=(1.0,)", "`sigma` must be"),
        ("kernel_fraction=0", "`kernel_fraction` must be"),
        ("kernel_fraction=1.5", "`kernel_fraction` must be"),
        ("p=-0.1", "`p` must be a probability"),
    ],
)
def test_blur_argument_errors(args, match):
    with pytest.raises(ValueError, match=f"gaussian_blur: {match}"):
        get_preprocess_fn(f"gaussian_blur({args})")


def test_blur_needs_static_hw_float_and_a_large_enough_image():
    fn = get_preprocess_fn("gaussian_blur", log_data=False)
    with pytest.raises(ValueError, match="gaussian_blur: expected a float image"):
        fn({"image": tf.zeros([8, 8, 3], tf.uint8)})
    with pytest.raises(ValueError, match="gaussian_blur: image 1x5 is too small"):
        fn({"image": tf.zeros([1, 5, 3])})

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    def dynamic(x):
        return fn({"image": x})

    with pytest.raises(ValueError, match="gaussian_blur: needs a static height"):
        dynamic(tf.zeros([8, 8, 3]))
