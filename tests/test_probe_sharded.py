"""Tests for revisit_tf.probe.sharded: streamed and replicated L-BFGS objective.

References: the whole-batch objective of ``lbfgs`` (itself checked against
NumPy and finite differences in test_probe_lbfgs.py) on the same rows, and
the whole-batch solver's minimiser.
"""

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import lbfgs, sharded
from revisit_tf.probe import objective as objective_lib


def _data(seed, n=700, d=12, c=4, spread=0.6):
    rng = np.random.default_rng(seed)
    centers = spread * rng.normal(size=(c, d))
    y = rng.integers(0, c, size=n)
    x = centers[y] + rng.normal(size=(n, d)) + 3.0  # non-zero mean
    return x, y


def _two_cpu_strategy():
    cpus = tf.config.list_logical_devices("CPU")
    assert len(cpus) >= 2, "conftest.py splits the CPU into 2 logical devices"
    return tf.distribute.MirroredStrategy([d.name for d in cpus[:2]])


def _cached_source(tmp_path, x, y, shard_bytes=4096, mapped=True):
    cache = cache_lib.FeatureCache(tmp_path / "cache", shard_bytes=shard_bytes)
    spec = {"endpoint": "e", "split": "train"}
    entry = cache.get_or_build(
        {"e": spec},
        lambda: [({"e": x[i : i + 50]}, y[i : i + 50]) for i in range(0, len(y), 50)],
    )["e"]
    assert entry.num_shards > 3
    return sharded.ShardSource.from_cache(entry, mapped=mapped)


@pytest.mark.parametrize(
    "dtype, accumulate, rtol",
    [
        (tf.float64, tf.float64, 1e-10),
        (tf.float32, tf.float32, 1e-5),
        (tf.float32, tf.float64, 1e-5),
    ],
)
def test_streamed_objective_equals_whole_batch(tmp_path, dtype, accumulate, rtol):
    x, y = _data(0)
    np_dtype = dtype.as_numpy_dtype
    x = x.astype(np_dtype)
    rng = np.random.default_rng(1)
    params = lbfgs.ProbeParams(0.1 * rng.normal(size=(12, 4)), rng.normal(size=4))
    value, grad = lbfgs.objective_and_gradient(params, x, y, l2=0.05, dtype=dtype)

    if dtype == tf.float64:  # the cache stores float32: use resident shards
        source = sharded.ShardSource.from_arrays(x, y, rows_per_shard=64)
    else:
        source = _cached_source(tmp_path, x, y)
    objective = sharded.ShardedObjective(
        source, num_classes=4, l2=0.05, dtype=dtype, accumulate_dtype=accumulate
    )
    position = objective_lib.pack(params, accumulate.as_numpy_dtype)
    s_value, s_grad = objective(tf.constant(position))
    expected = objective_lib.pack(grad, np.float64)
    assert float(s_value) == pytest.approx(value, rel=rtol)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(s_grad.numpy(), expected, rtol=rtol, atol=rtol * scale)


def test_in_graph_and_round_by_round_solves_take_the_same_steps(tmp_path, monkeypatch):
    """Mapped and resident shards run the solve as one graph; copied shards
    (``mapped=False``), and mapped ones past the memory limit, run it round by
    round. All take the same steps (same iterations and passes) to the same
    minimiser, the whole-batch solver's, with standardizer and preconditioner."""
    from revisit_tf.probe import shard_data

    x, y = _data(6)
    x = x.astype(np.float32)
    mapped = _cached_source(tmp_path, x, y)
    copied = _cached_source(tmp_path, x, y, mapped=False)
    resident = sharded.ShardSource.from_arrays(x, y, rows_per_shard=80)
    standardizer = sharded.fit_standardizer(resident)

    def fit(source):
        objective = sharded.ShardedObjective(
            source, num_classes=4, l2=1e-3, standardizer=standardizer
        )
        passes = objective.data.passes
        out = sharded.fit_sharded(objective, tolerance=1e-7, precondition=True)
        # fit_sharded's own passes: the Gram matrix, max |x| and the solve.
        return objective.data.in_graph(), out, objective.data.passes - passes

    runs = {name: fit(src) for name, src in [("mapped", mapped), ("copied", copied)]}
    runs["resident"] = fit(resident)
    monkeypatch.setattr(shard_data, "available_memory", lambda: mapped.nbytes)
    runs["over_limit"] = fit(mapped)  # 4 N D > 0.5 x the memory available
    monkeypatch.undo()
    monkeypatch.setattr(shard_data, "IN_GRAPH_MAX_ROUNDS", mapped.num_shards - 1)
    runs["many_rounds"] = fit(mapped)
    assert {k: v[0] for k, v in runs.items()} == {
        "mapped": True,
        "copied": False,
        "resident": True,
        "over_limit": False,
        "many_rounds": False,
    }
    ref = runs["copied"][1]
    assert ref.converged and ref.iterations > 10
    for name, (_, out, passes) in runs.items():
        assert out.converged, name
        assert (out.iterations, passes) == (ref.iterations, runs["copied"][2]), name
        np.testing.assert_allclose(out.weights, ref.weights, rtol=1e-5, atol=1e-6)
    whole = lbfgs.fit_logistic_regression(
        standardizer.apply(x), y, l2=1e-3, tolerance=1e-7, dtype=tf.float64
    )
    np.testing.assert_allclose(ref.weights, whole.weights, atol=2e-5)
    assert ref.loss == pytest.approx(whole.loss, rel=1e-6)  # float32 products


def test_two_replicas_equal_one_device_objective_and_fit():
    x, y = _data(2)
    source = sharded.ShardSource.from_arrays(x, y, rows_per_shard=90)  # 8 shards
    standardizer = sharded.fit_standardizer(source)
    kwargs = dict(num_classes=4, l2=1e-2, dtype=tf.float64, standardizer=standardizer)
    one = sharded.ShardedObjective(source, **kwargs)
    two = sharded.ShardedObjective(source, strategy=_two_cpu_strategy(), **kwargs)
    assert two.num_replicas == 2
    position = tf.constant(np.random.default_rng(3).normal(size=13 * 4))
    (v1, g1), (v2, g2) = one(position), two(position)
    assert float(v2) == pytest.approx(float(v1), rel=1e-12)
    np.testing.assert_allclose(g2.numpy(), g1.numpy(), rtol=1e-10, atol=1e-14)

    fit1 = sharded.fit_sharded(one, tolerance=1e-8)
    fit2 = sharded.fit_sharded(two, tolerance=1e-8)
    assert fit1.converged and fit2.converged
    np.testing.assert_allclose(fit2.weights, fit1.weights, atol=1e-7)
    # And both equal the whole-batch solver on the standardized matrix.
    whole = lbfgs.fit_logistic_regression(
        standardizer.apply(x), y, l2=1e-2, tolerance=1e-8
    )
    np.testing.assert_allclose(fit1.weights, whole.weights, atol=1e-6)
    np.testing.assert_allclose(fit1.bias, whole.bias, atol=1e-6)
    assert fit1.loss == pytest.approx(whole.loss, rel=1e-10)


def test_streaming_standardizer_matches_in_memory():
    x, y = _data(4)
    ours = sharded.fit_standardizer(
        sharded.ShardSource.from_arrays(x, y, rows_per_shard=33)
    )
    ref = lbfgs.Standardizer.fit(x)
    np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(ours.scale, ref.scale, rtol=1e-10)


def test_streamed_sweep_matches_whole_batch_sweep(tmp_path):
    x, y = _data(5, n=900, spread=0.3)
    train = _cached_source(tmp_path, x[:600], y[:600])
    val = sharded.ShardSource.from_arrays(x[600:], y[600:], rows_per_shard=100)
    grid = [1e-1, 1e-2, 1e-3]
    streamed = sharded.sweep_l2_sharded(
        train,
        val,
        l2_grid=grid,
        num_classes=4,
        tolerance=1e-6,
        strategy=_two_cpu_strategy(),
    )
    whole = lbfgs.sweep_l2(
        x[:600].astype(np.float32),
        y[:600],
        x[600:],
        y[600:],
        l2_grid=grid,
        num_classes=4,
        tolerance=1e-6,
    )
    assert streamed.best_l2 == whole.best_l2
    for a, b in zip(streamed.table, whole.table, strict=True):
        assert a.val_top1 == pytest.approx(b.val_top1, abs=1 / 300 + 1e-9)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert sharded.result_accuracy(streamed, val) == pytest.approx(
        whole.accuracy(x[600:], y[600:]), abs=1 / 300 + 1e-9
    )


def test_streamed_predict_matches_numpy_and_top1(tmp_path):
    x, y = _data(6)
    x = x.astype(np.float32)
    source = _cached_source(tmp_path, x, y)  # several shards, read ahead
    standardizer = lbfgs.Standardizer.fit(x)
    rng = np.random.default_rng(8)
    params = lbfgs.ProbeParams(
        rng.normal(size=(12, 4)).astype(np.float32),
        rng.normal(size=4).astype(np.float32),
    )
    pred = sharded.predict(params, source, standardizer)
    z = (x.astype(np.float64) - standardizer.mean) / standardizer.scale
    expected = np.argmax(z @ params.weights + params.bias, axis=1)
    assert pred.dtype == np.int32 and pred.shape == (700,)
    assert np.mean(pred != expected) <= 1 / 700  # float32 vs float64 near-ties
    top1 = sharded.top1(params, source, standardizer)
    assert np.mean(pred == source.labels) == top1
    result = lbfgs.SweepResult(
        best=lbfgs.ProbeFit(
            weights=params.weights,
            bias=params.bias,
            l2=0.0,
            loss=0.0,
            gradient_max=0.0,
            iterations=0,
            function_evaluations=0,
            converged=True,
            failed=False,
            seconds=0.0,
            solver="tfp_sharded",
        ),
        table=[],
        standardizer=standardizer,
    )
    np.testing.assert_array_equal(sharded.result_predict(result, source), pred)
    assert sharded.result_accuracy(result, source) == top1
