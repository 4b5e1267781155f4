"""Probe protocols on cached features: one call per (endpoint, protocol, subset).

Place in the data flow (stage 6, after ``features`` and ``cache``): the
``linear_probe`` root extracts (or finds) the cached features of the train,
val and test splits of every endpoint, then calls ``run_protocol`` for every
requested protocol and label subset; each call returns the result fields of
one ``probe/results.jsonl`` row.

Protocols (``PROTOCOLS``):
  * ``lbfgs``: multinomial logistic regression, L2 penalty chosen on val from
    a warm-started path (``lbfgs.sweep_l2``), then, as the paper, a final fit
    at that penalty on train + val (warm-started from the selected fit) scored
    on test. Whole-batch on one device when the training matrix fits
    ``max_resident_bytes`` and no strategy is given; otherwise sharded
    (``sharded.sweep_l2_sharded``), streamed from the cache and reduced over
    the strategy's replicas.
  * ``sgd`` / ``mlp``: the release's SGD protocol with a linear or MLP head
    (``sgd.train_sgd_probe``; reference 8.4, 8.5), trained on train, scored
    on val and test.
  * ``knn``: cosine k-NN with train as the reference set (``knn.knn_top1``,
    ``knn.knn_predict``).

Every row names its protocol settings in ``protocol`` and carries
``fingerprint = fingerprint.protocol_fingerprint(protocol)``. Every row also
carries ``test_predictions`` (``predictions.encode_predictions``): the
predicted class of every test example under the model scored on test (for
L-BFGS the train + val refit when ``refit_on_trainval``, produced shard by
shard on the streamed path; for k-NN the vote), so that reports can bootstrap
paired differences over the same test images; ``test_top1`` is exactly the
mean of its decoded ``correct``. Predictions are outputs, not settings: they
do not enter the fingerprint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import knn, lbfgs, predictions, sgd, sharded, subsets

PROTOCOLS = ("lbfgs", "sgd", "mlp", "knn")
PRECISIONS = {"float32": tf.float32, "float64": tf.float64}
_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Settings:
    """Every protocol setting (the ``linear_probe`` arguments of the same name).

    ``protocol_settings(name)`` is the part of it that defines protocol
    ``name`` and goes into the fingerprint.
    """

    l2_grid: Sequence[float] = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
    standardize: bool = True
    max_iterations: int = 1000
    precision: str = "float32"
    accumulate_precision: str = "float64"
    tolerance: float = 1e-4
    solver: str = "lbfgs"
    precondition: bool = True
    refit_on_trainval: bool = True
    sgd_epochs: float = 70
    sgd_decay_epochs: Sequence[float] = (30, 50)
    sgd_batch_size: int = 512
    sgd_lr: float = 0.1
    mlp_hidden: int = 1000
    knn_k: int = 20
    seed: int = 0
    max_resident_bytes: int = 8 << 30
    strategy: tf.distribute.Strategy | None = None

    def __post_init__(self):
        for name in ("precision", "accumulate_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise ValueError(
                    f"{name} must be one of {sorted(PRECISIONS)}; got "
                    f"{getattr(self, name)!r}."
                )
        if self.solver not in lbfgs.SOLVERS:
            raise ValueError(
                f"solver must be one of {lbfgs.SOLVERS}; got {self.solver!r}."
            )

    def protocol_settings(self, name: str) -> dict[str, Any]:
        """The settings that define protocol ``name`` (JSON values)."""
        if name == "lbfgs":
            return {
                "l2_grid": list(self.l2_grid),
                "standardize": self.standardize,
                "max_iterations": self.max_iterations,
                "precision": self.precision,
                "tolerance": self.tolerance,
                "solver": self.solver,
                "precondition": self.precondition,
                "refit_on_trainval": self.refit_on_trainval,
            }
        if name in ("sgd", "mlp"):
            out = {
                "epochs": self.sgd_epochs,
                "decay_epochs": list(self.sgd_decay_epochs),
                "batch_size": self.sgd_batch_size,
                "lr": self.sgd_lr,
                "momentum": 0.9,
                "reference_batch_size": 256,
            }
            if name == "mlp":
                out["hidden"] = self.mlp_hidden
            return out
        if name == "knn":
            return {"k": self.knn_k, "similarity": "cosine"}
        raise ValueError(f"protocol must be one of {PROTOCOLS}; got {name!r}.")


@dataclasses.dataclass
class SplitEntries:
    """The cached ``[N, D]`` features of one endpoint for train, val and test."""

    train: cache_lib.CachedFeatures
    val: cache_lib.CachedFeatures
    test: cache_lib.CachedFeatures
    _loaded: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict
    )

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 [N, D], int32 [N])`` of ``split``, loaded once."""
        if split not in self._loaded:
            self._loaded[split] = getattr(self, split).load()
        return self._loaded[split]


def _subset_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    return None if fraction == 1.0 else subsets.balanced_subset(labels, fraction, seed)


def _run_lbfgs(entries: SplitEntries, rows, s: Settings) -> dict[str, Any]:
    dtype = PRECISIONS[s.precision]
    num_rows = entries.train.num_examples if rows is None else len(rows)
    train_bytes = num_rows * entries.train.dim * dtype.size
    sharded_path = s.strategy is not None or train_bytes > s.max_resident_bytes
    val_x, val_y = (None, None)
    if not sharded_path:
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
            precondition=s.precondition and s.solver == "lbfgs",
        )
        final, test_source = sweep, None
        if s.refit_on_trainval:
            final = _refit_whole(sweep, train_x, train_y, val_x, val_y, num_classes, s)
        test_x, test_y = entries.arrays("test")
        test_pred = final.predict(test_x)
    else:
        train = _source(entries.train, rows)
        val = sharded.ShardSource.from_cache(entries.val)
        test_source = sharded.ShardSource.from_cache(entries.test)
        num_classes = 1 + int(max(train.labels.max(), val.labels.max()))
        kwargs = dict(
            num_classes=num_classes,
            standardize=s.standardize,
            max_iterations=s.max_iterations,
            tolerance=s.tolerance,
            dtype=dtype,
            accumulate_dtype=PRECISIONS[s.accumulate_precision],
            strategy=s.strategy,
        )
        _logger.info(
            "L-BFGS on %d x %d features (%.1f GB) streamed in %d shards%s.",
            train.num_examples,
            train.dim,
            train_bytes / 1e9,
            train.num_shards,
            ""
            if s.strategy is None
            else f" over {s.strategy.num_replicas_in_sync} replicas",
        )
        sweep = sharded.sweep_l2_sharded(train, val, l2_grid=s.l2_grid, **kwargs)
        final = sweep
        if s.refit_on_trainval:
            both = sharded.ShardSource.concat([train, val])
            final = sharded.sweep_l2_sharded(
                both, val, l2_grid=[sweep.best_l2], **kwargs
            )
        # Shard by shard: the test matrix is never held whole.
        test_pred = sharded.result_predict(final, test_source)
        test_y = test_source.labels
    best, point = sweep.best, sweep.best_point
    return {
        "l2": best.l2,
        "iterations": best.iterations,
        "converged": bool(best.converged and final.best.converged),
        "train_top1": point.train_top1,
        "val_top1": point.val_top1,
        **_scored(test_pred, test_y),
        "refit_iterations": final.best.iterations if s.refit_on_trainval else None,
        "streamed": sharded_path,
        "l2_path": [
            {
                "l2": p.l2,
                "train_top1": p.train_top1,
                "val_top1": p.val_top1,
                "iterations": p.iterations,
                "seconds": p.seconds,
            }
            for p in sweep.table
        ],
    }


def _scored(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``test_top1`` and ``test_predictions`` of predicted classes ``pred [N]``.

    ``test_top1`` is ``mean(pred == labels)``, so it equals the decoded
    ``correct.mean()`` exactly (and the accuracy functions' value).
    """
    return {
        "test_top1": int(np.sum(pred == labels)) / len(labels),
        "test_predictions": predictions.encode_predictions(pred, labels),
    }


def _source(entry: cache_lib.CachedFeatures, rows) -> sharded.ShardSource:
    """Streamed source of an entry, or (for a subset) its rows gathered once."""
    if rows is None:
        return sharded.ShardSource.from_cache(entry)
    picked, labels, start = [], [], 0
    for x, y in entry.iter_shards():
        inside = rows[(rows >= start) & (rows < start + len(y))] - start
        picked.append(x[inside])
        labels.append(y[inside])
        start += len(y)
    return sharded.ShardSource.from_arrays(
        np.concatenate(picked), np.concatenate(labels), rows_per_shard=1 << 16
    )


def _refit_whole(sweep, train_x, train_y, val_x, val_y, num_classes, s):
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
    )
    _logger.info(
        "Refit on train+val (%d examples) at l2 %.1e: %d iterations, %.1fs.",
        len(both_y),
        fit.l2,
        fit.iterations,
        fit.seconds,
    )
    return lbfgs.SweepResult(best=fit, table=[], standardizer=standardizer)


def _resident(entries: SplitEntries, rows, s: Settings, name: str):
    if entries.train.nbytes > s.max_resident_bytes:
        raise ValueError(
            f"the {name} probe needs the training features in memory "
            f"({entries.train.nbytes / 1e9:.1f} GB > max_resident_bytes = "
            f"{s.max_resident_bytes / 1e9:.1f} GB); only the lbfgs protocol "
            "streams. Raise max_resident_bytes or use a label subset."
        )
    train_x, train_y = entries.arrays("train")
    if rows is not None:
        train_x, train_y = train_x[rows], train_y[rows]
    return train_x, train_y


def run_protocol(
    name: str, entries: SplitEntries, *, subset: float, settings: Settings
) -> dict[str, Any]:
    """Runs protocol ``name`` on one endpoint's features and one label subset.

    Args:
        name: one of ``PROTOCOLS``.
        entries: the endpoint's cached train/val/test features.
        subset: fraction of the training labels, class-balanced and seeded by
            ``settings.seed`` (``subsets.balanced_subset``); 1 = all.
        settings: the protocol settings.

    Returns:
        The result fields of a row: ``train_top1``/``val_top1``/``test_top1``
        in [0, 1], ``test_predictions`` (``predictions.encode_predictions``
        of the final model's predicted class per test example and the test
        labels; ``test_top1 == decode_predictions(...)[1].mean()``),
        ``n_train`` after subsetting, ``seconds``, and the protocol's own
        fields (``lbfgs``: ``l2``, ``iterations``, ``converged``,
        ``refit_iterations``, ``streamed``, ``l2_path``: one dict per L2 in
        visiting order with ``l2``, ``train_top1``, ``val_top1``,
        ``iterations``, ``seconds``; ``knn``: ``k``;
        ``sgd``/``mlp``: ``steps`` and ``lr_curve``, one dict per epoch with
        ``epoch``, ``lr``, ``loss``, ``val_top1``, ``test_top1``).

    Raises:
        ValueError: unknown protocol, bad subset, or (non-L-BFGS protocols)
            training features larger than ``max_resident_bytes``.
    """
    settings.protocol_settings(name)  # validates the name
    subset = subsets.check_fraction(subset)
    start = time.perf_counter()
    rows = _subset_rows(entries.train.labels, subset, settings.seed)
    n_train = entries.train.num_examples if rows is None else len(rows)
    if name == "lbfgs":
        out = _run_lbfgs(entries, rows, settings)
    else:
        train_x, train_y = _resident(entries, rows, settings, name)
        val_x, val_y = entries.arrays("val")
        test_x, test_y = entries.arrays("test")
        num_classes = 1 + int(max(train_y.max(), val_y.max(), test_y.max()))
        if name == "knn":
            k = min(settings.knn_k, len(train_y))
            test_pred = knn.knn_predict(
                train_x, train_y, test_x, k=k, num_classes=num_classes
            )
            out = {
                "k": k,
                "train_top1": None,
                "val_top1": knn.knn_top1(
                    train_x, train_y, val_x, val_y, k=k, num_classes=num_classes
                ),
                **_scored(test_pred, test_y),
            }
        else:
            result = sgd.train_sgd_probe(
                train_x,
                train_y,
                eval_sets={"val": (val_x, val_y), "test": (test_x, test_y)},
                num_classes=num_classes,
                head="linear" if name == "sgd" else "mlp",
                batch_size=min(settings.sgd_batch_size, len(train_y)),
                lr=settings.sgd_lr,
                epochs=settings.sgd_epochs,
                decay_epochs=settings.sgd_decay_epochs,
                hidden=settings.mlp_hidden,
                seed=settings.seed,
            )
            out = {
                "train_top1": result.train_top1,
                "val_top1": result.top1["val"],
                **_scored(result.predictions["test"], test_y),
                "steps": result.steps,
                "lr_curve": result.curve,
            }
    out["n_train"] = n_train
    out["seconds"] = time.perf_counter() - start
    return out


def protocol_record(
    name: str,
    settings: Settings,
    *,
    dataset: str,
    splits: Mapping[str, str],
    pp: str,
    pooling: str,
    subset: float,
    version: str,
) -> dict[str, Any]:
    """The ``protocol`` mapping of a row (input of the fingerprint)."""
    return {
        "protocol": name,
        "settings": settings.protocol_settings(name),
        "dataset": dataset,
        "splits": dict(splits),
        "pp": pp,
        "pooling": pooling,
        "subset": subset,
        "seed": settings.seed,
        "version": version,
    }
