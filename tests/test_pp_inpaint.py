"""Tests of the context-encoder inpainting op ``inpaint_mask`` (ops_pretext).

Hand-made images with exact region indices, eagerly and in tf.data.
"""

import helpers
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.pp import get_preprocess_fn

pytestmark = pytest.mark.usefixtures("seeded")
run_both = helpers.run_pipeline  # pipeline string, eagerly and in tf.data


def coordinate_image(h, w, c=2):
    """Distinct float values; pixel (y, x, k) = (y * w + x) * c + k + 1."""
    return np.arange(1, h * w * c + 1, dtype=np.float32).reshape(h, w, c)


def box(h, w, top, left, bh, bw):
    m = np.zeros((h, w, 1), np.float32)
    m[top : top + bh, left : left + bw] = 1.0
    return m


def test_central_half_region_of_8x8_is_rows_and_cols_2_to_5():
    x = coordinate_image(8, 8)
    for out in run_both("inpaint_mask(fill=0.25)", {"image": x}):
        assert out["mask"].shape == (8, 8, 1) and out["mask"].dtype == np.float32
        rows, cols = np.nonzero(out["mask"][..., 0])
        assert sorted(set(rows)) == [2, 3, 4, 5] and sorted(set(cols)) == [2, 3, 4, 5]
        np.testing.assert_array_equal(out["mask"], box(8, 8, 2, 2, 4, 4))
        np.testing.assert_array_equal(out["target"], x)
        expected = x.copy()
        expected[2:6, 2:6] = 0.25
        np.testing.assert_array_equal(out["image"], expected)
        # Re-inserting the target into the hole gives the target back.
        m = out["mask"]
        np.testing.assert_array_equal(out["image"] * (1 - m) + out["target"] * m, x)


@pytest.mark.parametrize(
    ("hw", "size", "region"),
    [
        ((7, 10), 0.5, (1, 2, 4, 5)),  # round(3.5) = 4 (half to even), offsets
        ((9, 9), 0.25, (3, 3, 2, 2)),  # round(2.25) = 2, (9 - 2) // 2 = 3
        ((6, 4), 0.7, (1, 0, 4, 3)),  # round(4.2) = 4, round(2.8) = 3
    ],
)
def test_central_region_size_and_offset(hw, size, region):
    x = coordinate_image(*hw, c=1)
    for out in run_both(f"inpaint_mask({size})", {"image": x}):
        np.testing.assert_array_equal(out["mask"], box(*hw, *region))
        np.testing.assert_array_equal(out["image"], x * (1 - box(*hw, *region)))


def test_random_offsets_stay_inside_and_vary():
    x = coordinate_image(8, 10, c=1)
    fn = get_preprocess_fn("inpaint_mask(0.5, random=True, fill=-1.0)", log_data=False)
    ds = tf.data.Dataset.from_tensors({"image": x}).repeat(60).map(fn)
    offsets = set()
    for out in list(ds) + [fn({"image": tf.constant(x)}) for _ in range(5)]:
        m = out["mask"].numpy()
        rows, cols = np.nonzero(m[..., 0])
        top, left = rows.min(), cols.min()
        assert 0 <= top <= 4 and 0 <= left <= 5  # 4x5 region inside 8x10
        np.testing.assert_array_equal(m, box(8, 10, top, left, 4, 5))
        np.testing.assert_array_equal(out["image"].numpy(), x * (1 - m) + -1.0 * m)
        offsets.add((top, left))
    assert len(offsets) >= 10  # 30 positions, 65 draws


def test_after_value_range_fill_zero_is_mid_grey_and_shapes_are_static():
    img = np.full((8, 8, 3), 255, np.uint8)
    pipeline = "value_range(-1, 1)|inpaint_mask"
    for out in run_both(pipeline, {"image": img}):
        assert out["image"][4, 4].tolist() == [0.0, 0.0, 0.0]
        assert out["image"][0, 0].tolist() == [1.0, 1.0, 1.0]
        assert out["target"].min() == 1.0
    fn = get_preprocess_fn(pipeline, log_data=False)
    spec = tf.data.Dataset.from_tensors({"image": img}).map(fn).element_spec
    assert spec["image"].shape.as_list() == [8, 8, 3]
    assert spec["target"].shape.as_list() == [8, 8, 3]
    assert spec["mask"].shape.as_list() == [8, 8, 1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ("0", "`size` must be a number in \\(0, 1\\)"),
        ("1.0", "`size` must be a number in \\(0, 1\\)"),
        ("'0.5'", "`size`"),
        ("0.5, random=1", "`random` must be a bool"),
        ("0.5, fill=None", "`fill` must be a finite number"),
        ("key_mask='image'", "`key`, `key_target` and `key_mask` must differ"),
        ("key_target=''", "`key_target`"),
    ],
)
def test_inpaint_mask_argument_errors(args, match):
    with pytest.raises(ValueError, match=f"inpaint_mask: {match}"):
        get_preprocess_fn(f"inpaint_mask({args})")


def test_inpaint_mask_trace_time_errors():
    fn = get_preprocess_fn("inpaint_mask(0.1)", log_data=False)
    with pytest.raises(ValueError, match="inpaint_mask: expected a float image"):
        fn({"image": tf.zeros([8, 8, 3], tf.uint8)})
    with pytest.raises(ValueError, match="inpaint_mask: expected an image"):
        fn({"image": tf.zeros([2, 8, 8, 3])})
    with pytest.raises(ValueError, match="inpaint_mask: region .* is empty"):
        fn({"image": tf.zeros([4, 4, 3])})

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    def dynamic(x):
        return fn({"image": x})

    with pytest.raises(ValueError, match="inpaint_mask: needs a static height"):
        dynamic(tf.zeros([8, 8, 3]))
