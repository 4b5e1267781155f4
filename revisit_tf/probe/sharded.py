"""The L-BFGS probe on sharded features: streamed from the cache, across replicas.

Place in the data flow (stage 6): the same problem as ``probe/lbfgs.py`` (see
its module docstring for ``J``, ``R`` and the gradient), for features that do
not fit in memory or that are spread over several devices. The solver is the
whole-batch path's own driver (``solver.minimize``: logit line search,
honest flags, optional eigen-preconditioner) run over shards through
``shard_data.ShardData``: the per-shard logits stay resident, so an iteration
costs two passes over the shards, like the whole-batch path. Shards are
either resident (held once, standardized, placed on their replica) or
streamed from a ``cache.CachedFeatures`` entry at every pass, reading the next
shard while the current one is processed. Streamed shards are memory maps of
the cache's files by default (the page cache read in place, no copy; its pages
are the kernel's, reclaimable, not the process's), or copies read at every
pass (``from_cache(mapped=False)``); either way the process's own memory holds
the ``[N, C]`` logits and a few shard-sized temporaries, never the ``[N, D]``
matrix: about 7 shard-sized buffers when copying, so pick the cache's
``shard_bytes`` below an eighth of the memory to spare (``revisit-benchmark
probe`` measures the peak). Under a
``tf.distribute`` strategy the shards of a round go to the replicas (one
each) and ``strategy.reduce(SUM)`` adds them, so the same probe runs on one
CPU, N GPUs or a TPU.

Contract:
  * ``ShardSource``: ``[N, D]`` features and ``[N]`` labels as row shards
    (``from_arrays`` or ``from_cache``);
  * ``ShardedObjective(source, ...)(position)`` -> ``(J, dJ/dTheta)``, equal
    to ``lbfgs.objective_and_gradient`` up to summation order;
  * ``fit_sharded`` / ``sweep_l2_sharded``: results are ``lbfgs.ProbeFit`` /
    ``lbfgs.SweepResult`` like the whole-batch path (``sweep.run_path``: the
    same L2 path, edge extension and warnings);
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

from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import (
    lbfgs,
    objective,
    shard_data,
    solver,
    sweep,
    validation,
)
from revisit_tf.probe import precondition as precondition_lib

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
        mapped: bool = False,
    ):
        """Low level; use ``from_arrays``, ``from_cache`` or ``concat``.

        Args:
            readers: one callable per shard returning ``([n_i, D], [n_i])``.
            dim: D.
            labels: all labels, ``[N]`` (shard order).
            streamed: whether readers read from disk.
            mapped: whether streamed readers return memory maps of the files
                (no copy; ``from_cache``).
        """
        if not readers:
            raise ValueError("a ShardSource needs at least one shard.")
        self._readers = list(readers)
        self.dim = int(dim)
        self.labels = np.asarray(labels, np.int32)
        self.num_examples = len(self.labels)
        self.num_shards = len(self._readers)
        self.streamed = streamed
        self.mapped = streamed and mapped

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
        x = validation.check_features(features, "features")
        y = validation.check_labels(labels, "labels", x.shape[0], None)
        readers = [
            functools.partial(
                lambda i: (x[i : i + rows_per_shard], y[i : i + rows_per_shard]), i
            )
            for i in range(0, len(y), rows_per_shard)
        ]
        return cls(readers, dim=x.shape[1], labels=y, streamed=False)

    @classmethod
    def from_cache(
        cls, entry: cache_lib.CachedFeatures, *, mapped: bool = True
    ) -> ShardSource:
        """Streamed shards of a feature-cache entry (read at every pass).

        Args:
            entry: the cache entry.
            mapped: read shards through memory maps of their files
                (``CachedFeatures.mapped_shard``: no copy, the page cache is
                read in place; the default) or by copying each file at every
                pass (``CachedFeatures.shard``: for filesystems where a read
                error under a mapping would be a SIGBUS).
        """
        read = entry.mapped_shard if mapped else entry.shard
        readers = [functools.partial(read, i) for i in range(entry.num_shards)]
        return cls(
            readers, dim=entry.dim, labels=entry.labels, streamed=True, mapped=mapped
        )

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
            mapped=all(s.mapped or not s.streamed for s in sources),
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


class ShardedObjective:
    """``J`` and ``dJ/dTheta`` summed over shards (and replicas); see module doc.

    Call it with the flat L-BFGS position ``[(D+1) C]`` (accumulate dtype);
    it returns ``(J, gradient)`` in the same dtype. ``data`` is the
    ``shard_data.ShardData`` the driver runs on; ``with_l2`` shares it (the
    shards are placed and standardized once per path).

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
        data: shard_data.ShardData | None = None,
    ):
        """Args:
        source: the shards.
        num_classes: C.
        l2: penalty strength ``>= 0``.
        dtype: dtype of the per-shard products (float32 or float64).
        accumulate_dtype: dtype of the cross-shard sums and of the position.
        standardizer: applied to every shard on the fly (None: raw features).
        strategy: distribute shards over its replicas (None: no strategy).
        data: an existing ``ShardData`` of ``source`` to share (then dtype,
            standardizer and strategy are its own).

        Raises:
            ValueError: bad dtypes, l2, class count or standardizer size.
        """
        self.dtype = validation.check_dtype(dtype)
        self.accumulate_dtype = validation.check_dtype(accumulate_dtype)
        self.l2 = validation.check_l2(l2)
        self.num_classes = validation.check_num_classes(num_classes)
        if self.num_classes is None:
            raise ValueError("num_classes is required for a sharded objective.")
        self.source, self.strategy = source, strategy
        self.data = data or shard_data.ShardData(
            source,
            num_classes=self.num_classes,
            dtype=self.dtype,
            accumulate_dtype=self.accumulate_dtype,
            standardizer=standardizer,
            strategy=strategy,
        )
        self.dtype, self.accumulate_dtype = self.data.compute_dtype, self.data.dtype
        self.num_replicas = self.data.num_replicas
        self.evaluations = 0

    def with_l2(self, l2: float) -> ShardedObjective:
        """The same shards (shared ``data``) with another penalty."""
        return ShardedObjective(
            self.source,
            num_classes=self.num_classes,
            l2=l2,
            strategy=self.strategy,
            data=self.data,
        )

    def max_abs_feature(self) -> float:
        """``max |x|`` over the features the objective sees (standardized if it
        standardizes): one pass over the shards."""
        return self.data.max_abs_feature()

    def __call__(self, position: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(J, dJ/dTheta)`` at the flat position ``[(D+1) C]``."""
        self.evaluations += 1
        position = tf.cast(position, self.accumulate_dtype)
        theta = tf.reshape(position, [self.source.dim + 1, self.num_classes])
        weights = theta[:-1]
        _, ce, grad_x, grad_b = self.data.fresh_gradient(weights, theta[-1])
        value = ce + 0.5 * self.l2 * tf.reduce_sum(tf.square(weights))
        grad = tf.concat([grad_x + self.l2 * weights, grad_b[None]], axis=0)
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


def preconditioner_of(objective_: ShardedObjective) -> precondition_lib.Preconditioner:
    """The eigen-preconditioner of ``objective_``'s features (one Gram pass).

    ``S = X^T X / N`` of the standardized features, accumulated over shards
    in float64, then one ``eigh`` (``precondition.Preconditioner``).
    """
    return precondition_lib.Preconditioner.from_gram(objective_.data.gram())


def fit_sharded(
    objective_: ShardedObjective,
    *,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
    initial: lbfgs.ProbeParams | None = None,
    solver_name: str = "lbfgs",
    precondition: bool = False,
    preconditioner: precondition_lib.Preconditioner | None = None,
    tf32: bool = solver.TF32_DEFAULT,
    label: str = "",
) -> lbfgs.ProbeFit:
    """Minimises a ``ShardedObjective`` with the probe's L-BFGS driver.

    ``solver.minimize`` runs on ``objective_.data`` (two passes over the
    shards per iteration, the line search on the resident logits): as one
    graph over resident or memory-mapped shards without a strategy
    (``ShardData.in_graph``), else eagerly, where every pass can read shards
    from disk and call ``strategy.run``, with the per-shard work compiled.
    Same correction pairs, line search, flags and stopping test as
    ``lbfgs.fit_logistic_regression``.

    Args:
        objective_: the sharded objective (its ``l2`` is the penalty).
        max_iterations: L-BFGS iteration cap.
        tolerance: stop when ``max |dJ/dTheta| <= tolerance``.
        initial: warm start (``ProbeParams`` of shape ``[D, C]``/``[C]``).
        solver_name: ``"lbfgs"`` (the driver) or ``"tfp"``
            (``tfp.optimizer.lbfgs_minimize`` run eagerly on the objective,
            about three objective evaluations per iteration: an oracle).
        precondition: run in eigen-preconditioned coordinates (computes
            ``preconditioner_of(objective_)`` unless ``preconditioner`` is
            given, e.g. shared along an L2 path).
        preconditioner: a precomputed ``precondition.Preconditioner``.
        tf32: TF32 policy during the solve (default off).
        label: names the problem in warnings.

    Returns:
        ``lbfgs.ProbeFit`` (``solver="lbfgs_sharded"`` or ``"tfp_sharded"``),
        bias centred; ``converged`` only if the gradient test holds at the
        returned point; a fit that did not converge logs a warning (also in
        ``ProbeFit.warnings``, and the badly-scaled hint if it applies).

    Raises:
        ValueError: bad ``max_iterations``, ``tolerance``, ``initial`` or solver.
    """
    solver.check_solver_args(max_iterations, tolerance, solver_name)
    use_precondition = precondition or preconditioner is not None
    solver.check_precondition(use_precondition, solver_name)
    data = objective_.data
    dim, num_classes, acc = objective_.source.dim, objective_.num_classes, data.dtype
    validation.check_initial(initial, dim, num_classes)
    if use_precondition and preconditioner is None:
        preconditioner = preconditioner_of(objective_)
    l2 = objective_.l2
    start, passes = time.perf_counter(), data.passes
    terms = None if preconditioner is None else preconditioner.for_l2(l2, acc)
    position = solver.start_position(initial, dim, num_classes, acc, terms)
    with solver.tf32_policy(tf32):
        if solver_name == "lbfgs":
            out = data.minimize(
                position,
                l2=tf.constant(l2, acc),
                tolerance=tf.constant(tolerance, acc),
                max_iterations=tf.constant(int(max_iterations)),
                coordinates=solver.Coordinates(
                    None if terms is None else (terms.basis, terms.coef, terms.scale),
                    terms is None or terms.full,
                ),
            )
        else:
            out = _tfp_minimize(objective_, position, max_iterations, tolerance)
    fit = solver.finish(
        out,
        dim=dim,
        num_classes=num_classes,
        l2=l2,
        tolerance=tolerance,
        max_iterations=int(max_iterations),
        seconds=time.perf_counter() - start,
        solver=f"{solver_name}_sharded",
        terms=terms,
        tf32=tf32,
        max_abs_feature=objective_.max_abs_feature,
        label=label,
    )
    _logger.info(
        "Sharded L-BFGS l2 %.1e: %d iterations, %d passes over %d shards, %.1fs.",
        l2,
        fit.iterations,
        data.passes - passes,
        objective_.source.num_shards,
        fit.seconds,
    )
    return fit


def _tfp_minimize(objective_, position, max_iterations, tolerance) -> dict:
    """``tfp.optimizer.lbfgs_minimize`` eagerly on the objective (the oracle)."""
    result = tfp.optimizer.lbfgs_minimize(
        objective_,
        initial_position=position,
        num_correction_pairs=solver.NUM_CORRECTION_PAIRS,
        tolerance=tolerance,
        max_iterations=max_iterations,
        max_line_search_iterations=solver.MAX_LINE_SEARCH_ITERATIONS,
    )
    converged, failed = objective.honest_flags(
        result.objective_value,
        result.objective_gradient,
        tf.constant(tolerance, result.objective_value.dtype),
        result.converged,
        result.failed,
    )
    return {
        "position": result.position,
        "loss": result.objective_value,
        "gradient_max": tf.reduce_max(tf.abs(result.objective_gradient)),
        "iterations": result.num_iterations,
        "function_evaluations": result.num_objective_evaluations,
        "line_search_evaluations": 0,
        "converged": converged,
        "failed": failed,
    }


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
    solver_name: str = "lbfgs",
    precondition: bool = False,
    extend: bool = True,
    tf32: bool = solver.TF32_DEFAULT,
    label: str = "",
) -> lbfgs.SweepResult:
    """``lbfgs.sweep_l2`` on sharded data (``sweep.run_path``: same path rules).

    The shards are placed (resident) or opened (streamed) once, the
    standardizer and the preconditioner's Gram matrix take one pass each, and
    every l2 of the path reuses them.

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
        solver_name, precondition, tf32, label: see ``fit_sharded``.
        extend: continue the path past an edge pick (``sweep.run_path``).

    Returns:
        ``lbfgs.SweepResult``; score other splits with
        ``result_accuracy(result, source)``.

    Raises:
        ValueError: empty grid, bad l2, or train/val of different D.
    """
    grid = validation.check_l2_grid(l2_grid)
    solver.check_solver_args(max_iterations, tolerance, solver_name)
    solver.check_precondition(precondition, solver_name)
    if val.dim != train.dim:
        raise ValueError(f"val has {val.dim} features per row; expected {train.dim}.")
    standardizer = fit_standardizer(train) if standardize else None
    base = ShardedObjective(
        train,
        num_classes=num_classes,
        l2=grid[0],
        dtype=dtype,
        accumulate_dtype=accumulate_dtype,
        standardizer=standardizer,
        strategy=strategy,
    )
    preconditioner = preconditioner_of(base) if precondition else None

    def fit(l2: float, initial: lbfgs.ProbeFit | None) -> lbfgs.ProbeFit:
        return fit_sharded(
            base.with_l2(l2),
            max_iterations=max_iterations,
            tolerance=tolerance,
            initial=initial,
            solver_name=solver_name,
            preconditioner=preconditioner,
            tf32=tf32,
            label=label,
        )

    def score(result: lbfgs.ProbeFit) -> tuple[float, float]:
        return top1(result, train, standardizer), top1(result, val, standardizer)

    return sweep.run_path(
        grid,
        fit,
        score,
        standardizer=standardizer,
        warm_start=warm_start,
        extend=extend,
        label=label,
    )


def result_accuracy(result: lbfgs.SweepResult, source: ShardSource) -> float:
    """Top-1 of a sweep's best fit on ``source`` (standardized as in the sweep)."""
    return top1(result.best, source, result.standardizer)


def result_predict(result: lbfgs.SweepResult, source: ShardSource) -> np.ndarray:
    """Predicted class (int32 ``[N]``) of a sweep's best fit on ``source``."""
    return predict(result.best, source, result.standardizer)
