"""Data access of the L-BFGS driver for features in shards (``solver.minimize``).

Place in the data flow (stage 6): ``probe/sharded.py`` builds one
``ShardData`` per training source and runs the same ``solver.minimize`` as
the whole-batch path on it: as one ``tf.function`` over every shard when the
shards need no copy (resident, or memory-mapped cache files that fit in the
memory available) and no strategy is given, else eagerly, round by round.
``J`` is a mean over examples, so every quantity the driver needs is a sum of
per-shard terms:

    Zd_s       = X~_s d                                   [n_s, C] per shard
    N phi(t)   = sum_s sum_{i in s} CE(Z_s + t Zd_s)_i + N (l2/2) ||W + t dW||^2
    N dJ/dW    = sum_s X_s^T (P_s - Y_s) + N l2 W          [D, C]

The per-shard logits ``Z_s`` and ``Zd_s`` stay resident (``[N, C]`` in all,
much smaller than ``[N, D]`` when C < D), so a line-search trial is
``O(N C)`` and an iteration costs two passes over the shards, as on the
whole-batch path: one for ``Zd``, one for ``X^T R`` at the accepted step
(which also recomputes ``Z`` exactly every ``solver.LOGITS_REFRESH_EVERY``
iterations). Shards are resident (standardized once and placed on their
replica) or streamed from the feature cache at every pass (memory maps, or
copies read one shard ahead). Under a ``tf.distribute`` strategy each round
of ``num_replicas`` shards runs with ``strategy.run`` and the sums are
``strategy.reduce(SUM)``; the per-shard ``Z_s`` stay on their replica.

Precision: per-shard products in ``dtype`` (float32 by default, the cache's
precision); row sums are cast to ``accumulate_dtype`` (float64) before the sum
over rows and shards, and the L-BFGS state is in ``accumulate_dtype``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from revisit_tf.probe import arrays, model, solver


@functools.cache
def _shard_functions(dtype: tf.DType, acc: tf.DType) -> dict:
    """The compiled per-shard terms for (compute dtype, accumulate dtype).

    Shapes: x ``[n, D]`` (standardized), y ``[n]`` int32, z/zd ``[n, C]``
    (dtype), w ``[D, C]``, b ``[C]`` and t ``[]`` (acc). Sums come back in acc.
    """
    mat = tf.TensorSpec([None, None], dtype)
    vec = tf.TensorSpec([None], dtype)
    labels = tf.TensorSpec([None], tf.int32)
    w_spec, b_spec = tf.TensorSpec([None, None], acc), tf.TensorSpec([None], acc)
    t_spec = tf.TensorSpec([], acc)

    def total(v):  # [n] or [n, C] in dtype -> [] in acc (row sums first)
        if v.shape.rank == 2:
            v = tf.reduce_sum(v, axis=1)
        return tf.reduce_sum(tf.cast(v, acc))

    def picked(m, y):  # m[i, y_i]: [n]
        return tf.gather(m, y[:, None], axis=1, batch_dims=1)[:, 0]

    @tf.function(input_signature=[mat, vec, vec])
    def standardize(x, mean, scale):
        return (x - mean) / scale

    @tf.function(input_signature=[mat, w_spec, b_spec])
    def logits(x, w, b):
        return tf.matmul(x, tf.cast(w, dtype)) + tf.cast(b, dtype)

    @tf.function(input_signature=[labels, b_spec])
    def constant(y, b):
        return tf.zeros([tf.shape(y)[0], tf.size(b)], dtype) + tf.cast(b, dtype)

    @tf.function(input_signature=[mat, mat, t_spec])
    def advance(z, zd, t):
        return z + tf.cast(t, dtype) * zd

    @tf.function(input_signature=[mat, mat, labels, t_spec])
    def line(z, zd, y, t):
        log_probs = tf.nn.log_softmax(z + tf.cast(t, dtype) * zd)
        ce = -total(picked(log_probs, y))
        dce = total(tf.exp(log_probs) * zd) - total(picked(zd, y))
        return ce, dce

    def gradient_terms(x, y, z):
        log_probs = tf.nn.log_softmax(z)
        residual = tf.exp(log_probs) - tf.one_hot(y, tf.shape(z)[1], dtype=dtype)
        grad_x = tf.matmul(x, residual, transpose_a=True)  # X^T (P - Y): [D, C]
        return (
            -total(picked(log_probs, y)),
            tf.cast(grad_x, acc),
            tf.cast(tf.reduce_sum(residual, axis=0), acc),
        )

    gradient = tf.function(gradient_terms, input_signature=[mat, labels, mat])

    @tf.function(input_signature=[mat, labels, w_spec, b_spec])
    def fresh(x, y, w, b):
        z = tf.matmul(x, tf.cast(w, dtype)) + tf.cast(b, dtype)
        return (z, *gradient_terms(x, y, z))

    @tf.function(input_signature=[mat])
    def gram(x):
        return tf.cast(tf.matmul(x, x, transpose_a=True), acc)

    @tf.function(input_signature=[mat])
    def max_abs(x):
        return tf.cast(tf.reduce_max(tf.abs(x), axis=None, keepdims=False), acc)

    return {
        "standardize": standardize,
        "logits": logits,
        "constant": constant,
        "advance": advance,
        "line": line,
        "gradient": gradient,
        "fresh": fresh,
        "gram": gram,
        "max_abs": max_abs,
    }


# ``ShardData.minimize`` runs in one graph over mapped files up to this
# fraction of the memory available (``available_memory``): all their pages may
# be touched by one pass's parallel shard products. Larger sources run round by
# round, with the kernel's read-ahead started one shard ahead.
IN_GRAPH_MAPPED_FRACTION = 0.5
# ... and over at most this many rounds: the graph holds every round's terms,
# so its trace grows with the rounds (64 rounds of 1000 classes: the first fit
# took 43 s on 2 cores). Past it each round is large (64 MiB cache shards: 1 GiB in the
# graph), and a pass's Python overhead round by round is small beside it.
IN_GRAPH_MAX_ROUNDS = 16


def available_memory() -> int:
    """Bytes of memory available (``MemAvailable`` of ``/proc/meminfo``, else
    the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _ShardTerms:
    """The driver's per-shard terms (``solver.minimize``'s data interface).

    Subclasses give ``rounds()`` (``(x, y)`` per round, one pass), ``_labels``
    (``y`` per round), ``_run``, ``_sum``, ``cond``, ``while_loop``,
    ``line_search``, ``two_loop`` and ``num_examples``; ``Z``/``Zd`` are lists
    with one ``[n_s, C]`` tensor per round.
    """

    _fn: dict

    def _run(self, fn, *args):
        return fn(*args)

    def _sum(self, value):
        return value

    def _sums(self, parts) -> list:
        totals = None
        for part in parts:
            part = [self._sum(v) for v in part]
            totals = (
                part
                if totals is None
                else [a + b for a, b in zip(totals, part, strict=True)]
            )
        return totals

    def logits(self, w, b):
        return [self._run(self._fn["logits"], x, w, b) for x, _ in self.rounds()]

    direction = logits

    def advance(self, z, zd, t):
        return [
            self._run(self._fn["advance"], a, b, t) for a, b in zip(z, zd, strict=True)
        ]

    def line(self, z, zd, t):
        parts = (
            self._run(self._fn["line"], a, b, y, t)
            for a, b, y in zip(z, zd, self._labels, strict=True)
        )
        return tuple(self._sums(parts))

    def gradient(self, z):
        parts = (
            self._run(self._fn["gradient"], x, y, zi)
            for (x, y), zi in zip(self.rounds(), z, strict=True)
        )
        ce, grad_x, grad_b = self._sums(parts)
        n = self.num_examples
        return ce / n, grad_x / n, grad_b / n

    def fresh_gradient(self, w, b):
        z, parts = [], []
        for x, y in self.rounds():
            zi, *sums = self._run(self._fn["fresh"], x, y, w, b)
            z.append(zi)
            parts.append(sums)
        ce, grad_x, grad_b = self._sums(parts)
        n = self.num_examples
        return z, ce / n, grad_x / n, grad_b / n


class _InGraph(_ShardTerms):
    """``_ShardTerms`` over every shard at once, inside one ``tf.function``.

    ``xs``/``ys``: one ``[n_s, D]`` / ``[n_s]`` tensor per shard (mapped or
    resident, no copy); ``standardizer``: ``(mean, scale)`` applied to a shard
    where it is used (never to all of them at once), or None.
    """

    def __init__(self, fn, xs, ys, standardizer, num_examples, num_classes, dtype):
        self._fn, self._xs, self._labels = fn, list(xs), list(ys)
        self._standardizer = standardizer
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.dtype = dtype

    def rounds(self):
        for x, y in zip(self._xs, self._labels, strict=True):
            if self._standardizer is not None:
                x = self._fn["standardize"](x, *self._standardizer)
            yield x, y

    def constant_logits(self, b):
        return [self._fn["constant"](y, b) for y in self._labels]

    def line_search(self, z, zd, *scalars):
        return solver.line_search(self.line, self.num_examples, z, zd, *scalars)

    two_loop = staticmethod(solver.two_loop_direction)
    cond = staticmethod(tf.cond)
    while_loop = staticmethod(solver.ResidentData.while_loop)


class ShardData(_ShardTerms):
    """``solver.minimize``'s data access over a ``sharded.ShardSource``.

    ``Z``/``Zd`` are lists with one ``[n_s, C]`` tensor per round (a
    per-replica value under a strategy). Without a strategy, over shards that
    need no copy (resident, or memory-mapped files that fit in the memory
    available), ``minimize`` runs the whole solve as one ``tf.function``
    (``in_graph``, ``minimize``), as the whole-batch path does; otherwise it
    runs eagerly, round by round.

    Example:
        >>> data = ShardData(source, num_classes=10, standardizer=s)
        >>> z = data.logits(w, b)               # list of [n_s, C]
        >>> ce, grad_x, grad_b = data.gradient(z)
    """

    def __init__(
        self,
        source,
        *,
        num_classes: int,
        dtype: tf.DType = tf.float32,
        accumulate_dtype: tf.DType = tf.float64,
        standardizer: model.Standardizer | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ):
        """Args:
        source: ``sharded.ShardSource`` (resident or streamed).
        num_classes: C.
        dtype: dtype of the per-shard products.
        accumulate_dtype: dtype of the sums and of the L-BFGS state.
        standardizer: applied to every shard (once if resident).
        strategy: distribute rounds of shards over its replicas.
        """
        self.source, self.strategy = source, strategy
        self.compute_dtype, self.dtype = dtype, accumulate_dtype
        self.num_classes = int(num_classes)
        self.num_examples = tf.constant(source.num_examples, accumulate_dtype)
        self.num_replicas = 1 if strategy is None else strategy.num_replicas_in_sync
        self.passes = 0
        self._fn = _shard_functions(dtype, accumulate_dtype)
        np_dtype = dtype.as_numpy_dtype
        self._standardizer = None
        if standardizer is not None:
            if standardizer.mean.shape != (source.dim,):
                raise ValueError(
                    f"standardizer has {standardizer.mean.shape[0]} features; the "
                    f"source has {source.dim}."
                )
            self._standardizer = (
                tf.constant(standardizer.mean.astype(np_dtype)),
                tf.constant(standardizer.scale.astype(np_dtype)),
            )
        self._labels: list = []
        # The line search (O(N C) a trial on the resident logits) and the
        # two-loop recursion, compiled: eager they cost more than a pass over
        # small shards. One trace per ShardData (lists of fixed length).
        # Under a strategy the logits are per-replica values: eager.
        if strategy is None:
            self.line_search = tf.function(self._line_search, reduce_retracing=True)
            self.two_loop = tf.function(solver.two_loop_direction)
        else:
            self.line_search, self.two_loop = (
                self._line_search,
                solver.two_loop_direction,
            )
        self._graph_solve = None
        self._resident = None
        if not source.streamed:
            self._resident = list(self._placed_rounds())

    # -- shards -------------------------------------------------------------

    def _groups(self) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        """Rounds of ``num_replicas`` consecutive shards (the last padded empty)."""
        group = []
        for shard in self.source.iter_shards():
            group.append(shard)
            if len(group) == self.num_replicas:
                yield group
                group = []
        if group:
            empty = (np.zeros([0, self.source.dim]), np.zeros([0], np.int32))
            yield group + [empty] * (self.num_replicas - len(group))

    def _run(self, fn, *args):
        if self.strategy is None:
            return fn(*args)
        # A plain callable: given a tf.function, MirroredStrategy.run in eager
        # mode would retrace it on the distributed values themselves.
        return self.strategy.run(lambda *a: fn(*a), args=args)

    def _sum(self, value):
        if self.strategy is None:
            return value
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[tf.Tensor, tf.Tensor]:
        """One shard as tensors (x in the compute dtype, not standardized)."""
        x = np.asarray(x, self.compute_dtype.as_numpy_dtype)
        # A streamed shard is a memory map or a fresh (aligned) buffer per
        # read: shared with TensorFlow, not copied. Resident shards are views
        # of the caller's arrays: copied once.
        if self.source.streamed:
            x = arrays.as_tensor(x, self.compute_dtype)
        else:
            x = tf.constant(x)
        return x, tf.constant(y, tf.int32)

    def _place(self, group):
        """``(x, y)`` of one round on the replicas' devices, x standardized."""

        def tensors(index):
            return self._tensors(*group[index])

        if self.strategy is None:
            x, y = tensors(0)
        else:
            distribute = self.strategy.experimental_distribute_values_from_function
            x, y = (
                distribute(lambda ctx, k=k: tensors(ctx.replica_id_in_sync_group)[k])
                for k in (0, 1)
            )
        if self._standardizer is not None:
            x = self._run(self._fn["standardize"], x, *self._standardizer)
        return x, y

    def _placed_rounds(self):
        for group in self._groups():
            yield self._place(group)

    def rounds(self) -> Iterator[tuple]:
        """``(x, y)`` per round: resident, or read and placed now (one pass)."""
        self.passes += 1
        rounds = self._resident if self._resident is not None else self._placed_rounds()
        for index, (x, y) in enumerate(rounds):
            if index == len(self._labels):
                self._labels.append(y)
            yield x, y

    # -- the driver's interface (solver.minimize) ---------------------------

    def constant_logits(self, b):
        if len(self._labels) < self._num_rounds():
            return self.logits(
                tf.zeros([self.source.dim, self.num_classes], self.dtype), b
            )
        return [self._run(self._fn["constant"], y, b) for y in self._labels]

    def _num_rounds(self) -> int:
        return -(-self.source.num_shards // self.num_replicas)

    def _line_search(self, z, zd, *scalars):
        return solver.line_search(self.line, self.num_examples, z, zd, *scalars)

    @staticmethod
    def cond(pred, true_fn, false_fn):
        return true_fn() if bool(pred) else false_fn()

    @staticmethod
    def while_loop(cond, body, state):
        while bool(cond(state)):
            state = body(state)
        return state

    # -- the whole solve in one graph ---------------------------------------

    def in_graph(self) -> bool:
        """Whether ``minimize`` runs as one ``tf.function``: no strategy, at
        most ``IN_GRAPH_MAX_ROUNDS`` shards, and shards that need no copy
        (resident, or memory-mapped files taking at most
        ``IN_GRAPH_MAPPED_FRACTION`` of the memory available)."""
        if self.strategy is not None or self._num_rounds() > IN_GRAPH_MAX_ROUNDS:
            return False
        if not self.source.streamed:
            return True
        return (
            self.source.mapped
            and self.source.nbytes <= IN_GRAPH_MAPPED_FRACTION * available_memory()
        )

    def minimize(
        self,
        position: tf.Tensor,
        *,
        l2: tf.Tensor,
        tolerance: tf.Tensor,
        max_iterations: tf.Tensor,
        coordinates: solver.Coordinates,
    ) -> dict[str, tf.Tensor]:
        """``solver.minimize`` on this data (same arguments and result).

        In one graph if ``in_graph()`` (like the whole-batch path: no Python
        between the passes, one trace per ``ShardData`` and preconditioner
        variant), else eagerly round by round. Either way ``passes`` counts
        the passes over the shards.
        """
        args = dict(l2=l2, tolerance=tolerance, max_iterations=max_iterations)
        if not self.in_graph():
            return solver.minimize(self, position, coordinates=coordinates, **args)
        if self._resident is not None:
            xs, ys = zip(*self._resident, strict=True)
            standardizer = None  # standardized when placed
        else:  # mapped: every shard at once costs no copy
            xs, ys = zip(
                *(self._tensors(x, y) for x, y in self.source.iter_shards()),
                strict=True,
            )
            standardizer = self._standardizer
        if self._graph_solve is None:
            self._graph_solve = self._graph_solver(standardizer)
        out = self._graph_solve(
            list(xs), list(ys), position, coordinates.terms, coordinates.full, **args
        )
        # A pass for Z (none from W = 0, as in ``solver.minimize``), one for
        # the first gradient, then two per iteration (Zd, and X^T R or a fresh
        # Z with it).
        weights = tf.reshape(position, [-1, self.num_classes])[:-1]
        start = 0 if bool(tf.reduce_all(tf.equal(weights, 0))) else 1
        self.passes += start + 1 + 2 * int(out["iterations"])
        return out

    def _graph_solver(self, standardizer):
        fn, meta = self._fn, (self.num_examples, self.num_classes, self.dtype)

        def solve(xs, ys, position, terms, full, **args):
            data = _InGraph(fn, xs, ys, standardizer, *meta)
            coordinates = solver.Coordinates(terms, full)
            return solver.minimize(data, position, coordinates=coordinates, **args)

        return tf.function(solve, reduce_retracing=True)

    # -- one-pass statistics ------------------------------------------------

    def gram(self) -> np.ndarray:
        """``S = X^T X / N`` ``[D, D]`` float64 (standardized features)."""
        (total,) = self._sums(
            [self._run(self._fn["gram"], x)] for x, _ in self.rounds()
        )
        return tf.cast(total, tf.float64).numpy() / self.source.num_examples

    def max_abs_feature(self) -> float:
        """``max |x|`` over the features the solver sees (standardized)."""
        out = 0.0
        for x, _ in self.rounds():
            value = self._run(self._fn["max_abs"], x)
            if self.strategy is not None:
                value = self.strategy.reduce(
                    tf.distribute.ReduceOp.MAX, value, axis=None
                )
            out = max(out, float(value))
        return out
