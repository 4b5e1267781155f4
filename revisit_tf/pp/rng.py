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

``position()`` and ``seeded_rows`` let a pipeline be split between the host
and the accelerator (``pp.device``) without changing a single draw: the host
part records each example's seed and draw count, and the batch part, run on
``[B, ...]`` inside the training step, continues every row's draws from
there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import tensorflow as tf

_local = threading.local()

# Named, not "auto_select": TensorFlow's CPU kernels pick Philox, but XLA's
# auto choice draws other numbers, and the batch part of a split pipeline
# (pp.device) must draw in the compiled step what the host would. With Philox
# named and int32 seeds, XLA and the kernels draw the same *integers* bit for
# bit (measured over shapes 1-1001, bounded and full range), but not the same
# floats, nor from int64 seeds of more than 32 bits (hence ``row_key``, and
# integer-only draws in the batch part).
ALG = "philox"


def _in_device_part() -> bool:
    stack = getattr(_local, "stack", None)
    return bool(stack) and stack[-1][0][0] in ("rows", "key")


@contextlib.contextmanager
def seeded(seed: tf.Tensor) -> Iterator[None]:
    """Within the block (while tracing), pp draws are stateless in ``seed``.

    Args:
      seed: int64 ``[2]``, the example's (or batch's) seed.
    """
    seed = tf.convert_to_tensor(seed, tf.int64)
    if seed.shape != (2,):
        raise ValueError(f"seed must be an int64 [2] tensor; got shape {seed.shape}.")
    with _entered(("seed", seed)):
        yield


def row_key(seed: tf.Tensor) -> tf.Tensor:
    """int32 ``[]``: the seed-dependent half of ``seeded(seed)``'s draw seeds.

    ``stateless_fold_in(seed, k)`` is ``[row_key(seed), k]`` for an int32
    ``k`` (TensorFlow's definition: a full-range int32 drawn from ``seed``,
    then ``k``). The host part of a split pipeline sends this key instead of
    the int64 seed: XLA hashes int64 seeds of more than 32 bits differently
    from TensorFlow's kernels, an int32 key alike.
    """
    return tf.random.stateless_uniform(
        [],
        seed=tf.convert_to_tensor(seed, tf.int64),
        minval=None,
        maxval=None,
        dtype=tf.int32,
    )


@contextlib.contextmanager
def seeded_key(key: tf.Tensor) -> Iterator[None]:
    """``seeded(seed)`` given ``row_key(seed)`` (int32 ``[]``) instead of ``seed``.

    The same draws, from a key that XLA and TensorFlow's kernels hash alike
    (the batch pp ops of a split pipeline, run in the compiled step).
    """
    key = tf.convert_to_tensor(key, tf.int32)
    if key.shape.rank != 0:
        raise ValueError(f"seeded_key needs an int32 scalar key; got {key.shape}.")
    with _entered(("key", key)):
        yield


@contextlib.contextmanager
def _entered(source: tuple) -> Iterator[None]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append([source, 0])
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def seeded_rows(keys: tf.Tensor, draws: tf.Tensor) -> Iterator[None]:
    """Within the block, a draw of shape ``[B, *rest]`` is made row by row.

    Row ``b`` gets exactly the ``[1, *rest]`` draw that an op run on example
    ``b`` alone (leading size 1) would have made inside ``seeded(seed_b)``
    after ``draws[b]`` earlier draws: the batch continues each example's
    stream where the host stopped (``pp.device``). ``permutation`` is not
    available here (no batch op needs one per row).

    Args:
      keys: int32 ``[B]``, ``row_key(seed_b)`` of each example.
      draws: int32 ``[B]``, each example's draw count so far (``position()[1]``).
    """
    keys = tf.convert_to_tensor(keys, tf.int32)
    draws = tf.convert_to_tensor(draws, tf.int32)
    if keys.shape.rank != 1 or draws.shape.rank != 1:
        raise ValueError(
            "seeded_rows needs int32 keys [B] and draw counts [B]; got shapes "
            f"{keys.shape} and {draws.shape}."
        )
    with _entered(("rows", keys, draws)):
        yield


def position() -> tuple[tf.Tensor, int] | None:
    """``(seed, draws so far)`` of the innermost ``seeded`` block, or None.

    Called by the host part of a split pipeline (``pp.device``) after its
    last op, so that the batch part can continue the same draws.
    """
    stack = getattr(_local, "stack", None)
    if not stack or stack[-1][0][0] != "seed":
        return None
    return stack[-1][0][1], stack[-1][1]


def _next_seed() -> tf.Tensor | None:
    """The next draw's seed: ``[2]``, or ``[B, 2]`` (one per row) in seeded_rows."""
    stack = getattr(_local, "stack", None)
    if not stack:
        return None
    top = stack[-1]
    top[1] += 1
    kind, *source = top[0]
    if kind == "rows":  # every row's own seed, [B, 2] int32
        keys, draws = source
        return tf.stack([keys, draws + top[1]], axis=1)
    if kind == "key":  # = stateless_fold_in(seed, k) for key = row_key(seed)
        return tf.stack([source[0], tf.constant(top[1], tf.int32)])
    return tf.random.experimental.stateless_fold_in(source[0], top[1], alg=ALG)


def _row_uniform(seeds, shape, minval, maxval, dtype) -> tf.Tensor:
    """``[B, *rest]``: row b drawn as ``[1, *rest]`` with its seed ``seeds[b]``."""
    shape = tf.convert_to_tensor(shape, tf.int32)
    check = tf.debugging.assert_equal(
        shape[0],
        tf.shape(seeds)[0],
        message="pp.rng.seeded_rows: a draw's leading size must be the batch size",
    )
    with tf.control_dependencies([check]):
        row_shape = tf.concat([[1], shape[1:]], axis=0)

    def draw(seed):
        out = tf.random.stateless_uniform(
            row_shape, seed=seed, minval=minval, maxval=maxval, dtype=dtype, alg=ALG
        )
        return out[0]

    return tf.map_fn(draw, seeds, fn_output_signature=dtype)


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
    if dtype.is_floating and _in_device_part():
        raise ValueError(
            f"pp.rng.uniform: a {dtype.name} draw in the batch part of a split "
            "pipeline (pp.device) would differ under XLA from the host's (XLA "
            "draws the same integers as TensorFlow's kernels, not the same "
            "floats); draw integers, or run the op in the host pipeline."
        )
    if seed.shape.rank == 2:  # seeded_rows: [B, 2]
        return _row_uniform(seed, shape, minval, maxval, dtype)
    return tf.random.stateless_uniform(
        shape, seed=seed, minval=minval, maxval=maxval, dtype=dtype, alg=ALG
    )


def permutation(n: int | tf.Tensor) -> tf.Tensor:
    """A uniformly random permutation of ``range(n)``, int32 ``[n]``.

    ``tf.random.shuffle`` outside a ``seeded`` block; inside, the stable
    argsort of ``n`` stateless full-range int64 keys (ties have probability
    ~n^2 / 2^65). Integer keys, not floats: XLA draws the same integers as
    TensorFlow's kernels, not the same floats (see ``ALG``).
    """
    seed = _next_seed()
    if seed is None:
        return tf.random.shuffle(tf.range(n, dtype=tf.int32))
    if seed.shape.rank == 2:
        raise ValueError(
            "pp.rng.permutation inside seeded_rows: a permutation per row is not "
            "supported on the device; run the op in the host pipeline."
        )
    keys = tf.random.stateless_uniform(
        [n], seed=seed, minval=None, maxval=None, dtype=tf.int64, alg=ALG
    )
    return tf.cast(tf.argsort(keys, stable=True), tf.int32)
