"""Probe protocols: small registered classes, one ``run`` per (endpoint, subset).

Place in the data flow (stage 6, after ``features`` and ``cache``): the
``linear_probe`` root resolves its ``protocols`` (names or instances) with
``resolve``, extracts (or finds) the cached features of the train, val and
test splits of every endpoint, and calls each feature protocol's ``run`` for
every endpoint and label subset; each call returns the result fields of one
``probe/results.jsonl`` row. A protocol that trains on images instead of
cached features (``uses == "images"``: ``AugmentedSgdProbe``) gets the
export and the data through ``run_images`` once, for all endpoints.

A protocol is a dataclass holding only its own arguments; ``settings()`` is
the JSON part of the row's ``protocol`` record that defines it (the input of
``fingerprint.protocol_fingerprint``, with the dataset, splits, pp, subset and
seed the root adds). ``REGISTRY`` maps each ``name`` to its class; gin binds
the classes' arguments (``LbfgsProbe.l2_grid = ...``; ``configurables`` puts
the gin-configurable classes into the registry, so ``'lbfgs'`` and
``@LbfgsProbe()`` both honour the bindings).

Protocols:
  * ``lbfgs`` (``LbfgsProbe``): multinomial logistic regression, L2 penalty
    chosen on val from a warm-started path that extends itself past an edge
    pick (``lbfgs.sweep_l2``, ``probe/sweep.py``), then, as the paper, a final
    fit at that penalty on train + val (warm-started from the selected fit)
    scored on test. Whole-batch on one device when the training matrix fits
    ``max_resident_bytes`` and no strategy is given; otherwise streamed from
    the cache (``sharded.sweep_l2_sharded``) and reduced over the strategy's
    replicas; the same L-BFGS driver and preconditioner either way
    (``lbfgs_path.fit_path``).
  * ``sgd`` / ``mlp`` (``SgdProbe``, ``MlpProbe``): the release's SGD
    schedule with a linear or MLP head on cached central-crop features
    (``sgd.train_sgd_probe``; reference 8.4, 8.5), trained on train, scored
    on val and test.
  * ``knn`` (``KnnProbe``): cosine k-NN with train as the reference set.
  * ``sgd_augmented`` / ``mlp_augmented`` (``AugmentedSgdProbe``): the
    release's own protocol, heads trained on random crops re-drawn at every
    step through the frozen export, central crops for evaluation, an
    accuracy curve over epochs (``augmented.train_augmented_probe``;
    reference 8.5, paper Table 2 and Fig. 8).

Every row carries ``test_predictions`` (``predictions.encode_predictions``):
the predicted class of every test example under the model scored on test,
so that reports can bootstrap paired differences over the same test images;
``test_top1`` is exactly the mean of its decoded ``correct``. Predictions are
outputs, not settings: they do not enter the fingerprint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from revisit_tf.probe import (
    augmented,
    knn,
    lbfgs,
    lbfgs_path,
    predictions,
    sgd,
    subsets,
)
from revisit_tf.probe import cache as cache_lib

PRECISIONS = lbfgs_path.PRECISIONS
DEFAULT_L2_GRID = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
_logger = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class Context:
    """What the root gives every protocol: the seed and the strategy."""

    seed: int = 0
    strategy: tf.distribute.Strategy | None = None


class Protocol:
    """Base of the registered protocols (module docstring)."""

    name: ClassVar[str]
    uses: ClassVar[str] = "features"  # or "images"

    def settings(self) -> dict[str, Any]:
        """The JSON settings that define this protocol (fingerprint input)."""
        raise NotImplementedError

    def run(
        self, entries: SplitEntries, rows: np.ndarray | None, context: Context
    ) -> dict[str, Any]:
        """Result fields of one row (``run_protocol``); ``rows``: the label
        subset's training rows, None for all."""
        raise NotImplementedError


REGISTRY: dict[str, type[Protocol]] = {}


def register(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: ``REGISTRY[cls.name] = cls``."""
    REGISTRY[cls.name] = cls
    return cls


def resolve(protocol: str | Protocol) -> Protocol:
    """A protocol instance from a registered name (default arguments, or the
    gin-bound ones once ``configurables`` is imported) or an instance."""
    if isinstance(protocol, Protocol):
        return protocol
    if isinstance(protocol, str) and protocol in REGISTRY:
        return REGISTRY[protocol]()
    raise ValueError(
        f"protocols must be among {sorted(REGISTRY)} or Protocol instances; "
        f"got {protocol!r}."
    )


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.")


def _scored(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``test_top1`` and ``test_predictions`` of predicted classes ``pred [N]``.

    ``test_top1`` is ``mean(pred == labels)``, so it equals the decoded
    ``correct.mean()`` exactly (and the accuracy functions' value).
    """
    return {
        "test_top1": int(np.sum(pred == labels)) / len(labels),
        "test_predictions": predictions.encode_predictions(pred, labels),
    }


def _resident(entries: SplitEntries, rows, max_bytes: int, name: str):
    """The training features in memory (``[N, D]``, ``[N]``), or a clear error."""
    if entries.train.nbytes > max_bytes:
        raise ValueError(
            f"the {name} probe needs the training features in memory "
            f"({entries.train.nbytes / 1e9:.1f} GB > {max_bytes / 1e9:.1f} GB); "
            "only the lbfgs protocol streams. Use a label subset."
        )
    train_x, train_y = entries.arrays("train")
    if rows is not None:
        train_x, train_y = train_x[rows], train_y[rows]
    return train_x, train_y


# Above this size the non-streaming protocols refuse the training matrix.
RESIDENT_LIMIT_BYTES = lbfgs_path.RESIDENT_LIMIT_BYTES


@register
@dataclasses.dataclass
class LbfgsProbe(Protocol):
    """The paper's linear evaluation solved exactly (module docstring).

    Args:
        l2_grid: penalties of the path (mean cross-entropy + l2/2 ||W||^2),
            extended automatically past an edge pick (``probe/sweep.py``).
        standardize: standardize features with training-split statistics.
        max_iterations: L-BFGS iteration cap per fit (a fit that reaches it
            is a warning in the log and the row).
        precision: ``"float32"`` (default) or ``"float64"`` (then use
            ``tolerance=1e-6`` or smaller) for the solver.
        accumulate_precision: dtype of the cross-shard sums and the L-BFGS
            state of the streamed path.
        tolerance: L-BFGS stops when the largest gradient entry is below it.
        solver: ``"lbfgs"`` (line search on the logits) or ``"tfp"``
            (``tfp.optimizer.lbfgs_minimize``, the oracle); same iterates.
        precondition: run ``"lbfgs"`` in coordinates where the Hessian is
            well conditioned (one eigendecomposition of ``X^T X`` per path).
        refit_on_trainval: final fit on train + val (the paper).
        extend_l2: continue the path past an edge pick until validation
            top-1 stops improving (``probe/sweep.py``); off, an edge pick is
            only a warning.
        max_resident_bytes: above this size of the training matrix the probe
            streams shards from the cache instead of holding it.
        stream_mapped: stream memory maps of the cache's shard files (no
            copy; the default) rather than copies read at every pass (for
            filesystems where a read error under a mapping is a SIGBUS).
            Same iterates either way: not in the fingerprint.
    """

    name: ClassVar[str] = "lbfgs"
    l2_grid: Sequence[float] = DEFAULT_L2_GRID
    standardize: bool = True
    max_iterations: int = 1000
    precision: str = "float32"
    accumulate_precision: str = "float64"
    tolerance: float = 1e-4
    solver: str = "lbfgs"
    precondition: bool = True
    refit_on_trainval: bool = True
    extend_l2: bool = True
    max_resident_bytes: int = RESIDENT_LIMIT_BYTES
    stream_mapped: bool = True

    def __post_init__(self):
        self.l2_grid = tuple(float(v) for v in self.l2_grid)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("accumulate_precision", self.accumulate_precision, PRECISIONS)
        _check_choice("solver", self.solver, lbfgs.SOLVERS)

    def settings(self) -> dict[str, Any]:
        return {
            "l2_grid": list(self.l2_grid),
            "standardize": self.standardize,
            "max_iterations": self.max_iterations,
            "precision": self.precision,
            "tolerance": self.tolerance,
            "solver": self.solver,
            "precondition": self.precondition,
            "refit_on_trainval": self.refit_on_trainval,
            "extend_l2": self.extend_l2,
        }

    def run(self, entries, rows, context):
        fit = lbfgs_path.fit_path(self, entries, rows, strategy=context.strategy)
        return {
            **lbfgs_path.row_fields(fit, refit=self.refit_on_trainval),
            **_scored(fit.test_predictions, fit.test_labels),
        }


@register
@dataclasses.dataclass
class SgdProbe(Protocol):
    """The release's SGD schedule on cached features (reference 8.4, 8.5).

    Args:
        epochs: training epochs (reference 10.6: 70; Fig. 8: longer).
        decay_epochs: x0.1 after each (10.6: 30, 50).
        batch_size: batch (10.6: 512; capped at the training set).
        lr: rate at batch 256, scaled linearly (10.6: 0.1).
    """

    name: ClassVar[str] = "sgd"
    head: ClassVar[str] = "linear"
    epochs: float = 70
    decay_epochs: Sequence[float] = (30, 50)
    batch_size: int = 512
    lr: float = 0.1

    def __post_init__(self):
        self.decay_epochs = tuple(self.decay_epochs)

    def settings(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "decay_epochs": list(self.decay_epochs),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": 0.9,
            "reference_batch_size": 256,
        }

    def _hidden(self) -> int:
        return 0

    def run(self, entries, rows, context):
        train_x, train_y = _resident(entries, rows, RESIDENT_LIMIT_BYTES, self.name)
        val_x, val_y = entries.arrays("val")
        test_x, test_y = entries.arrays("test")
        num_classes = 1 + int(max(train_y.max(), val_y.max(), test_y.max()))
        result = sgd.train_sgd_probe(
            train_x,
            train_y,
            eval_sets={"val": (val_x, val_y), "test": (test_x, test_y)},
            num_classes=num_classes,
            head=self.head,
            batch_size=min(self.batch_size, len(train_y)),
            lr=self.lr,
            epochs=self.epochs,
            decay_epochs=self.decay_epochs,
            hidden=self._hidden() or 1,
            seed=context.seed,
        )
        return {
            "train_top1": result.train_top1,
            "val_top1": result.top1["val"],
            **_scored(result.predictions["test"], test_y),
            "steps": result.steps,
            "lr_curve": result.curve,
        }


@register
@dataclasses.dataclass
class MlpProbe(SgdProbe):
    """An MLP head (paper Fig. 3; reference 8.4: 1000 hidden ReLU units,
    dropout 0.5) with the SGD schedule of ``SgdProbe``."""

    name: ClassVar[str] = "mlp"
    head: ClassVar[str] = "mlp"
    hidden: int = 1000

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "hidden": self.hidden}

    def _hidden(self) -> int:
        return self.hidden


@register
@dataclasses.dataclass
class KnnProbe(Protocol):
    """Cosine k-NN, train as the reference set; no training.

    Args:
        k: neighbours (capped at the training set).
    """

    name: ClassVar[str] = "knn"
    k: int = 20

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "similarity": "cosine"}

    def run(self, entries, rows, context):
        train_x, train_y = _resident(entries, rows, RESIDENT_LIMIT_BYTES, self.name)
        val_x, val_y = entries.arrays("val")
        test_x, test_y = entries.arrays("test")
        num_classes = 1 + int(max(train_y.max(), val_y.max(), test_y.max()))
        k = min(self.k, len(train_y))
        test_pred = knn.knn_predict(
            train_x, train_y, test_x, k=k, num_classes=num_classes
        )
        return {
            "k": k,
            "train_top1": None,
            "val_top1": knn.knn_top1(
                train_x, train_y, val_x, val_y, k=k, num_classes=num_classes
            ),
            **_scored(test_pred, test_y),
        }


@register
@dataclasses.dataclass
class AugmentedSgdProbe(Protocol):
    """The release's linear evaluation: heads on re-augmented images.

    ``augmented.train_augmented_probe`` (reference 8.5, 10.6/10.7): trained
    on the root's ``train_split`` with ``pp_train`` (random crops, no flips)
    re-drawn at every step, scored on ``val_split`` and ``test_split`` with
    the root's ``pp_probe`` (central crops) every ``eval_every_epochs``; the
    curve goes to the row (``curve``) and to TensorBoard.

    Args:
        pp_train: training pp, ending in float32 ``[H, W, C]`` in [0, 1] of
            the shape ``pp_probe`` gives.
        head: ``"linear"`` (protocol ``sgd_augmented``) or ``"mlp"``
            (``mlp_augmented``; hidden 1000, dropout 0.5).
        epochs, decay_epochs, batch_size, lr: the schedule (10.6: 70,
            (30, 50), 512, 0.1 at batch 256).
        hidden: MLP width.
        eval_every_epochs: evaluation interval (and always at the end).
        eval_batch_size: evaluation batch.
        num_classes: classes; None: the source's class names' count, else
            the largest label + 1 over the splits.
        eval_val: score ``val_split`` too (off when it is inside the
            training split, e.g. ``trainval``: its ``val_top1`` would be a
            training accuracy; the row's ``val_top1`` is then None).
    """

    name: ClassVar[str] = "sgd_augmented"
    uses: ClassVar[str] = "images"
    pp_train: str = "resize_small(256)|random_crop(224)|value_range(0, 1)"
    head: str = "linear"
    epochs: float = 70
    decay_epochs: Sequence[float] = (30, 50)
    batch_size: int = 512
    lr: float = 0.1
    hidden: int = 1000
    eval_every_epochs: int = 1
    eval_batch_size: int = 256
    num_classes: int | None = None
    eval_val: bool = True

    def __post_init__(self):
        self.decay_epochs = tuple(self.decay_epochs)
        _check_choice("head", self.head, augmented.PROTOCOLS)

    @property
    def protocol_name(self) -> str:
        """``sgd_augmented`` or ``mlp_augmented`` (the row's protocol)."""
        return augmented.PROTOCOLS[self.head]

    def settings(self) -> dict[str, Any]:
        out = {
            "pp_train": self.pp_train,
            "head": self.head,
            "epochs": self.epochs,
            "decay_epochs": list(self.decay_epochs),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": 0.9,
            "reference_batch_size": 256,
            "eval_every_epochs": self.eval_every_epochs,
            "eval_val": self.eval_val,
        }
        if self.head == "mlp":
            out["hidden"] = self.hidden
        return out

    def run_images(
        self,
        export_dir: str,
        *,
        dataset: str,
        data_dir: str | None,
        splits: Mapping[str, str],
        pp_eval: str,
        endpoints: Sequence[str],
        num_classes: int,
        context: Context,
        logdir: str | None,
    ) -> dict[str, dict[str, Any]]:
        """``{endpoint: result fields of its row}`` after one training run."""
        start = time.perf_counter()
        val, test = splits["val"], splits["test"]
        scored = (val, test) if self.eval_val else (test,)
        results = augmented.train_augmented_probe(
            export_dir,
            dataset=dataset,
            data_dir=data_dir,
            train_split=splits["train"],
            eval_splits=tuple(dict.fromkeys(scored)),
            pp_train=self.pp_train,
            pp_eval=pp_eval,
            endpoints=endpoints,
            num_classes=self.num_classes or num_classes,
            head=self.head,
            hidden=self.hidden,
            epochs=self.epochs,
            decay_epochs=self.decay_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_batch_size=self.eval_batch_size,
            eval_every_epochs=self.eval_every_epochs,
            seed=context.seed,
            strategy=context.strategy,
            logdir=logdir,
        )
        out = {}
        for endpoint, r in results.items():
            curve = [
                {
                    "epoch": p["epoch"],
                    "step": p["step"],
                    "lr": p["lr"],
                    "loss": p["loss"],
                    "val_top1": p.get(f"{val}_top1") if self.eval_val else None,
                    "test_top1": p[f"{test}_top1"],
                }
                for p in r.curve
            ]
            out[endpoint] = {
                "train_top1": None,
                "val_top1": r.top1[val] if self.eval_val else None,
                **_scored(r.predictions[test], r.labels[test]),
                "test_top5": r.top5[test],
                "steps": r.steps,
                "curve": curve,
                "n_train": r.num_examples[splits["train"]],
                "n_val": r.num_examples[val] if self.eval_val else 0,
                "n_test": r.num_examples[test],
                "dim": int(r.params.get("hidden_kernel", r.params["kernel"]).shape[0]),
                "seconds": time.perf_counter() - start,
            }
        return out


@register
@dataclasses.dataclass
class AugmentedMlpProbe(AugmentedSgdProbe):
    """``AugmentedSgdProbe`` with the MLP head (``mlp_augmented``; paper
    Fig. 3, reference 8.4)."""

    name: ClassVar[str] = "mlp_augmented"
    head: str = "mlp"


def run_protocol(
    protocol: str | Protocol,
    entries: SplitEntries,
    *,
    subset: float,
    context: Context | None = None,
) -> dict[str, Any]:
    """Runs a feature protocol on one endpoint's features and one label subset.

    Args:
        protocol: a registered name or a ``Protocol`` with ``uses ==
            "features"``.
        entries: the endpoint's cached train/val/test features.
        subset: fraction of the training labels, class-balanced and seeded by
            ``context.seed`` (``subsets.balanced_subset``); 1 = all.
        context: seed and strategy (default: seed 0, one device).

    Returns:
        The result fields of a row: ``train_top1``/``val_top1``/``test_top1``
        in [0, 1], ``test_predictions`` (``predictions.encode_predictions``
        of the final model's predicted class per test example and the test
        labels; ``test_top1 == decode_predictions(...)[1].mean()``),
        ``n_train`` after subsetting, ``seconds``, ``warnings`` (list of
        strings: non-convergence, an L2 pick at the end of the path) and the
        protocol's own fields (``lbfgs``: ``l2``, ``iterations``,
        ``converged``, ``refit_iterations``, ``streamed``, ``l2_extended``,
        ``l2_path``: one dict per L2 in visiting order with ``l2``,
        ``train_top1``, ``val_top1``, ``iterations``, ``seconds``; ``knn``:
        ``k``; ``sgd``/``mlp``: ``steps`` and ``lr_curve``, one dict per
        epoch with ``epoch``, ``lr``, ``loss``, ``val_top1``, ``test_top1``).

    Raises:
        ValueError: unknown protocol, an image protocol, bad subset, or
            (non-L-BFGS protocols) training features too large to hold.
    """
    protocol = resolve(protocol)
    if protocol.uses != "features":
        raise ValueError(
            f"protocol {protocol.name!r} trains on images, not cached features; "
            "linear_probe runs it through run_images."
        )
    context = context or Context()
    subset = subsets.check_fraction(subset)
    start = time.perf_counter()
    rows = (
        None
        if subset == 1.0
        else subsets.balanced_subset(entries.train.labels, subset, context.seed)
    )
    out = protocol.run(entries, rows, context)
    out.setdefault("warnings", [])
    out["n_train"] = entries.train.num_examples if rows is None else len(rows)
    out["seconds"] = time.perf_counter() - start
    return out


def protocol_record(
    protocol: str | Protocol,
    *,
    dataset: str,
    splits: Mapping[str, str],
    pp: str,
    pooling: str,
    subset: float,
    seed: int,
    version: str,
) -> dict[str, Any]:
    """The ``protocol`` mapping of a row (input of the fingerprint)."""
    protocol = resolve(protocol)
    return {
        "protocol": getattr(protocol, "protocol_name", protocol.name),
        "settings": protocol.settings(),
        "dataset": dataset,
        "splits": dict(splits),
        "pp": pp,
        "pooling": pooling,
        "subset": subset,
        "seed": seed,
        "version": version,
    }
