"""Linear probe: multinomial logistic regression solved with TFP's L-BFGS.

Place in the data flow (stage 6, second half): ``probe/features.py`` runs an
exported trunk once per split and caches one feature matrix per endpoint; this
module fits a linear classifier on such a matrix, selects the L2 strength on a
held-out split and scores splits with the chosen model. The numbers it returns
end up as rows of ``probe/results.jsonl`` (stage 7, ``revisit_tf.report``).

Contract:
  * inputs: ``features`` real ``[N, D]`` (finite), ``labels`` integer ``[N]`` in
    ``[0, C)``; NumPy arrays or eager tensors;
  * outputs: ``ProbeFit`` (NumPy ``weights [D, C]``, ``bias [C]`` and solver
    diagnostics) and, for a sweep, ``SweepResult`` (best fit, per-l2 table, the
    standardizer to apply to every other split).

The problem. With ``Z = X W + 1 b^T`` (``[N, C]`` logits), ``P = softmax(Z)``
row-wise and ``Y = onehot(y)``, we minimise

    J(W, b) = (1/N) sum_i CE(p_i, y_i) + (l2 / 2) ||W||_F^2,
    CE(p_i, y_i) = -log p_{i, y_i},                           (bias not penalised)

the objective of the paper's linear evaluation (section 8.4 of the reference:
softmax cross-entropy of a linear head, with L2 weight decay), solved to
convergence on the whole training set instead of by SGD. scikit-learn's
``LogisticRegression(C=C)`` (multinomial, l2) minimises
``S = sum_i CE_i + ||W||_F^2 / (2 C)``; since ``S = N * J`` when
``l2 = 1 / (C * N)``, both have the same minimiser (scikit-learn itself divides
by N internally: its ``l2_reg_strength`` is ``1 / (C * sum(sample_weight))``).

The gradient, written with ``R = (P - Y) / N`` (``[N, C]``, ``dJ/dZ``):

    dJ/dW = X^T R + l2 W        [D, C]
    dJ/db = 1^T R               [C]

We work with the augmented matrices ``X~ = [X, 1]`` (``[N, D+1]``) and
``Theta = [W; b]`` (``[D+1, C]``, W stacked on top of b) so that
``Z = X~ Theta`` and ``dJ/dTheta = X~^T R + l2 [W; 0]``. The L-BFGS position is
``Theta`` flattened row-major, i.e. ``[W.ravel(); b]``.

Uniqueness. ``J`` is convex; for ``l2 > 0`` it is strictly convex in ``W``,
and the only flat direction left is ``b -> b + c 1`` (softmax is invariant to a
shift of all logits). We return the representative with ``sum(b) = 0``, which
makes the solution unique and comparable across solvers. (Shifting every
column of ``W`` by the same vector is also softmax-invariant, but the penalty
is smallest when the rows of ``W`` sum to zero, so the optimum has them so.)

Why the solver looks like this:
  * float64 by default: the objective is a mean over N examples, and near the
    optimum the line search compares values that differ below float32's
    rounding of that sum. In float32 the search then stalls before a gradient
    tolerance of 1e-6 is met: TFP either sets ``failed`` or takes a zero step,
    which it reports as ``converged`` (its ``x_tolerance`` is 0). Every
    solver here reports ``converged`` only when the gradient test holds at
    the returned point (``_honest_flags``); a zero step is ``failed``.
    ``dtype=tf.float32`` halves memory for large feature matrices; use a
    looser ``tolerance`` (~1e-4) with it.
  * badly scaled features (``max |x|`` above ``BADLY_SCALED_MAX_ABS``) make
    the line search stall at the start; a fit that does not converge on them
    logs a warning that says so (``warn_if_badly_scaled``). The sweeps
    standardize by default.
  * one compiled ``tf.function`` per dtype, with an ``input_signature`` whose
    shapes are all unknown and with ``l2``, the tolerance and the iteration cap
    passed as tensors: a whole L2 sweep over several endpoints traces once.
    The feature matrix is a function argument, never a captured constant, so
    it is not copied into the graph, and NumPy features reach it without a
    copy (``arrays.as_tensor``: the cache and the standardizer write aligned
    arrays that TensorFlow shares through DLPack).
  * 10 correction pairs and up to 50 line-search steps, the values
    scikit-learn gives scipy's L-BFGS-B (``maxcor`` default, ``maxls=50``).
  * two solvers with the same iterates (``SOLVERS``): ``"tfp"`` is
    ``tfp.optimizer.lbfgs_minimize`` on the objective above; ``"lbfgs"`` (the
    default) is the same L-BFGS (two-loop recursion, TFP's Hager-Zhang line
    search with TFP's constants and initial step 1, TFP's convergence and
    failure flags) written out so that the line search runs on the logits:
    the model is linear, so along ``Theta + t d`` the logits are
    ``Z + t X~ d``. One ``[N, D] x [D, C]`` product per iteration gives
    ``X~ d``; each line-search trial then costs ``O(N C)``, and ``X~^T R`` is
    computed once, at the accepted step. TFP's line search evaluates the full
    objective about 3 times per iteration (it brackets and takes a secant
    step before testing the Wolfe conditions), each evaluation two passes over
    ``X``; here an iteration costs two passes in all (``revisit-benchmark
    probe`` measures the difference against TFP and scikit-learn). Those two
    products are the whole cost of a fit; on CPUs the first runs as an XLA
    dot (``_uses_xla_product``), and a cold start skips the pass for the
    initial logits.
  * ``precondition=True`` (the probe protocol's default) runs L-BFGS in the
    coordinates ``W' = L^T W``, ``L L^T = X^T X / N + (l2 / 0.1) I``, where
    the Hessian is well conditioned whatever the feature correlations
    (``_Preconditioner``). Same objective, same minimiser, same stopping test
    on ``dJ/d[W; b]``; on raw Fashion-MNIST pixels 4-5x fewer iterations
    (401 -> 96 at l2 = 3e-3, 791 -> 151 at l2 = 1e-4).
  * the sharded variant for features that do not fit in memory, or that are
    spread over replicas, is ``probe/sharded.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from revisit_tf import progress as progress_lib
from revisit_tf.probe import arrays

_logger = logging.getLogger(__name__)

_NUM_CORRECTION_PAIRS = 10
_MAX_LINE_SEARCH_ITERATIONS = 50
_SUPPORTED_DTYPES = (tf.float32, tf.float64)
# "lbfgs": L-BFGS with TFP's Hager-Zhang line search run on the logits
# (``_compiled_logit_solver``); "tfp": ``tfp.optimizer.lbfgs_minimize`` on the
# full objective. Same method and iterates; "lbfgs" does ~3x fewer passes over
# the features.
SOLVERS = ("lbfgs", "tfp")


# --------------------------------------------------------------------------
# Data classes.
# --------------------------------------------------------------------------


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
        x = _check_features(features, "features")
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
        x = _check_features(features, "features", num_features=self.mean.shape[0])
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
    """

    l2: float
    train_top1: float
    val_top1: float
    loss: float
    iterations: int
    converged: bool
    failed: bool
    seconds: float

    @classmethod
    def of_fit(cls, fit: ProbeFit, train_top1: float, val_top1: float) -> SweepPoint:
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
        )


@dataclasses.dataclass
class SweepResult:
    """Outcome of ``sweep_l2``.

    Attributes:
        best: the fit with the best validation top-1 (ties -> larger l2). Its
            weights apply to *standardized* features when ``standardizer`` is
            not None.
        table: one ``SweepPoint`` per grid value, from largest to smallest l2.
        standardizer: the map fitted on the training split, or None when the
            sweep ran on raw features.

    Example:
        >>> result = sweep_l2(tr_x, tr_y, va_x, va_y, l2_grid=[1e-2, 1e-4])
        >>> test_top1 = result.accuracy(te_x, te_y)
    """

    best: ProbeFit
    table: list[SweepPoint]
    standardizer: Standardizer | None

    @property
    def best_l2(self) -> float:
        """The selected penalty strength."""
        return self.best.l2

    @property
    def best_point(self) -> SweepPoint:
        """The table row of the selected l2 (its train/val top-1, iterations)."""
        return next(p for p in self.table if p.l2 == self.best.l2)

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


# --------------------------------------------------------------------------
# Validation helpers.
# --------------------------------------------------------------------------


def _all_finite(x: np.ndarray) -> bool:
    """Whether every entry of a float ``[N, D]`` array is finite.

    Fast path: one BLAS product ``x @ 1``; a NaN or an infinity in a row makes
    that row's sum non-finite, so finite sums prove the whole array finite,
    without the ``[N, D]`` boolean temporary of ``np.isfinite`` (2.5x faster
    on a 1 GB matrix). A non-finite sum (or a finite overflow) falls back to
    the exact test.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: exact test
        row_sums = x @ np.ones(x.shape[1], x.dtype)
    if np.all(np.isfinite(row_sums)):
        return True
    return bool(np.isfinite(x).all())


def _check_features(
    features: np.ndarray, name: str, *, num_features: int | None = None
) -> np.ndarray:
    """Returns ``features`` as a NumPy ``[N, D]`` real array or raises."""
    x = np.asarray(features)
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    ):
        raise ValueError(
            f"{name} must be a real-valued (float or int) array; got dtype {x.dtype}."
        )
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D] (rank 2); got {x.shape}.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty [N, D]; got shape {x.shape}.")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{name} has {x.shape[1]} features per row; expected {num_features}."
        )
    if np.issubdtype(x.dtype, np.floating) and not _all_finite(x):
        finite = np.isfinite(x)
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} must be finite; found {int((~finite).sum())} non-finite "
            f"value(s), the first at row {row}, column {col}: {x[row, col]!r}."
        )
    return x


def _check_labels(
    labels: np.ndarray, name: str, num_examples: int, num_classes: int | None
) -> np.ndarray:
    """Returns ``labels`` as int32 ``[N]`` in ``[0, num_classes)`` or raises."""
    y = np.asarray(labels)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array; got dtype {y.dtype}.")
    if y.ndim != 1:
        raise ValueError(f"{name} must have shape [N] (rank 1); got {y.shape}.")
    if y.shape[0] != num_examples:
        raise ValueError(
            f"{name} has {y.shape[0]} entries but the features have "
            f"{num_examples} rows; they must match."
        )
    if y.size and y.min() < 0:
        raise ValueError(f"{name} must be >= 0; got minimum {int(y.min())}.")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(
            f"{name} must be in [0, {num_classes}) for num_classes={num_classes};"
            f" got maximum {int(y.max())}."
        )
    return y.astype(np.int32)


def _check_num_classes(num_classes: int | None) -> int | None:
    """``None`` or an int ``>= 2``."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an int or None; got {num_classes!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    return int(num_classes)


def _infer_num_classes(*label_arrays: np.ndarray) -> int:
    """``1 + max label`` over the (validated) label arrays; must be >= 2."""
    num_classes = 1 + max(int(np.max(y)) for y in label_arrays)
    if num_classes < 2:
        raise ValueError(
            "labels contain only class 0; pass num_classes >= 2 explicitly."
        )
    return num_classes


def _check_l2(l2: float) -> float:
    try:
        value = float(l2)
    except (TypeError, ValueError):
        raise ValueError(f"l2 must be a finite float >= 0; got {l2!r}.") from None
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"l2 must be a finite float >= 0; got {l2!r}.")
    return value


def _check_dtype(dtype: tf.DType) -> tf.DType:
    dtype = tf.as_dtype(dtype)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be tf.float32 or tf.float64; got {dtype.name}.")
    return dtype


# --------------------------------------------------------------------------
# Objective and compiled solver.
# --------------------------------------------------------------------------


def _value_and_gradient(
    position: tf.Tensor, features: tf.Tensor, labels: tf.Tensor, l2: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``J`` and ``dJ/dTheta`` at the flat ``position`` (see module docstring).

    Shapes: position ``[(D+1) C]``, features ``[N, D]``, labels ``[N]`` int32,
    l2 ``[]``. Returns a scalar and a ``[(D+1) C]`` vector.
    """
    dtype = features.dtype
    num_examples = tf.cast(tf.shape(features)[0], dtype)
    theta = tf.reshape(position, [tf.shape(features)[1] + 1, -1])  # [D+1, C]
    weights, bias = theta[:-1], theta[-1]  # [D, C], [C]
    logits = tf.matmul(features, weights) + bias  # Z: [N, C]
    log_probs = tf.nn.log_softmax(logits)  # log P: [N, C], stable
    # CE_i = -log P[i, y_i].
    nll = -tf.gather(log_probs, labels[:, None], axis=1, batch_dims=1)  # [N, 1]
    value = tf.reduce_sum(nll) / num_examples + 0.5 * l2 * tf.reduce_sum(
        tf.square(weights)
    )
    # R = dJ/dZ = (P - Y) / N.
    onehot = tf.one_hot(labels, tf.shape(theta)[1], dtype=dtype)  # Y: [N, C]
    residual = (tf.exp(log_probs) - onehot) / num_examples  # R: [N, C]
    grad_weights = tf.matmul(features, residual, transpose_a=True) + l2 * weights
    grad_bias = tf.reduce_sum(residual, axis=0, keepdims=True)  # 1^T R: [1, C]
    gradient = tf.concat([grad_weights, grad_bias], axis=0)  # [D+1, C]
    return value, tf.reshape(gradient, [-1])


def _signature(dtype: tf.DType) -> list[tf.TensorSpec]:
    return [
        tf.TensorSpec([None, None], dtype, name="features"),  # [N, D]
        tf.TensorSpec([None], tf.int32, name="labels"),  # [N]
        tf.TensorSpec([], dtype, name="l2"),
        tf.TensorSpec([None], dtype, name="position"),  # [(D+1) C]
    ]


@functools.cache
def _compiled_objective(dtype: tf.DType):
    """``tf.function`` of ``_value_and_gradient``, one trace per dtype."""

    @tf.function(input_signature=_signature(dtype))
    def objective(features, labels, l2, position):
        return _value_and_gradient(position, features, labels, l2)

    return objective


def _honest_flags(value, gradient, tolerance, converged, failed):
    """``(converged, failed)`` judged at the returned point only.

    TFP (and the logit solver, which mirrors it) also stops when a step does
    not move the position or the objective (``x_tolerance`` and
    ``f_relative_tolerance`` are 0) and calls that ``converged``; on badly
    scaled features that happens at the starting point with a gradient of
    1e17. Here ``converged`` means the gradient test holds at the returned
    point: every value finite and ``max |gradient| <= tolerance``. A stop for
    any other reason (no progress, a non-finite value) is ``failed``;
    ``max_iterations`` reached leaves both False, as before.

    Shapes: ``value`` ``[]``, ``gradient`` ``[P]``; returns two bool scalars.
    """
    finite = tf.math.is_finite(value) & tf.reduce_all(tf.math.is_finite(gradient))
    holds = finite & (tf.reduce_max(tf.abs(gradient)) <= tolerance)
    return holds, failed | ~finite | (converged & ~holds)


@functools.cache
def _compiled_solver(dtype: tf.DType):
    """``tf.function`` running ``tfp.optimizer.lbfgs_minimize``; one trace per dtype.

    Everything that varies between calls (data, l2, start, tolerance, iteration
    cap) is a tensor argument with an unknown shape, so sweeps never retrace.
    """
    signature = _signature(dtype) + [
        tf.TensorSpec([], dtype, name="tolerance"),
        tf.TensorSpec([], tf.int32, name="max_iterations"),
    ]

    @tf.function(input_signature=signature)
    def solve(features, labels, l2, position, tolerance, max_iterations):
        result = tfp.optimizer.lbfgs_minimize(
            lambda p: _value_and_gradient(p, features, labels, l2),
            initial_position=position,
            num_correction_pairs=_NUM_CORRECTION_PAIRS,
            tolerance=tolerance,
            max_iterations=max_iterations,
            max_line_search_iterations=_MAX_LINE_SEARCH_ITERATIONS,
        )
        gradient_max = tf.reduce_max(tf.abs(result.objective_gradient))
        converged, failed = _honest_flags(
            result.objective_value,
            result.objective_gradient,
            tolerance,
            result.converged,
            result.failed,
        )
        return {
            "position": result.position,
            "loss": result.objective_value,
            "gradient_max": gradient_max,
            "iterations": result.num_iterations,
            "function_evaluations": result.num_objective_evaluations,
            "converged": converged,
            "failed": failed,
        }

    return solve


# Recompute the logits X Theta from scratch every this many iterations instead
# of updating them as Z + t Zd, so that float32 rounding cannot accumulate.
_LOGITS_REFRESH_EVERY = 20


# Feature matrices with at least this many entries get X d and the O(N C)
# terms from XLA on a CPU-only host (``_uses_xla_product``).
_XLA_PRODUCT_MIN_ENTRIES = 1 << 22


@tf.function(jit_compile=True)
def _xla_matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """``a @ b`` compiled by XLA (one compilation per shape)."""
    return tf.matmul(a, b)


def _line_terms(z, zd, onehot, t):
    """Sums of CE and dCE/dt at logits ``z + t zd`` (all ``[N, C]``): scalars."""
    log_probs = tf.nn.log_softmax(z + t * zd)
    return (
        -tf.reduce_sum(onehot * log_probs),
        tf.reduce_sum((tf.exp(log_probs) - onehot) * zd),
    )


def _ce_and_residual(z, onehot, num_examples):
    """Mean CE at logits ``z`` and ``R = (softmax(z) - Y) / N`` ``[N, C]``."""
    log_probs = tf.nn.log_softmax(z)
    return (
        -tf.reduce_sum(onehot * log_probs) / num_examples,
        (tf.exp(log_probs) - onehot) / num_examples,
    )


# The same, as single fused XLA loops (no [N, C] temporaries).
_xla_line_terms = tf.function(_line_terms, jit_compile=True)
_xla_ce_and_residual = tf.function(_ce_and_residual, jit_compile=True)


def _uses_xla_product(features: tf.Tensor) -> bool:
    """Whether the solver runs ``X d`` and its O(N C) terms as XLA computations.

    The solve is two passes over X per iteration, each a tall-skinny product
    (``[N, D] x [D, C]`` with C ~ 10, then ``X^T R``), and those products
    are nearly the whole cost. On CPUs TF's oneDNN kernel runs them far below
    the machine's GEMM peak (on the 2-core dev machine: 72 ms for 60000 x
    4096 at C = 10, against 88 ms at C = 32, i.e. packing, not arithmetic,
    dominates), and XLA's dot does ``X d`` in 52 ms (37 vs 28 ms at D =
    2048). For ``X^T R`` XLA's best form is within 10% of TF's either way
    (60 vs 66 ms at D = 4096, 37 vs 33 ms at D = 2048; 430 ms as written,
    with a transposed operand), so it stays with TF. The line-search terms
    and the residual are fused into single XLA loops, with no ``[N, C]``
    temporaries. Measured together: 135 instead of 156 ms per iteration at
    D = 4096, 74 instead of 86 ms at D = 2048. Small matrices keep TF's
    kernels: XLA compiles once per shape, which is not worth it below ~16 MB
    of features. On GPUs and TPUs the vendor kernels are used as they are.
    """
    entries = int(features.shape[0]) * int(features.shape[1])
    return entries >= _XLA_PRODUCT_MIN_ENTRIES and arrays.cpu_only()


class _LineValue(collections.namedtuple("_LineValue", ["x", "f", "df"])):
    """A point of the 1-D restriction ``phi(t) = J(Theta + t d)``: t, phi, phi'."""


def _two_loop_direction(gradient, position_deltas, gradient_deltas, num_pairs):
    """``-H g`` by the L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4).

    ``position_deltas``/``gradient_deltas`` are ``[m, P]`` queues, oldest
    first; only the newest ``num_pairs`` rows are filled (the others are zero
    and contribute nothing, as in TFP's implementation). With no pair yet the
    direction is ``-g``. ``H_0 = gamma I`` with ``gamma = s^T y / y^T y`` of
    the newest pair.
    """
    memory = position_deltas.shape[0]

    def recursion():
        inv_rhos = tf.reduce_sum(position_deltas * gradient_deltas, axis=1)  # [m]
        q = gradient
        alphas = [None] * memory
        for i in reversed(range(memory)):
            alphas[i] = tf.math.divide_no_nan(
                tf.reduce_sum(position_deltas[i] * q), inv_rhos[i]
            )
            q = q - alphas[i] * gradient_deltas[i]
        gamma = inv_rhos[-1] / tf.reduce_sum(tf.square(gradient_deltas[-1]))
        r = gamma * q
        for i in range(memory):
            beta = tf.math.divide_no_nan(
                tf.reduce_sum(gradient_deltas[i] * r), inv_rhos[i]
            )
            r = r + (alphas[i] - beta) * position_deltas[i]
        return -r

    return tf.cond(num_pairs > 0, recursion, lambda: -gradient)


def _compiled_logit_solver(
    dtype: tf.DType, xla_product: bool = False, preconditioned: bool = False
):
    """The compiled logit-space solver for ``dtype`` (one per variant)."""
    return _build_logit_solver(dtype, bool(xla_product), bool(preconditioned))


@functools.cache
def _build_logit_solver(dtype: tf.DType, xla_product: bool, preconditioned: bool):
    """L-BFGS whose line search runs in logit space; one trace per variant.

    Same method as ``tfp.optimizer.lbfgs_minimize`` (two-loop recursion with
    10 pairs, TFP's Hager-Zhang line search with its default constants,
    initial step 1, the same convergence and failure flags) but it exploits
    that the model is linear: along ``Theta + t d`` the logits are
    ``Z + t Zd`` with ``Zd = X~ d``, so after one ``[N, D] x [D, C]`` product
    per iteration every line-search trial costs ``O(N C)`` instead of two
    passes over the ``[N, D]`` features, and the full gradient
    (``X~^T R``, one more pass) is computed only at the accepted step. TFP's
    L-BFGS evaluates the full objective about three times per iteration
    (its line search always brackets and runs a secant step before it tests
    the Wolfe conditions), so this does about a third of the feature passes
    for the same iterates. ``Z`` is recomputed exactly every
    ``_LOGITS_REFRESH_EVERY`` iterations. With ``xla_product`` the product
    ``X d`` runs as an XLA computation (``_uses_xla_product``). A start with
    ``W = 0`` (the default) skips the pass that computes the first logits:
    they are ``1 b^T``.
    """
    product = _xla_matmul if xla_product else tf.matmul
    line_terms = _xla_line_terms if xla_product else _line_terms
    ce_and_residual = _xla_ce_and_residual if xla_product else _ce_and_residual
    signature = _signature(dtype) + [
        tf.TensorSpec([], dtype, name="tolerance"),
        tf.TensorSpec([], tf.int32, name="max_iterations"),
        tf.TensorSpec([None, None], dtype, name="preconditioner"),  # P: [D, D]
    ]
    memory = _NUM_CORRECTION_PAIRS

    @tf.function(input_signature=signature)
    def solve(features, labels, l2, position, tolerance, max_iterations, precond):
        # Preconditioned: the position holds W' with W = P W' (P [D, D],
        # ``_Preconditioner``); the objective is J(P W', b), so its gradient
        # in W' is P^T dJ/dW. Otherwise P is ignored ([0, 0]) and W' = W.
        def weights(w_prime):  # [D, C] -> W
            return tf.matmul(precond, w_prime) if preconditioned else w_prime

        def pulled_back(grad):  # dJ/dW -> dJ/dW'
            if not preconditioned:
                return grad
            return tf.matmul(precond, grad, transpose_a=True)

        num_features = tf.shape(features)[1]
        num_classes = tf.size(position) // (num_features + 1)
        num_examples = tf.cast(tf.shape(features)[0], dtype)
        onehot = tf.one_hot(labels, num_classes, dtype=dtype)  # Y: [N, C]

        def as_theta(flat):  # [(D+1) C] -> [D+1, C]
            return tf.reshape(flat, [num_features + 1, num_classes])

        def logits(flat):  # Z = X W + b: [N, C]
            theta = as_theta(flat)
            return product(features, weights(theta[:-1])) + theta[-1]

        def value_and_gradient(flat, z):
            theta = as_theta(flat)
            value, residual = ce_and_residual(z, onehot, num_examples)  # R: [N, C]
            w = weights(theta[:-1])
            value += 0.5 * l2 * tf.reduce_sum(tf.square(w))
            grad_w = tf.matmul(features, residual, transpose_a=True) + l2 * w
            grad_b = tf.reduce_sum(residual, axis=0, keepdims=True)
            # The stopping test is on dJ/d[W; b] in every variant.
            sup = tf.maximum(
                tf.reduce_max(tf.abs(grad_w)), tf.reduce_max(tf.abs(grad_b))
            )
            flat = tf.reshape(tf.concat([pulled_back(grad_w), grad_b], 0), [-1])
            return value, flat, sup

        z0 = tf.cond(  # W = 0: Z = 1 b^T without a pass over the features
            tf.reduce_all(tf.equal(as_theta(position)[:-1], 0)),
            lambda: (
                tf.zeros([tf.shape(features)[0], num_classes], dtype)
                + as_theta(position)[-1]
            ),
            lambda: logits(position),
        )
        f0, g0, sup0 = value_and_gradient(position, z0)
        finite0 = tf.math.is_finite(f0) & tf.reduce_all(tf.math.is_finite(g0))
        empty = tf.zeros([memory, tf.size(position)], dtype)
        state = {
            "iterations": tf.constant(0),
            "evaluations": tf.constant(1),
            "line_evaluations": tf.constant(0),
            "position": position,
            "logits": z0,
            "value": f0,
            "gradient": g0,
            "s": empty,
            "y": empty,
            "pairs": tf.constant(0),
            "gradient_max": sup0,
            "converged": finite0 & (sup0 <= tolerance),
            "stalled": tf.constant(False),
            "failed": ~finite0,
        }

        def cond(st):
            return (
                ~st["converged"]
                & ~st["stalled"]
                & ~st["failed"]
                & (st["iterations"] < max_iterations)
            )

        def body(st):
            x, z, f, g = st["position"], st["logits"], st["value"], st["gradient"]
            d = _two_loop_direction(g, st["s"], st["y"], st["pairs"])
            d_theta = as_theta(d)
            w, dw = weights(as_theta(x)[:-1]), weights(d_theta[:-1])
            zd = product(features, dw) + d_theta[-1]  # Zd: [N, C]
            w_dw, dw_dw = tf.reduce_sum(w * dw), tf.reduce_sum(dw * dw)
            w_w = tf.reduce_sum(w * w)

            def restricted(t):  # phi(t) = J(x + t d), phi'(t); O(N C)
                ce, dce = line_terms(z, zd, onehot, t)
                ce, dce = ce / num_examples, dce / num_examples
                penalty = 0.5 * l2 * (w_w + 2 * t * w_dw + t * t * dw_dw)
                return _LineValue(x=t, f=ce + penalty, df=dce + l2 * (w_dw + t * dw_dw))

            ls = tfp.optimizer.linesearch.hager_zhang(
                restricted,
                initial_step_size=tf.constant(1, dtype),
                value_at_zero=_LineValue(
                    x=tf.constant(0, dtype), f=f, df=tf.reduce_sum(g * d)
                ),
                max_iterations=_MAX_LINE_SEARCH_ITERATIONS,
            )
            step = ls.left.x
            new_x = x + step * d
            iterations = st["iterations"] + 1
            new_z = tf.cond(
                iterations % _LOGITS_REFRESH_EVERY == 0,
                lambda: logits(new_x),
                lambda: z + step * zd,
            )
            new_f, new_g, new_sup = value_and_gradient(new_x, new_z)
            s, y = new_x - x, new_g - g
            curvature = tf.reduce_sum(s * y)
            push = curvature > 0  # always true for Wolfe steps on a convex J

            def pushed(queue, vec):
                return tf.concat([queue[1:], vec[None]], axis=0)

            finite = tf.math.is_finite(new_f) & tf.reduce_all(tf.math.is_finite(new_g))
            # Only the gradient test is convergence. A step that moved
            # nothing stops the loop as TFP does (x_tolerance and
            # f_relative_tolerance = 0), but it is a failure unless the test
            # holds (``_honest_flags``).
            converged = finite & (new_sup <= tolerance)
            stalled = tf.reduce_all(tf.equal(s, 0)) | tf.equal(new_f, f)
            return (
                {
                    "iterations": iterations,
                    "evaluations": st["evaluations"] + 1,
                    "line_evaluations": st["line_evaluations"] + ls.func_evals,
                    "position": new_x,
                    "logits": new_z,
                    "value": new_f,
                    "gradient": new_g,
                    "gradient_max": new_sup,
                    "s": tf.cond(push, lambda: pushed(st["s"], s), lambda: st["s"]),
                    "y": tf.cond(push, lambda: pushed(st["y"], y), lambda: st["y"]),
                    "pairs": st["pairs"] + tf.cast(push, tf.int32),
                    "converged": converged,
                    "stalled": stalled,
                    "failed": ~finite | (~ls.converged & ~converged),
                },
            )

        (final,) = tf.while_loop(cond, body, (state,), parallel_iterations=1)
        return {
            "position": final["position"],
            "loss": final["value"],
            "gradient_max": final["gradient_max"],
            "iterations": final["iterations"],
            "function_evaluations": final["evaluations"],
            "line_search_evaluations": final["line_evaluations"],
            "converged": final["converged"],
            "failed": final["failed"] | (final["stalled"] & ~final["converged"]),
        }

    return solve


def _pack(params: ProbeParams, np_dtype: np.dtype) -> np.ndarray:
    """``[W; b]`` flattened row-major: ``[(D+1) C]``."""
    return (
        np.concatenate([params.weights, params.bias[None, :]], axis=0)
        .astype(np_dtype)
        .ravel()
    )


class _Preconditioner:
    """``P = L^{-T}`` with ``L L^T = X^T X / N + c I``, ``c = l2 / curvature``.

    Why: the Hessian of ``J`` in W is about ``kappa X^T X / N + l2 I`` (kappa
    ~ the softmax curvature ``p (1 - p)``, ~0.1 for 10 classes), and L-BFGS
    needs a number of iterations that grows with its condition number. For
    correlated features (raw pixels, trunk endpoints) that is 1e4 or more, and
    a fit takes hundreds of iterations. In ``W' = L^T W`` the Hessian becomes
    ``L^{-1} (kappa S + l2 I) L^{-T}`` with ``S = X^T X / N``, whose
    eigenvalues lie between ``kappa`` and ``l2 / c`` = ``curvature``: well
    conditioned whatever S. The objective, and so the minimiser, is
    unchanged (``J(P W')``, penalty on ``W = P W'``); only the coordinates
    L-BFGS moves in change. The stopping test stays on ``max |dJ/d[W; b]|``.

    Cost: ``S`` is one ``[D, N] x [N, D]`` product (a full-speed GEMM,
    computed once per feature matrix), then per l2 one Cholesky factor and
    triangular inverse (``O(D^3)``: 0.4 s at D = 2048, 2.8 s at 4096 on the
    2-core dev machine), and per iteration two ``[D, D] x [D, C]`` products.
    Worth it when iterations are many and D is moderate; above
    ``_PRECONDITION_MAX_DIM`` features the probe runs without it.
    """

    def __init__(self, features: tf.Tensor, curvature: float = 0.1):
        n = tf.cast(tf.shape(features)[0], features.dtype)
        gram = tf.matmul(features, features, transpose_a=True) / n  # S: [D, D]
        self._gram = tf.cast(gram, tf.float64)
        self._curvature = curvature

    def for_l2(self, l2: float, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
        """``(P, L^T)`` for this ``l2``: ``W = P W'`` and ``W' = L^T W``."""
        dim = self._gram.shape[0]
        # c > 0 even at l2 = 0 (the factor must exist): a tiny floor.
        c = max(l2 / self._curvature, 1e-8 * float(tf.linalg.trace(self._gram)) / dim)
        chol = tf.linalg.cholesky(self._gram + c * tf.eye(dim, dtype=tf.float64))
        inverse = tf.linalg.triangular_solve(chol, tf.eye(dim, dtype=tf.float64))
        return tf.cast(tf.transpose(inverse), dtype), tf.cast(tf.transpose(chol), dtype)


def _solve(
    features: tf.Tensor,
    labels: tf.Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iterations: int,
    tolerance: float,
    initial: ProbeParams | None,
    solver: str = "lbfgs",
    preconditioner: _Preconditioner | None = None,
) -> ProbeFit:
    """Runs the compiled solver on already validated, converted tensors."""
    dtype = features.dtype
    np_dtype = dtype.as_numpy_dtype
    num_features = int(features.shape[1])
    start = time.perf_counter()
    precond = tf.zeros([0, 0], dtype)
    if preconditioner is not None:
        precond, chol_t = preconditioner.for_l2(l2, dtype)
    if initial is None:
        position = np.zeros([(num_features + 1) * num_classes], np_dtype)
    elif preconditioner is None:
        position = _pack(initial, np_dtype)
    else:  # W' = L^T W
        w_prime = (chol_t @ tf.constant(initial.weights, dtype)).numpy()
        position = _pack(ProbeParams(w_prime, initial.bias), np_dtype)
    args = (
        features,
        labels,
        tf.constant(l2, dtype),
        tf.constant(position),
        tf.constant(tolerance, dtype),
        tf.constant(max_iterations, tf.int32),
    )
    if solver == "lbfgs":
        compiled = _compiled_logit_solver(
            dtype, _uses_xla_product(features), preconditioner is not None
        )
        out = compiled(*args, precond)
    else:
        out = _compiled_solver(dtype)(*args)
    theta = np.array(out["position"]).reshape(num_features + 1, num_classes)
    if preconditioner is not None:  # W = P W'
        theta[:-1] = (precond @ tf.constant(theta[:-1])).numpy()
    seconds = time.perf_counter() - start
    bias = theta[-1]
    if not bool(out["converged"]):
        warn_if_badly_scaled(
            float(tf.reduce_max(tf.abs(features))),
            gradient_max=float(out["gradient_max"]),
            tolerance=tolerance,
            iterations=int(out["iterations"]),
            l2=l2,
        )
    return ProbeFit(
        weights=theta[:-1],
        # Centre the bias: J is flat along b -> b + c 1 (module docstring).
        bias=bias - bias.mean(),
        l2=l2,
        loss=float(out["loss"]),
        gradient_max=float(out["gradient_max"]),
        iterations=int(out["iterations"]),
        function_evaluations=int(out["function_evaluations"]),
        converged=bool(out["converged"]),
        failed=bool(out["failed"]),
        seconds=seconds,
        solver=solver,
        line_search_evaluations=int(out.get("line_search_evaluations", 0)),
    )


# Above this magnitude a feature is "badly scaled": logits of unit weights
# exceed 1e4 and the line search's steps underflow against the first gradient.
# Raw pixels (0..255) and standardized features are far below it.
BADLY_SCALED_MAX_ABS = 1e4


def warn_if_badly_scaled(
    max_abs: float, *, gradient_max: float, tolerance: float, iterations: int, l2: float
) -> bool:
    """Logs a warning for a fit that did not converge on badly scaled features.

    Called for every fit that did not converge (the whole-batch and the
    sharded path); healthy fits never pay for the ``max |x|`` pass.

    Args:
        max_abs: ``max |x|`` over the ``[N, D]`` features the solver saw.
        gradient_max, tolerance, iterations, l2: of the fit, for the message.

    Returns:
        Whether ``max_abs`` exceeds ``BADLY_SCALED_MAX_ABS`` (warning logged).
    """
    if not max_abs > BADLY_SCALED_MAX_ABS:
        return False
    _logger.warning(
        "L-BFGS did not converge at l2 %.1e (max |dJ/dTheta| = %.3g > tolerance "
        "%.1e after %d iterations): the features are badly scaled (max |x| = "
        "%.3g > %.0e). Standardize them (lbfgs.Standardizer, or the sweeps' "
        "standardize=True, the probe's default).",
        l2,
        gradient_max,
        tolerance,
        iterations,
        max_abs,
        BADLY_SCALED_MAX_ABS,
    )
    return True


def _top1(params: ProbeParams, features: tf.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy on already validated tensors (no re-checking of [N, D])."""
    logits = tf.matmul(features, tf.constant(params.weights, features.dtype))
    logits += tf.constant(params.bias, features.dtype)  # [N, C]
    return float(np.mean(np.argmax(logits.numpy(), axis=1) == labels))


def _check_solver_args(
    max_iterations: int, tolerance: float, solver: str = "lbfgs"
) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
    if isinstance(max_iterations, bool) or not isinstance(
        max_iterations, int | np.integer
    ):
        raise ValueError(f"max_iterations must be an int; got {max_iterations!r}.")
    if not 1 <= max_iterations < 2**31:
        raise ValueError(f"max_iterations must be >= 1; got {max_iterations}.")
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite float > 0; got {tolerance!r}.")


def _check_precondition(precondition: bool, solver: str) -> None:
    if precondition and solver != "lbfgs":
        raise ValueError(
            f"precondition=True needs solver='lbfgs'; got solver={solver!r}."
        )


# Above this many features the O(D^3) factorisation per l2 and the [D, D]
# Gram matrix cost more than preconditioning saves (``_Preconditioner``).
_PRECONDITION_MAX_DIM = 4096


def _maybe_preconditioner(
    features: tf.Tensor, precondition: bool
) -> _Preconditioner | None:
    """A ``_Preconditioner`` if asked for and D is small enough, else None."""
    if not precondition:
        return None
    dim = int(features.shape[1])
    if dim > _PRECONDITION_MAX_DIM:
        _logger.info(
            "%d features > %d: L-BFGS runs without the X^T X preconditioner.",
            dim,
            _PRECONDITION_MAX_DIM,
        )
        return None
    return _Preconditioner(features)


def _check_initial(
    initial: ProbeParams | None, num_features: int, num_classes: int
) -> None:
    if initial is None:
        return
    if not isinstance(initial, ProbeParams):
        raise ValueError(
            f"initial must be a ProbeParams/ProbeFit or None; got {type(initial)}."
        )
    w_shape, b_shape = np.shape(initial.weights), np.shape(initial.bias)
    if w_shape != (num_features, num_classes) or b_shape != (num_classes,):
        raise ValueError(
            f"initial has weights {w_shape} and bias {b_shape}; expected "
            f"({num_features}, {num_classes}) and ({num_classes},)."
        )
    if not (np.isfinite(initial.weights).all() and np.isfinite(initial.bias).all()):
        raise ValueError("initial weights and bias must be finite.")


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def objective_and_gradient(
    params: ProbeParams,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    l2: float,
    dtype: tf.DType = tf.float64,
) -> tuple[float, ProbeParams]:
    """Evaluates ``J`` and its gradient at ``params`` (the solver's own code).

    Args:
        params: ``weights [D, C]``, ``bias [C]``.
        features: ``[N, D]`` real, finite.
        labels: ``[N]`` integers in ``[0, C)``.
        l2: penalty strength ``>= 0``.
        dtype: computation dtype (tf.float32 or tf.float64).

    Returns:
        ``(J, grad)`` where ``grad.weights = X^T R + l2 W`` ``[D, C]`` and
        ``grad.bias = 1^T R`` ``[C]``, ``R = (softmax(Z) - Y) / N``.

    Raises:
        ValueError: on malformed or mismatched inputs.
    """
    dtype = _check_dtype(dtype)
    l2 = _check_l2(l2)
    x = _check_features(features, "features")
    _check_initial(params, x.shape[1], params.num_classes)
    y = _check_labels(labels, "labels", x.shape[0], params.num_classes)
    value, gradient = _compiled_objective(dtype)(
        arrays.as_tensor(x, dtype),
        tf.constant(y),
        tf.constant(l2, dtype),
        tf.constant(_pack(params, dtype.as_numpy_dtype)),
    )
    theta = gradient.numpy().reshape(x.shape[1] + 1, params.num_classes)
    return float(value), ProbeParams(weights=theta[:-1], bias=theta[-1])


def fit_logistic_regression(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int | None = None,
    l2: float,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
    initial: ProbeParams | None = None,
    dtype: tf.DType = tf.float64,
    solver: str = "lbfgs",
    precondition: bool = False,
) -> ProbeFit:
    """Minimises ``J(W, b)`` (module docstring) with TFP L-BFGS on all rows.

    Args:
        features: ``[N, D]`` real, finite training features.
        labels: ``[N]`` integer labels in ``[0, num_classes)``.
        num_classes: C; defaults to ``1 + max(labels)``.
        l2: penalty strength ``>= 0`` (``= 1 / (C_sklearn * N)``). With
            ``l2 = 0`` and separable data there is no minimiser and the solver
            runs until ``max_iterations``.
        max_iterations: cap on L-BFGS iterations.
        tolerance: stop when ``max |dJ/dTheta| <= tolerance``. J is a mean, so
            this does not depend on N; 1e-6 suits float64, use ~1e-4 in float32.
        initial: start point (warm start); default all zeros (``J = log C``).
        dtype: tf.float64 (default) or tf.float32 for the solver state and the
            features it works on. Features already in that dtype, C-contiguous
            and 64-byte aligned (what the feature cache returns) are shared
            with TensorFlow; others are converted once (``arrays.as_tensor``).
        solver: ``"lbfgs"`` (default; line search on the logits) or ``"tfp"``
            (``tfp.optimizer.lbfgs_minimize``); see ``SOLVERS``.
        precondition: run L-BFGS in coordinates where the Hessian is well
            conditioned (``_Preconditioner``; ``"lbfgs"`` solver only). Same
            objective and stopping test; 4-5x fewer iterations on correlated
            features (raw Fashion-MNIST pixels: 401 -> 96 at l2 = 3e-3) for one
            ``[D, N] x [N, D]`` product up front. Ignored (logged) above
            ``_PRECONDITION_MAX_DIM`` = 4096 features.

    Returns:
        A ``ProbeFit``; check ``converged``/``failed``. A fit that did not
        converge on badly scaled features (``max |x| > 1e4``) logs a warning
        suggesting standardization.

    Raises:
        ValueError: on malformed inputs (rank, N mismatch, non-integer or
            out-of-range labels, non-finite features, bad l2/tolerance/
            max_iterations/dtype, initial of the wrong shape).
    """
    dtype = _check_dtype(dtype)
    l2 = _check_l2(l2)
    _check_solver_args(max_iterations, tolerance, solver)
    num_classes = _check_num_classes(num_classes)
    x = _check_features(features, "features")
    y = _check_labels(labels, "labels", x.shape[0], num_classes)
    num_classes = num_classes or _infer_num_classes(y)
    _check_initial(initial, x.shape[1], num_classes)
    _check_precondition(precondition, solver)
    features = arrays.as_tensor(x, dtype)
    return _solve(
        features,
        tf.constant(y),
        num_classes=num_classes,
        l2=l2,
        max_iterations=int(max_iterations),
        tolerance=float(tolerance),
        initial=initial,
        solver=solver,
        preconditioner=_maybe_preconditioner(features, precondition),
    )


def predict_logits(params: ProbeParams, features: np.ndarray) -> np.ndarray:
    """Returns ``features @ weights + bias``, ``[N, C]``, in the weights' dtype.

    Raises:
        ValueError: if ``features`` is not finite ``[N, D]`` with the params' D.
    """
    x = _check_features(features, "features", num_features=params.num_features)
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
    y = _check_labels(labels, "labels", logits.shape[0], params.num_classes)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def sweep_l2(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    l2_grid: Sequence[float],
    num_classes: int | None = None,
    warm_start: bool = True,
    standardize: bool = True,
    max_iterations: int = 1000,
    tolerance: float = 1e-6,
    dtype: tf.DType = tf.float64,
    solver: str = "lbfgs",
    precondition: bool = False,
) -> SweepResult:
    """Fits one probe per ``l2`` and keeps the best on the validation split.

    The grid is visited from the largest penalty to the smallest: strongly
    regularised problems are well conditioned and solve in few iterations,
    and each solution is a close start for the next, slightly weaker penalty
    (the continuation used for regularisation paths, e.g. glmnet). The
    minimiser is unique (module docstring), so a warm-started fit converges to
    the same solution as a cold one, only faster.

    Args:
        train_x: ``[N, D]`` training features.
        train_y: ``[N]`` training labels.
        val_x: ``[M, D]`` validation features (model selection only).
        val_y: ``[M]`` validation labels.
        l2_grid: penalty strengths ``>= 0``; duplicates are dropped.
        num_classes: C; defaults to ``1 + max`` over train and val labels.
        warm_start: start each fit from the previous solution.
        standardize: fit a ``Standardizer`` on ``train_x`` and apply it to both
            splits (see ``Standardizer`` for why this is the default).
        max_iterations: per-fit L-BFGS iteration cap.
        tolerance: per-fit gradient sup-norm tolerance.
        dtype: solver dtype.
        solver: ``"lbfgs"`` or ``"tfp"`` (see ``fit_logistic_regression``).
        precondition: see ``fit_logistic_regression``; ``X^T X`` is computed
            once for the whole sweep.

    Returns:
        ``SweepResult``: the fit with the highest validation top-1 (ties go to
        the larger l2, the simpler model), the per-l2 table in visiting order
        and the standardizer (None if ``standardize`` is False). Score the
        test split with ``result.accuracy(test_x, test_y)``.

    Raises:
        ValueError: on an empty grid, a negative or non-finite l2, or any input
            error of ``fit_logistic_regression``; also if train and val differ
            in D.
    """
    dtype = _check_dtype(dtype)
    _check_solver_args(max_iterations, tolerance, solver)
    _check_precondition(precondition, solver)
    if isinstance(l2_grid, str | bytes) or len(l2_grid) == 0:
        raise ValueError(
            f"l2_grid must be a non-empty sequence of floats; got {l2_grid!r}."
        )
    grid = sorted({_check_l2(v) for v in l2_grid}, reverse=True)

    num_classes = _check_num_classes(num_classes)
    train_x = _check_features(train_x, "train_x")
    val_x = _check_features(val_x, "val_x", num_features=train_x.shape[1])
    train_y = _check_labels(train_y, "train_y", train_x.shape[0], num_classes)
    val_y = _check_labels(val_y, "val_y", val_x.shape[0], num_classes)
    num_classes = num_classes or _infer_num_classes(train_y, val_y)

    standardizer = Standardizer.fit(train_x) if standardize else None
    if standardizer is not None:
        train_x, val_x = standardizer.apply(train_x), standardizer.apply(val_x)
    # Converted once (shared, or one [N, D] copy in the solver dtype, see
    # arrays.as_tensor); every fit and scoring pass of the sweep reuses them.
    train_x_t, train_y_t = arrays.as_tensor(train_x, dtype), tf.constant(train_y)
    val_x_t = arrays.as_tensor(val_x, dtype)
    preconditioner = _maybe_preconditioner(train_x_t, precondition)

    table: list[SweepPoint] = []
    best: ProbeFit | None = None
    best_val = -1.0
    previous: ProbeFit | None = None
    progress = progress_lib.Progress(len(grid))
    for i, l2 in enumerate(grid):
        fit = _solve(
            train_x_t,
            train_y_t,
            num_classes=num_classes,
            l2=l2,
            max_iterations=int(max_iterations),
            tolerance=float(tolerance),
            initial=previous if warm_start else None,
            solver=solver,
            preconditioner=preconditioner,
        )
        val_top1 = _top1(fit, val_x_t, val_y)
        table.append(SweepPoint.of_fit(fit, _top1(fit, train_x_t, train_y), val_top1))
        point = table[-1]
        _logger.info(
            "l2 %.1e: train %.2f%%, val %.2f%% (%d iterations%s, %.1fs); sweep %s.",
            l2,
            100 * point.train_top1,
            100 * val_top1,
            fit.iterations,
            "" if fit.converged else ", NOT converged",
            fit.seconds,
            progress.summary(i + 1),
        )
        # Strict ">": the grid is descending, so ties keep the larger l2.
        if val_top1 > best_val:
            best, best_val = fit, val_top1
        previous = fit
    return SweepResult(best=best, table=table, standardizer=standardizer)
