"""The probe's L-BFGS driver: one iteration, traced or run over shards.

Place in the data flow (stage 6): ``probe/lbfgs.py`` (features in one
resident tensor) and ``probe/sharded.py`` (features in shards, streamed from
the cache or spread over replicas) both call ``minimize``; they differ only in
the *data access* object they give it (``ResidentData`` here,
``shard_data.ShardData`` there), which computes for a direction ``d`` the
logits change ``Zd = X~ d`` and, for logits ``Z``, the mean CE and
``X~^T R``. The iteration itself is written once:

  * L-BFGS with ``NUM_CORRECTION_PAIRS`` pairs (two-loop recursion,
    ``H_0 = gamma I``), TFP's Hager-Zhang line search with TFP's constants,
    initial step 1 and ``MAX_LINE_SEARCH_ITERATIONS`` (the values
    scikit-learn gives scipy's L-BFGS-B);
  * the line search runs on the logits: along ``Theta + t d`` they are
    ``Z + t Zd`` (``objective.line_terms``), so a trial is ``O(N C)`` and an
    iteration costs two passes over ``X`` (``Zd``, then ``X~^T R`` at the
    accepted step). TFP's ``lbfgs_minimize`` evaluates the full objective
    about three times per iteration; it stays available as ``solver="tfp"``
    (``compiled_tfp_solver``), the oracle of the tests;
  * ``Z`` is recomputed exactly every ``LOGITS_REFRESH_EVERY`` iterations
    (fused with the gradient pass), a start with ``W = 0`` skips the pass
    for the first logits (``Z = 1 b^T``);
  * honest flags (``objective.honest_flags``): ``converged`` only when the
    gradient test ``max |dJ/d[W; b]| <= tolerance`` holds at the returned
    point, a stop that moved nothing is ``failed``;
  * optional preconditioning: L-BFGS moves in ``W'`` with ``W = P W'``
    (``precondition.Preconditioner``), same objective and stopping test.

The resident path is one ``tf.function`` per (dtype, XLA product,
preconditioned) with unknown shapes, so a sweep over l2s and endpoints traces
once; the sharded path runs the same ``minimize`` eagerly (a Python loop over
shards inside each pass, the per-shard work compiled).

TF32: ``tf32_policy`` sets ``tf.config.experimental.
enable_tensor_float_32_execution`` for the duration of a fit and restores it;
the probe's default is off (``TF32_DEFAULT``), because the line search
compares float32 logit sums whose TF32 rounding (10-bit mantissa inputs) is
far above the tolerance, and the policy is recorded in ``ProbeFit.tf32``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from revisit_tf.probe import model, objective, precondition, validation

_logger = logging.getLogger(__name__)

NUM_CORRECTION_PAIRS = 10
MAX_LINE_SEARCH_ITERATIONS = 50
LOGITS_REFRESH_EVERY = 20
# "lbfgs": the driver below; "tfp": ``tfp.optimizer.lbfgs_minimize`` on the
# full objective (same method and iterates, ~3x the passes over the features).
SOLVERS = ("lbfgs", "tfp")
TF32_DEFAULT = False
# Above this magnitude a feature is "badly scaled": logits of unit weights
# exceed 1e4 and the line search's steps underflow against the first gradient.
BADLY_SCALED_MAX_ABS = 1e4


def check_solver_args(
    max_iterations: int, tolerance: float, solver: str = "lbfgs"
) -> None:
    """Raises ``ValueError`` on an unknown solver or a bad cap/tolerance."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
    validation.check_iterations_and_tolerance(max_iterations, tolerance)


def check_precondition(precondition_: bool, solver: str) -> None:
    """The preconditioner needs the ``"lbfgs"`` driver."""
    if precondition_ and solver != "lbfgs":
        raise ValueError(
            f"precondition=True needs solver='lbfgs'; got solver={solver!r}."
        )


@contextlib.contextmanager
def tf32_policy(enabled: bool):
    """Runs the block with TF32 execution ``enabled``, then restores the policy."""
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(bool(enabled))
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------


def two_loop_direction(gradient, position_deltas, gradient_deltas, num_pairs):
    """``-H g`` by the L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4).

    ``position_deltas``/``gradient_deltas`` are ``[m, P]`` queues, oldest
    first; only the newest ``num_pairs`` rows are filled (the others are zero
    and contribute nothing, as in TFP). With no pair yet the direction is
    ``-g``. ``H_0 = gamma I`` with ``gamma = s^T y / y^T y`` of the newest pair.
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


def line_search(line, num_examples, z, zd, f, slope, w_w, w_dw, dw_dw, l2):
    """Hager-Zhang on ``phi(t) = J(Theta + t d)`` from the logits; ``O(N C)`` a trial.

    Args:
        line: ``line(z, zd, t)`` -> sums of CE and dCE/dt at ``z + t zd``.
        num_examples: N (state dtype).
        z, zd: the logits and their change along d (as ``line`` takes them).
        f, slope: ``phi(0)`` and ``phi'(0) = g . d``.
        w_w, w_dw, dw_dw: ``|W|^2``, ``W . dW``, ``|dW|^2`` for the penalty.
        l2: the penalty strength.

    Returns:
        ``(step, trials, converged)`` of TFP's Hager-Zhang (initial step 1).
    """
    dtype = f.dtype

    def restricted(t):  # phi(t), phi'(t)
        ce, dce = line(z, zd, t)
        ce, dce = ce / num_examples, dce / num_examples
        penalty = 0.5 * l2 * (w_w + 2 * t * w_dw + t * t * dw_dw)
        return objective.LineValue(
            x=t, f=ce + penalty, df=dce + l2 * (w_dw + t * dw_dw)
        )

    ls = tfp.optimizer.linesearch.hager_zhang(
        restricted,
        initial_step_size=tf.constant(1, dtype),
        value_at_zero=objective.LineValue(x=tf.constant(0, dtype), f=f, df=slope),
        max_iterations=MAX_LINE_SEARCH_ITERATIONS,
    )
    return ls.left.x, ls.func_evals, ls.converged


class Coordinates:
    """``W = P W'`` and the pulled-back gradient ``P^T dJ/dW`` (``[D, C]``).

    With ``terms`` None, ``P = I``; else ``terms = (basis, coef, scale)`` of a
    ``precondition.PreconditionerTerms`` and ``full`` its flag.
    """

    def __init__(self, terms: tuple | None = None, full: bool = True):
        self.terms, self.full = terms, full

    def weights(self, w_prime: tf.Tensor) -> tf.Tensor:
        if self.terms is None:
            return w_prime
        return precondition.to_weights(*self.terms, w_prime, self.full)

    def pull_back(self, grad: tf.Tensor) -> tf.Tensor:
        if self.terms is None:
            return grad
        return precondition.pull_back(*self.terms, grad, self.full)


def minimize(
    data,
    position: tf.Tensor,
    *,
    l2: tf.Tensor,
    tolerance: tf.Tensor,
    max_iterations: tf.Tensor,
    coordinates: Coordinates,
) -> dict[str, tf.Tensor]:
    """L-BFGS on ``J`` with the line search on the logits (module docstring).

    Args:
        data: the data access (``ResidentData`` or ``shard_data.ShardData``):
            ``num_examples``, ``dtype`` (of the L-BFGS state),
            ``constant_logits(b)``, ``logits(w, b)`` / ``direction(dw, db)``
            (``Z``), ``advance(z, zd, t)``, ``line(z, zd, t)`` -> sums of CE and
            dCE/dt, ``gradient(z)`` -> ``(mean CE, X^T R [D, C], 1^T R [C])``,
            ``fresh_gradient(w, b)`` -> ``(Z, mean CE, X^T R, 1^T R)``,
            ``line_search`` (``line_search`` on its ``line``), ``two_loop``
            (``two_loop_direction``), ``cond`` and ``while_loop``; the sharded
            access compiles the last O(N C) and O(P) pieces.
        position: start ``[(D+1) C]``, ``[W'; b]`` flattened, ``data.dtype``.
        l2, tolerance: scalars in ``data.dtype``; ``max_iterations`` int32.
        coordinates: ``W = P W'`` (identity without preconditioner).

    Returns:
        ``position``, ``loss``, ``gradient_max``, ``iterations``,
        ``function_evaluations``, ``line_search_evaluations``, ``converged``,
        ``failed`` (honest flags).
    """
    dtype = data.dtype
    num_classes = data.num_classes
    num_features = tf.size(position) // num_classes - 1

    def as_theta(flat):  # [(D+1) C] -> [D+1, C]
        return tf.reshape(flat, [num_features + 1, num_classes])

    def assemble(theta, ce, grad_x, grad_b):  # value, flat gradient, sup-norm
        w = coordinates.weights(theta[:-1])
        value = ce + 0.5 * l2 * tf.reduce_sum(tf.square(w))
        grad_w = grad_x + l2 * w
        # The stopping test is on dJ/d[W; b] in every variant.
        sup = tf.maximum(tf.reduce_max(tf.abs(grad_w)), tf.reduce_max(tf.abs(grad_b)))
        flat = tf.concat([coordinates.pull_back(grad_w), grad_b[None]], 0)
        return value, tf.reshape(flat, [-1]), sup

    theta0 = as_theta(position)
    z0 = data.cond(  # W = 0: Z = 1 b^T without a pass over the features
        tf.reduce_all(tf.equal(theta0[:-1], 0)),
        lambda: data.constant_logits(theta0[-1]),
        lambda: data.logits(coordinates.weights(theta0[:-1]), theta0[-1]),
    )
    f0, g0, sup0 = assemble(theta0, *data.gradient(z0))
    finite0 = tf.math.is_finite(f0) & tf.reduce_all(tf.math.is_finite(g0))
    empty = tf.zeros([NUM_CORRECTION_PAIRS, tf.size(position)], dtype)
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
        d = data.two_loop(g, st["s"], st["y"], st["pairs"])
        d_theta = as_theta(d)
        w = coordinates.weights(as_theta(x)[:-1])
        dw = coordinates.weights(d_theta[:-1])
        zd = data.direction(dw, d_theta[-1])  # Zd: [N, C]
        w_dw, dw_dw = tf.reduce_sum(w * dw), tf.reduce_sum(dw * dw)
        w_w = tf.reduce_sum(w * w)

        step, line_evaluations, line_converged = data.line_search(
            z, zd, f, tf.reduce_sum(g * d), w_w, w_dw, dw_dw, l2
        )
        new_x = x + step * d
        new_theta = as_theta(new_x)
        iterations = st["iterations"] + 1

        def updated():
            new_z = data.advance(z, zd, step)
            return (new_z, *data.gradient(new_z))

        new_z, ce, grad_x, grad_b = data.cond(
            iterations % LOGITS_REFRESH_EVERY == 0,
            lambda: data.fresh_gradient(
                coordinates.weights(new_theta[:-1]), new_theta[-1]
            ),
            updated,
        )
        new_f, new_g, new_sup = assemble(new_theta, ce, grad_x, grad_b)
        s, y = new_x - x, new_g - g
        push = tf.reduce_sum(s * y) > 0  # always true for Wolfe steps on a convex J

        def pushed(queue, vec):
            return tf.concat([queue[1:], vec[None]], axis=0)

        finite = tf.math.is_finite(new_f) & tf.reduce_all(tf.math.is_finite(new_g))
        # Only the gradient test is convergence. A step that moved nothing
        # stops the loop as TFP does, but it is a failure unless the test holds.
        converged = finite & (new_sup <= tolerance)
        return {
            "iterations": iterations,
            "evaluations": st["evaluations"] + 1,
            "line_evaluations": st["line_evaluations"] + line_evaluations,
            "position": new_x,
            "logits": new_z,
            "value": new_f,
            "gradient": new_g,
            "gradient_max": new_sup,
            "s": tf.cond(push, lambda: pushed(st["s"], s), lambda: st["s"]),
            "y": tf.cond(push, lambda: pushed(st["y"], y), lambda: st["y"]),
            "pairs": st["pairs"] + tf.cast(push, tf.int32),
            "converged": converged,
            "stalled": tf.reduce_all(tf.equal(s, 0)) | tf.equal(new_f, f),
            "failed": ~finite | (~line_converged & ~converged),
        }

    final = data.while_loop(cond, body, state)
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


class ResidentData:
    """Data access of ``minimize`` for one resident ``[N, D]`` tensor (in-graph).

    ``Z``/``Zd`` are ``[N, C]`` tensors; ``xla_product`` runs ``X d`` and the
    O(N C) terms as XLA computations (``objective.uses_xla_product``).
    """

    def __init__(self, features, labels, num_classes, xla_product: bool):
        self.features = features
        self.dtype = features.dtype
        self.num_classes = num_classes
        self.num_examples = tf.cast(tf.shape(features)[0], self.dtype)
        self.onehot = tf.one_hot(labels, num_classes, dtype=self.dtype)  # Y: [N, C]
        self._product = objective.xla_matmul if xla_product else tf.matmul
        self._line = objective.xla_line_terms if xla_product else objective.line_terms
        self._ce = (
            objective.xla_ce_and_residual if xla_product else objective.ce_and_residual
        )

    def constant_logits(self, b):
        return tf.zeros([tf.shape(self.features)[0], self.num_classes], self.dtype) + b

    def logits(self, w, b):
        return self._product(self.features, w) + b

    direction = logits

    def advance(self, z, zd, t):
        return z + t * zd

    def line(self, z, zd, t):
        return self._line(z, zd, self.onehot, t)

    def gradient(self, z):
        ce, residual = self._ce(z, self.onehot, self.num_examples)  # R: [N, C]
        grad_x = tf.matmul(self.features, residual, transpose_a=True)  # [D, C]
        return ce, grad_x, tf.reduce_sum(residual, axis=0)

    def fresh_gradient(self, w, b):
        z = self.logits(w, b)
        return (z, *self.gradient(z))

    def line_search(self, z, zd, *scalars):
        return line_search(self.line, self.num_examples, z, zd, *scalars)

    two_loop = staticmethod(two_loop_direction)
    cond = staticmethod(tf.cond)

    @staticmethod
    def while_loop(cond, body, state):
        (final,) = tf.while_loop(
            cond, lambda st: (body(st),), (state,), parallel_iterations=1
        )
        return final


def _resident_signature(dtype):
    return objective.signature(dtype) + [
        tf.TensorSpec([], dtype, name="tolerance"),
        tf.TensorSpec([], tf.int32, name="max_iterations"),
    ]


def compiled_resident_solver(
    dtype: tf.DType,
    xla_product: bool = False,
    preconditioned: bool = False,
    full_basis: bool = True,
):
    """``minimize`` on ``ResidentData`` as one ``tf.function`` per variant.

    The same object for every call with the same variant (cached);
    ``full_basis`` is ``PreconditionerTerms.full``.
    """
    return _build_resident_solver(
        tf.as_dtype(dtype), bool(xla_product), bool(preconditioned), bool(full_basis)
    )


@functools.cache
def _build_resident_solver(
    dtype: tf.DType, xla_product: bool, preconditioned: bool, full_basis: bool
):
    """The ``tf.function`` of ``compiled_resident_solver``.

    Arguments: features ``[N, D]``, labels ``[N]``, l2, position ``[(D+1) C]``,
    tolerance, max_iterations, then the preconditioner's basis ``[D, r]``,
    coef ``[r]`` and scale ``[]`` (ignored unless ``preconditioned``).
    """
    signature = _resident_signature(dtype) + [
        tf.TensorSpec([None, None], dtype, name="basis"),
        tf.TensorSpec([None], dtype, name="coef"),
        tf.TensorSpec([], dtype, name="scale"),
    ]

    @tf.function(input_signature=signature)
    def solve(features, labels, l2, position, tolerance, max_iterations, *terms):
        num_classes = tf.size(position) // (tf.shape(features)[1] + 1)
        data = ResidentData(features, labels, num_classes, xla_product)
        return minimize(
            data,
            position,
            l2=l2,
            tolerance=tolerance,
            max_iterations=max_iterations,
            coordinates=Coordinates(terms if preconditioned else None, full_basis),
        )

    return solve


@functools.cache
def compiled_tfp_solver(dtype: tf.DType):
    """``tfp.optimizer.lbfgs_minimize`` on the full objective; one trace per dtype."""

    @tf.function(input_signature=_resident_signature(dtype))
    def solve(features, labels, l2, position, tolerance, max_iterations):
        result = tfp.optimizer.lbfgs_minimize(
            lambda p: objective.value_and_gradient(p, features, labels, l2),
            initial_position=position,
            num_correction_pairs=NUM_CORRECTION_PAIRS,
            tolerance=tolerance,
            max_iterations=max_iterations,
            max_line_search_iterations=MAX_LINE_SEARCH_ITERATIONS,
        )
        converged, failed = objective.honest_flags(
            result.objective_value,
            result.objective_gradient,
            tolerance,
            result.converged,
            result.failed,
        )
        return {
            "position": result.position,
            "loss": result.objective_value,
            "gradient_max": tf.reduce_max(tf.abs(result.objective_gradient)),
            "iterations": result.num_iterations,
            "function_evaluations": result.num_objective_evaluations,
            "line_search_evaluations": tf.constant(0),
            "converged": converged,
            "failed": failed,
        }

    return solve


# --------------------------------------------------------------------------
# Start point, result and warnings (shared by both paths).
# --------------------------------------------------------------------------


def start_position(
    initial, dim: int, num_classes: int, dtype: tf.DType, terms=None
) -> tf.Tensor:
    """``[W'; b]`` flat ``[(D+1) C]``: zeros, or ``initial`` with ``W' = P^-1 W``."""
    np_dtype = dtype.as_numpy_dtype
    if initial is None:
        return tf.zeros([(dim + 1) * num_classes], dtype)
    weights = np.asarray(initial.weights, np_dtype)
    if terms is not None:
        weights = terms.coordinates(tf.constant(weights)).numpy()
    return tf.constant(
        objective.pack(model.ProbeParams(weights, initial.bias), np_dtype)
    )


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


def finish(
    out: dict,
    *,
    dim: int,
    num_classes: int,
    l2: float,
    tolerance: float,
    max_iterations: int,
    seconds: float,
    solver: str,
    terms=None,
    tf32: bool,
    max_abs_feature,
    label: str = "",
) -> model.ProbeFit:
    """The ``ProbeFit`` of a driver output: ``W = P W'``, centred bias, warnings.

    A fit that did not converge logs a WARNING naming ``label`` (e.g. the
    endpoint), l2, iterations and the gradient, kept in ``ProbeFit.warnings``;
    ``max_abs_feature()`` is then called for the badly-scaled hint.
    """
    theta = np.array(out["position"]).reshape(dim + 1, num_classes)
    if terms is not None:  # W = P W'
        theta[:-1] = terms.weights(tf.constant(theta[:-1])).numpy()
    bias = theta[-1]
    fit = model.ProbeFit(
        weights=theta[:-1],
        # Centre the bias: J is flat along b -> b + c 1 (lbfgs docstring).
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
        line_search_evaluations=int(out["line_search_evaluations"]),
        tf32=bool(tf32),
        preconditioned=terms is not None,
    )
    if not fit.converged:
        why = (
            "the line search failed or stalled"
            if fit.failed
            else f"the iteration cap {max_iterations} was reached"
        )
        message = (
            f"{label + ': ' if label else ''}L-BFGS did not converge at l2 "
            f"{l2:.1e} after {fit.iterations} iterations ({why}): max |dJ/dTheta| "
            f"= {fit.gradient_max:.3g} > tolerance {tolerance:.1e}."
        )
        _logger.warning(message)
        fit.warnings.append(message)
        warn_if_badly_scaled(
            max_abs_feature(),
            gradient_max=fit.gradient_max,
            tolerance=tolerance,
            iterations=fit.iterations,
            l2=l2,
        )
    return fit


def solve_resident(
    features: tf.Tensor,
    labels: tf.Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iterations: int,
    tolerance: float,
    initial=None,
    solver: str = "lbfgs",
    preconditioner: precondition.Preconditioner | None = None,
    tf32: bool = TF32_DEFAULT,
    label: str = "",
) -> model.ProbeFit:
    """One fit on a validated, converted ``[N, D]`` tensor and int32 ``[N]`` labels."""
    dtype = features.dtype
    dim = int(features.shape[1])
    start = time.perf_counter()
    terms = None if preconditioner is None else preconditioner.for_l2(l2, dtype)
    with tf32_policy(tf32):
        args = (
            features,
            labels,
            tf.constant(l2, dtype),
            start_position(initial, dim, num_classes, dtype, terms),
            tf.constant(tolerance, dtype),
            tf.constant(max_iterations, tf.int32),
        )
        if solver == "lbfgs":
            compiled = compiled_resident_solver(
                dtype,
                objective.uses_xla_product(features),
                terms is not None,
                terms is None or terms.full,
            )
            if terms is None:
                empty = (tf.zeros([0, 0], dtype), tf.zeros([0], dtype))
                out = compiled(*args, *empty, tf.constant(1, dtype))
            else:
                out = compiled(*args, terms.basis, terms.coef, terms.scale)
        else:
            out = compiled_tfp_solver(dtype)(*args)
        return finish(
            out,
            dim=dim,
            num_classes=num_classes,
            l2=l2,
            tolerance=tolerance,
            max_iterations=max_iterations,
            seconds=time.perf_counter() - start,
            solver=solver,
            terms=terms,
            tf32=tf32,
            max_abs_feature=lambda: float(tf.reduce_max(tf.abs(features))),
            label=label,
        )
