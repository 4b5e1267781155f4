"""Tests of the pp builder and registry (revisit_tf.pp.builder / .registry).

Pipelines are run both eagerly and inside ``tf.data.Dataset.map``; every
malformed pipeline must fail when the function is built, with a message that
names the op and its position.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf
from helpers import run_both

from revisit_tf.pp import get_preprocess_fn
from revisit_tf.pp.builder import parse_op, split_pipeline
from revisit_tf.pp.registry import GLOBAL_REGISTRY, Registry, isolated_registry


def get_add(value, key="x"):
    """Temporary test op: data[key] + value."""

    def _add(data):
        return {**data, key: data[key] + value}

    return _add


def get_mul(value, key="x"):
    """Temporary test op: data[key] * value."""

    def _mul(data):
        return {**data, key: data[key] * value}

    return _mul


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "text, expected",
    [
        ("flip_lr", ("flip_lr", (), {})),
        ("  flip_lr  ", ("flip_lr", (), {})),
        ("resize(224)", ("resize", (224,), {})),
        (
            "resize( (4, 6) , method = 'area' )",
            ("resize", ((4, 6),), {"method": "area"}),
        ),
        ("value_range(-1, 1)", ("value_range", (-1, 1), {})),
        (
            "value_range(vmin=-0.5, in_max=-2e1)",
            ("value_range", (), {"vmin": -0.5, "in_max": -20.0}),
        ),
        ('keep("image", "label")', ("keep", ("image", "label"), {})),
        (
            "f([1, 2], None, True, x={'a': 1})",
            ("f", ([1, 2], None, True), {"x": {"a": 1}}),
        ),
    ],
)
def test_parse_op(text, expected):
    assert parse_op(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("resize(x)", "not a Python literal: 'x'"),
        ("resize(size=x)", "keyword argument 'size'"),
        ("resize(int(3))", "not a Python literal"),
        ("resize(1 + y)", "not a Python literal"),
        ("resize(*[1])", r"\*args"),
        ("resize(**{'size': 1})", r"\*\*kwargs"),
        ("1 + 2", "op name or a call"),
        ("tf.image.resize(3)", "op name or a call"),
        ("resize(4,,)", "cannot parse"),
    ],
)
def test_parse_op_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_op(text)


def test_split_pipeline_respects_quotes_and_brackets():
    assert split_pipeline("a | b(1, (2, 3)) |c('x|y', \"|\")") == [
        "a",
        "b(1, (2, 3))",
        "c('x|y', \"|\")",
    ]
    assert split_pipeline("a||b") == ["a", "", "b"]
    with pytest.raises(ValueError, match="missing a closing"):
        split_pipeline("resize((4, 4)")
    with pytest.raises(ValueError, match="Unbalanced"):
        split_pipeline("resize(4))")


# --------------------------------------------------------------------------- #
# Building and running
# --------------------------------------------------------------------------- #


def test_pipeline_with_whitespace_runs_eagerly_and_in_dataset():
    image = np.arange(5 * 6 * 3).reshape(5, 6, 3).astype(np.uint8)
    fn = get_preprocess_fn(
        " decode |central_crop( (4 , 4) )| rotate4 | value_range( -1 , 1 ) "
        '| keep ( "image" , "label" ) ',
        log_data=False,
    )
    crop = image[0:4, 1:5].astype(np.float64)  # offsets ((5-4)//2, (6-4)//2)
    expected = np.stack([np.rot90(crop, r) for r in range(4)]) * 2 / 255 - 1
    data = {"image": image, "label": np.int64(5), "id": b"x"}
    for out in run_both(fn, data):
        assert sorted(out) == ["image", "label"]
        np.testing.assert_allclose(out["image"], expected, atol=1e-6)
        np.testing.assert_array_equal(out["label"], [0, 1, 2, 3])


def test_ops_are_applied_in_order():
    with isolated_registry() as reg:
        reg.register("add")(get_add)
        reg.register("mul")(get_mul)
        data = {"x": np.float32(3)}
        for out in run_both(get_preprocess_fn("add(1)|mul(2)"), data):
            assert out["x"] == 8  # (3 + 1) * 2
        for out in run_both(get_preprocess_fn("mul(2)|add(value=1)"), data):
            assert out["x"] == 7  # 3 * 2 + 1


def test_empty_pipeline_is_identity():
    data = {"x": np.arange(3)}
    for out in run_both(get_preprocess_fn(""), data):
        np.testing.assert_array_equal(out["x"], [0, 1, 2])


def test_input_dict_is_not_mutated():
    data = {"image": tf.zeros([4, 4, 3], tf.uint8), "label": tf.constant(1)}
    before = dict(data)
    out = get_preprocess_fn("rotate4|value_range", log_data=False)(data)
    assert data == before
    assert out["image"].shape == (4, 4, 4, 3)


def test_ops_run_inside_their_name_scope():
    scopes = []

    def get_spy():
        def _spy(data):
            scopes.append(tf.get_current_name_scope())
            return data

        return _spy

    with isolated_registry() as reg:
        reg.register("spy")(get_spy)
        fn = get_preprocess_fn("spy|spy", log_data=False)
        tf.function(fn)({"x": tf.constant(1.0)})
    assert len(scopes) == 2
    assert all(scope.split("/")[-1].startswith("spy") for scope in scopes), scopes


def test_logs_data_once_before_and_after(caplog):
    fn = get_preprocess_fn("value_range(0, 1)|rotate4")
    data = {"image": np.zeros([3, 3, 1], np.uint8)}
    with caplog.at_level(logging.INFO, logger="revisit_tf.pp.builder"):
        list(tf.data.Dataset.from_tensors(data).map(fn))
        fn(data)  # a second call does not log again
    messages = [
        r.getMessage() for r in caplog.records if r.name == "revisit_tf.pp.builder"
    ]
    assert len(messages) == 2, messages
    assert "before" in messages[0] and "uint8 [3, 3, 1]" in messages[0]
    assert "after" in messages[1] and "float32 [4, 3, 3, 1]" in messages[1]
    assert "label: int32 [4]" in messages[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="revisit_tf.pp.builder"):
        get_preprocess_fn("rotate4", log_data=False)(data)
    assert not [r for r in caplog.records if r.name == "revisit_tf.pp.builder"]


# --------------------------------------------------------------------------- #
# Build-time errors
# --------------------------------------------------------------------------- #


def test_unknown_op_names_it_and_suggests_the_closest():
    with pytest.raises(ValueError) as err:
        get_preprocess_fn("decode|rotate|value_range")
    message = str(err.value)
    assert "'rotate'" in message
    assert "Did you mean 'rotate4'" in message
    assert "op 2 of 3" in message
    assert "central_crop" in message  # lists the known ops


@pytest.mark.parametrize(
    "pipeline, match",
    [
        ("decode|resize(4, 'bilinear', False, 7)", "too many positional"),
        ("resize(4, foo=1)", "unexpected keyword argument 'foo'"),
        ("resize", "missing a required argument: 'size'"),
        ("flip_lr(0.5)", "too many positional"),
    ],
)
def test_arguments_that_do_not_bind_name_op_position_and_signature(pipeline, match):
    with pytest.raises(ValueError, match=match) as err:
        get_preprocess_fn(pipeline)
    message = str(err.value)
    assert "do not match the expected signature" in message
    assert "op " in message and " in pipeline " in message
    name = pipeline.split("|")[-1].split("(")[0]
    assert f"{name}(" in message  # the signature, e.g. "resize(size, method=..."


def test_non_literal_argument_fails_at_build_time():
    with pytest.raises(ValueError, match="not a Python literal") as err:
        get_preprocess_fn("decode|resize(x)")
    assert "op 2 of 2" in str(err.value)


@pytest.mark.parametrize(
    "pipeline, match",
    [
        ("resize(-3)", "positive"),
        ("resize((2, 0))", "positive"),
        ("to_gray(1.5)", "probability"),
        ("value_range(in_min=1, in_max=1)", "in_min != in_max"),
        ("central_crop('big')", "size"),
        ("keep('image', 'image')", "duplicate"),
    ],
)
def test_bad_values_fail_at_build_time(pipeline, match):
    with pytest.raises(ValueError, match=match) as err:
        get_preprocess_fn(pipeline)
    assert "op 1 of 1" in str(err.value)


@pytest.mark.parametrize(
    "pipeline, position", [("decode||flip_lr", 2), ("decode|", 2), ("|decode", 1)]
)
def test_empty_op_is_an_error(pipeline, position):
    with pytest.raises(ValueError, match=f"Empty op \\(op {position} of"):
        get_preprocess_fn(pipeline)


def test_non_string_pipeline_is_an_error():
    with pytest.raises(ValueError, match="must be a string"):
        get_preprocess_fn(["decode"])


def test_non_dict_data_is_an_error():
    with pytest.raises(ValueError, match="dict"):
        get_preprocess_fn("decode", log_data=False)(tf.zeros([2, 2, 3]))


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


def test_builtin_ops_are_registered():
    expected = {
        "decode",
        "resize",
        "resize_small",
        "central_crop",
        "random_crop",
        "inception_crop",
        "flip_lr",
        "to_gray",
        "value_range",
        "standardize",
        "rotate4",
        "keep",
    }
    assert expected <= set(GLOBAL_REGISTRY.names())


def test_isolated_registry_does_not_leak():
    before = GLOBAL_REGISTRY.names()
    with isolated_registry() as reg:
        reg.register("add")(get_add)
        reg.register("flip_lr", replace=True)(get_mul)  # shadow a builtin
        out = get_preprocess_fn("add(2)")({"x": tf.constant(1)})
        assert int(out["x"]) == 3
        assert "rotate4" in reg  # builtins stay usable inside
    assert GLOBAL_REGISTRY.names() == before
    assert GLOBAL_REGISTRY.lookup("flip_lr") is not get_mul
    with pytest.raises(ValueError, match="Unknown preprocessing op 'add'"):
        get_preprocess_fn("add(2)")


def test_fresh_registry_instance_is_independent():
    reg = Registry()
    reg.register("add")(get_add)
    fn = get_preprocess_fn("add(5)|add(value=-1)", registry=reg, log_data=False)
    for out in run_both(fn, {"x": np.int32(1)}):
        assert out["x"] == 5
    assert "add" not in GLOBAL_REGISTRY
    with pytest.raises(ValueError, match="Known ops: add"):
        get_preprocess_fn("rotate4", registry=reg)


def test_register_rejects_duplicates_and_bad_names():
    reg = Registry()
    reg.register("add")(get_add)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("add")(get_mul)
    reg.register("add", replace=True)(get_mul)
    assert reg.lookup("add") is get_mul
    for bad in ("", "a-b", "resize(3)", "_private", 3):
        with pytest.raises(ValueError, match="identifier"):
            reg.register(bad)
    with pytest.raises(ValueError, match="callable"):
        reg.register("thing")(42)
