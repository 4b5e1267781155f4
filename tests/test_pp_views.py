"""Tests of the multi-view ops (revisit_tf.pp.ops_views) and exemplar_copies on them.

Each op runs eagerly and inside ``tf.data.Dataset.map`` (``helpers.run_both``).
"""

import helpers
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.pp import get_preprocess_fn, ops_views
from revisit_tf.pp.registry import isolated_registry

pytestmark = pytest.mark.usefixtures("seeded")
run_both = helpers.run_pipeline  # pipeline string, eagerly and in tf.data


def distinct_image(h, w, c=3):
    return np.arange(h * w * c, dtype=np.float32).reshape(h, w, c)


# --------------------------------------------------------------------------- #
# copies
# --------------------------------------------------------------------------- #


def test_copies_of_a_deterministic_pipeline_equal_one_application():
    img = distinct_image(6, 5)
    inner = "central_crop(4)|value_range(-1, 1)"
    single = get_preprocess_fn(inner, log_data=False)
    expected = single({"image": tf.constant(img)})["image"].numpy()
    for out in run_both(f'copies(3, "{inner}")', {"image": img}):
        assert out["image"].shape == (3, 4, 4, 3)
        for copy in out["image"]:
            np.testing.assert_array_equal(copy, expected)
    # Closed form as well: rows/cols 1..4, -1 + 2 x / 255.
    np.testing.assert_allclose(expected, -1 + 2 * img[1:5, 0:4] / 255, rtol=1e-6)


def test_copies_example_pipeline_shape_and_static_spec():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    pipeline = 'decode|copies(2, "inception_crop(28)|flip_lr")|value_range(-1, 1)'
    for out in run_both(pipeline, {"image": img}):
        assert out["image"].shape == (2, 28, 28, 3)
        assert out["image"].dtype == np.float32
        assert out["image"].min() >= -1 and out["image"].max() <= 1
    fn = get_preprocess_fn(pipeline, log_data=False)
    spec = tf.data.Dataset.from_tensors({"image": img}).map(fn).element_spec
    assert spec["image"].shape.as_list() == [2, 28, 28, 3]


def test_copies_draw_independently_both_flips_occur():
    img = distinct_image(3, 4, 1)
    mirror = img[:, ::-1]
    for out in run_both('copies(40, "flip_lr")', {"image": img}):
        flipped = []
        for copy in out["image"]:
            assert np.array_equal(copy, img) or np.array_equal(copy, mirror)
            flipped.append(np.array_equal(copy, mirror))
        assert 5 <= sum(flipped) <= 35  # Binomial(40, 0.5): P(outside) ~ 1e-6.


def test_copies_stack_written_keys_and_pass_untouched_keys_through():
    def get_tag():  # writes a new key and leaves `image` alone
        def _tag(data):
            return {**data, "tag": tf.random.uniform([2])}

        return _tag

    img = distinct_image(4, 4)
    label = np.int64(7)
    with isolated_registry() as reg:
        reg.register("tag")(get_tag)
        for out in run_both(
            "copies(3, \"tag|flip_lr(key='other')\")",
            {
                "image": img,
                "other": img,
                "label": label,
            },
        ):
            np.testing.assert_array_equal(out["image"], img)  # untouched: [H, W, C]
            assert out["label"] == 7 and out["label"].shape == ()
            assert out["tag"].shape == (3, 2)  # written: stacked
            assert len({row.tobytes() for row in out["tag"]}) == 3  # independent
            assert out["other"].shape == (3, 4, 4, 3)  # changed: stacked


def test_copies_num_copies_one_adds_a_leading_axis_and_keep_drops_keys():
    img = distinct_image(4, 4)
    data = {"image": img, "label": np.int64(1)}
    for out in run_both("copies(1, \"central_crop(2)|keep('image')\")", data):
        assert set(out) == {"image"}
        np.testing.assert_array_equal(out["image"], img[None, 1:3, 1:3])


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_copies_rejects_bad_num_copies_at_build_time(bad):
    with pytest.raises(ValueError, match=r"copies: `num_copies` must be an int > 0"):
        get_preprocess_fn(f'copies({bad!r}, "flip_lr")')


@pytest.mark.parametrize(
    ("inner", "names"),
    [
        ("flip_lrr", ["copies", "flip_lrr", "flip_lr"]),  # unknown op + suggestion
        ("central_crop(0)", ["copies", "central_crop", "positive"]),  # bad value
        ("resize(4, methd='area')", ["copies", "resize", "methd"]),  # bad kwarg
        ("flip_lr|", ["copies", "Empty op"]),  # syntax
    ],
)
def test_copies_sub_pipeline_errors_surface_at_build_time(inner, names):
    with pytest.raises(ValueError) as info:
        get_preprocess_fn(f'decode|copies(2, "{inner}")')
    message = str(info.value)
    for name in names:
        assert name in message, message
    assert "op 2 of 2" in message  # the outer op's position


@pytest.mark.parametrize("bad", ["''", "'  '", "3", "None"])
def test_copies_rejects_non_string_or_empty_pipeline(bad):
    with pytest.raises(ValueError, match="copies: `pipeline` must be a non-empty"):
        get_preprocess_fn(f"copies(2, {bad})")


def test_copies_gin_style_nested_quotes_parse():
    # Gin binds pp strings in single quotes: the sub-pipeline uses double ones;
    # escaped quotes of the same type also work.
    img = distinct_image(4, 4)
    for pipeline in (
        "copies(2, \"keep('image')|central_crop(2)\")",
        "copies(2, 'keep(\\'image\\')|central_crop(2)')",
    ):
        out = get_preprocess_fn(pipeline, log_data=False)({"image": tf.constant(img)})
        assert out["image"].shape == (2, 2, 2, 3)


# --------------------------------------------------------------------------- #
# surrogate_label
# --------------------------------------------------------------------------- #


def test_surrogate_label_one_id_per_source_image_in_range():
    views = np.zeros((5, 2, 2, 1), np.float32)
    for out in run_both("surrogate_label", {"image": views}):
        labels = out["label"]
        assert labels.shape == (5,) and labels.dtype == np.int64
        assert len(set(labels.tolist())) == 1
        assert 0 <= labels[0] < 2**62
    fn = get_preprocess_fn("surrogate_label(key_label='y')", log_data=False)
    ds = tf.data.Dataset.from_tensors({"image": views}).repeat(30).map(fn)
    assert ds.element_spec["y"].shape.as_list() == [5]
    ids = [int(x["y"][0]) for x in ds]
    assert len(set(ids)) == 30


def test_surrogate_label_rejects_unstacked_image():
    fn = get_preprocess_fn("surrogate_label", log_data=False)
    with pytest.raises(ValueError, match=r"surrogate_label: expected a stack"):
        fn({"image": tf.zeros([4, 4, 3])})
    with pytest.raises(ValueError, match="surrogate_label: `key_label`"):
        get_preprocess_fn("surrogate_label(key_label='')")


def test_exemplar_id_range_moved_to_ops_views():
    assert ops_views._EXEMPLAR_ID_RANGE == 2**62


# --------------------------------------------------------------------------- #
# exemplar_copies on top of copies
# --------------------------------------------------------------------------- #


def test_exemplar_copies_shape_range_and_equal_labels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 26, 3)).astype(np.uint8)
    for out in run_both("exemplar_copies(5, (12, 10))", {"image": img, "label": 3}):
        assert out["image"].shape == (5, 12, 10, 3)
        assert out["image"].min() >= -1 and out["image"].max() <= 1
        assert out["label"].shape == (5,) and len(set(out["label"].tolist())) == 1
        assert len({c.tobytes() for c in out["image"]}) == 5


def test_exemplar_copies_equals_copies_of_inception_preprocess_plus_label():
    # The same random ops in the same order: equal outputs for equal seeds.
    # (tf.image.sample_distorted_bounding_box is unseeded by default, so the
    # crop is made deterministic with area 1 via a constant-colour image.)
    img = np.full((20, 20, 3), 100, np.uint8)
    results = []
    for pipeline in (
        "exemplar_copies(3, 8)",
        'copies(3, "inception_preprocess(8)")|surrogate_label',
    ):
        tf.random.set_seed(5)
        fn = get_preprocess_fn(pipeline, log_data=False)
        results.append(next(iter(tf.data.Dataset.from_tensors({"image": img}).map(fn))))
    np.testing.assert_array_equal(results[0]["image"], results[1]["image"])
    np.testing.assert_array_equal(results[0]["label"], results[1]["label"])


def test_exemplar_copies_still_rejects_stacks_and_single_copy():
    fn = get_preprocess_fn("exemplar_copies(2, 4)", log_data=False)
    with pytest.raises(ValueError, match="exemplar_copies: expected an image"):
        fn({"image": tf.zeros([2, 8, 8, 3], tf.uint8)})
    with pytest.raises(ValueError, match="exemplar_copies: `num_copies` must be >= 2"):
        get_preprocess_fn("exemplar_copies(1, 4)")
    with pytest.raises(ValueError, match="exemplar_copies: `legacy` must be a bool"):
        get_preprocess_fn("exemplar_copies(2, 4, legacy=1)")
