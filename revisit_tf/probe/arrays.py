"""Feature matrices handed to TensorFlow without a copy.

Place in the data flow (stage 6): the probes (``lbfgs.py``, ``sgd.py``,
``knn.py``) work on ``[N, D]`` feature matrices that the feature cache
(``cache.py``) has already read into NumPy. ``tf.constant`` copies such a
matrix, and for a 60000 x 2048 float32 matrix (491 MB) that copy costs more
than half of a whole L-BFGS fit on a CPU (``revisit-benchmark probe``: 0.4 to
1.3 s against 1.3 s for the 15-iteration solve; most of it is the kernel
faulting in fresh pages). On a CPU-only host a C-contiguous array whose data
is aligned to ``ALIGNMENT`` bytes (what TensorFlow's kernels assume) can be
shared instead, through DLPack. ``aligned_empty`` allocates such arrays; the
cache's ``load`` and the standardizer write into them, so the probe path from
cache to solver makes no copy of the features at all.

Contract of ``as_tensor``: the returned tensor may share memory with the
array. The probes only read it; callers must not write to the array while the
tensor is in use. Arrays that cannot be shared (wrong dtype, not contiguous,
not aligned, read-only, or a visible GPU/TPU, where the solver must run on the
accelerator's copy anyway) are copied, as ``tf.constant`` would.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported lazily: cache.py uses this module.
    import tensorflow as tf

# Eigen's EIGEN_MAX_ALIGN_BYTES in TensorFlow's x86 builds (AVX-512). A CPU
# tensor whose data pointer is not a multiple of it aborts the process in
# some kernels (``Check failed: IsAligned()``), so sharing is refused below it.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on ``ALIGNMENT``.

    Args:
        shape: array shape, e.g. ``(N, D)``.
        dtype: NumPy dtype.

    Returns:
        ``np.ndarray`` of ``shape`` and ``dtype`` (a view into a slightly
        larger byte buffer, which it keeps alive).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-buffer.ctypes.data) % ALIGNMENT
    return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def is_shareable(array: np.ndarray) -> bool:
    """Whether ``as_tensor`` can hand ``array`` to TensorFlow without a copy."""
    return (
        isinstance(array, np.ndarray)
        and array.size > 0
        and array.flags.c_contiguous
        and array.flags.writeable
        and array.ctypes.data % ALIGNMENT == 0
        and array.dtype in (np.float32, np.float64)
        and array.dtype.byteorder in ("=", "|")
        and cpu_only()
    )


@functools.cache
def cpu_only() -> bool:
    import tensorflow as tf

    # Cached: the logical devices are fixed once TensorFlow is initialised.
    return not (
        tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
    )


def as_tensor(array: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """``array`` as a ``dtype`` tensor, sharing its memory where possible.

    Args:
        array: NumPy array (any shape); features are ``[N, D]``.
        dtype: ``tf.float32`` or ``tf.float64`` (others are converted by
            ``tf.constant``).

    Returns:
        An eager tensor equal to ``array.astype(dtype)``. It shares the
        array's memory when ``is_shareable(array)`` and the dtypes agree;
        otherwise the array is converted once into a fresh aligned buffer,
        which the tensor then shares (one pass, no second copy inside
        TensorFlow).
    """
    import tensorflow as tf

    np_dtype = dtype.as_numpy_dtype
    if not (isinstance(array, np.ndarray) and np_dtype in (np.float32, np.float64)):
        return tf.constant(array, dtype)
    if not cpu_only() or array.size == 0:
        return tf.constant(array, dtype)
    if not (is_shareable(array) and array.dtype == np_dtype):
        converted = aligned_empty(array.shape, np_dtype)
        np.copyto(converted, array, casting="unsafe")
        array = converted
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
