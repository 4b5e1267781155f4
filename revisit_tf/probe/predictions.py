"""Per-example test predictions of a probe, in a compact JSON-safe form.

Place in the data flow (stage 6, output): every ``probe/results.jsonl`` row
carries ``test_predictions = encode_predictions(pred, test_labels)``, the
predicted class of every test example under the final model, so that a
report can run a paired bootstrap over the same test images (two rows are
comparable when their ``labels_sha256`` match: same labels, same order).

Format (all values JSON-native)::

    {
      "n": N,                            # number of test examples
      "dtype": "uint8" | "uint16" | "int32",
      "predictions": str,                # base64(zlib(pred as little-endian dtype))
      "correct": str,                    # base64(np.packbits(pred == labels))
      "labels_sha256": str,              # 12 hex of sha256(labels as <i4 bytes)
    }

``dtype`` is the narrowest of the three that holds every predicted class and
label; ``correct`` is packed big-endian in bit order (``np.packbits``
default), ``ceil(N / 8)`` bytes, zero padding bits.

Contract: ``encode_predictions(pred [N], labels [N]) -> dict``;
``decode_predictions(d) -> (pred int32 [N], correct bool [N])``, with
``decode_predictions(d, labels=labels)`` also checking the digest and the
``correct`` bits against ``labels``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

DTYPES = ("uint8", "uint16", "int32")
KEYS = ("n", "dtype", "predictions", "correct", "labels_sha256")
_DIGEST_CHARS = 12
_DIGEST = re.compile(r"[0-9a-f]{12}")


def _as_int_vector(values: Any, name: str) -> np.ndarray:
    """``values`` as int64 ``[N]``; integral, within int32."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N]; got shape {array.shape}.")
    if array.size and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise ValueError(f"{name} must hold integers; got dtype {array.dtype}.")
    array = array.astype(np.int64)
    info = np.iinfo(np.int32)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"{name} must fit in int32.")
    return array


def labels_digest(labels: np.ndarray) -> str:
    """12 hex characters of the SHA-256 of ``labels [N]`` as little-endian int32.

    Raises:
        ValueError: ``labels`` is not a 1-D integer array within int32.
    """
    y = _as_int_vector(labels, "labels").astype("<i4")
    return hashlib.sha256(y.tobytes()).hexdigest()[:_DIGEST_CHARS]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_predictions(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Encodes the predicted classes ``pred [N]`` of examples labelled ``labels [N]``.

    Args:
        pred: predicted class per example, integers ``>= 0``.
        labels: the examples' labels, integers, in the same order.

    Returns:
        The mapping described in the module docstring (JSON-safe).

    Raises:
        ValueError: not 1-D integer arrays of one length, a negative
            prediction, or values outside int32.
    """
    p = _as_int_vector(pred, "pred")
    y = _as_int_vector(labels, "labels")
    if len(p) != len(y):
        raise ValueError(f"pred has {len(p)} entries but labels has {len(y)}.")
    if p.size and p.min() < 0:
        raise ValueError(f"pred must be >= 0; got {int(p.min())}.")
    top = max(int(p.max()) if p.size else 0, int(y.max()) if y.size else 0)
    negative = bool(y.size) and int(y.min()) < 0
    if negative or top > np.iinfo(np.uint16).max:
        dtype = "int32"
    elif top > np.iinfo(np.uint8).max:
        dtype = "uint16"
    else:
        dtype = "uint8"
    raw = p.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return {
        "n": len(p),
        "dtype": dtype,
        "predictions": _b64(zlib.compress(raw, 9)),
        "correct": _b64(np.packbits(p == y).tobytes()),
        "labels_sha256": labels_digest(y),
    }


def _b64decode(text: Any, key: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"test predictions: {key!r} must be a base64 string.")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"test predictions: {key!r} is not valid base64 ({e}).") from e


def decode_predictions(
    d: Mapping[str, Any], *, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``encode_predictions`` output.

    Args:
        d: the encoded mapping (e.g. a row's ``test_predictions``).
        labels: optional ``[N]`` labels; when given, their digest must equal
            ``d["labels_sha256"]`` and ``correct`` must equal ``pred == labels``.

    Returns:
        ``(pred, correct)``: int32 ``[N]`` predicted classes and bool ``[N]``.

    Raises:
        ValueError: a missing key, a bad ``n``/``dtype``/digest, undecodable
            data, lengths that disagree with ``n``, non-zero padding bits, or
            ``labels`` that do not match.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"test predictions must be a mapping; got {type(d).__name__}.")
    missing = [k for k in KEYS if k not in d]
    if missing:
        raise ValueError(f"test predictions lack {missing}; expected keys {KEYS}.")
    n = d["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"test predictions: 'n' must be an int >= 0; got {n!r}.")
    if d["dtype"] not in DTYPES:
        raise ValueError(
            f"test predictions: 'dtype' must be one of {DTYPES}; got {d['dtype']!r}."
        )
    digest = d["labels_sha256"]
    if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise ValueError(
            "test predictions: 'labels_sha256' must be 12 lowercase hex "
            f"characters; got {digest!r}."
        )
    try:
        raw = zlib.decompress(_b64decode(d["predictions"], "predictions"))
    except zlib.error as e:
        raise ValueError(
            f"test predictions: 'predictions' is not zlib data ({e})."
        ) from e
    dtype = np.dtype(d["dtype"]).newbyteorder("<")
    if len(raw) != n * dtype.itemsize:
        raise ValueError(
            f"test predictions: 'predictions' holds {len(raw)} bytes; n = {n} "
            f"{d['dtype']} values need {n * dtype.itemsize}."
        )
    pred = np.frombuffer(raw, dtype).astype(np.int32)
    packed = np.frombuffer(_b64decode(d["correct"], "correct"), np.uint8)
    if len(packed) != (n + 7) // 8:
        raise ValueError(
            f"test predictions: 'correct' holds {len(packed)} bytes; n = {n} "
            f"needs {(n + 7) // 8}."
        )
    bits = np.unpackbits(packed)
    if bits[n:].any():
        raise ValueError("test predictions: 'correct' has non-zero padding bits.")
    correct = bits[:n].astype(bool)
    if labels is not None:
        y = _as_int_vector(labels, "labels")
        if len(y) != n:
            raise ValueError(
                f"test predictions hold {n} examples; labels has {len(y)}."
            )
        if labels_digest(y) != digest:
            raise ValueError(
                f"test predictions were scored on other labels (digest {digest}, "
                f"these labels {labels_digest(y)}): different test set or order."
            )
        if not np.array_equal(correct, pred == y):
            raise ValueError("test predictions: 'correct' disagrees with the labels.")
    return pred, correct
