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

Why the solver looks like this (the modules of ``probe/``, each readable on
its own: ``validation`` checks, ``model`` types, ``objective`` the math,
``precondition``, ``solver`` the one L-BFGS driver, ``sweep`` the L2 path;
this module is the public facade of the whole-batch path):
  * float64 by default: the objective is a mean over N examples, and near the
    optimum the line search compares values that differ below float32's
    rounding of that sum. In float32 the search then stalls before a gradient
    tolerance of 1e-6 is met: TFP either sets ``failed`` or takes a zero step,
    which it reports as ``converged`` (its ``x_tolerance`` is 0). Every
    solver here reports ``converged`` only when the gradient test holds at
    the returned point (``objective.honest_flags``); a zero step is
    ``failed``. ``dtype=tf.float32`` halves memory for large feature
    matrices; use a looser ``tolerance`` (~1e-4) with it.
  * badly scaled features (``max |x|`` above ``BADLY_SCALED_MAX_ABS``) make
    the line search stall at the start; a fit that does not converge on them
    logs a warning that says so (``warn_if_badly_scaled``). Every fit that
    does not converge logs a WARNING and keeps it in ``ProbeFit.warnings``;
    the sweeps collect them in ``SweepResult.warnings``. The sweeps
    standardize by default.
  * one compiled ``tf.function`` per dtype and variant, with an
    ``input_signature`` whose shapes are all unknown and with ``l2``, the
    tolerance and the iteration cap passed as tensors: a whole L2 sweep over
    several endpoints traces once. The feature matrix is a function argument,
    never a captured constant, so it is not copied into the graph, and NumPy
    features reach it without a copy (``arrays.as_tensor``).
  * two solvers with the same iterates (``SOLVERS``): ``"tfp"`` is
    ``tfp.optimizer.lbfgs_minimize`` on the objective above; ``"lbfgs"`` (the
    default) is ``solver.minimize``, the same L-BFGS written out so that the
    line search runs on the logits (two passes over ``X`` per iteration
    instead of about six; ``revisit-benchmark probe`` measures it). The
    sharded path (``probe/sharded.py``) runs the same driver over shards.
  * ``precondition=True`` (the probe protocol's default) runs L-BFGS in the
    coordinates ``W = P W'``, ``P = (X^T X / N + (l2 / 0.1) I)^{-1/2}`` from
    one eigendecomposition of ``X^T X / N`` per feature matrix, reused for
    every l2 of a sweep (``precondition.Preconditioner``). Same objective,
    same minimiser, same stopping test on ``dJ/d[W; b]``; on raw
    Fashion-MNIST pixels 4-5x fewer iterations. No cap on D (the ``eigh``
    time and memory are logged).
  * TF32 is off for the solve unless asked for (``tf32=True``), whatever the
    process's policy; the policy is recorded in ``ProbeFit.tf32``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from revisit_tf.probe import arrays, objective, sweep, validation
from revisit_tf.probe import precondition as precondition_lib
from revisit_tf.probe import solver as solver_lib
from revisit_tf.probe.model import (
    ProbeFit,
    ProbeParams,
    Standardizer,
    SweepPoint,
    SweepResult,
    accuracy,
    predict,
    predict_logits,
)
from revisit_tf.probe.solver import (
    BADLY_SCALED_MAX_ABS,
    SOLVERS,
    TF32_DEFAULT,
    warn_if_badly_scaled,
)

__all__ = [
    "BADLY_SCALED_MAX_ABS",
    "SOLVERS",
    "TF32_DEFAULT",
    "ProbeFit",
    "ProbeParams",
    "Standardizer",
    "SweepPoint",
    "SweepResult",
    "accuracy",
    "fit_logistic_regression",
    "objective_and_gradient",
    "predict",
    "predict_logits",
    "sweep_l2",
    "warn_if_badly_scaled",
]


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
    dtype = validation.check_dtype(dtype)
    l2 = validation.check_l2(l2)
    x = validation.check_features(features, "features")
    validation.check_initial(params, x.shape[1], params.num_classes)
    y = validation.check_labels(labels, "labels", x.shape[0], params.num_classes)
    value, gradient = objective.compiled_objective(dtype)(
        arrays.as_tensor(x, dtype),
        tf.constant(y),
        tf.constant(l2, dtype),
        tf.constant(objective.pack(params, dtype.as_numpy_dtype)),
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
    tf32: bool = TF32_DEFAULT,
    label: str = "",
) -> ProbeFit:
    """Minimises ``J(W, b)`` (module docstring) with L-BFGS on all rows.

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
            conditioned (``precondition.Preconditioner``; ``"lbfgs"`` solver
            only). Same objective and stopping test; 4-5x fewer iterations on
            correlated features for one ``[D, N] x [N, D]`` product and one
            ``eigh`` up front.
        tf32: TF32 policy during the solve (default off; ``solver.tf32_policy``).
        label: names the problem in warnings (e.g. the endpoint).

    Returns:
        A ``ProbeFit``; check ``converged``/``failed`` and ``warnings``.

    Raises:
        ValueError: on malformed inputs (rank, N mismatch, non-integer or
            out-of-range labels, non-finite features, bad l2/tolerance/
            max_iterations/dtype, initial of the wrong shape).
    """
    dtype = validation.check_dtype(dtype)
    l2 = validation.check_l2(l2)
    solver_lib.check_solver_args(max_iterations, tolerance, solver)
    num_classes = validation.check_num_classes(num_classes)
    x = validation.check_features(features, "features")
    y = validation.check_labels(labels, "labels", x.shape[0], num_classes)
    num_classes = num_classes or validation.infer_num_classes(y)
    validation.check_initial(initial, x.shape[1], num_classes)
    solver_lib.check_precondition(precondition, solver)
    features = arrays.as_tensor(x, dtype)
    return solver_lib.solve_resident(
        features,
        tf.constant(y),
        num_classes=num_classes,
        l2=l2,
        max_iterations=int(max_iterations),
        tolerance=float(tolerance),
        initial=initial,
        solver=solver,
        preconditioner=_preconditioner(features, precondition),
        tf32=tf32,
        label=label,
    )


def _preconditioner(
    features: tf.Tensor, precondition: bool
) -> precondition_lib.Preconditioner | None:
    return (
        precondition_lib.Preconditioner.from_features(features)
        if precondition
        else None
    )


def _top1(params: ProbeParams, features: tf.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy on already validated tensors (no re-checking of [N, D])."""
    logits = tf.matmul(features, tf.constant(params.weights, features.dtype))
    logits += tf.constant(params.bias, features.dtype)  # [N, C]
    return float(np.mean(np.argmax(logits.numpy(), axis=1) == labels))


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
    extend: bool = True,
    tf32: bool = TF32_DEFAULT,
    label: str = "",
) -> SweepResult:
    """Fits one probe per ``l2`` of a warm-started path; keeps the best on val.

    The path (``sweep.run_path``): the grid from the largest penalty to the
    smallest, each fit warm-started from the previous one (the minimiser is
    unique, so a warm start only saves iterations), then, when the pick is at
    an edge of the grid, points past that edge in the grid's log spacing until
    the validation top-1 stops improving.

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
        precondition: see ``fit_logistic_regression``; the eigendecomposition
            of ``X^T X / N`` is computed once for the whole path.
        extend: continue the path past an edge pick (``sweep.run_path``).
        tf32: TF32 policy during the fits (default off).
        label: names the problem (e.g. the endpoint) in the log and warnings.

    Returns:
        ``SweepResult``: the fit with the highest validation top-1 (ties go to
        the larger l2), the table in visiting order, the standardizer (None if
        ``standardize`` is False), ``l2_extended`` and ``warnings``. Score the
        test split with ``result.accuracy(test_x, test_y)``.

    Raises:
        ValueError: on an empty grid, a negative or non-finite l2, or any input
            error of ``fit_logistic_regression``; also if train and val differ
            in D.
    """
    dtype = validation.check_dtype(dtype)
    solver_lib.check_solver_args(max_iterations, tolerance, solver)
    solver_lib.check_precondition(precondition, solver)
    grid = validation.check_l2_grid(l2_grid)
    num_classes = validation.check_num_classes(num_classes)
    train_x = validation.check_features(train_x, "train_x")
    val_x = validation.check_features(val_x, "val_x", num_features=train_x.shape[1])
    train_y = validation.check_labels(train_y, "train_y", train_x.shape[0], num_classes)
    val_y = validation.check_labels(val_y, "val_y", val_x.shape[0], num_classes)
    num_classes = num_classes or validation.infer_num_classes(train_y, val_y)

    standardizer = Standardizer.fit(train_x) if standardize else None
    if standardizer is not None:
        train_x, val_x = standardizer.apply(train_x), standardizer.apply(val_x)
    # Converted once (shared, or one [N, D] copy in the solver dtype, see
    # arrays.as_tensor); every fit and scoring pass of the path reuses them.
    train_x_t, train_y_t = arrays.as_tensor(train_x, dtype), tf.constant(train_y)
    val_x_t = arrays.as_tensor(val_x, dtype)
    preconditioner = _preconditioner(train_x_t, precondition)

    def fit(l2: float, initial: ProbeFit | None) -> ProbeFit:
        return solver_lib.solve_resident(
            train_x_t,
            train_y_t,
            num_classes=num_classes,
            l2=l2,
            max_iterations=int(max_iterations),
            tolerance=float(tolerance),
            initial=initial,
            solver=solver,
            preconditioner=preconditioner,
            tf32=tf32,
            label=label,
        )

    def score(result: ProbeFit) -> tuple[float, float]:
        return _top1(result, train_x_t, train_y), _top1(result, val_x_t, val_y)

    return sweep.run_path(
        grid,
        fit,
        score,
        standardizer=standardizer,
        warm_start=warm_start,
        extend=extend,
        label=label,
    )
