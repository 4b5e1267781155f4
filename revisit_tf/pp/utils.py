"""Helpers shared by the preprocessing ops (stage 2, ``pp``).

Contract:

* :func:`in_key_out_key` turns a factory of *image functions*
  (``image -> image``) into a factory of *ops* (``data dict -> data dict``)
  with two extra keyword-only arguments, ``key="image"`` (where the input is
  read) and ``key_result=None`` (where the result is written; ``None`` means
  ``key``). The op never mutates its input dict. This is big_vision's
  ``InKeyOutKey`` idea, written fresh, except that the wrapped factory keeps
  an honest ``inspect.signature`` so the builder can check arguments at build
  time.
* :func:`map_per_image` applies a function to one image ``[H, W, C]`` or to
  every element of a stack ``[K, H, W, C]`` (or deeper ``[..., H, W, C]``).
* :func:`per_image_coin` draws one Bernoulli coin per image of such a stack.
* ``check_*`` / ``parse_*`` validate factory arguments (build time) and raise
  ``ValueError`` naming the op, the bad value and the expected form.

Place in the data flow: used only by ``pp.ops_*``; no gin, no flags.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from revisit_tf.pp import rng

ImageFn = Callable[[tf.Tensor], tf.Tensor]


# --------------------------------------------------------------------------- #
# Build-time argument validation.
# --------------------------------------------------------------------------- #


def is_int(value: Any) -> bool:
    """True for Python/numpy integers, False for bools (``True`` is no size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for real numbers (ints or floats), False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_size(op: str, name: str, value: Any) -> tuple[int, int]:
    """Validates a spatial size given as ``int`` (square) or ``(h, w)``.

    Args:
        op: op name, for the error message.
        name: argument name, for the error message.
        value: ``s`` or ``(h, w)`` / ``[h, w]`` with positive ints.

    Returns:
        ``(h, w)`` as Python ints.

    Raises:
        ValueError: for anything else (negative, zero, floats, wrong length).
    """
    if is_int(value):
        pair = (value, value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(is_int(v) for v in value)
    ):
        pair = tuple(value)
    else:
        raise ValueError(
            f"{op}: `{name}` must be a positive int or a pair (height, width) of "
            f"positive ints, got {value!r}."
        )
    if min(pair) <= 0:
        raise ValueError(
            f"{op}: `{name}` must be positive, got {value!r} "
            "(expected an int > 0 or (height, width) with both > 0)."
        )
    return int(pair[0]), int(pair[1])


def check_positive_int(op: str, name: str, value: Any) -> int:
    """Returns ``value`` if it is an int > 0, else raises ``ValueError``."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{op}: `{name}` must be an int > 0, got {value!r}.")
    return int(value)


def check_probability(op: str, name: str, value: Any) -> float:
    """Returns ``value`` as float if it is a number in [0, 1], else raises."""
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"{op}: `{name}` must be a probability in [0, 1], got {value!r}."
        )
    return float(value)


def check_key(op: str, name: str, value: Any, *, allow_none: bool = False) -> Any:
    """Returns ``value`` if it is a non-empty str (or None when allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        expected = "a non-empty str or None" if allow_none else "a non-empty str"
        raise ValueError(f"{op}: `{name}` must be {expected}, got {value!r}.")
    return value


# --------------------------------------------------------------------------- #
# Data-dict helpers.
# --------------------------------------------------------------------------- #


def check_has_keys(op: str, data: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Raises ``ValueError`` naming the keys of ``keys`` missing from ``data``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{op}: expected a dict of tensors, got {type(data)!r}.")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(
            f"{op}: missing key(s) {missing} in the data dict; available keys: "
            f"{sorted(data)}."
        )


def in_key_out_key(factory: Callable[..., ImageFn]) -> Callable[..., Callable]:
    """Decorator: ``get_x(...) -> (image -> image)`` becomes an op factory.

    The decorated factory accepts the original arguments plus keyword-only
    ``key="image"`` and ``key_result=None``; it returns ``fn(data) -> data``
    that reads ``data[key]`` (converted to a tensor), applies the image
    function and writes the result to ``data[key_result or key]`` in a *new*
    dict. The decorated factory's ``__signature__`` lists all of these
    arguments, so ``inspect.signature(...).bind`` checks them exactly.

    Args:
        factory: ``get_<op>(...)`` returning an image function.

    Returns:
        The op factory.
    """
    op = factory.__name__.removeprefix("get_")
    original = inspect.signature(factory)
    for param in original.parameters.values():
        if param.name in ("key", "key_result"):
            raise ValueError(f"{op}: factory already has a `{param.name}` argument.")
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            raise ValueError(f"{op}: factories wrapped by in_key_out_key take no **kw.")
    extra = [
        inspect.Parameter("key", inspect.Parameter.KEYWORD_ONLY, default="image"),
        inspect.Parameter("key_result", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    params = list(original.parameters.values())
    # Keyword-only parameters must follow every positional one.
    params = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY] + [
        p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]

    @functools.wraps(factory)
    def _op_factory(
        *args: Any, key: str = "image", key_result: str | None = None, **kw
    ):
        check_key(op, "key", key)
        check_key(op, "key_result", key_result, allow_none=True)
        image_fn = factory(*args, **kw)
        out_key = key_result or key

        def _op(data: dict) -> dict:
            check_has_keys(op, data, [key])
            result = dict(data)
            result[out_key] = image_fn(tf.convert_to_tensor(data[key]))
            return result

        return _op

    # The wrapped factory returns an op (data -> data), not an image function.
    _op_factory.__signature__ = original.replace(
        parameters=params + extra, return_annotation=inspect.Signature.empty
    )
    return _op_factory


# --------------------------------------------------------------------------- #
# Image / stack helpers.
# --------------------------------------------------------------------------- #


def check_image_rank(op: str, image: tf.Tensor, *, max_rank: int | None = None) -> int:
    """Returns the static rank of ``image``; raises unless it is >= 3 (<= max).

    Images are ``[H, W, C]``; stacks of copies/patches ``[K, H, W, C]``.
    """
    rank = image.shape.rank
    if rank is None or rank < 3 or (max_rank is not None and rank > max_rank):
        expected = "[H, W, C]" if max_rank == 3 else "[H, W, C] or [K, H, W, C]"
        raise ValueError(
            f"{op}: expected an image {expected} with known rank, got shape "
            f"{image.shape} (dtype {image.dtype.name})."
        )
    return rank


def map_per_image(
    op: str, fn: ImageFn, image: tf.Tensor, out_dtype: tf.DType
) -> tf.Tensor:
    """Applies ``fn`` to one image ``[H, W, C]`` or to each image of a stack.

    Stacks ``[K, ..., H, W, C]`` are handled with ``tf.map_fn`` over the
    leading axis (recursively), so random ops draw independently per element
    (reference 3, "for a stack they apply to each element independently").

    Args:
        op: op name for error messages.
        fn: function of one ``[H, W, C]`` image; must return equal shapes for
            all elements of a stack.
        image: ``[H, W, C]`` or ``[..., H, W, C]``.
        out_dtype: dtype that ``fn`` returns.

    Returns:
        ``fn(image)`` for rank 3; the stacked per-element results otherwise.
    """
    rank = check_image_rank(op, image)
    if rank == 3:
        return fn(image)
    return tf.map_fn(
        lambda element: map_per_image(op, fn, element, out_dtype),
        image,
        fn_output_signature=tf.TensorSpec(None, out_dtype),
    )


def per_image_coin(image: tf.Tensor, p: float) -> tf.Tensor:
    """Draws one Bernoulli(p) coin per image, broadcastable against ``image``.

    Args:
        image: ``[H, W, C]`` or ``[..., H, W, C]``.
        p: success probability in [0, 1].

    Returns:
        bool ``[1, 1, 1]`` for a single image, ``[K, 1, 1, 1]`` for a stack
        (``[..., 1, 1, 1]`` in general); ``uniform[0, 1) < p`` is always True
        for ``p = 1`` and always False for ``p = 0``.
    """
    leading = tf.shape(image)[:-3]
    shape = tf.concat([leading, tf.ones([3], tf.int32)], axis=0)
    return rng.uniform(shape, dtype=tf.float32) < p


def with_static_hw(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Returns ``image`` with its static H and W (axes -3, -2) set.

    Uses ``tf.ensure_shape`` (a runtime check in graphs, a plain check in
    eager mode) so that downstream ops and ``tf.data`` see a static size.
    """
    shape = image.shape.as_list()
    shape[-3], shape[-2] = height, width
    return tf.ensure_shape(image, shape)


def describe(data: Mapping[str, Any]) -> str:
    """One line per key: ``key: dtype shape``, for the builder's logging."""
    lines = []
    for k in sorted(data):
        v = data[k]
        dtype = getattr(getattr(v, "dtype", None), "name", None) or type(v).__name__
        shape = getattr(v, "shape", None)
        lines.append(f"  {k}: {dtype} {list(shape) if shape is not None else ''}")
    return "\n".join(lines)
