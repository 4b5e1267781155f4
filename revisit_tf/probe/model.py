"""The probe's model: parameters, solved fits, standardizer, sweep results.

Place in the data flow (stage 6): every solver of ``probe/`` returns these
types; ``probe/lbfgs.py`` re-exports them. A linear classifier is
``logits = features @ weights + bias`` with ``weights [D, C]`` and
``bias [C]``; a ``SweepResult`` adds the L2 path it was selected on and the
``Standardizer`` to apply to every other split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from revisit_tf.probe import arrays, validation


@dataclasses.dataclass
class ProbeParams:
    """Parameters of a linear classifier ``logits = features @ weights + bias``.

    Attributes:
        weights: ``[D, C]`` array.
        bias: ``[C]`` array.

    Example:
        >>> params = ProbeParams(np.zeros([5, 3]), np.zeros([3]))
        >>> predict_logits(params, np.ones([2, 5])).shape
        (2, 3)
    """

    weights: np.ndarray
    bias: np.ndarray

    def __post_init__(self):
        self.weights = np.asarray(self.weights)
        self.bias = np.asarray(self.bias)

    @property
    def num_features(self) -> int:
        """D, the input dimension."""
        return int(self.weights.shape[0])

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return int(self.weights.shape[1])


@dataclasses.dataclass
class ProbeFit(ProbeParams):
    """A solved probe: parameters plus L-BFGS diagnostics.

    A ``ProbeFit`` is a ``ProbeParams``, so it can be passed directly as the
    ``initial`` point of the next fit (warm start) or to ``predict_logits``.

    Attributes:
        weights: ``[D, C]`` array in the solver dtype.
        bias: ``[C]`` array, centred (``sum(bias) == 0``, see module docstring).
        l2: the penalty strength ``l2`` of the objective ``J``.
        loss: ``J`` at the returned position (mean CE + ``l2/2 ||W||^2``).
        gradient_max: sup-norm of ``dJ/dTheta`` at the returned position.
        iterations: L-BFGS iterations (TFP ``num_iterations``).
        function_evaluations: objective+gradient evaluations
            (TFP ``num_objective_evaluations``).
        converged: the gradient test holds at the returned position:
            ``loss`` and the gradient finite and ``gradient_max <=
            tolerance``. (TFP also calls a step that stopped moving
            ``converged``; here that is ``failed``.)
        failed: the solver stopped before the gradient test held: the line
            search found no acceptable step, a step moved nothing, or a value
            was not finite. With ``converged`` False and ``failed`` False,
            ``max_iterations`` was hit.
        seconds: wall time of the solve (includes tracing on first use).
        solver: ``"lbfgs"`` or ``"tfp"`` (see ``SOLVERS``).
        line_search_evaluations: line-search trials of the ``"lbfgs"`` solver
            (each ``O(N C)``; not counted in ``function_evaluations``).
        tf32: the TensorFloat-32 policy the solve ran under
            (``solver.tf32_policy``; only GPUs of the Ampere generation and
            later use it, for float32 products).
        preconditioned: whether L-BFGS ran in the eigen-preconditioned
            coordinates (``precondition.Preconditioner``).
        warnings: messages of a fit that did not converge (also logged).
    """

    l2: float
    loss: float
    gradient_max: float
    iterations: int
    function_evaluations: int
    converged: bool
    failed: bool
    seconds: float
    solver: str = "lbfgs"
    line_search_evaluations: int = 0
    tf32: bool = False
    preconditioned: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Standardizer:
    """Per-feature affine map ``(x - mean) / scale`` fitted on a training split.

    Why the sweep standardizes by default: L-BFGS converges in a number of
    iterations that grows with the condition number of the Hessian of ``J``,
    which for raw trunk features is poor (endpoint activations differ in scale
    by orders of magnitude, and un-centred non-negative ReLU features couple
    the bias with every weight). Centring and scaling to unit variance makes
    one tolerance and one l2 grid usable for every endpoint. It changes the
    effective penalty (``||W'||^2`` on standardized features is
    ``||diag(scale) W||^2`` on raw ones), which is harmless because ``l2`` is
    chosen on validation data anyway.

    Features whose training standard deviation is ``<= min_scale`` (e.g. a
    ReLU channel that is zero on every training image) are only centred, with
    scale 1, as scikit-learn's ``StandardScaler`` does: dividing by a floored
    tiny std would turn a small non-zero test activation into a huge input.

    Attributes:
        mean: ``[D]`` float64 training mean.
        scale: ``[D]`` float64 divisor (training std, or 1 for ~constant
            features).

    Example:
        >>> s = Standardizer.fit(train_x)
        >>> z_train, z_test = s.apply(train_x), s.apply(test_x)
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, *, min_scale: float = 1e-8) -> Standardizer:
        """Computes mean and scale over the rows of ``features``.

        Args:
            features: ``[N, D]`` real, finite array (the training split).
            min_scale: standard deviations at or below this are replaced by 1.

        Returns:
            The fitted ``Standardizer`` (float64 statistics).

        Raises:
            ValueError: on a bad ``features`` array or a negative ``min_scale``.
        """
        if not min_scale >= 0:
            raise ValueError(f"min_scale must be >= 0; got {min_scale!r}.")
        x = validation.check_features(features, "features")
        mean = np.mean(x, axis=0, dtype=np.float64)  # [D]
        std = np.std(x, axis=0, dtype=np.float64)  # [D]
        scale = np.where(std > min_scale, std, 1.0)
        return cls(mean=mean, scale=scale)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Returns ``(features - mean) / scale``, shape ``[N, D]``.

        The result keeps the dtype of ``features`` when it is floating point
        (so float32 features stay float32), else it is float64.

        Raises:
            ValueError: if ``features`` is not ``[N, D]`` with the fitted D.
        """
        x = validation.check_features(
            features, "features", num_features=self.mean.shape[0]
        )
        out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        # In the output dtype, into an aligned buffer (arrays.as_tensor shares
        # it): no [N, D] float64 temporaries for float32 features.
        out = arrays.aligned_empty(x.shape, out_dtype)
        np.subtract(x, self.mean.astype(out_dtype), out=out, casting="unsafe")
        out /= self.scale.astype(out_dtype)
        return out


@dataclasses.dataclass
class SweepPoint:
    """One row of the L2 sweep table.

    Attributes:
        l2: penalty strength.
        train_top1: top-1 accuracy on the training split, in [0, 1].
        val_top1: top-1 accuracy on the validation split, in [0, 1].
        loss: final objective ``J`` on the training split.
        iterations: L-BFGS iterations of this fit.
        converged: ``ProbeFit.converged`` (gradient test at the returned point).
        failed: ``ProbeFit.failed``.
        seconds: wall time of this fit.
        extended: whether this l2 was added past an edge of the requested grid
            (``sweep.run_path``).
    """

    l2: float
    train_top1: float
    val_top1: float
    loss: float
    iterations: int
    converged: bool
    failed: bool
    seconds: float
    extended: bool = False

    @classmethod
    def of_fit(
        cls, fit: ProbeFit, train_top1: float, val_top1: float, extended: bool = False
    ) -> SweepPoint:
        """The row of ``fit`` (its l2 and diagnostics) with its two accuracies."""
        return cls(
            l2=fit.l2,
            train_top1=train_top1,
            val_top1=val_top1,
            loss=fit.loss,
            iterations=fit.iterations,
            converged=fit.converged,
            failed=fit.failed,
            seconds=fit.seconds,
            extended=extended,
        )


@dataclasses.dataclass
class SweepResult:
    """Outcome of ``sweep_l2``.

    Attributes:
        best: the fit with the best validation top-1 (ties -> larger l2). Its
            weights apply to *standardized* features when ``standardizer`` is
            not None.
        table: one ``SweepPoint`` per visited l2, in visiting order: the grid
            from largest to smallest l2, then any points added past an edge
            (``SweepPoint.extended``).
        standardizer: the map fitted on the training split, or None when the
            sweep ran on raw features.
        l2_extended: the l2 values added past an edge of the requested grid
            (empty when the pick was inside it).
        warnings: fits that did not converge, and a pick still at an edge of
            the (extended) path; each is also logged as a WARNING.

    Example:
        >>> result = sweep_l2(tr_x, tr_y, va_x, va_y, l2_grid=[1e-2, 1e-4])
        >>> test_top1 = result.accuracy(te_x, te_y)
    """

    best: ProbeFit
    table: list[SweepPoint]
    standardizer: Standardizer | None
    l2_extended: list[float] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def best_l2(self) -> float:
        """The selected penalty strength."""
        return self.best.l2

    @property
    def best_point(self) -> SweepPoint:
        """The table row of the selected l2 (its train/val top-1, iterations)."""
        return next(p for p in self.table if p.l2 == self.best.l2)

    @property
    def tf32(self) -> bool:
        """The TF32 policy the selected fit ran under (``ProbeFit.tf32``)."""
        return self.best.tf32

    def predict_logits(self, features: np.ndarray) -> np.ndarray:
        """Standardizes (if the sweep did) and applies the best fit: ``[N, C]``."""
        if self.standardizer is not None:
            features = self.standardizer.apply(features)
        return predict_logits(self.best, features)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class (int32 ``[N]``) of the best fit on raw ``features``."""
        if self.standardizer is not None:
            features = self.standardizer.apply(features)
        return predict(self.best, features)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Top-1 accuracy of the best fit on raw ``features`` ``[N, D]``."""
        if self.standardizer is not None:
            features = self.standardizer.apply(features)
        return accuracy(self.best, features, labels)


def predict_logits(params: ProbeParams, features: np.ndarray) -> np.ndarray:
    """Returns ``features @ weights + bias``, ``[N, C]``, in the weights' dtype.

    Raises:
        ValueError: if ``features`` is not finite ``[N, D]`` with the params' D.
    """
    x = validation.check_features(
        features, "features", num_features=params.num_features
    )
    weights = tf.constant(params.weights)
    logits = tf.matmul(tf.cast(x, weights.dtype), weights) + tf.cast(
        params.bias, weights.dtype
    )
    return logits.numpy()


def predict(params: ProbeParams, features: np.ndarray) -> np.ndarray:
    """Predicted class per row, int32 ``[N]``: ``argmax_c`` of ``predict_logits``.

    Ties go to the smallest class (``np.argmax``), as in ``accuracy``.

    Raises:
        ValueError: as ``predict_logits``.
    """
    return np.argmax(predict_logits(params, features), axis=1).astype(np.int32)


def accuracy(params: ProbeParams, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in ``[0, 1]``: mean of ``argmax_c logits == label``.

    Raises:
        ValueError: on malformed features or labels outside ``[0, C)``.
    """
    logits = predict_logits(params, features)
    y = validation.check_labels(labels, "labels", logits.shape[0], params.num_classes)
    return float(np.mean(np.argmax(logits, axis=1) == y))
