"""The probe's objective: value, gradient and its restriction to a line.

Place in the data flow (stage 6): the math that every L-BFGS path of
``probe/`` shares (``probe/lbfgs.py`` has the derivation). With
``Z = X W + 1 b^T`` (``[N, C]``), ``P = softmax(Z)``, ``Y = onehot(y)`` and
``R = (P - Y) / N``:

    J(W, b)  = (1/N) sum_i CE_i + (l2 / 2) ||W||_F^2
    dJ/dW    = X^T R + l2 W       [D, C]
    dJ/db    = 1^T R              [C]

and along ``Theta + t d`` the logits are ``Z + t Zd`` with ``Zd = X~ d``, so
``phi(t) = J(Theta + t d)`` and ``phi'(t)`` cost ``O(N C)`` once ``Zd`` is
known (``line_terms``). The L-BFGS position is ``Theta = [W; b]`` flattened
row-major (``pack``).
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import tensorflow as tf

from revisit_tf.probe import arrays

# Feature matrices with at least this many entries get X d and the O(N C)
# terms from XLA on a CPU-only host (``uses_xla_product``).
XLA_PRODUCT_MIN_ENTRIES = 1 << 22


def pack(params, np_dtype: np.dtype) -> np.ndarray:
    """``[W; b]`` of ``params`` (``weights [D, C]``, ``bias [C]``) as ``[(D+1) C]``."""
    return (
        np.concatenate(
            [np.asarray(params.weights), np.asarray(params.bias)[None, :]], axis=0
        )
        .astype(np_dtype)
        .ravel()
    )


def value_and_gradient(
    position: tf.Tensor, features: tf.Tensor, labels: tf.Tensor, l2: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``J`` and ``dJ/dTheta`` at the flat ``position``.

    Shapes: position ``[(D+1) C]``, features ``[N, D]``, labels ``[N]`` int32,
    l2 ``[]``. Returns a scalar and a ``[(D+1) C]`` vector.
    """
    dtype = features.dtype
    num_examples = tf.cast(tf.shape(features)[0], dtype)
    theta = tf.reshape(position, [tf.shape(features)[1] + 1, -1])  # [D+1, C]
    weights, bias = theta[:-1], theta[-1]  # [D, C], [C]
    logits = tf.matmul(features, weights) + bias  # Z: [N, C]
    log_probs = tf.nn.log_softmax(logits)  # log P: [N, C], stable
    nll = -tf.gather(log_probs, labels[:, None], axis=1, batch_dims=1)  # [N, 1]
    value = tf.reduce_sum(nll) / num_examples + 0.5 * l2 * tf.reduce_sum(
        tf.square(weights)
    )
    onehot = tf.one_hot(labels, tf.shape(theta)[1], dtype=dtype)  # Y: [N, C]
    residual = (tf.exp(log_probs) - onehot) / num_examples  # R: [N, C]
    grad_weights = tf.matmul(features, residual, transpose_a=True) + l2 * weights
    grad_bias = tf.reduce_sum(residual, axis=0, keepdims=True)  # 1^T R: [1, C]
    gradient = tf.concat([grad_weights, grad_bias], axis=0)  # [D+1, C]
    return value, tf.reshape(gradient, [-1])


def signature(dtype: tf.DType) -> list[tf.TensorSpec]:
    """Input signature ``(features [N, D], labels [N], l2 [], position [P])``."""
    return [
        tf.TensorSpec([None, None], dtype, name="features"),  # [N, D]
        tf.TensorSpec([None], tf.int32, name="labels"),  # [N]
        tf.TensorSpec([], dtype, name="l2"),
        tf.TensorSpec([None], dtype, name="position"),  # [(D+1) C]
    ]


@functools.cache
def compiled_objective(dtype: tf.DType):
    """``tf.function`` of ``value_and_gradient``, one trace per dtype."""

    @tf.function(input_signature=signature(dtype))
    def objective(features, labels, l2, position):
        return value_and_gradient(position, features, labels, l2)

    return objective


def honest_flags(value, gradient, tolerance, converged, failed):
    """``(converged, failed)`` judged at the returned point only.

    TFP (and the logit solver, which mirrors it) also stops when a step does
    not move the position or the objective (``x_tolerance`` and
    ``f_relative_tolerance`` are 0) and calls that ``converged``; on badly
    scaled features that happens at the starting point with a gradient of
    1e17. Here ``converged`` means the gradient test holds at the returned
    point: every value finite and ``max |gradient| <= tolerance``. A stop for
    any other reason (no progress, a non-finite value) is ``failed``;
    ``max_iterations`` reached leaves both False.

    Shapes: ``value`` ``[]``, ``gradient`` ``[P]``; returns two bool scalars.
    """
    finite = tf.math.is_finite(value) & tf.reduce_all(tf.math.is_finite(gradient))
    holds = finite & (tf.reduce_max(tf.abs(gradient)) <= tolerance)
    return holds, failed | ~finite | (converged & ~holds)


class LineValue(collections.namedtuple("LineValue", ["x", "f", "df"])):
    """A point of the 1-D restriction ``phi(t) = J(Theta + t d)``: t, phi, phi'."""


def line_terms(z, zd, onehot, t):
    """Sums of CE and dCE/dt at logits ``z + t zd`` (all ``[N, C]``): scalars."""
    log_probs = tf.nn.log_softmax(z + t * zd)
    return (
        -tf.reduce_sum(onehot * log_probs),
        tf.reduce_sum((tf.exp(log_probs) - onehot) * zd),
    )


def ce_and_residual(z, onehot, num_examples):
    """Mean CE at logits ``z`` and ``R = (softmax(z) - Y) / N`` ``[N, C]``."""
    log_probs = tf.nn.log_softmax(z)
    return (
        -tf.reduce_sum(onehot * log_probs) / num_examples,
        (tf.exp(log_probs) - onehot) / num_examples,
    )


@tf.function(jit_compile=True)
def xla_matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """``a @ b`` compiled by XLA (one compilation per shape)."""
    return tf.matmul(a, b)


# The same terms as single fused XLA loops (no [N, C] temporaries).
xla_line_terms = tf.function(line_terms, jit_compile=True)
xla_ce_and_residual = tf.function(ce_and_residual, jit_compile=True)


def uses_xla_product(features: tf.Tensor) -> bool:
    """Whether the solver runs ``X d`` and its O(N C) terms as XLA computations.

    The solve is two passes over X per iteration, each a tall-skinny product
    (``[N, D] x [D, C]`` with C ~ 10, then ``X^T R``), and those products
    are nearly the whole cost. On CPUs TF's oneDNN kernel runs them far below
    the machine's GEMM peak (on the 2-core dev machine: 72 ms for 60000 x
    4096 at C = 10, against 88 ms at C = 32, i.e. packing, not arithmetic,
    dominates), and XLA's dot does ``X d`` in 52 ms (37 vs 28 ms at D =
    2048). For ``X^T R`` XLA's best form is within 10% of TF's either way, so
    it stays with TF. The line-search terms and the residual are fused into
    single XLA loops, with no ``[N, C]`` temporaries: 135 instead of 156 ms
    per iteration at D = 4096, 74 instead of 86 ms at D = 2048. Small
    matrices keep TF's kernels: XLA compiles once per shape, which is not
    worth it below ~16 MB of features. On GPUs and TPUs the vendor kernels
    are used as they are.
    """
    entries = int(features.shape[0]) * int(features.shape[1])
    return entries >= XLA_PRODUCT_MIN_ENTRIES and arrays.cpu_only()
