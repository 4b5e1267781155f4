"""Tests for revisit_tf.probe.predictions: the rows' per-example test predictions.

References: the format decoded by hand with ``base64``/``zlib``/``hashlib``
and ``np.unpackbits`` (independently of ``decode_predictions``), and NumPy
comparisons of the predicted classes with the labels.
"""

import base64
import hashlib
import json
import zlib

import numpy as np
import pytest

from revisit_tf.probe import predictions


def _by_hand(d):
    """Decodes a row's test_predictions with the standard library and NumPy."""
    raw = zlib.decompress(base64.b64decode(d["predictions"]))
    pred = np.frombuffer(raw, np.dtype(d["dtype"]).newbyteorder("<"))
    bits = np.unpackbits(np.frombuffer(base64.b64decode(d["correct"]), np.uint8))
    return pred.astype(np.int64), bits[: d["n"]].astype(bool)


@pytest.mark.parametrize(
    "n, num_classes, dtype",
    [
        (1, 2, "uint8"),
        (7, 10, "uint8"),
        (8, 10, "uint8"),
        (13, 256, "uint8"),  # largest class 255 still fits a byte
        (1001, 300, "uint16"),  # > 255 classes
        (999, 70_000, "int32"),  # > 65535 classes
    ],
)
def test_round_trip_and_format(n, num_classes, dtype):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, num_classes, size=n)
    pred = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, size=n))
    pred[0] = num_classes - 1  # the largest class decides the dtype
    enc = predictions.encode_predictions(pred, labels)
    assert json.loads(json.dumps(enc)) == enc  # JSON-native values only
    assert set(enc) == set(predictions.KEYS)
    assert enc["n"] == n and enc["dtype"] == dtype
    expected_digest = hashlib.sha256(labels.astype("<i4").tobytes()).hexdigest()
    assert enc["labels_sha256"] == expected_digest[:12]
    assert len(base64.b64decode(enc["correct"])) == (n + 7) // 8

    hand_pred, hand_correct = _by_hand(enc)
    np.testing.assert_array_equal(hand_pred, pred)
    np.testing.assert_array_equal(hand_correct, pred == labels)

    got_pred, got_correct = predictions.decode_predictions(enc, labels=labels)
    assert got_pred.dtype == np.int32 and got_correct.dtype == np.bool_
    np.testing.assert_array_equal(got_pred, pred)
    np.testing.assert_array_equal(got_correct, pred == labels)
    assert got_correct.mean() == np.mean(pred == labels)


def test_encoding_is_compact():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, size=50_000)  # ImageNet-sized val set
    pred = np.where(rng.random(50_000) < 0.5, labels, rng.integers(0, 1000, 50_000))
    size = len(json.dumps(predictions.encode_predictions(pred, labels)))
    assert size < 3.2 * 50_000  # a JSON list of the classes takes ~4.9 bytes each
    assert size < 0.7 * len(json.dumps(pred.tolist()))


def test_digest_tells_test_sets_and_orders_apart():
    labels = np.arange(20) % 4
    same = predictions.labels_digest(labels.astype(np.int64))
    assert same == predictions.labels_digest(labels.astype(np.int32))
    assert same != predictions.labels_digest(labels[::-1])
    assert same != predictions.labels_digest(labels[:-1])
    enc = predictions.encode_predictions(labels, labels)
    with pytest.raises(ValueError, match="scored on other labels"):
        predictions.decode_predictions(enc, labels=labels[::-1])
    with pytest.raises(ValueError, match="hold 20 examples; labels has 19"):
        predictions.decode_predictions(enc, labels=labels[:-1])


def _encoded(n=10):
    labels = np.arange(n) % 3
    return predictions.encode_predictions((labels + (np.arange(n) % 2)) % 3, labels)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n": 11}, "'predictions' holds 10 bytes; n = 11"),
        ({"n": -1}, "'n' must be an int >= 0"),
        ({"n": True}, "'n' must be an int >= 0"),
        ({"dtype": "float32"}, "'dtype' must be one of"),
        ({"labels_sha256": "ABCDEF012345"}, "12 lowercase hex"),
        ({"labels_sha256": "abc"}, "12 lowercase hex"),
        ({"predictions": "not base64!"}, "'predictions' is not valid base64"),
        ({"predictions": base64.b64encode(b"raw").decode()}, "not zlib data"),
        ({"correct": base64.b64encode(b"\x00").decode()}, "'correct' holds 1 bytes"),
        ({"correct": base64.b64encode(b"\x00\x01").decode()}, "padding bits"),
        ({"correct": 5}, "'correct' must be a base64 string"),
    ],
)
def test_decode_rejects_malformed_input(change, message):
    with pytest.raises(ValueError, match=message):
        predictions.decode_predictions({**_encoded(), **change})


def test_decode_rejects_missing_keys_and_inconsistent_bits():
    enc = _encoded()
    with pytest.raises(ValueError, match=r"lack \['correct'\]"):
        predictions.decode_predictions({k: v for k, v in enc.items() if k != "correct"})
    with pytest.raises(ValueError, match="must be a mapping"):
        predictions.decode_predictions([1, 2])
    flipped = {**enc, "correct": base64.b64encode(b"\xff\xc0").decode()}
    predictions.decode_predictions(flipped)  # well-formed on its own
    with pytest.raises(ValueError, match="'correct' disagrees with the labels"):
        predictions.decode_predictions(flipped, labels=np.arange(10) % 3)


@pytest.mark.parametrize(
    "pred, labels, message",
    [
        (np.zeros(3, int), np.zeros(4, int), "pred has 3 entries but labels has 4"),
        (np.array([0, -1]), np.array([0, 1]), "pred must be >= 0"),
        (np.zeros((2, 2), int), np.zeros(2, int), "pred must be 1-D"),
        (np.array([0.5, 1.0]), np.array([0, 1]), "pred must hold integers"),
        (np.array([0, 2**31]), np.array([0, 1]), "pred must fit in int32"),
    ],
)
def test_encode_rejects_bad_arrays(pred, labels, message):
    with pytest.raises(ValueError, match=message):
        predictions.encode_predictions(pred, labels)


def test_empty_split_round_trips():
    enc = predictions.encode_predictions(np.zeros(0, int), np.zeros(0, int))
    pred, correct = predictions.decode_predictions(enc)
    assert enc["n"] == 0 and pred.shape == (0,) and correct.shape == (0,)
