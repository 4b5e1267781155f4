"""Feature extraction for the linear probe (stage 6).

Runs an exported SavedModel (stage 5) once over a split and returns one
``[N, D]`` float32 matrix per endpoint, plus the labels. Rank-4 endpoints are
max-pooled to at most 9000 features and flattened, as the original's linear
evaluation (reference 8.2, ``pool_mode=max``; 8.4 flattening row-major,
channels fastest). ``PixelFeatures`` is the raw-pixel baseline.
``iter_batches`` yields the same features batch by batch, which is what the
feature cache (``probe/cache.py``) stores; ``POOLING`` names this pooling in
cache keys and protocol fingerprints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from revisit_tf import progress as progress_lib
from revisit_tf.export.saved_model import FEATURE_BUDGET
from revisit_tf.export.saved_model import pool_to_budget as export_pool_to_budget

_logger = logging.getLogger(__name__)

# Reference 8.2: fixed target of 9000 features per endpoint (the export's
# patch-averaging signature uses the same pooling).
POOLING = f"max_to_{FEATURE_BUDGET}"
LOG_EVERY_S = 30.0  # seconds between progress lines


def pool_to_budget(x: tf.Tensor, budget: int = FEATURE_BUDGET) -> tf.Tensor:
    """Max-pools a ``[N, h, w, C]`` map so that ``h' * w' * C <= budget``.

    ``export.pool_to_budget`` (reference 8.2, ``max`` mode), which this checks
    the rank for: rank-2 input is returned unchanged, other ranks are errors.
    """
    if x.shape.rank not in (2, 4):
        raise ValueError(f"Expected an endpoint of rank 2 or 4; got shape {x.shape}.")
    return export_pool_to_budget(x, budget)


def _flatten(x: tf.Tensor) -> np.ndarray:
    x = pool_to_budget(x)
    return tf.reshape(x, [x.shape[0], -1]).numpy().astype(np.float32)


class SavedModelFeatures:
    """Endpoint features of a revisit_tf SavedModel (``representation`` signature).

    Example:
      feats, labels = SavedModelFeatures(path, ["pre_logits"]).extract(ds)
      feats["pre_logits"].shape  # [N, D]
    """

    def __init__(self, path: str, endpoints: Sequence[str] = ("pre_logits",)):
        if not tf.saved_model.contains_saved_model(path):
            raise FileNotFoundError(
                f"No SavedModel at {path!r}: run revisit-export on the training "
                "workdir first."
            )
        self._loaded = tf.saved_model.load(path)
        if "representation" not in self._loaded.signatures:
            raise ValueError(
                f"SavedModel {path!r} has no 'representation' signature (found "
                f"{sorted(self._loaded.signatures)}); it is not a revisit_tf export."
            )
        self._fn = self._loaded.signatures["representation"]
        (self._input_name,) = self._fn.structured_input_signature[1].keys()
        available = sorted(self._fn.structured_outputs)
        missing = [e for e in endpoints if e not in available]
        if missing:
            raise ValueError(
                f"Endpoints {missing} are not in {path!r}; available: {available}."
            )
        self.endpoints = tuple(endpoints)

    @staticmethod
    def available_endpoints(path: str) -> list[str]:
        """Sorted endpoint names of the ``representation`` signature at ``path``."""
        loaded = tf.saved_model.load(path)
        return sorted(loaded.signatures["representation"].structured_outputs)

    def iter_batches(
        self, dataset: tf.data.Dataset
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Yields ``({endpoint: float32 [B, D]}, int64 [B])`` per input batch.

        Input batches are ``{"image": [B, H, W, C] in [0, 1], "label": [B]}``.
        Logs progress (``log_progress``) every ``LOG_EVERY_S`` seconds.
        """
        for images, labels in log_progress(dataset, "Features"):
            out = self._fn(**{self._input_name: tf.cast(images, tf.float32)})
            yield {e: _flatten(out[e]) for e in self.endpoints}, labels

    def extract(
        self, dataset: tf.data.Dataset
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Runs the model over batches ``{"image": [B, H, W, C] in [0, 1], "label"}``.

        Returns:
          ``({endpoint: float32 [N, D]}, int64 labels [N])``.
        """
        return _concatenate(self.iter_batches(dataset), self.endpoints)


class PixelFeatures:
    """Flattened preprocessed pixels: the raw-pixel baseline (endpoint ``pixels``)."""

    endpoints = ("pixels",)

    def iter_batches(
        self, dataset: tf.data.Dataset
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Yields ``({"pixels": float32 [B, H*W*C]}, int64 [B])`` per batch."""
        for images, labels in log_progress(dataset, "Pixel features"):
            yield {"pixels": _flatten(tf.cast(images, tf.float32))}, labels

    def extract(
        self, dataset: tf.data.Dataset
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Returns ``({"pixels": float32 [N, H*W*C]}, int64 labels [N])``."""
        return _concatenate(self.iter_batches(dataset), self.endpoints)


def log_progress(
    dataset: tf.data.Dataset,
    what: str,
    *,
    every_s: float = LOG_EVERY_S,
    clock=time.perf_counter,
) -> Iterator[tuple[tf.Tensor, np.ndarray]]:
    """Yields ``(images, int64 labels)`` of every batch, logging progress.

    Every ``every_s`` seconds (time spent by the consumer included) one line:
    ``"<what>: batch 120/391 (31%), elapsed 0m25s, ETA 0m56s; 30720 images,
    1229 images/s."`` (``progress.Progress``). The total is the dataset's
    cardinality when TensorFlow knows it (finite sources of known size);
    otherwise the line has no total and no ETA.
    """
    cardinality = int(dataset.cardinality())
    progress = progress_lib.Progress(
        cardinality if cardinality >= 0 else None, every_s=every_s, clock=clock
    )
    seen = 0
    for i, batch in enumerate(dataset):
        labels = batch["label"].numpy().astype(np.int64)
        yield batch["image"], labels
        seen += len(labels)
        if progress.due():
            _logger.info(
                "%s: batch %s; %d images, %.0f images/s.",
                what,
                progress.summary(i + 1),
                seen,
                seen / max(progress.elapsed(), 1e-9),
            )


def _concatenate(batches, endpoints) -> tuple[dict[str, np.ndarray], np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {e: [] for e in endpoints}
    labels = []
    for feats, batch_labels in batches:
        for e in endpoints:
            chunks[e].append(feats[e])
        labels.append(batch_labels)
    if not labels:
        raise ValueError("The probe's dataset is empty.")
    return {e: np.concatenate(c) for e, c in chunks.items()}, np.concatenate(labels)
