"""Write a trained trunk as a Keras 3 ``.keras`` file, checked on reload.

Place in the data flow: stage 5 (export), the alternative to the SavedModel
(``revisit-export --format keras``; ``experiments.export_model(...,
export_format="keras")``). Input: the restored trunk and the export
preprocessing. Output: ``workdir/trunk.keras``, written atomically.

What loading it needs (this is what ``tests/test_export_consumers.py`` runs in
a fresh interpreter):

    import keras
    import revisit_tf.models  # registers the trunks' custom layers
    trunk = keras.saving.load_model("workdir/trunk.keras")
    endpoints = trunk(x, training=False)  # {"after_root", ..., "pre_logits"}

* ``revisit_tf`` must be installed and ``revisit_tf.models`` imported first:
  the trunks use layers registered under the ``revisit_tf`` package
  (``revisit_tf>BatchNormalization`` in every trunk, ``ReversibleStage`` /
  ``ReversibleUnit`` / ``ZeroPadChannels`` in RevNet), which Keras cannot
  deserialize otherwise.
* The file holds the bare trunk: no preprocessing, no input check and no
  ``default`` output. ``x`` is what the trunk saw in training, i.e. images
  *after* the export's ``pp_export`` (recorded in the SavedModel's metadata
  and the run's gin config; the default ``value_range(-1, 1, 0, 1)`` maps
  images in [0, 1] to [-1, 1], ``x = images * 2 - 1``) of the trunk's input
  shape ``[N, h, w, C]``. A patch task's trunk takes single patches (after
  ``crop_patches`` and per-patch ``standardize``); combining patches is the
  SavedModel's job.
* The file keeps the weight-decay regularizers, so ``trunk.losses`` is the
  weight decay for fine-tuning; nothing is compiled.

Writes are atomic: ``<dir>/<name>.tmp-<random>.keras`` is written and reloaded
with ``keras.saving.load_model``, its outputs must match the in-memory trunk's
on the probe batch (``consumers.compare``: within ``consumers.TOLERANCE``
scaled by the output's magnitude), and only then is it renamed over ``path``;
on any failure the temporary file is removed and an existing file is kept.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from revisit_tf.export import consumers as consumers_lib

KERAS_FILE = "trunk.keras"
_SUFFIX = ".keras"


def trunk_probe(
    image_shape: tuple[int | None, int | None, int],
    preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> np.ndarray:
    """The parity probe batch as the trunk sees it: preprocessed images.

    Patches ``[N, P, h, w, C]`` (a patch task's preprocessing) are flattened
    to ``[N * P, h, w, C]``, one trunk input each.
    """
    spec = tf.TensorSpec([None, *image_shape], tf.float32)
    images = consumers_lib.probe_inputs({"images": spec})["images"]
    x = tf.constant(images) if preprocess is None else preprocess(tf.constant(images))
    if x.shape.rank == 5:
        x = tf.reshape(x, [-1, *x.shape[2:]])
    return np.asarray(x)


def export_keras_trunk(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    probe: np.ndarray,
    tolerance: float = consumers_lib.TOLERANCE,
) -> dict[str, float]:
    """Writes ``model`` to ``path`` (``.keras``) after checking that it reloads.

    Args:
      model: the trunk (functional, from ``revisit_tf.models``).
      path: the ``.keras`` file (local or any ``tf.io.gfile`` path).
      probe: a batch of trunk inputs (``trunk_probe``).
      tolerance: see ``consumers``.

    Returns:
      ``{"max_abs_diff": ...}`` of the reloaded trunk on ``probe``.

    Raises:
      ValueError: ``path`` does not end in ``.keras``.
      ExportParityError: the reloaded file computes other numbers; ``path``
        is left as it was.
    """
    path = os.fspath(path)
    if not path.endswith(_SUFFIX):
        raise ValueError(f"A Keras file's name ends in {_SUFFIX!r}, got {path!r}.")
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    tmp = f"{path[: -len(_SUFFIX)]}.tmp-{secrets.token_hex(8)}{_SUFFIX}"
    try:
        keras.saving.save_model(model, tmp)
        loaded = keras.saving.load_model(tmp, compile=False)
        x = tf.constant(probe)
        expected = {k: np.asarray(v) for k, v in model(x, training=False).items()}
        actual = {k: np.asarray(v) for k, v in loaded(x, training=False).items()}
        worst, mismatches = consumers_lib.compare(
            {"trunk": actual}, {"trunk": expected}, tolerance
        )
        if mismatches:
            raise consumers_lib.ExportParityError(
                f"{tmp} reloaded by keras.saving.load_model does not compute what "
                f"the trunk computes (tolerance {tolerance:g} x max(1, "
                "|output|)):\n  keras: " + "\n  keras: ".join(mismatches)
            )
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
    return {"max_abs_diff": worst}
