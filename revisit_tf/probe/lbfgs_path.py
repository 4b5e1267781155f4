"""The ``lbfgs`` protocol's fit: the L2 path on train/val, the refit, test predictions.

Place in the data flow (stage 6): ``protocols.LbfgsProbe.run`` calls
``fit_path`` and turns the ``PathFit`` into a results row (``row_fields``);
``revisit-benchmark probe --path_size`` calls the same ``fit_path`` to time
the protocol as users run it. One of two routes, with the same L-BFGS driver,
path rules (``probe/sweep.py``) and preconditioner:

  * whole-batch (``lbfgs.sweep_l2``): the training matrix fits
    ``max_resident_bytes`` and no strategy is given. The refit on train + val
    gets its own standardizer and is warm-started from the selected fit
    expressed in the new standardization.
  * streamed (``sharded.sweep_l2_sharded``): shards read from the feature
    cache at every pass (or placed on a strategy's replicas); memory holds a
    few shards and the ``[N, C]`` logits, never the ``[N, D]`` matrix. The
    test split is scored shard by shard.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import lbfgs, sharded

PRECISIONS = {"float32": tf.float32, "float64": tf.float64}
# Above this size of the training matrix the whole-batch route is not taken
# (and the non-streaming protocols refuse it).
RESIDENT_LIMIT_BYTES = 8 << 30
_logger = logging.getLogger(__name__)


class PathSettings(Protocol):
    """What ``fit_path`` reads (``protocols.LbfgsProbe`` has these fields)."""

    l2_grid: tuple[float, ...]
    standardize: bool
    max_iterations: int
    precision: str
    accumulate_precision: str
    tolerance: float
    solver: str
    precondition: bool
    refit_on_trainval: bool
    extend_l2: bool
    max_resident_bytes: int
    stream_mapped: bool


class Entries(Protocol):
    """What ``fit_path`` reads (``protocols.SplitEntries`` has these)."""

    train: cache_lib.CachedFeatures
    val: cache_lib.CachedFeatures
    test: cache_lib.CachedFeatures

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass
class PathFit:
    """The outcome of ``fit_path``.

    Attributes:
        sweep: the path on train/val (``lbfgs.SweepResult``; ``best`` is the
            selected fit, ``table`` the visited points).
        final: the fit scored on test: the refit on train + val (its own
            ``standardizer``), or ``sweep`` without a refit.
        test_predictions: int ``[N_test]`` predicted classes of ``final``.
        test_labels: int ``[N_test]``.
        streamed: whether the streamed route ran.
    """

    sweep: lbfgs.SweepResult
    final: lbfgs.SweepResult
    test_predictions: np.ndarray
    test_labels: np.ndarray
    streamed: bool


def fit_path(
    s: PathSettings,
    entries: Entries,
    rows: np.ndarray | None,
    *,
    strategy: tf.distribute.Strategy | None = None,
) -> PathFit:
    """Runs the path on train/val, the refit on train + val, and predicts test.

    Args:
        s: the protocol's settings (``protocols.LbfgsProbe``).
        entries: cached ``[N, D]`` features of train, val and test.
        rows: training rows of a label subset (None: all).
        strategy: reduce the streamed route over its replicas (forces it).

    Returns:
        ``PathFit``.
    """
    dtype = PRECISIONS[s.precision]
    num_rows = entries.train.num_examples if rows is None else len(rows)
    train_bytes = num_rows * entries.train.dim * dtype.size
    streamed = strategy is not None or train_bytes > s.max_resident_bytes
    label = str(entries.train.spec.get("endpoint", "")) if entries.train.spec else ""
    precondition = s.precondition and s.solver == "lbfgs"
    if not streamed:
        train_x, train_y = entries.arrays("train")
        if rows is not None:
            train_x, train_y = train_x[rows], train_y[rows]
        val_x, val_y = entries.arrays("val")
        num_classes = 1 + int(max(train_y.max(), val_y.max()))
        sweep = lbfgs.sweep_l2(
            train_x,
            train_y,
            val_x,
            val_y,
            l2_grid=s.l2_grid,
            num_classes=num_classes,
            standardize=s.standardize,
            max_iterations=s.max_iterations,
            tolerance=s.tolerance,
            dtype=dtype,
            solver=s.solver,
            precondition=precondition,
            extend=s.extend_l2,
            label=label,
        )
        final = sweep
        if s.refit_on_trainval:
            final = _refit_whole(
                sweep, train_x, train_y, val_x, val_y, num_classes, s, label
            )
        test_x, test_y = entries.arrays("test")
        return PathFit(sweep, final, final.predict(test_x), test_y, False)

    mapped = s.stream_mapped
    train = _source(entries.train, rows, mapped)
    val = sharded.ShardSource.from_cache(entries.val, mapped=mapped)
    test_source = sharded.ShardSource.from_cache(entries.test, mapped=mapped)
    num_classes = 1 + int(max(train.labels.max(), val.labels.max()))
    kwargs = dict(
        num_classes=num_classes,
        standardize=s.standardize,
        max_iterations=s.max_iterations,
        tolerance=s.tolerance,
        dtype=dtype,
        accumulate_dtype=PRECISIONS[s.accumulate_precision],
        strategy=strategy,
        solver_name=s.solver,
        precondition=precondition,
        label=label,
    )
    _logger.info(
        "L-BFGS on %d x %d features (%.1f GB) streamed in %d shards%s.",
        train.num_examples,
        train.dim,
        train_bytes / 1e9,
        train.num_shards,
        "" if strategy is None else f" over {strategy.num_replicas_in_sync} replicas",
    )
    sweep = sharded.sweep_l2_sharded(
        train, val, l2_grid=s.l2_grid, extend=s.extend_l2, **kwargs
    )
    final = sweep
    if s.refit_on_trainval:
        both = sharded.ShardSource.concat([train, val])
        final = sharded.sweep_l2_sharded(
            both, val, l2_grid=[sweep.best_l2], extend=False, **kwargs
        )
    # Shard by shard: the test matrix is never held whole.
    test_pred = sharded.result_predict(final, test_source)
    return PathFit(sweep, final, test_pred, test_source.labels, True)


def row_fields(fit: PathFit, *, refit: bool) -> dict[str, Any]:
    """The ``lbfgs`` row's own fields (``protocols.run_protocol`` documents
    them), without the test score."""
    sweep, final = fit.sweep, fit.final
    best, point = sweep.best, sweep.best_point
    return {
        "l2": best.l2,
        "iterations": best.iterations,
        "converged": bool(best.converged and final.best.converged),
        "train_top1": point.train_top1,
        "val_top1": point.val_top1,
        "refit_iterations": final.best.iterations if refit else None,
        "streamed": fit.streamed,
        "l2_path": [
            {
                "l2": p.l2,
                "train_top1": p.train_top1,
                "val_top1": p.val_top1,
                "iterations": p.iterations,
                "seconds": p.seconds,
                "extended": p.extended,
            }
            for p in sweep.table
        ],
        "l2_extended": list(sweep.l2_extended),
        "tf32": final.best.tf32,
        "warnings": list(sweep.warnings)
        + (list(final.warnings) if final is not sweep else []),
    }


def _source(entry: cache_lib.CachedFeatures, rows, mapped: bool) -> sharded.ShardSource:
    """Streamed source of an entry, or (for a subset) its rows gathered once."""
    if rows is None:
        return sharded.ShardSource.from_cache(entry, mapped=mapped)
    picked, labels, start = [], [], 0
    for x, y in entry.iter_shards():
        inside = rows[(rows >= start) & (rows < start + len(y))] - start
        picked.append(x[inside])
        labels.append(y[inside])
        start += len(y)
    return sharded.ShardSource.from_arrays(
        np.concatenate(picked), np.concatenate(labels), rows_per_shard=1 << 16
    )


def _refit_whole(
    sweep, train_x, train_y, val_x, val_y, num_classes, s: PathSettings, label=""
):
    """The selected l2 refitted on train + val (new standardizer), warm-started."""
    both_x = np.concatenate([train_x, val_x])
    both_y = np.concatenate([train_y, val_y])
    standardizer = lbfgs.Standardizer.fit(both_x) if s.standardize else None
    z = standardizer.apply(both_x) if standardizer is not None else both_x
    start = sweep.best
    if standardizer is not None and sweep.standardizer is not None:
        # Same model expressed on the new standardization: W' = diag(s'/s) W,
        # b' = b + ((m' - m) / s) W, so the warm start is the selected fit.
        old, new = sweep.standardizer, standardizer
        weights = start.weights * (new.scale / old.scale)[:, None]
        bias = start.bias + ((new.mean - old.mean) / old.scale) @ start.weights
        start = lbfgs.ProbeParams(weights, bias)
    fit = lbfgs.fit_logistic_regression(
        z,
        both_y,
        num_classes=num_classes,
        l2=sweep.best_l2,
        max_iterations=s.max_iterations,
        tolerance=s.tolerance,
        initial=start,
        dtype=PRECISIONS[s.precision],
        solver=s.solver,
        precondition=s.precondition and s.solver == "lbfgs",
        label=label,
    )
    _logger.info(
        "Refit on train+val (%d examples) at l2 %.1e: %d iterations, %.1fs.",
        len(both_y),
        fit.l2,
        fit.iterations,
        fit.seconds,
    )
    return lbfgs.SweepResult(
        best=fit, table=[], standardizer=standardizer, warnings=list(fit.warnings)
    )
