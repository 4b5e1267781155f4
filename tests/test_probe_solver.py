"""Tests of the probe's one L-BFGS driver on both data paths, its eigen-
preconditioner, its warnings and the L2 path's edge extension.

References: scikit-learn's ``LogisticRegression`` and TFP's ``lbfgs_minimize``
(``solver="tfp"``) on the same data, NumPy for the objective and for
``(S + c I)^{-1}``; every comparison is against a value computed another way.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression

from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import lbfgs, precondition, sharded, sweep

_DEFAULT_GRID = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)


def _correlated(seed, n=600, d=12, c=4):
    """Class means plus noise, mixed by a matrix with singular values 1e-2..10."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    x = 0.8 * rng.normal(size=(c, d))[y] + rng.normal(size=(n, d))
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return x @ (u * np.logspace(-2, 1, d)) @ u.T, y


def _numpy_objective(w, b, x, y, l2):
    z = x @ w + b
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w * w)


def _cached_source(tmp_path, x, y):
    cache = cache_lib.FeatureCache(tmp_path / "cache", shard_bytes=8192)
    entry = cache.get_or_build(
        {"e": {"split": "train"}},
        lambda: [({"e": x[i : i + 50]}, y[i : i + 50]) for i in range(0, len(y), 50)],
    )["e"]
    assert entry.num_shards > 3
    return sharded.ShardSource.from_cache(entry)


def test_streamed_and_whole_batch_reach_the_oracles_minimiser(tmp_path):
    x, y = _correlated(0)
    l2, n = 1e-2, len(y)
    whole = lbfgs.fit_logistic_regression(
        x, y, l2=l2, tolerance=1e-8, precondition=True, max_iterations=2000
    )
    oracle = lbfgs.fit_logistic_regression(
        x, y, l2=l2, tolerance=1e-8, solver="tfp", max_iterations=5000
    )
    resident = sharded.ShardSource.from_arrays(x, y, rows_per_shard=64)  # 10 shards
    streamed = sharded.fit_sharded(
        sharded.ShardedObjective(resident, num_classes=4, l2=l2, dtype=tf.float64),
        tolerance=1e-8,
        precondition=True,
        max_iterations=2000,
    )
    for fit in (whole, oracle, streamed):
        assert fit.converged, fit
    assert whole.preconditioned and streamed.preconditioned
    assert whole.solver == "lbfgs" and streamed.solver == "lbfgs_sharded"
    # Strongly convex with modulus l2: |W - W*| <= |grad|_2 / l2 ~ 7e-6.
    for fit in (whole, streamed):
        np.testing.assert_allclose(fit.weights, oracle.weights, atol=2e-5)
        np.testing.assert_allclose(fit.bias, oracle.bias, atol=2e-5)
        expected = _numpy_objective(fit.weights, fit.bias, x, y, l2)
        assert fit.loss == pytest.approx(expected, rel=1e-10)
    # The whole-batch and the sharded driver take the same iterates.
    assert abs(whole.iterations - streamed.iterations) <= 2

    sk = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(streamed.weights, sk.coef_.T, atol=1e-4)
    np.testing.assert_allclose(
        streamed.bias, sk.intercept_ - sk.intercept_.mean(), atol=1e-4
    )

    # Streamed from the float32 cache (products in float32, sums in float64).
    cached = sharded.fit_sharded(
        sharded.ShardedObjective(
            _cached_source(tmp_path, x.astype(np.float32), y), num_classes=4, l2=l2
        ),
        tolerance=1e-6,
        precondition=True,
    )
    assert cached.converged
    assert cached.loss == pytest.approx(oracle.loss, rel=1e-6)
    np.testing.assert_allclose(cached.weights, oracle.weights, atol=1e-3)


def test_eigen_preconditioner_is_the_inverse_square_root_of_s_plus_c():
    rng = np.random.default_rng(1)
    for n, d in ((200, 6), (5, 9)):  # full basis, then thin (N < D)
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        pre = precondition.Preconditioner.from_features(tf.constant(x))
        assert pre.full == (n >= d)
        terms = pre.for_l2(1e-2, tf.float64)
        c = 1e-2 / 0.1
        p = terms.weights(tf.eye(d, dtype=tf.float64)).numpy()  # [D, D]
        expected = np.linalg.inv(x.T @ x / n + c * np.eye(d))
        np.testing.assert_allclose(p @ p.T, expected, rtol=1e-8, atol=1e-10)
        w = rng.normal(size=(d, 3))
        back = terms.weights(terms.coordinates(tf.constant(w))).numpy()
        np.testing.assert_allclose(back, w, rtol=1e-9, atol=1e-9)


def test_streamed_preconditioner_saves_iterations_and_keeps_the_minimiser():
    x, y = _correlated(2)
    source = sharded.ShardSource.from_arrays(x, y, rows_per_shard=100)
    obj = sharded.ShardedObjective(source, num_classes=4, l2=1e-2, dtype=tf.float64)
    plain = sharded.fit_sharded(obj, tolerance=1e-7, max_iterations=3000)
    pre = sharded.fit_sharded(obj, tolerance=1e-7, precondition=True)
    assert plain.converged and pre.converged
    np.testing.assert_allclose(pre.weights, plain.weights, atol=1e-4)
    assert pre.loss == pytest.approx(plain.loss, rel=1e-10)
    assert pre.iterations < plain.iterations / 2, (pre.iterations, plain.iterations)


def test_more_than_4096_features_are_preconditioned():
    rng = np.random.default_rng(3)
    n, d = 30, 4100
    y = np.arange(n) % 3
    x = rng.normal(size=(n, d)) + rng.normal(size=(3, d))[y]
    kwargs = {"num_classes": 3, "l2": 1e-1, "tolerance": 1e-7}
    pre = lbfgs.fit_logistic_regression(x, y, precondition=True, **kwargs)
    plain = lbfgs.fit_logistic_regression(x, y, **kwargs)
    assert pre.preconditioned and pre.converged and plain.converged
    np.testing.assert_allclose(pre.weights, plain.weights, atol=1e-5)
    assert pre.loss == pytest.approx(plain.loss, rel=1e-7)


def test_iteration_cap_is_a_warning_in_the_log_and_the_result(caplog):
    x, y = _correlated(4)
    with caplog.at_level(logging.WARNING):
        fit = lbfgs.fit_logistic_regression(
            x, y, l2=1e-4, max_iterations=3, label="block4"
        )
    assert not fit.converged and not fit.failed and fit.iterations == 3
    (message,) = fit.warnings
    for part in ("block4", "1.0e-04", "3 iterations", "iteration cap 3"):
        assert part in message
    assert message in caplog.text

    result = lbfgs.sweep_l2(
        x[:400], y[:400], x[400:], y[400:], l2_grid=[1e-2, 1e-3], max_iterations=2,
        extend=False,
    )  # fmt: skip
    assert sum("iteration cap 2" in w for w in result.warnings) >= 2

    source = sharded.ShardSource.from_arrays(x, y, rows_per_shard=100)
    obj = sharded.ShardedObjective(source, num_classes=4, l2=1e-4)
    streamed = sharded.fit_sharded(obj, max_iterations=2)
    assert "iteration cap 2" in streamed.warnings[0]


def _hidden_signal(seed, n=4000, eps=3e-3):
    """Two classes whose clean signal lies in a direction of variance ~eps^2.

    Feature 0 is weakly informative with unit variance; features 1 and 2 are
    the same unit-variance nuisance except for ``eps * v``, ``v`` the label's
    sign plus a little noise. Strong penalties can only afford the weak
    feature (~70% accuracy); the clean direction needs weights ~1/eps, so
    the validation accuracy keeps rising as l2 falls below 1e-5 (~99.9% at
    1e-7, measured).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    sign = 2 * y - 1
    v = sign + 0.3 * rng.normal(size=n)
    u = rng.normal(size=n)
    x = np.stack([0.5 * sign + rng.normal(size=n), u + eps * v, u], axis=1)
    return x, y


def test_path_extends_below_the_grid_until_val_stops_improving(monkeypatch):
    x, y = _hidden_signal(0)
    vx, vy = _hidden_signal(1)
    kwargs = {"tolerance": 1e-7, "precondition": True}
    result = lbfgs.sweep_l2(x, y, vx, vy, l2_grid=_DEFAULT_GRID, **kwargs)
    assert result.l2_extended[:2] == [1e-6, 1e-7]
    assert result.best_l2 < 1e-5
    rows = {p.l2: p for p in result.table}
    assert rows[1e-5].val_top1 < 0.9 < rows[result.best_l2].val_top1
    assert [p.extended for p in result.table] == [False] * 6 + [True] * len(
        result.l2_extended
    )
    # Stopped by the rule: two points without improvement, or the limit;
    # a warning exactly when the pick is still the smallest l2 visited.
    visited = [p.l2 for p in result.table]
    after = [v for v in visited if v < result.best_l2]
    assert len(after) == 2 or min(visited) <= sweep.LOWER_LIMIT * (1 + 1e-9)
    assert bool(result.warnings) == (result.best_l2 == min(visited))

    # The same with the extension off, or cut by a limit: a warning.
    off = lbfgs.sweep_l2(x, y, vx, vy, l2_grid=_DEFAULT_GRID, extend=False, **kwargs)
    assert off.best_l2 == 1e-5 and off.l2_extended == []
    assert "smallest" in off.warnings[0] and "extension off" in off.warnings[0]
    monkeypatch.setattr(sweep, "LOWER_LIMIT", 1e-6)
    cut = lbfgs.sweep_l2(x, y, vx, vy, l2_grid=_DEFAULT_GRID, **kwargs)
    assert cut.l2_extended == [1e-6] and cut.best_l2 == 1e-6
    assert "1.0e-06 is the smallest" in cut.warnings[0]


def test_streamed_path_extends_like_the_whole_batch_path():
    x, y = _hidden_signal(2, n=1500)
    vx, vy = _hidden_signal(3, n=1500)
    grid = [1e-3, 1e-4, 1e-5]
    kwargs = {"tolerance": 1e-7, "precondition": True}
    whole = lbfgs.sweep_l2(x, y, vx, vy, l2_grid=grid, **kwargs)
    streamed = sharded.sweep_l2_sharded(
        sharded.ShardSource.from_arrays(x, y, rows_per_shard=500),
        sharded.ShardSource.from_arrays(vx, vy, rows_per_shard=500),
        l2_grid=grid,
        num_classes=2,
        dtype=tf.float64,
        **kwargs,
    )
    assert whole.l2_extended and streamed.l2_extended == whole.l2_extended
    assert streamed.best_l2 == whole.best_l2
    for a, b in zip(streamed.table, whole.table, strict=True):
        assert a.val_top1 == pytest.approx(b.val_top1, abs=1 / 1500 + 1e-9)


def test_a_pick_inside_the_grid_adds_no_points():
    x, y = _hidden_signal(0)
    vx, vy = _hidden_signal(1)
    grid = [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]
    result = lbfgs.sweep_l2(
        x, y, vx, vy, l2_grid=grid, tolerance=1e-7, precondition=True
    )
    assert result.best_l2 not in (grid[0], grid[-1])
    assert result.l2_extended == [] and len(result.table) == len(grid)
    assert not any(p.extended for p in result.table) and result.warnings == []


def test_tf32_policy_is_set_for_the_solve_and_restored():
    x, y = _correlated(5, n=100)
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    fit = lbfgs.fit_logistic_regression(x, y, l2=1e-2, dtype=tf.float32, tolerance=1e-4)
    assert fit.tf32 is False
    assert tf.config.experimental.tensor_float_32_execution_enabled() == before
    on = lbfgs.fit_logistic_regression(x, y, l2=1e-2, dtype=tf.float32, tf32=True)
    assert on.tf32 is True
    assert tf.config.experimental.tensor_float_32_execution_enabled() == before
