"""Randomness of the pp ops: stateless per example when the pipeline says so.

Every random pp op draws through ``uniform`` / ``permutation`` here. Outside a
``seeded`` block they are TensorFlow's stateful ops (``tf.random.uniform``):
the behaviour of an op called by hand. Inside ``seeded(seed)``, entered by the
training pipeline (``data.pipeline.make_train_dataset``) around each example's
(or batch's) preprocessing, the k-th draw of the trace is
``tf.random.stateless_uniform(..., seed=fold_in(seed, k))``: a pure function
of the example's seed, which the pipeline derives from (run seed, input
pipeline, epoch, index in epoch).

That makes the training stream a function of its position alone: a run
resumed at step ``s`` rebuilds exactly the batches an uninterrupted run sees
from step ``s`` on (exact resume), and a parallel ``map`` gives the same
stream on every run (stateful ops inside a parallel map are drawn in
scheduling order).

The draw counter advances at trace time, so the seeds depend only on the
order of the random ops in the traced pipeline, never on values.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import tensorflow as tf

_local = threading.local()


@contextlib.contextmanager
def seeded(seed: tf.Tensor) -> Iterator[None]:
    """Within the block (while tracing), pp draws are stateless in ``seed``.

    Args:
      seed: int64 ``[2]``, the example's (or batch's) seed.
    """
    seed = tf.convert_to_tensor(seed, tf.int64)
    if seed.shape != (2,):
        raise ValueError(f"seed must be an int64 [2] tensor; got shape {seed.shape}.")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append([seed, 0])
    try:
        yield
    finally:
        stack.pop()


def _next_seed() -> tf.Tensor | None:
    stack = getattr(_local, "stack", None)
    if not stack:
        return None
    top = stack[-1]
    top[1] += 1
    return tf.random.experimental.stateless_fold_in(top[0], top[1])


def uniform(
    shape,
    minval: float | int | tf.Tensor = 0,
    maxval: float | int | tf.Tensor | None = None,
    dtype: tf.DType = tf.float32,
) -> tf.Tensor:
    """``tf.random.uniform`` semantics: ``[minval, maxval)``, ``maxval`` 1 for floats.

    Integer dtypes need ``maxval``.
    """
    seed = _next_seed()
    if seed is None:
        return tf.random.uniform(shape, minval, maxval, dtype=dtype)
    if maxval is None:
        if dtype.is_integer:
            raise ValueError("maxval is required for integer dtypes.")
        maxval = 1
    return tf.random.stateless_uniform(
        shape, seed=seed, minval=minval, maxval=maxval, dtype=dtype
    )


def permutation(n: int | tf.Tensor) -> tf.Tensor:
    """A uniformly random permutation of ``range(n)``, int32 ``[n]``.

    ``tf.random.shuffle`` outside a ``seeded`` block; inside, the argsort of
    ``n`` stateless uniforms (float64 keys: ties have probability ~n^2 / 2^53).
    """
    seed = _next_seed()
    if seed is None:
        return tf.random.shuffle(tf.range(n, dtype=tf.int32))
    keys = tf.random.stateless_uniform([n], seed=seed, dtype=tf.float64)
    return tf.cast(tf.argsort(keys, stable=True), tf.int32)
