"""Eigen-preconditioner of the probe's L-BFGS: one ``eigh`` per feature matrix.

Place in the data flow (stage 6): ``probe/solver.py`` runs L-BFGS in the
coordinates ``W'`` with ``W = P W'``, ``P = (S + c I)^{-1/2}``,
``S = X^T X / N`` (features after standardisation) and ``c = l2 / curvature``.

Why: the Hessian of ``J`` in W is about ``kappa S + l2 I`` (kappa ~ the
softmax curvature ``p (1 - p)``, ~0.1 for 10 classes), and L-BFGS needs a
number of iterations that grows with its condition number, 1e4 or more for
correlated features (raw pixels, trunk endpoints). In ``W'`` it becomes
``P (kappa S + l2 I) P`` with eigenvalues between ``kappa`` and
``l2 / c = curvature``: well conditioned whatever S. The objective, and so
the minimiser, is unchanged (``J(P W', b)``, penalty on ``W``); only the
coordinates L-BFGS moves in change, and the stopping test stays on
``max |dJ/d[W; b]|``.

How: ``S = Q diag(lam) Q^T`` is computed once per feature matrix (one
``[D, N] x [N, D]`` product, or a sum of them over shards, then one
``eigh``), and every l2 of a path reuses it:

    P      = Q diag(1 / sqrt(lam + c)) Q^T + (I - Q Q^T) / sqrt(c)
    P^{-1} = Q diag(sqrt(lam + c)) Q^T     + (I - Q Q^T) sqrt(c)

With a full basis L-BFGS moves in eigen-coordinates, ``W = Q diag(a) W'``
(``a = 1 / sqrt(lam + c)``; one ``[D, D] x [D, C]`` product each way, no
cancellation). With fewer rows than features (``N < D``) ``S`` has rank
``r <= N``, its eigenvectors come from the ``[N, N]`` matrix ``X X^T / N``
(``Q = X^T U diag(1/sqrt(N mu))``, thin), and ``P`` is applied in the
symmetric form above, ``W' / sqrt(c) + Q ((a - 1/sqrt(c)) * (Q^T W'))``.
Either way ``P P^T = (S + c I)^{-1}``, the metric of the Cholesky factor
used before, up to an orthogonal change of coordinates that L-BFGS's
iterates do not see (the same iterates in exact arithmetic).

Cost: the ``eigh`` is ``O(D^3)`` once (D = 2048: ~1-2 s on the 2-core dev
machine; D = 8192 about 64x that and 1.5 GB of float64 ``[D, D]`` buffers,
logged); per l2 only ``O(D r)``; per iteration two ``[D, r] x [r, C]``
products on each side.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import tensorflow as tf

_logger = logging.getLogger(__name__)

# Relative floor of c at l2 = 0 (P must exist), times trace(S) / D.
_C_FLOOR = 1e-8
# Eigenvalues of the dual [N, N] matrix below this times the largest are 0.
_RANK_RTOL = 1e-10


@dataclasses.dataclass
class PreconditionerTerms:
    """``P`` and ``P^{-1}`` for one l2, as tensors in the solver dtype.

    Full basis (``r = D``): ``W'`` are eigen-coordinates,
    ``W = Q (coef * W')`` and ``W' = inverse_coef * (Q^T W)`` (no
    cancellation). Thin basis (``r < D``): the symmetric form of the module
    docstring, ``P W' = scale W' + Q (coef * (Q^T W'))``.

    Attributes:
        basis: ``Q`` ``[D, r]``.
        coef: ``[r]``; full: ``1 / sqrt(lam + c)``; thin: that minus ``scale``.
        scale: ``[]``; thin: ``1 / sqrt(c)``; full: 0 (unused).
        inverse_coef: ``[r]``; full: ``sqrt(lam + c)``; thin: that minus
            ``sqrt(c)``.
        inverse_scale: ``[]``; thin: ``sqrt(c)``; full: 0.
        full: whether ``r = D``.
    """

    basis: tf.Tensor
    coef: tf.Tensor
    scale: tf.Tensor
    inverse_coef: tf.Tensor
    inverse_scale: tf.Tensor
    full: bool

    def weights(self, w_prime: tf.Tensor) -> tf.Tensor:
        """``W = P W'`` ``[D, C]``."""
        return to_weights(self.basis, self.coef, self.scale, w_prime, self.full)

    def coordinates(self, w: tf.Tensor) -> tf.Tensor:
        """``W' = P^{-1} W`` ``[D, C]``."""
        if self.full:
            inner = tf.matmul(self.basis, w, transpose_a=True)
            return self.inverse_coef[:, None] * inner
        return _symmetric(self.basis, self.inverse_coef, self.inverse_scale, w)


def _symmetric(basis, coef, scale, w):
    inner = tf.matmul(basis, w, transpose_a=True)  # [r, C]
    return scale * w + tf.matmul(basis, coef[:, None] * inner)


def to_weights(basis, coef, scale, w_prime, full: bool) -> tf.Tensor:
    """``W = P W'`` ``[D, C]`` from the terms' tensors (usable in a graph)."""
    if full:
        return tf.matmul(basis, coef[:, None] * w_prime)
    return _symmetric(basis, coef, scale, w_prime)


def pull_back(basis, coef, scale, grad, full: bool) -> tf.Tensor:
    """``dJ/dW' = P^T dJ/dW`` ``[D, C]``."""
    if full:
        return coef[:, None] * tf.matmul(basis, grad, transpose_a=True)
    return _symmetric(basis, coef, scale, grad)  # P is symmetric


class Preconditioner:
    """``S = X^T X / N = Q diag(lam) Q^T``, reused for every l2 (module doc).

    Example:
        >>> pre = Preconditioner.from_features(x_tensor)          # [N, D]
        >>> terms = pre.for_l2(1e-3, tf.float32)
        >>> w = terms.weights(w_prime)                   # W = P W', [D, C]
    """

    def __init__(
        self,
        basis: np.ndarray,
        eigenvalues: np.ndarray,
        *,
        trace: float,
        dim: int,
        curvature: float = 0.1,
    ):
        """Low level; use ``from_features`` or ``from_gram``.

        Args:
            basis: ``Q`` ``[D, r]`` float64, orthonormal columns.
            eigenvalues: ``lam`` ``[r]`` float64, ``>= 0``.
            trace: ``trace(S)`` (sets the floor of c).
            dim: D.
            curvature: ``l2 / c``, the assumed softmax curvature.
        """
        self.basis = np.asarray(basis, np.float64)
        self.eigenvalues = np.maximum(np.asarray(eigenvalues, np.float64), 0.0)
        self.trace = float(trace)
        self.dim = int(dim)
        self.curvature = float(curvature)
        self._basis: dict[tf.DType, tf.Tensor] = {}

    @classmethod
    def from_gram(cls, gram: np.ndarray, **kwargs) -> Preconditioner:
        """From ``S = X^T X / N`` ``[D, D]`` (float64): one ``eigh``."""
        gram = np.asarray(gram, np.float64)
        dim = gram.shape[0]
        start = time.perf_counter()
        lam, q = np.linalg.eigh(gram)
        _logger.info(
            "Preconditioner: eigh of the %d x %d feature covariance in %.1fs "
            "(%.0f MB of float64 [D, D] buffers).",
            dim,
            dim,
            time.perf_counter() - start,
            3 * 8 * dim * dim / 2**20,
        )
        return cls(q, lam, trace=float(np.trace(gram)), dim=dim, **kwargs)

    @classmethod
    def from_features(cls, features: tf.Tensor, **kwargs) -> Preconditioner:
        """From a resident ``[N, D]`` feature tensor.

        ``N >= D``: ``S`` by one GEMM in the features' dtype, then
        ``from_gram``. ``N < D``: the eigenvectors of ``S`` with non-zero
        eigenvalue from the ``[N, N]`` matrix ``X X^T / N`` (thin ``Q``).
        """
        num, dim = int(features.shape[0]), int(features.shape[1])
        if num >= dim:
            gram = tf.matmul(features, features, transpose_a=True) / num
            return cls.from_gram(tf.cast(gram, tf.float64).numpy(), **kwargs)
        start = time.perf_counter()
        x = tf.cast(features, tf.float64)
        kernel = (tf.matmul(x, x, transpose_b=True) / num).numpy()  # [N, N]
        mu, u = np.linalg.eigh(kernel)
        keep = mu > _RANK_RTOL * max(float(mu.max()), 1e-300)
        mu, u = mu[keep], u[:, keep]
        q = tf.matmul(x, tf.constant(u / np.sqrt(num * mu)), transpose_a=True)
        _logger.info(
            "Preconditioner: %d rows < %d features, rank-%d basis from the "
            "[N, N] kernel in %.1fs.",
            num,
            dim,
            len(mu),
            time.perf_counter() - start,
        )
        return cls(q.numpy(), mu, trace=float(np.sum(mu)), dim=dim, **kwargs)

    def shift(self, l2: float) -> float:
        """``c = l2 / curvature``, floored at ``1e-8 trace(S) / D`` (> 0)."""
        return max(l2 / self.curvature, _C_FLOOR * max(self.trace, 1e-300) / self.dim)

    def for_l2(self, l2: float, dtype: tf.DType) -> PreconditionerTerms:
        """The ``PreconditionerTerms`` of this l2 in ``dtype`` (``O(D r)``)."""
        dtype = tf.as_dtype(dtype)
        np_dtype = dtype.as_numpy_dtype
        if dtype not in self._basis:  # converted once per dtype
            self._basis[dtype] = tf.constant(self.basis.astype(np_dtype))
        c = self.shift(l2)
        root = np.sqrt(self.eigenvalues + c)  # [r]

        def const(v):
            return tf.constant(np.asarray(v, np_dtype))

        if self.full:
            return PreconditionerTerms(
                basis=self._basis[dtype],
                coef=const(1 / root),
                scale=const(0.0),
                inverse_coef=const(root),
                inverse_scale=const(0.0),
                full=True,
            )
        return PreconditionerTerms(
            basis=self._basis[dtype],
            coef=const(1 / root - 1 / np.sqrt(c)),
            scale=const(1 / np.sqrt(c)),
            inverse_coef=const(root - np.sqrt(c)),
            inverse_scale=const(np.sqrt(c)),
            full=False,
        )

    @property
    def full(self) -> bool:
        """Whether the basis spans all D features (``r = D``)."""
        return self.basis.shape[1] == self.dim
