"""Feature extraction for the linear probe (stage 6).

Runs an exported SavedModel (stage 5) once over a split and returns one
``[N, D]`` float32 matrix per endpoint, plus the labels. Rank-4 endpoints are
max-pooled to at most 9000 features and flattened, as the original's linear
evaluation (reference 8.2, ``pool_mode=max``; 8.4 flattening row-major,
channels fastest). ``PixelFeatures`` is the raw-pixel baseline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# Reference 8.2: fixed target of 9000 features per endpoint.
FEATURE_BUDGET = 9000
_LOG_EVERY_BATCHES = 100


def pool_to_budget(x: tf.Tensor, budget: int = FEATURE_BUDGET) -> tf.Tensor:
    """Max-pools a ``[N, h, w, C]`` map so that ``h' * w' * C <= budget``.

    Window = stride = ``ceil(sqrt(h*w*C / budget))`` clamped to ``[1, h]``,
    "valid" padding, as reference 8.2 (``max`` mode). Rank-2 input is returned
    unchanged.
    """
    if x.shape.rank == 2:
        return x
    if x.shape.rank != 4:
        raise ValueError(f"Expected an endpoint of rank 2 or 4; got shape {x.shape}.")
    h, w, c = (int(d) for d in x.shape[1:])
    if h * w * c <= budget:
        return x
    window = min(max(1, math.ceil(math.sqrt(h * w * c / budget))), h, w)
    return tf.nn.max_pool2d(x, ksize=window, strides=window, padding="VALID")


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

    def extract(
        self, dataset: tf.data.Dataset
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Runs the model over batches ``{"image": [B, H, W, C] in [0, 1], "label"}``.

        Returns:
          ``({endpoint: float32 [N, D]}, int64 labels [N])``.
        """
        chunks: dict[str, list[np.ndarray]] = {e: [] for e in self.endpoints}
        labels = []
        start, seen = time.perf_counter(), 0
        for i, batch in enumerate(dataset):
            out = self._fn(**{self._input_name: tf.cast(batch["image"], tf.float32)})
            for e in self.endpoints:
                chunks[e].append(_flatten(out[e]))
            labels.append(batch["label"].numpy())
            seen += len(labels[-1])
            if (i + 1) % _LOG_EVERY_BATCHES == 0:
                logging.info(
                    "Features: %d images, %.0f images/s.",
                    seen,
                    seen / (time.perf_counter() - start),
                )
        if not labels:
            raise ValueError("The probe's dataset is empty.")
        return (
            {e: np.concatenate(c) for e, c in chunks.items()},
            np.concatenate(labels).astype(np.int64),
        )


class PixelFeatures:
    """Flattened preprocessed pixels: the raw-pixel baseline (endpoint ``pixels``)."""

    endpoints = ("pixels",)

    def extract(
        self, dataset: tf.data.Dataset
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Returns ``({"pixels": float32 [N, H*W*C]}, int64 labels [N])``."""
        chunks, labels = [], []
        for batch in dataset:
            chunks.append(_flatten(tf.cast(batch["image"], tf.float32)))
            labels.append(batch["label"].numpy())
        if not labels:
            raise ValueError("The probe's dataset is empty.")
        return {"pixels": np.concatenate(chunks)}, np.concatenate(labels).astype(
            np.int64
        )
