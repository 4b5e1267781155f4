"""Class-balanced, seeded label subsets of a training split (paper Fig. 7).

Place in the data flow (stage 6): before a probe is fitted, the training rows
are restricted to a subset of the labelled examples, to measure how a
representation does with few labels (the paper's Fig. 7 trains the linear
model on 1%, 10%, 50% and 100% of the ImageNet labels).

Contract: ``balanced_subset(labels, fraction, seed)`` -> sorted int64 row
indices ``[M]``. The subset is class-balanced: every class contributes
``per_class = max(1, round(fraction * N / C))`` examples (or all it has, if
fewer; a warning says so), so class frequencies do not change with the
fraction. It is reproducible: the same labels, fraction and seed always give
the same rows, and the subsets of one seed are nested (the 1% subset lies
inside the 10% one), because each class's rows are drawn in one seeded
random order and a subset takes a prefix of it. NumPy only.
"""

from __future__ import annotations

import logging

import numpy as np

_logger = logging.getLogger(__name__)


def check_fraction(fraction: float) -> float:
    """Returns ``fraction`` as a float in ``(0, 1]`` or raises ValueError."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(
            f"fraction must be a float in (0, 1]; got {fraction!r}."
        ) from None
    if not (0.0 < value <= 1.0):
        raise ValueError(f"fraction must be a float in (0, 1]; got {fraction!r}.")
    return value


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of a class-balanced ``fraction`` of ``labels``.

    Args:
        labels: integer ``[N]`` labels (any non-negative class ids).
        fraction: in ``(0, 1]``; ``1`` returns every row (no balancing).
        seed: seeds the per-class random order (``np.random.default_rng``).

    Returns:
        Sorted int64 indices ``[M]``, ``M ~= fraction * N``.

    Raises:
        ValueError: labels not a non-empty 1-D integer array, a bad fraction,
            or a seed that is not an int.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"labels must be a non-empty 1-D integer array; got {y.dtype} {y.shape}."
        )
    fraction = check_fraction(fraction)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int; got {seed!r}.")
    if fraction == 1.0:
        return np.arange(y.size, dtype=np.int64)
    classes = np.unique(y)
    per_class = max(1, int(round(fraction * y.size / classes.size)))
    rng = np.random.default_rng(seed)
    chosen = []
    short = []
    for c in classes:  # ascending: the draw order is fixed by (labels, seed)
        rows = np.flatnonzero(y == c)
        order = rng.permutation(rows.size)
        if rows.size < per_class:
            short.append(int(c))
        chosen.append(rows[order[:per_class]])
    if short:
        _logger.warning(
            "Label subset %.3g: classes %s have fewer than %d examples; all of "
            "them are used, so the subset is not exactly balanced.",
            fraction,
            short[:10],
            per_class,
        )
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset_name(fraction: float) -> str:
    """``"1%"``, ``"10%"``, ``"0.5%"``, ``"100%"``: the label of a subset in reports."""
    return f"{100 * check_fraction(fraction):.3g}%"
