"""Argument checks shared by the trunk builders (ResNet, RevNet, VGG).

Each returns the normalised value or raises a ``ValueError`` that names the
argument, echoes the received value and states the expected form (the
keras-hub builder convention), so a bad gin binding fails before any layer is
built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def is_positive_int(value: object) -> bool:
    """True for a Python/NumPy int > 0 (not a bool)."""
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and value > 0
    )


def check_positive_int(value: object, arg: str) -> int:
    """Returns ``value`` as an int or raises a ValueError."""
    if not is_positive_int(value):
        raise ValueError(f"{arg} must be a positive int, got {value!r}.")
    return int(value)


def check_four_positive_ints(values: Sequence[int], arg: str) -> tuple[int, ...]:
    """Returns ``values`` as a 4-tuple of ints or raises a ValueError."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{arg} must be a sequence of 4 positive ints (one per stage), "
            f"got {values!r}."
        )
    if len(values) != 4 or not all(is_positive_int(v) for v in values):
        raise ValueError(
            f"{arg} must be a sequence of 4 positive ints (one per stage), "
            f"got {tuple(values)!r}."
        )
    return tuple(int(v) for v in values)


def check_num_classes(num_classes: int | None) -> int | None:
    """None or a positive int (the size of the ``logits`` layer)."""
    if num_classes is not None and not is_positive_int(num_classes):
        raise ValueError(
            f"num_classes must be a positive int or None, got {num_classes!r}."
        )
    return None if num_classes is None else int(num_classes)


def check_weight_decay(weight_decay: float) -> float:
    """A finite float >= 0."""
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(
            f"weight_decay must be a finite float >= 0, got {weight_decay!r}."
        )
    return float(weight_decay)


def check_name(name: str | None, default: str) -> str:
    """``default`` for None, else a non-empty str without '/'."""
    if name is None:
        return default
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty str without '/', got {name!r}.")
    return name


def scaled_channels(width: float, per_k: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Channel counts ``base * width``, each required to be a positive integer.

    Args:
        width: the widening factor k (any positive number).
        per_k: ``(what, base)`` pairs, e.g. ``("stem", 16)``; ``what`` names
            the layer in the error message.

    Returns:
        ``{what: round(base * width)}``.

    Raises:
        ValueError: for a non-positive width or a count that is not a positive
            integer (the message names the layer and the product).
    """
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float, np.integer, np.floating))
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ValueError(f"width must be a positive number, got {width!r}.")
    counts = {}
    for what, base in per_k:
        exact = base * float(width)
        rounded = round(exact)
        if rounded < 1 or abs(exact - rounded) > 1e-6:
            smallest = min(b for _, b in per_k)
            raise ValueError(
                f"width={width!r} gives a non-integer or zero channel count for "
                f"the {what} ({base} * {width!r} = {exact!r}); choose a width "
                f"whose multiple {smallest:g} * width is a positive integer."
            )
        counts[what] = rounded
    return counts


def check_input_shape(
    input_shape: Sequence[int | None], *, static: bool = False
) -> tuple[int | None, ...]:
    """Checks ``(H, W, C)``: H, W positive ints (or None unless ``static``), C known."""
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or len(input_shape) != 3
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels), got {input_shape!r}."
        )
    h, w, c = input_shape
    for dim_name, dim in (("height", h), ("width", w)):
        if dim is None and static:
            raise ValueError(
                f"input_shape {dim_name} must be a known positive int for this "
                f"trunk (its fc6 kernel spans the final feature map), got "
                f"{tuple(input_shape)!r}."
            )
        if dim is not None and not is_positive_int(dim):
            raise ValueError(
                f"input_shape {dim_name} must be a positive int or None, "
                f"got {dim!r} in {tuple(input_shape)!r}."
            )
    if not is_positive_int(c):
        raise ValueError(
            f"input_shape channels must be a known positive int, got {c!r} "
            f"in {tuple(input_shape)!r}."
        )
    return tuple(None if d is None else int(d) for d in input_shape)
