"""Zero-copy feature tensors (revisit_tf/probe/arrays.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.probe import arrays, cache, knn, lbfgs


def _unaligned(shape, dtype=np.float32) -> np.ndarray:
    """A C-contiguous array whose data is 4 bytes past an aligned address."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = arrays.aligned_empty((nbytes + arrays.ALIGNMENT,), np.uint8)
    out = buffer[4 : 4 + nbytes].view(dtype).reshape(shape)
    assert out.ctypes.data % arrays.ALIGNMENT == 4
    return out


@tf.function
def _sum_and_product(x, w):
    return tf.reduce_sum(x), tf.matmul(x, w)


@pytest.mark.parametrize("shape", [(1,), (3, 5), (1000, 17), (7, 64, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint8])
def test_aligned_empty_is_aligned_contiguous_and_sized(shape, dtype):
    a = arrays.aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % arrays.ALIGNMENT == 0
    a[...] = 1  # the whole view is writable memory
    assert a.sum() == np.prod(shape)


def test_aligned_float32_is_shared_not_copied():
    x = arrays.aligned_empty((64, 8), np.float32)
    x[...] = np.arange(x.size, dtype=np.float32).reshape(x.shape)
    assert arrays.is_shareable(x)
    t = arrays.as_tensor(x, tf.float32)
    np.testing.assert_array_equal(t.numpy(), x)
    x[3, 4] = -7.0  # the tensor is a view of the same memory
    assert float(t[3, 4]) == -7.0


@pytest.mark.parametrize(
    "make",
    [
        lambda v: _unaligned(v.shape),  # misaligned data pointer
        lambda v: np.asfortranarray(np.zeros(v.shape, np.float32)),  # not C order
        lambda v: np.zeros(v.shape, np.float64),  # other dtype (cast)
        lambda v: np.zeros(v.shape, np.int64),  # integer features
    ],
    ids=["unaligned", "fortran", "float64", "int64"],
)
def test_unshareable_arrays_are_copied_and_safe_in_kernels(make):
    values = np.random.default_rng(0).integers(-5, 5, size=(300, 70)).astype(np.float32)
    x = make(values)
    x[...] = values
    assert not arrays.is_shareable(x) or x.dtype != np.float32
    t = arrays.as_tensor(x, tf.float32)
    assert t.dtype == tf.float32
    x[0, 0] = 99  # a copy: later writes to the array do not reach the tensor
    assert float(t[0, 0]) == values[0, 0]
    # Kernels that require aligned buffers (reduction, matmul) run on it; an
    # unaligned DLPack import would abort the process here.
    w = tf.ones([70, 3])
    total, product = _sum_and_product(t, w)
    assert float(total) == pytest.approx(float(values.sum()))
    np.testing.assert_allclose(product.numpy(), values @ np.ones([70, 3]), rtol=1e-6)


def test_read_only_array_is_copied():
    x = arrays.aligned_empty((10, 4), np.float32)
    x[...] = 2.0
    x.flags.writeable = False
    assert not arrays.is_shareable(x)
    np.testing.assert_array_equal(arrays.as_tensor(x, tf.float32).numpy(), x)


def test_float64_tensor_from_float32_features():
    x = arrays.aligned_empty((5, 3), np.float32)
    x[...] = np.linspace(0, 1, 15, dtype=np.float32).reshape(5, 3)
    t = arrays.as_tensor(x, tf.float64)
    assert t.dtype == tf.float64
    np.testing.assert_array_equal(t.numpy(), x.astype(np.float64))


def test_cache_load_and_standardizer_give_shareable_arrays(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(257, 33)).astype(np.float32)
    y = rng.integers(0, 4, size=257).astype(np.int32)
    spec = {"model": "m", "endpoint": "e", "split": "train", "pp": "x"}

    def build():
        for start in range(0, 257, 50):
            yield {"e": x[start : start + 50]}, y[start : start + 50]

    features = cache.FeatureCache(tmp_path, shard_bytes=4096)  # 31 rows/shard
    entry = features.get_or_build({"e": spec}, build)["e"]
    assert entry.num_shards > 1
    loaded, labels = entry.load()
    np.testing.assert_array_equal(loaded, x)
    np.testing.assert_array_equal(labels, y)
    assert arrays.is_shareable(loaded)
    standardizer = lbfgs.Standardizer.fit(loaded)
    z = standardizer.apply(loaded)
    assert z.dtype == np.float32 and arrays.is_shareable(z)
    expected = (x.astype(np.float64) - x.mean(0, dtype=np.float64)) / x.std(
        0, dtype=np.float64
    )
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    unit = knn._unit_rows(x)
    assert arrays.is_shareable(unit)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def test_fit_is_the_same_whether_features_are_shared_or_copied():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(400, 12)).astype(np.float32)
    labels = (values[:, 0] + 0.5 * values[:, 1] > 0).astype(np.int32) + (
        values[:, 2] > 1
    ).astype(np.int32)
    shared = arrays.aligned_empty(values.shape, np.float32)
    shared[...] = values
    unaligned = _unaligned(values.shape)
    unaligned[...] = values
    fits = [
        lbfgs.fit_logistic_regression(
            x, labels, num_classes=3, l2=1e-2, dtype=tf.float32, tolerance=1e-5
        )
        for x in (shared, unaligned, values.tolist())
    ]
    for fit in fits[1:]:
        np.testing.assert_array_equal(fit.weights, fits[0].weights)
        assert fit.loss == fits[0].loss
    np.testing.assert_array_equal(shared, values)  # the solver did not write
