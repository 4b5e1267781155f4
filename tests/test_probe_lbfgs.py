"""Tests for revisit_tf.probe.lbfgs: the L-BFGS logistic-regression probe.

Reference values come from outside the code under test: scikit-learn's
LogisticRegression and StandardScaler on the same arrays, a NumPy re-derivation
of the objective, central finite differences, and data whose accuracy is known
by construction (well-separated classes).
"""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from revisit_tf.probe import lbfgs, objective, solver, validation


def _gaussian_classes(rng, num_examples, num_features, num_classes, spread):
    """Class c has mean spread * mu_c (mu_c ~ N(0, I)) and unit covariance."""
    centers = spread * np.random.default_rng(1234).normal(
        size=(num_classes, num_features)
    )
    labels = rng.integers(0, num_classes, size=num_examples)
    features = centers[labels] + rng.normal(size=(num_examples, num_features))
    return features, labels


def _numpy_objective(weights, bias, features, labels, l2):
    """J = mean_i -log softmax(x_i W + b)[y_i] + l2/2 ||W||^2, written in NumPy."""
    logits = features @ weights + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(len(labels)), labels]
    return nll.mean() + 0.5 * l2 * np.sum(weights**2)


def test_separable_classes_are_classified_perfectly():
    rng = np.random.default_rng(0)
    # 3 classes in 5-D, means 10 apart along separate axes, noise std 0.5:
    # the classes are separable by a margin of many standard deviations.
    centers = 10.0 * np.eye(3, 5)

    def sample(n):
        y = rng.integers(0, 3, size=n)
        return centers[y] + 0.5 * rng.normal(size=(n, 5)), y

    train_x, train_y = sample(150)
    test_x, test_y = sample(150)
    fit = lbfgs.fit_logistic_regression(train_x, train_y, l2=1e-3)
    assert fit.converged
    assert not fit.failed
    assert fit.weights.shape == (5, 3) and fit.bias.shape == (3,)
    assert lbfgs.accuracy(fit, train_x, train_y) == 1.0
    assert lbfgs.accuracy(fit, test_x, test_y) == 1.0


def test_matches_scikit_learn_multinomial_logistic_regression():
    rng = np.random.default_rng(1)
    n, l2 = 2000, 1e-3
    x, y = _gaussian_classes(rng, n + 1000, 64, 10, spread=0.35)
    train_x, train_y, test_x, test_y = x[:n], y[:n], x[n:], y[n:]

    fit = lbfgs.fit_logistic_regression(train_x, train_y, l2=l2)
    assert fit.converged and not fit.failed
    # sklearn minimises sum_i CE_i + ||W||^2 / (2C) = N * J  when C = 1/(l2 N).
    # sklearn >= 1.8 fits the multinomial model for > 2 classes and an l2
    # penalty by default (l1_ratio=0); `penalty=` is deprecated in 1.9.
    # One OpenMP thread: sklearn's loss kernels otherwise spin against
    # TensorFlow's thread pools on a 2-core machine (100x slower).
    with threadpool_limits(limits=1):
        sk = LogisticRegression(
            C=1.0 / (l2 * n), solver="lbfgs", max_iter=5000, tol=1e-10
        ).fit(train_x, train_y)
    assert sk.coef_.shape == (10, 64)  # one row per class: multinomial

    ours = _numpy_objective(fit.weights, fit.bias, train_x, train_y, l2)
    theirs = _numpy_objective(sk.coef_.T, sk.intercept_, train_x, train_y, l2)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert fit.loss == pytest.approx(ours, rel=1e-10)  # reported J is J

    for features, labels in ((train_x, train_y), (test_x, test_y)):
        ours_acc = lbfgs.accuracy(fit, features, labels)
        sk_acc = sk.score(features, labels)
        assert abs(ours_acc - sk_acc) <= 0.005
    # Same minimiser; the bias is only defined up to a constant shift.
    np.testing.assert_allclose(fit.weights, sk.coef_.T, atol=2e-3)
    np.testing.assert_allclose(
        fit.bias, sk.intercept_ - sk.intercept_.mean(), atol=2e-3
    )
    assert abs(fit.bias.sum()) < 1e-10
    logits = lbfgs.predict_logits(fit, test_x)
    np.testing.assert_allclose(logits, test_x @ fit.weights + fit.bias, atol=1e-12)


def test_objective_and_gradient_match_numpy_and_finite_differences():
    rng = np.random.default_rng(2)
    x, y = _gaussian_classes(rng, 30, 4, 3, spread=1.0)
    params = lbfgs.ProbeParams(rng.normal(size=(4, 3)), rng.normal(size=3))
    l2 = 0.3

    value, grad = lbfgs.objective_and_gradient(params, x, y, l2=l2)
    assert value == pytest.approx(
        _numpy_objective(params.weights, params.bias, x, y, l2), rel=1e-12
    )

    def numeric_grad(array, objective):
        grad = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            step = np.zeros_like(array)
            step[index] = 1e-6
            grad[index] = (objective(array + step) - objective(array - step)) / 2e-6
        return grad

    grad_w = numeric_grad(
        params.weights, lambda w: _numpy_objective(w, params.bias, x, y, l2)
    )
    grad_b = numeric_grad(
        params.bias, lambda b: _numpy_objective(params.weights, b, x, y, l2)
    )
    np.testing.assert_allclose(grad.weights, grad_w, atol=1e-8)
    np.testing.assert_allclose(grad.bias, grad_b, atol=1e-8)
    assert abs(grad.bias.sum()) < 1e-12  # softmax is shift-invariant in b


def test_warm_start_needs_fewer_iterations_and_reaches_same_solution():
    rng = np.random.default_rng(3)
    x, y = _gaussian_classes(rng, 1000, 32, 5, spread=0.4)
    first = lbfgs.fit_logistic_regression(x, y, l2=1e-2, tolerance=1e-8)
    cold = lbfgs.fit_logistic_regression(x, y, l2=0.9e-2, tolerance=1e-8)
    warm = lbfgs.fit_logistic_regression(x, y, l2=0.9e-2, tolerance=1e-8, initial=first)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.weights, cold.weights, atol=1e-5)
    np.testing.assert_allclose(warm.bias, cold.bias, atol=1e-5)


def test_one_trace_per_dtype_across_shapes_and_l2():
    rng = np.random.default_rng(4)
    x1, y1 = _gaussian_classes(rng, 50, 3, 3, spread=1.0)
    x2, y2 = _gaussian_classes(rng, 70, 6, 4, spread=1.0)
    compiled = solver.compiled_resident_solver(tf.float64)
    lbfgs.fit_logistic_regression(x1, y1, l2=0.1)
    traces = compiled.experimental_get_tracing_count()
    lbfgs.fit_logistic_regression(x2, y2, l2=0.01, max_iterations=20)
    lbfgs.fit_logistic_regression(x1, y1, l2=0.5, tolerance=1e-3)
    assert compiled.experimental_get_tracing_count() == traces == 1


def test_float32_solution_matches_float64():
    rng = np.random.default_rng(5)
    x, y = _gaussian_classes(rng, 500, 16, 4, spread=0.5)
    fit64 = lbfgs.fit_logistic_regression(x, y, l2=1e-2)
    fit32 = lbfgs.fit_logistic_regression(
        x.astype(np.float32), y, l2=1e-2, dtype=tf.float32, tolerance=1e-4
    )
    assert fit32.weights.dtype == np.float32
    assert fit32.converged and not fit32.failed
    assert fit32.loss == pytest.approx(fit64.loss, rel=1e-4)


def test_standardizer_matches_scikit_learn_and_keeps_constant_features():
    rng = np.random.default_rng(6)
    x = rng.normal(loc=3.0, scale=[1.0, 5.0, 0.1], size=(40, 3))
    x = np.concatenate([x, np.full((40, 1), 7.0)], axis=1)  # constant column
    ours = lbfgs.Standardizer.fit(x)
    theirs = StandardScaler().fit(x)
    np.testing.assert_allclose(ours.mean, theirs.mean_)
    np.testing.assert_allclose(ours.scale, theirs.scale_)
    assert ours.scale[3] == 1.0
    new = rng.normal(size=(5, 4))
    np.testing.assert_allclose(ours.apply(new), theirs.transform(new))
    assert ours.apply(new.astype(np.float32)).dtype == np.float32


def test_sweep_selects_best_validation_l2_and_returns_that_fit():
    rng = np.random.default_rng(7)
    # Few examples per parameter, so the penalty matters for validation.
    x, y = _gaussian_classes(rng, 900, 40, 6, spread=0.3)
    train_x, train_y = x[:300], y[:300]
    val_x, val_y = x[300:600], y[300:600]
    test_x, test_y = x[600:], y[600:]
    grid = [1e-4, 1.0, 1e-2, 1e-1, 1e-3]
    result = lbfgs.sweep_l2(
        train_x, train_y, val_x, val_y, l2_grid=grid, tolerance=1e-8
    )

    # Independent reference: standardize with NumPy, cold-fit every l2.
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    z_train, z_val, z_test = [(a - mean) / std for a in (train_x, val_x, test_x)]
    direct = {
        l2: lbfgs.fit_logistic_regression(z_train, train_y, l2=l2, tolerance=1e-8)
        for l2 in grid
    }
    val_acc = {l2: lbfgs.accuracy(f, z_val, val_y) for l2, f in direct.items()}
    best_acc = max(val_acc.values())
    expected_l2 = max(l2 for l2, acc in val_acc.items() if acc == best_acc)
    assert len(set(val_acc.values())) > 1  # the data make the choice matter

    assert [p.l2 for p in result.table] == sorted(grid, reverse=True)
    for point in result.table:
        assert point.val_top1 == pytest.approx(val_acc[point.l2])
        assert point.train_top1 == pytest.approx(
            lbfgs.accuracy(direct[point.l2], z_train, train_y)
        )
    assert result.best_l2 == expected_l2
    assert result.best_point.l2 == expected_l2
    assert result.best_point.val_top1 == pytest.approx(best_acc)
    np.testing.assert_allclose(
        result.best.weights, direct[expected_l2].weights, atol=1e-5
    )
    np.testing.assert_allclose(result.best.bias, direct[expected_l2].bias, atol=1e-5)
    assert result.accuracy(test_x, test_y) == pytest.approx(
        lbfgs.accuracy(direct[expected_l2], z_test, test_y)
    )


def test_sweep_warm_start_saves_iterations_on_a_fine_grid():
    rng = np.random.default_rng(10)
    x, y = _gaussian_classes(rng, 1200, 32, 5, spread=0.4)
    grid = [1e-2 * 0.7**k for k in range(6)]
    args = (x[:800], y[:800], x[800:], y[800:])
    warm = lbfgs.sweep_l2(*args, l2_grid=grid, tolerance=1e-8)
    cold = lbfgs.sweep_l2(*args, l2_grid=grid, tolerance=1e-8, warm_start=False)
    # The first (largest) l2 starts from zeros in both sweeps.
    assert warm.table[0].iterations == cold.table[0].iterations
    warm_rest = sum(p.iterations for p in warm.table[1:])
    cold_rest = sum(p.iterations for p in cold.table[1:])
    assert warm_rest < 0.9 * cold_rest
    assert warm.best_l2 == cold.best_l2


def test_sweep_breaks_ties_towards_larger_l2():
    rng = np.random.default_rng(8)
    centers = 10.0 * np.eye(3, 4)
    y = rng.integers(0, 3, size=120)
    x = centers[y] + 0.3 * rng.normal(size=(120, 4))
    # Separable: every l2 in the grid gives 100% validation accuracy.
    result = lbfgs.sweep_l2(
        x[:60], y[:60], x[60:], y[60:], l2_grid=[1e-3, 1e-1, 1e-2], standardize=False
    )
    # The pick is the grid's largest l2, so the path goes on above it (grid
    # spacing x10) until two points bring no strict improvement; they do
    # not, so the pick stays and is no longer at an edge (no warning).
    assert [p.val_top1 for p in result.table] == [1.0] * 5
    assert [p.extended for p in result.table] == [False] * 3 + [True] * 2
    assert result.l2_extended == [1.0, 10.0]
    assert result.best_l2 == 1e-1
    assert result.warnings == []
    assert result.standardizer is None


_X = np.random.default_rng(9).normal(size=(6, 3))
_Y = np.array([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize(
    "features, labels, kwargs, message",
    [
        (_X[:, 0], _Y, {}, r"features must have shape \[N, D\]"),
        (_X, _Y[:5], {}, "labels has 5 entries but the features have 6 rows"),
        (_X, _Y.astype(float), {}, "labels must be an integer array"),
        (_X, _Y - 1, {}, "labels must be >= 0"),
        (_X, _Y, {"num_classes": 2}, r"labels must be in \[0, 2\)"),
        (_X, np.zeros(6, int), {}, "only class 0"),
        (np.where(_X > 1, np.nan, _X), _Y, {}, "features must be finite"),
        (_X, _Y, {"l2": -1.0}, "l2 must be a finite float >= 0"),
        (_X, _Y, {"tolerance": 0.0}, "tolerance must be"),
        (_X, _Y, {"max_iterations": 0}, "max_iterations must be >= 1"),
        (_X, _Y, {"dtype": tf.float16}, "dtype must be tf.float32 or tf.float64"),
        (
            _X,
            _Y,
            {"initial": lbfgs.ProbeParams(np.zeros((2, 3)), np.zeros(3))},
            r"expected \(3, 3\) and \(3,\)",
        ),
    ],
)
def test_fit_rejects_bad_input(features, labels, kwargs, message):
    kwargs = {"l2": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        lbfgs.fit_logistic_regression(features, labels, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"l2_grid": []}, "l2_grid must be a non-empty sequence"),
        ({"l2_grid": [0.1, -0.5]}, "l2 must be a finite float >= 0; got -0.5"),
        ({"l2_grid": [0.1], "val_x": _X[:, :2]}, "val_x has 2 features per row"),
        ({"l2_grid": [0.1], "val_y": _Y + 3, "num_classes": 3}, "val_y must be in"),
    ],
)
def test_sweep_rejects_bad_input(kwargs, message):
    args = {"train_x": _X, "train_y": _Y, "val_x": _X, "val_y": _Y, **kwargs}
    with pytest.raises(ValueError, match=message):
        lbfgs.sweep_l2(**args)


def test_predict_rejects_wrong_feature_dimension():
    params = lbfgs.ProbeParams(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="has 4 features per row; expected 3"):
        lbfgs.predict_logits(params, np.zeros((2, 4)))


def test_predict_is_the_numpy_argmax_and_agrees_with_accuracy():
    rng = np.random.default_rng(7)
    x, y = _gaussian_classes(rng, 500, 6, 4, spread=0.8)
    params = lbfgs.ProbeParams(rng.normal(size=(6, 4)), rng.normal(size=4))
    pred = lbfgs.predict(params, x)
    assert pred.dtype == np.int32 and pred.shape == (500,)
    np.testing.assert_array_equal(pred, np.argmax(x @ params.weights + params.bias, 1))
    assert np.mean(pred == y) == lbfgs.accuracy(params, x, y)

    standardizer = lbfgs.Standardizer.fit(x)
    fit = lbfgs.fit_logistic_regression(standardizer.apply(x), y, l2=1e-2)
    sweep = lbfgs.SweepResult(best=fit, table=[], standardizer=standardizer)
    z = (x - x.mean(0)) / x.std(0)  # the standardizer, in NumPy
    np.testing.assert_array_equal(
        sweep.predict(x), np.argmax(z @ fit.weights + fit.bias, axis=1)
    )
    assert np.mean(sweep.predict(x) == y) == sweep.accuracy(x, y)


@pytest.mark.parametrize("dtype, tolerance", [(tf.float64, 1e-8), (tf.float32, 1e-4)])
def test_logit_line_search_solver_matches_tfp_lbfgs_with_fewer_passes(dtype, tolerance):
    rng = np.random.default_rng(11)
    x, y = _gaussian_classes(rng, 1500, 24, 5, spread=0.4)
    x = x.astype(dtype.as_numpy_dtype)
    fits = {
        solver: lbfgs.fit_logistic_regression(
            x, y, l2=1e-3, tolerance=tolerance, dtype=dtype, solver=solver
        )
        for solver in lbfgs.SOLVERS
    }
    ours, tfp_fit = fits["lbfgs"], fits["tfp"]
    assert ours.converged and tfp_fit.converged and not ours.failed
    assert ours.solver == "lbfgs" and tfp_fit.solver == "tfp"
    # Same method: same minimiser and (up to rounding) the same iterates.
    assert abs(ours.iterations - tfp_fit.iterations) <= 2
    assert ours.loss == pytest.approx(
        tfp_fit.loss, rel=1e-6 if dtype == tf.float32 else 1e-12
    )
    atol = 1e-3 if dtype == tf.float32 else 1e-6
    np.testing.assert_allclose(ours.weights, tfp_fit.weights, atol=atol)
    # One full objective+gradient evaluation per iteration (plus the start),
    # against about three for TFP; line-search trials are O(N C).
    assert ours.function_evaluations == ours.iterations + 1
    assert tfp_fit.function_evaluations > 2 * ours.iterations
    assert ours.line_search_evaluations >= ours.iterations
    # The reported loss is J at the returned point.
    assert ours.loss == pytest.approx(
        _numpy_objective(
            ours.weights.astype(np.float64), ours.bias, x.astype(np.float64), y, 1e-3
        ),
        rel=1e-5 if dtype == tf.float32 else 1e-12,
    )


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match=r"solver must be one of \('lbfgs', 'tfp'\)"):
        lbfgs.fit_logistic_regression(_X, _Y, l2=0.1, solver="newton")


@pytest.mark.parametrize(
    "dtype, rtol, atol, iterations",
    # float32: rounding in the line search changes the path near tolerance
    # (18 vs 21 iterations on this problem), not the solution.
    [(tf.float64, 1e-9, 1e-7, 0), (tf.float32, 1e-4, 1e-3, 5)],
)
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_xla_variant_matches_the_default_kernels(
    monkeypatch, dtype, rtol, atol, iterations, warm
):
    # Large matrices on a CPU take X d from XLA and fuse the O(N C) work
    # (objective.uses_xla_product); the iterates must not change. Forced here on a
    # small problem by lowering the size threshold.
    rng = np.random.default_rng(11)
    x, y = _gaussian_classes(rng, 300, 9, 4, spread=0.7)
    initial = lbfgs.ProbeParams(rng.normal(size=(9, 4)) * 0.1, np.zeros(4))
    kwargs = {
        "num_classes": 4,
        "l2": 1e-2,
        "dtype": dtype,
        # float32: 1e-4, the tolerance float32 reaches (lbfgs docstring); at
        # 1e-5 the cold default path stalls at a gradient of 2.8e-5, which
        # TFP's flags used to call converged.
        "tolerance": 1e-9 if dtype == tf.float64 else 1e-4,
        "initial": initial if warm else None,
    }
    assert not objective.uses_xla_product(tf.zeros([300, 9]))
    default = lbfgs.fit_logistic_regression(x, y, **kwargs)
    monkeypatch.setattr(objective, "XLA_PRODUCT_MIN_ENTRIES", 1)
    assert objective.uses_xla_product(tf.zeros([300, 9]))
    fused = lbfgs.fit_logistic_regression(x, y, **kwargs)
    assert fused.converged and default.converged
    assert abs(fused.iterations - default.iterations) <= iterations
    assert fused.loss == pytest.approx(default.loss, rel=rtol)
    np.testing.assert_allclose(fused.weights, default.weights, rtol=0, atol=atol)
    expected = _numpy_objective(fused.weights, fused.bias, x, y, 1e-2)
    assert fused.loss == pytest.approx(expected, rel=rtol)


def test_finiteness_check_fast_path_and_overflow_fallback():
    x = np.ones((50, 8), np.float32)
    assert validation.all_finite(x)
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[17, 3] = bad
        assert not validation.all_finite(y)
    # Finite but the row sums overflow float32: the exact test accepts it.
    big = np.full((4, 8), 3e38, np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(big @ np.ones(8, np.float32)).all()
    assert validation.all_finite(big)
    with pytest.raises(ValueError, match="row 2, column 5"):
        z = x.copy()
        z[2, 5] = np.nan
        lbfgs.fit_logistic_regression(z, np.arange(50) % 3, l2=0.1)


def _correlated_classes(rng, n=600, d=24, c=4):
    """Features mixed by a random matrix with singular values 1e-2..10."""
    x, y = _gaussian_classes(rng, n, d, c, spread=1.0)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return x @ (u * np.logspace(-2, 1, d)) @ u.T, y


def test_preconditioned_fit_has_the_same_minimiser_in_fewer_iterations():
    # Same objective and stopping test in other coordinates: in float64 at a
    # tight tolerance both runs land on the unique minimiser (module doc).
    x, y = _correlated_classes(np.random.default_rng(5))
    kwargs = {"num_classes": 4, "l2": 1e-3, "tolerance": 1e-9, "max_iterations": 5000}
    plain = lbfgs.fit_logistic_regression(x, y, **kwargs)
    pre = lbfgs.fit_logistic_regression(x, y, precondition=True, **kwargs)
    assert plain.converged and pre.converged
    assert pre.gradient_max <= 1e-9  # measured in W, not in W' coordinates
    # J is l2-strongly convex in W: |W - W*| <= |grad| / l2, with |grad| <=
    # sqrt(96) * 1e-9 for both runs, so they agree to 2 * 1e-5.
    np.testing.assert_allclose(pre.weights, plain.weights, rtol=0, atol=2e-5)
    np.testing.assert_allclose(pre.bias, plain.bias, rtol=0, atol=2e-5)
    assert pre.loss == pytest.approx(plain.loss, rel=1e-12)
    expected = _numpy_objective(pre.weights, pre.bias, x, y, 1e-3)
    assert pre.loss == pytest.approx(expected, rel=1e-10)
    # Measured: 127 against 368.
    assert pre.iterations < plain.iterations / 2, (pre.iterations, plain.iterations)


def test_preconditioned_warm_start_maps_the_initial_point():
    # Started at the solution (W, b), the preconditioned run starts at
    # W' = P^-1 W, i.e. at the same model: it must stop at once.
    x, y = _correlated_classes(np.random.default_rng(6))
    kwargs = {"num_classes": 4, "l2": 1e-2, "tolerance": 1e-8}
    solution = lbfgs.fit_logistic_regression(x, y, **kwargs)
    again = lbfgs.fit_logistic_regression(
        x, y, initial=solution, precondition=True, **kwargs
    )
    assert again.iterations <= 1
    np.testing.assert_allclose(again.weights, solution.weights, atol=1e-8)


def test_preconditioned_sweep_selects_the_same_l2():
    rng = np.random.default_rng(7)
    x, y = _correlated_classes(rng, n=800)
    split = dict(train_x=x[:600], train_y=y[:600], val_x=x[600:], val_y=y[600:])
    # Unstandardized, so the features stay correlated and badly scaled.
    kwargs = {"l2_grid": [1e-1, 1e-2, 1e-3], "tolerance": 1e-9, "standardize": False}
    plain = lbfgs.sweep_l2(**split, **kwargs)
    pre = lbfgs.sweep_l2(**split, **kwargs, precondition=True)
    assert pre.best_l2 == plain.best_l2
    assert [p.val_top1 for p in pre.table] == [p.val_top1 for p in plain.table]
    assert sum(p.iterations for p in pre.table) < sum(p.iterations for p in plain.table)


def test_precondition_needs_the_lbfgs_solver():
    with pytest.raises(ValueError, match="precondition=True needs solver='lbfgs'"):
        lbfgs.fit_logistic_regression(_X, _Y, l2=0.1, solver="tfp", precondition=True)
