"""The L-BFGS probe on sharded features: streamed from the cache, across replicas.

Place in the data flow (stage 6): the same problem as ``probe/lbfgs.py`` (see
its module docstring for ``J``, ``R`` and the gradient), for features that do
not fit in memory or that are spread over several devices. ``J`` is a mean
over examples, so it and its gradient are sums of per-shard terms:

    N J(Theta)  = sum_s sum_{i in s} CE_i + N (l2 / 2) ||W||_F^2
    N dJ/dTheta = sum_s X~_s^T (P_s - Y_s) + N l2 [W; 0]      [D+1, C]

Each shard's sums are computed by one compiled function; under a
``tf.distribute`` strategy the shards of a round go to the replicas (one each)
and ``strategy.reduce(SUM)`` adds them, so the same probe runs on one CPU, N
GPUs or a TPU. Shards are either resident (held once, placed on their replica)
or streamed from a ``cache.CachedFeatures`` entry at every evaluation, reading
the next shard while the current one is processed; then memory holds a few
shards, never the ``[N, D]`` matrix: about 7 shard-sized buffers (the shard,
its tensor, the standardized copy and temporaries, the next shard), so pick
the cache's ``shard_bytes`` below an eighth of the memory to spare
(``revisit-benchmark probe`` measures the peak).

Contract:
  * ``ShardSource``: ``[N, D]`` features and ``[N]`` labels as row shards
    (``from_arrays`` or ``from_cache``);
  * ``ShardedObjective(source, ...)(position)`` -> ``(J, dJ/dTheta)``, equal
    to ``lbfgs.objective_and_gradient`` up to summation order;
  * ``fit_sharded`` / ``sweep_l2_sharded``: ``tfp.optimizer.lbfgs_minimize``
    run eagerly on that objective; results are ``lbfgs.ProbeFit`` /
    ``lbfgs.SweepResult`` like the whole-batch path;
  * ``top1`` / ``result_accuracy`` (fraction correct) and ``predict`` /
    ``result_predict`` (int32 ``[N]`` classes) score a source shard by shard.

Precision defaults (``dtype=tf.float32``, ``accumulate_dtype=tf.float64``):
the per-shard products run in float32 (half the bytes of float64 and about
twice the speed on CPUs and GPUs, and the precision the features are cached
in), while the cross-shard sums and the L-BFGS state are float64: a sum over
N examples accumulated in float32 loses about ``log2(N / shard)`` more bits
than one in float64, and L-BFGS's line search compares objective values that
differ by less than float32 resolves near the optimum (``lbfgs`` docstring).
With float64 accumulation the result does not depend on the number of shards
or replicas beyond float32 rounding inside one shard (~1e-7 relative).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from revisit_tf import progress as progress_lib
from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import lbfgs

_logger = logging.getLogger(__name__)


class ShardSource:
    """``[N, D]`` features and ``[N]`` labels as an ordered list of row shards.

    Example:
        >>> src = ShardSource.from_arrays(x, y, rows_per_shard=10_000)
        >>> src = ShardSource.from_cache(cached_features)   # streamed
        >>> both = ShardSource.concat([src_train, src_val])
        >>> for xs, ys in src.iter_shards(): ...             # [n_i, D], [n_i]
    """

    def __init__(
        self,
        readers: Sequence[Callable[[], tuple[np.ndarray, np.ndarray]]],
        *,
        dim: int,
        labels: np.ndarray,
        streamed: bool,
    ):
        """Low level; use ``from_arrays``, ``from_cache`` or ``concat``.

        Args:
            readers: one callable per shard returning ``([n_i, D], [n_i])``.
            dim: D.
            labels: all labels, ``[N]`` (shard order).
            streamed: whether readers read from disk.
        """
        if not readers:
            raise ValueError("a ShardSource needs at least one shard.")
        self._readers = list(readers)
        self.dim = int(dim)
        self.labels = np.asarray(labels, np.int32)
        self.num_examples = len(self.labels)
        self.num_shards = len(self._readers)
        self.streamed = streamed

    @classmethod
    def from_arrays(
        cls, features: np.ndarray, labels: np.ndarray, *, rows_per_shard: int
    ) -> ShardSource:
        """Resident shards: views of ``features [N, D]`` / ``labels [N]``.

        Raises:
            ValueError: malformed arrays or ``rows_per_shard < 1``.
        """
        if isinstance(rows_per_shard, bool) or not (
            isinstance(rows_per_shard, int) and rows_per_shard >= 1
        ):
            raise ValueError(
                f"rows_per_shard must be an int >= 1; got {rows_per_shard!r}."
            )
        x = lbfgs._check_features(features, "features")
        y = lbfgs._check_labels(labels, "labels", x.shape[0], None)
        readers = [
            functools.partial(
                lambda i: (x[i : i + rows_per_shard], y[i : i + rows_per_shard]), i
            )
            for i in range(0, len(y), rows_per_shard)
        ]
        return cls(readers, dim=x.shape[1], labels=y, streamed=False)

    @classmethod
    def from_cache(cls, entry: cache_lib.CachedFeatures) -> ShardSource:
        """Streamed shards of a feature-cache entry (read at every pass)."""
        readers = [functools.partial(entry.shard, i) for i in range(entry.num_shards)]
        return cls(readers, dim=entry.dim, labels=entry.labels, streamed=True)

    @classmethod
    def concat(cls, sources: Sequence[ShardSource]) -> ShardSource:
        """The shards of ``sources`` one after the other (e.g. train + val)."""
        dims = {s.dim for s in sources}
        if len(dims) != 1:
            raise ValueError(f"sources differ in feature dimension: {sorted(dims)}.")
        return cls(
            [r for s in sources for r in s._readers],
            dim=dims.pop(),
            labels=np.concatenate([s.labels for s in sources]),
            streamed=any(s.streamed for s in sources),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the matrix in float32 (``4 N D``)."""
        return 4 * self.num_examples * self.dim

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``index``: ``[n_i, D]`` features, int32 ``[n_i]`` labels."""
        x, y = self._readers[index]()
        return x, np.asarray(y, np.int32)

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields every shard in order; streamed sources read one shard ahead."""
        if not self.streamed:
            for i in range(self.num_shards):
                yield self.shard(i)
            return
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.shard, 0)
            for i in range(self.num_shards):
                current = pending.result()
                if i + 1 < self.num_shards:
                    pending = pool.submit(self.shard, i + 1)
                yield current


def fit_standardizer(
    source: ShardSource, *, min_scale: float = 1e-8
) -> lbfgs.Standardizer:
    """``lbfgs.Standardizer`` from one pass over the shards.

    Per-shard mean and sum of squared deviations (float64) are merged with
    Chan et al.'s pairwise update, which avoids the cancellation of
    ``E[x^2] - E[x]^2``; the result equals ``Standardizer.fit`` on the
    concatenated rows to rounding.
    """
    count, mean, m2 = 0, np.zeros(source.dim), np.zeros(source.dim)
    for x, _ in source.iter_shards():
        n = len(x)
        if n == 0:
            continue
        x_mean = np.mean(x, axis=0, dtype=np.float64)
        x_m2 = np.sum(np.square(x - x_mean), axis=0, dtype=np.float64)
        delta = x_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + x_m2 + np.square(delta) * (count * n / total)
        count = total
    std = np.sqrt(m2 / count)
    return lbfgs.Standardizer(mean=mean, scale=np.where(std > min_scale, std, 1.0))


@functools.cache
def _compiled_partial(dtype: tf.DType, accumulate_dtype: tf.DType):
    """Per-shard sums ``(sum_i CE_i, X~^T (P - Y))``, traced once per dtype pair.

    Shapes: x ``[n, D]`` (dtype), y ``[n]`` int32, theta ``[D+1, C]``
    (accumulate dtype), mean/scale ``[D]``. Returns a scalar and ``[D+1, C]``
    in ``accumulate_dtype``. An empty shard gives zeros.
    """

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], dtype),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], accumulate_dtype),
            tf.TensorSpec([None], dtype),
            tf.TensorSpec([None], dtype),
        ]
    )
    def partial(x, y, theta, mean, scale):
        x = (x - mean) / scale  # standardize on the fly: [n, D]
        theta = tf.cast(theta, dtype)
        logits = tf.matmul(x, theta[:-1]) + theta[-1]  # Z: [n, C]
        log_probs = tf.nn.log_softmax(logits)
        nll = -tf.reduce_sum(tf.gather(log_probs, y[:, None], axis=1, batch_dims=1))
        residual = tf.exp(log_probs) - tf.one_hot(y, tf.shape(theta)[1], dtype=dtype)
        grad = tf.concat(
            [
                tf.matmul(x, residual, transpose_a=True),  # X^T (P - Y): [D, C]
                tf.reduce_sum(residual, axis=0, keepdims=True),  # [1, C]
            ],
            axis=0,
        )
        return tf.cast(nll, accumulate_dtype), tf.cast(grad, accumulate_dtype)

    return partial


class ShardedObjective:
    """``J`` and ``dJ/dTheta`` summed over shards (and replicas); see module doc.

    Call it with the flat L-BFGS position ``[(D+1) C]`` (accumulate dtype);
    it returns ``(J, gradient)`` in the same dtype.

    Example:
        >>> obj = ShardedObjective(src, num_classes=10, l2=1e-4)
        >>> value, grad = obj(tf.zeros([(src.dim + 1) * 10], tf.float64))
    """

    def __init__(
        self,
        source: ShardSource,
        *,
        num_classes: int,
        l2: float,
        dtype: tf.DType = tf.float32,
        accumulate_dtype: tf.DType = tf.float64,
        standardizer: lbfgs.Standardizer | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ):
        """Args:
        source: the shards.
        num_classes: C.
        l2: penalty strength ``>= 0``.
        dtype: dtype of the per-shard products (float32 or float64).
        accumulate_dtype: dtype of the cross-shard sums and of the position.
        standardizer: applied to every shard on the fly (None: raw features).
        strategy: distribute shards over its replicas (None: no strategy).

        Raises:
            ValueError: bad dtypes, l2, class count or standardizer size.
        """
        self.dtype = lbfgs._check_dtype(dtype)
        self.accumulate_dtype = lbfgs._check_dtype(accumulate_dtype)
        self.l2 = lbfgs._check_l2(l2)
        self.num_classes = lbfgs._check_num_classes(num_classes)
        if self.num_classes is None:
            raise ValueError("num_classes is required for a sharded objective.")
        self.source, self.strategy = source, strategy
        np_dtype = self.dtype.as_numpy_dtype
        if standardizer is None:
            mean, scale = np.zeros(source.dim), np.ones(source.dim)
        else:
            if standardizer.mean.shape != (source.dim,):
                raise ValueError(
                    f"standardizer has {standardizer.mean.shape[0]} features; the "
                    f"source has {source.dim}."
                )
            mean, scale = standardizer.mean, standardizer.scale
        self._mean = tf.constant(mean.astype(np_dtype))
        self._scale = tf.constant(scale.astype(np_dtype))
        self._partial = _compiled_partial(self.dtype, self.accumulate_dtype)
        self.num_replicas = 1 if strategy is None else strategy.num_replicas_in_sync
        self.evaluations = 0
        self._resident = None
        if not source.streamed:
            self._resident = [self._place(g) for g in self._rounds()]

    def _rounds(self) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        """Groups of ``num_replicas`` consecutive shards (the last padded empty)."""
        group = []
        for shard in self.source.iter_shards():
            group.append(shard)
            if len(group) == self.num_replicas:
                yield group
                group = []
        if group:
            empty = (np.zeros([0, self.source.dim]), np.zeros([0], np.int32))
            yield group + [empty] * (self.num_replicas - len(group))

    def _place(self, group):
        """Tensors of one round, on the device of the replica that uses them."""
        np_dtype = self.dtype.as_numpy_dtype

        def tensors(index):
            x, y = group[index]
            return tf.constant(np.asarray(x, np_dtype)), tf.constant(y, tf.int32)

        if self.strategy is None:
            return tensors(0)
        distribute = self.strategy.experimental_distribute_values_from_function
        return tuple(
            distribute(lambda ctx, k=k: tensors(ctx.replica_id_in_sync_group)[k])
            for k in (0, 1)
        )

    def _round_sums(self, placed, theta):
        if self.strategy is None:
            x, y = placed
            return self._partial(x, y, theta, self._mean, self._scale)
        # A plain callable: given a tf.function, MirroredStrategy.run in eager
        # mode would retrace it on the distributed values themselves.
        out = self.strategy.run(
            lambda *args: self._partial(*args),
            args=(*placed, theta, self._mean, self._scale),
        )
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)

    def sums(self, theta: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Unnormalised ``(sum_i CE_i, X~^T (P - Y))`` at ``theta [D+1, C]``."""
        total_value = tf.zeros([], self.accumulate_dtype)
        total_grad = tf.zeros_like(theta)
        rounds = (
            self._resident
            if self._resident is not None
            else map(self._place, self._rounds())
        )
        for placed in rounds:
            value, grad = self._round_sums(placed, theta)
            total_value += value
            total_grad += grad
        return total_value, total_grad

    def max_abs_feature(self) -> float:
        """``max |x|`` over the features the objective sees (standardized if it
        standardizes): one pass over the shards."""
        mean = self._mean.numpy().astype(np.float64)
        scale = self._scale.numpy().astype(np.float64)
        out = 0.0
        for x, _ in self.source.iter_shards():
            if len(x):
                z = (np.asarray(x, np.float64) - mean) / scale
                out = max(out, float(np.max(np.abs(z))))
        return out

    def __call__(self, position: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(J, dJ/dTheta)`` at the flat position ``[(D+1) C]``."""
        self.evaluations += 1
        position = tf.cast(position, self.accumulate_dtype)
        theta = tf.reshape(position, [self.source.dim + 1, self.num_classes])
        nll, grad = self.sums(theta)
        n = tf.cast(self.source.num_examples, self.accumulate_dtype)
        weights = theta[:-1]
        value = nll / n + 0.5 * self.l2 * tf.reduce_sum(tf.square(weights))
        grad = grad / n + tf.pad(self.l2 * weights, [[0, 1], [0, 0]])
        return value, tf.reshape(grad, [-1])


def _shard_predictions(
    params: lbfgs.ProbeParams,
    source: ShardSource,
    standardizer: lbfgs.Standardizer | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(argmax logits int32 [n_i], labels int32 [n_i])`` per shard."""
    np_dtype = np.asarray(params.weights).dtype
    weights = tf.constant(params.weights)
    bias = tf.constant(np.asarray(params.bias, np_dtype))
    for x, y in source.iter_shards():
        if len(y) == 0:
            continue
        if standardizer is not None:
            x = standardizer.apply(x)
        z = tf.matmul(tf.constant(np.asarray(x, np_dtype)), weights) + bias  # [n, C]
        yield np.argmax(z.numpy(), axis=1).astype(np.int32), y


def top1(
    params: lbfgs.ProbeParams,
    source: ShardSource,
    standardizer: lbfgs.Standardizer | None = None,
) -> float:
    """Top-1 accuracy of ``params`` on ``source``, shard by shard.

    Args:
        params: ``weights [D, C]``, ``bias [C]``; their dtype is the compute dtype.
        source: resident or streamed shards.
        standardizer: applied to every shard first (as in training).

    Returns:
        The fraction of rows whose ``argmax`` logit is the label.
    """
    correct = 0
    for pred, y in _shard_predictions(params, source, standardizer):
        correct += int(np.sum(pred == y))
    return correct / source.num_examples


def predict(
    params: lbfgs.ProbeParams,
    source: ShardSource,
    standardizer: lbfgs.Standardizer | None = None,
) -> np.ndarray:
    """Predicted class of every row of ``source``, shard by shard.

    Memory holds a few shards and the int32 ``[N]`` result, never ``[N, D]``.

    Args:
        params: ``weights [D, C]``, ``bias [C]``; their dtype is the compute dtype.
        source: resident or streamed shards.
        standardizer: applied to every shard first (as in training).

    Returns:
        int32 ``[N]``, ``argmax`` logit per row (ties: smallest class), in the
        order of ``source.labels``; ``mean(predict(...) == source.labels)`` is
        ``top1(...)``.
    """
    parts = [pred for pred, _ in _shard_predictions(params, source, standardizer)]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def fit_sharded(
    objective: ShardedObjective,
    *,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
    initial: lbfgs.ProbeParams | None = None,
) -> lbfgs.ProbeFit:
    """Minimises a ``ShardedObjective`` with ``tfp.optimizer.lbfgs_minimize``.

    TFP's L-BFGS runs eagerly here (its ``tf.while_loop`` becomes a Python
    loop), so every objective call can stream shards from disk and call
    ``strategy.run``; the per-shard work is compiled. Same correction pairs,
    line-search cap and flags as ``lbfgs.fit_logistic_regression``.

    Args:
        objective: the sharded objective (its ``l2`` is the penalty).
        max_iterations: L-BFGS iteration cap.
        tolerance: stop when ``max |dJ/dTheta| <= tolerance``.
        initial: warm start (``ProbeParams`` of shape ``[D, C]``/``[C]``).

    Returns:
        ``lbfgs.ProbeFit`` (``solver="tfp_sharded"``), bias centred;
        ``converged`` only if the gradient test holds at the returned point
        (``lbfgs.ProbeFit``). A fit that did not converge on badly scaled
        features logs a warning (``lbfgs.warn_if_badly_scaled``).

    Raises:
        ValueError: bad ``max_iterations``, ``tolerance`` or ``initial``.
    """
    lbfgs._check_solver_args(max_iterations, tolerance)
    dim, num_classes = objective.source.dim, objective.num_classes
    lbfgs._check_initial(initial, dim, num_classes)
    np_dtype = objective.accumulate_dtype.as_numpy_dtype
    if initial is None:
        position = np.zeros([(dim + 1) * num_classes], np_dtype)
    else:
        position = lbfgs._pack(initial, np_dtype)
    start, evaluations = time.perf_counter(), objective.evaluations
    result = tfp.optimizer.lbfgs_minimize(
        objective,
        initial_position=tf.constant(position),
        num_correction_pairs=lbfgs._NUM_CORRECTION_PAIRS,
        tolerance=tolerance,
        max_iterations=max_iterations,
        max_line_search_iterations=lbfgs._MAX_LINE_SEARCH_ITERATIONS,
    )
    theta = result.position.numpy().reshape(dim + 1, num_classes)
    gradient_max = float(tf.reduce_max(tf.abs(result.objective_gradient)))
    # Judged at the returned point only (lbfgs._honest_flags): TFP's own flag
    # also counts a step that moved nothing.
    converged, failed = (
        bool(flag)
        for flag in lbfgs._honest_flags(
            result.objective_value,
            result.objective_gradient,
            tf.constant(tolerance, result.objective_value.dtype),
            result.converged,
            result.failed,
        )
    )
    seconds = time.perf_counter() - start
    _logger.info(
        "Sharded L-BFGS l2 %.1e: %d iterations, %d evaluations of %d shards, %.1fs.",
        objective.l2,
        int(result.num_iterations),
        objective.evaluations - evaluations,
        objective.source.num_shards,
        seconds,
    )
    if not converged:
        lbfgs.warn_if_badly_scaled(
            objective.max_abs_feature(),
            gradient_max=gradient_max,
            tolerance=tolerance,
            iterations=int(result.num_iterations),
            l2=objective.l2,
        )
    return lbfgs.ProbeFit(
        weights=theta[:-1],
        bias=theta[-1] - theta[-1].mean(),
        l2=objective.l2,
        loss=float(result.objective_value),
        gradient_max=gradient_max,
        iterations=int(result.num_iterations),
        function_evaluations=int(result.num_objective_evaluations),
        converged=converged,
        failed=failed,
        seconds=seconds,
        solver="tfp_sharded",
    )


def sweep_l2_sharded(
    train: ShardSource,
    val: ShardSource,
    *,
    l2_grid: Sequence[float],
    num_classes: int,
    warm_start: bool = True,
    standardize: bool = True,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
    dtype: tf.DType = tf.float32,
    accumulate_dtype: tf.DType = tf.float64,
    strategy: tf.distribute.Strategy | None = None,
) -> lbfgs.SweepResult:
    """``lbfgs.sweep_l2`` on sharded data (same grid order, selection, ties).

    Args:
        train: training shards (resident or streamed).
        val: validation shards (model selection only).
        l2_grid: penalties ``>= 0``, visited from largest to smallest.
        num_classes: C.
        warm_start: start each fit from the previous solution.
        standardize: fit a ``Standardizer`` on ``train`` (one streamed pass)
            and apply it on the fly.
        max_iterations, tolerance: per fit.
        dtype, accumulate_dtype: see the module docstring.
        strategy: distribute shards over its replicas.

    Returns:
        ``lbfgs.SweepResult``; score other splits with
        ``result_accuracy(result, source)``.

    Raises:
        ValueError: empty grid, bad l2, or train/val of different D.
    """
    if isinstance(l2_grid, str | bytes) or len(l2_grid) == 0:
        raise ValueError(
            f"l2_grid must be a non-empty sequence of floats; got {l2_grid!r}."
        )
    grid = sorted({lbfgs._check_l2(v) for v in l2_grid}, reverse=True)
    if val.dim != train.dim:
        raise ValueError(f"val has {val.dim} features per row; expected {train.dim}.")
    standardizer = fit_standardizer(train) if standardize else None
    table, best, best_val, previous = [], None, -1.0, None
    progress = progress_lib.Progress(len(grid))
    for i, l2 in enumerate(grid):
        objective = ShardedObjective(
            train,
            num_classes=num_classes,
            l2=l2,
            dtype=dtype,
            accumulate_dtype=accumulate_dtype,
            standardizer=standardizer,
            strategy=strategy,
        )
        fit = fit_sharded(
            objective,
            max_iterations=max_iterations,
            tolerance=tolerance,
            initial=previous if warm_start else None,
        )
        val_top1 = top1(fit, val, standardizer)
        table.append(
            lbfgs.SweepPoint.of_fit(fit, top1(fit, train, standardizer), val_top1)
        )
        _logger.info(
            "l2 %.1e (streamed): train %.2f%%, val %.2f%% (%d iterations%s, "
            "%.1fs); sweep %s.",
            l2,
            100 * table[-1].train_top1,
            100 * val_top1,
            fit.iterations,
            "" if fit.converged else ", NOT converged",
            fit.seconds,
            progress.summary(i + 1),
        )
        if val_top1 > best_val:
            best, best_val = fit, val_top1
        previous = fit
    return lbfgs.SweepResult(best=best, table=table, standardizer=standardizer)


def result_accuracy(result: lbfgs.SweepResult, source: ShardSource) -> float:
    """Top-1 of a sweep's best fit on ``source`` (standardized as in the sweep)."""
    return top1(result.best, source, result.standardizer)


def result_predict(result: lbfgs.SweepResult, source: ShardSource) -> np.ndarray:
    """Predicted class (int32 ``[N]``) of a sweep's best fit on ``source``."""
    return predict(result.best, source, result.standardizer)
