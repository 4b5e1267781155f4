"""Features, cache entries and solver-independent scores for the probe benchmarks.

Shared by ``benchmarks/probe.py`` (solver rows) and ``benchmarks/probe_path.py``
(the L2-path row). Every loss and accuracy the benchmark reports is recomputed
here in NumPy, so all solvers are compared on equal terms.

Feature kinds (``kind``):
  * ``gaussian``: class means ``spread * N(0, I)`` plus unit noise: well
    conditioned, like standardized trunk features;
  * ``fmnist_relu``: random ReLU features of Fashion-MNIST pixels, rows drawn
    with replacement, standardized: strongly correlated, ill conditioned;
  * ``fmnist_pixels``: the standardized 784 Fashion-MNIST pixels themselves
    (``train``: the first N training images in file order; ``test``: the
    first N test images; standardized with the training images' statistics).
The two Fashion-MNIST kinds need the idx files (``data/idx.py``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

KINDS = ("gaussian", "fmnist_relu", "fmnist_pixels")
PIXELS = 784


def features(
    kind: str, n: int, d: int, *, classes: int, spread: float, seed: int, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic float32 ``[n, d]`` features and int64 ``[n]`` labels.

    Raises:
        ValueError: unknown ``kind``; ``fmnist_pixels`` with ``d != 784``, more
            rows than the split holds, or ``classes != 10``.
    """
    if kind == "gaussian":
        rng = np.random.default_rng(seed)
        centers = spread * np.random.default_rng(1234).normal(size=(classes, d))
        y = rng.integers(0, classes, size=n)
        x = rng.standard_normal(size=(n, d), dtype=np.float32)
        x += centers[y].astype(np.float32)
        return x, y
    if kind not in KINDS:
        raise ValueError(f"feature kind must be one of {KINDS}; got {kind!r}.")
    from revisit_tf.data import idx

    data = idx.load_idx_dataset()
    if classes != 10:
        raise ValueError(f"{kind} features have 10 classes; got classes={classes}.")
    if kind == "fmnist_pixels":
        if d != PIXELS:
            raise ValueError(f"fmnist_pixels has D = {PIXELS}; got {n}x{d}.")
        train = data["train"][0].reshape(-1, PIXELS).astype(np.float64)
        mean, std = train.mean(axis=0), train.std(axis=0)
        images, labels = data["test" if split == "test" else "train"]
        if n > len(labels):
            raise ValueError(
                f"fmnist_pixels {split!r} holds {len(labels)} images; asked for {n}."
            )
        x = images[:n].reshape(n, PIXELS).astype(np.float64)
        x = (x - mean) / np.where(std > 0, std, 1.0)
        return x.astype(np.float32), labels[:n].astype(np.int64)
    images, labels = data["train"]
    rows = np.random.default_rng(seed).integers(0, len(labels), size=n)
    pixels = images[rows].reshape(n, -1).astype(np.float32) / 255.0
    proj = np.random.default_rng(1234).normal(size=(pixels.shape[1], d))
    x = np.maximum(pixels @ (proj / np.sqrt(pixels.shape[1])).astype(np.float32), 0)
    x -= x.mean(axis=0)
    x /= x.std(axis=0) + 1e-6
    return x.astype(np.float32), labels[rows].astype(np.int64)


def cached_features(
    cache_dir: str,
    spec: dict[str, Any],
    build: Callable[[], tuple[np.ndarray, np.ndarray]],
    *,
    shard_bytes: int | None = None,
):
    """The feature-cache entry (``probe/cache.py``) of ``spec``, built once.

    ``build()`` returns ``([N, D] float32, [N] labels)``; the entry is written
    in 8192-row blocks into shards of about ``shard_bytes``.
    """
    from revisit_tf.probe import cache as cache_lib

    def blocks():
        x, y = build()
        for i in range(0, len(y), 8192):
            yield {"features": x[i : i + 8192]}, y[i : i + 8192]

    cache = cache_lib.FeatureCache(
        cache_dir, shard_bytes=shard_bytes or cache_lib.DEFAULT_SHARD_BYTES
    )
    return cache.get_or_build({"features": spec}, blocks)["features"]


def objective64(x: np.ndarray, y: np.ndarray, w, b, l2: float) -> float:
    """``J = mean CE + l2/2 ||W||^2`` in float64 NumPy, 8192 rows at a time."""
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    total = 0.0
    for i in range(0, len(y), 8192):
        z = x[i : i + 8192].astype(np.float64) @ w + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= logp[np.arange(len(z)), y[i : i + 8192]].sum()
    return total / len(y) + 0.5 * l2 * float(np.sum(w * w))


def top1(x: np.ndarray, y: np.ndarray, w, b) -> float:
    """Fraction of rows of ``x [N, D]`` whose argmax logit is ``y``."""
    hits = 0
    for i in range(0, len(y), 8192):
        z = x[i : i + 8192] @ np.asarray(w, np.float32) + np.asarray(b, np.float32)
        hits += int(np.sum(np.argmax(z, axis=1) == y[i : i + 8192]))
    return hits / len(y)


def median_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Runs ``run()`` ``repeats`` times; the median seconds and the last output."""
    seconds, out = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), out


class RssSampler:
    """Peak resident set size (``/proc/self/statm``), sampled every 10 ms.

    ``peak`` is the whole resident set; ``peak_private`` leaves out shared
    pages (mostly file pages: the page cache of memory-mapped cache shards,
    which the kernel reclaims under pressure), i.e. the process's own memory.

    Example:
        >>> sampler = RssSampler(); base, base_private = sampler.sizes()
        >>> with sampler: work()
        >>> sampler.peak - base, sampler.peak_private - base_private
    """

    def __init__(self):
        self.peak = self.peak_private = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def sizes(self) -> tuple[int, int]:
        """``(resident, private)`` bytes now (private = resident - shared)."""
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        resident, shared = int(fields[1]), int(fields[2])
        return resident * self._page, (resident - shared) * self._page

    def _sample(self):
        resident, private = self.sizes()
        self.peak = max(self.peak, resident)
        self.peak_private = max(self.peak_private, private)

    def _run(self):
        while not self._stop.wait(0.01):
            self._sample()

    def __enter__(self):
        self.peak, self.peak_private = self.sizes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
