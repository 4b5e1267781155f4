"""Write a trained trunk as a reusable, self-describing TF2 SavedModel.

Place in the data flow: stage 5 (export). Input: a trained Keras 3 model whose
output is a dict of named endpoints (``after_root``, ``block1``..``block4``,
``pre_logits``, ``logits``; reference section 5.4), restored from a checkpoint by
the caller. Output: a SavedModel directory that the linear probe (stage 6) and
any TF2 program read without this package, the modern form of the TF1 Hub
module of reference section 7.6.

Contract of the exported directory (``export_saved_model``):

* Input everywhere: ``images`` float32 ``[N, H, W, C]`` with values in [0, 1]
  (``H``/``W`` may be ``None``). The training preprocessing that maps such a
  batch onto what the trunk saw (e.g. ``x * 2 - 1`` for [-1, 1]) runs *inside*
  every exported function, so users need not know it (style guide 4.6).
  Every function checks the range (one min/max reduction per call): values
  outside ``[-RANGE_TOLERANCE, 1 + RANGE_TOLERANCE]`` (e.g. uint8 values cast
  to float, 0..255, whose features would be off by tens) fail with
  ``InvalidArgumentError`` naming the range seen. Another dtype (e.g. uint8
  itself) is refused by the signature; there is deliberately no uint8
  signature: divide by 255 (pp ``value_range(0, 1)``) before calling.
* Signature ``serving_default``: ``images`` -> dict with every endpoint by name,
  in inference mode (BN moving statistics), plus ``default`` = the pooled
  feature endpoint ``[N, D]`` (``pre_logits`` unless told otherwise; a rank-4
  endpoint ``[N, h, w, D]``, e.g. VGG's ``[N, 1, 1, D]``, is averaged over
  ``h, w``).
* Signature ``representation``: ``images`` -> the endpoint dict alone, also in
  inference mode (what reference 8.1 reads for linear evaluation).
* No ``default`` signature key. The TF1 module's ``default`` signature returned
  the trunk's *final* output (e.g. the 4 rotation logits); ours returns the
  feature vector under the output key ``default``. An alias would make old code
  asking for ``signatures["default"]`` silently receive different numbers; a
  missing key fails loudly and lists the available signatures instead.
* TF Hub "Reusable SavedModel" attributes on the root object:
  ``__call__(images, training=False)`` -> ``default`` ``[N, D]``, traced for
  ``training=False`` and ``training=True`` (training mode uses batch statistics
  and updates the BN moving averages, as the TF1 ``{"is_training"}`` graph
  variant did); ``variables``; ``trainable_variables``; and
  ``regularization_losses``, one zero-argument function per regularized kernel
  that returns its scalar weight-decay term, together equal to the model's
  ``sum(model.losses)`` (reference section 6). ``hub.KerasLayer(path,
  trainable=True)`` therefore fine-tunes the trunk with its weight decay; note
  that ``hub.KerasLayer`` is a Keras 2 (``tf_keras``) layer (tensorflow/hub#920):
  Keras 3 users load with ``keras.layers.TFSMLayer(path,
  call_endpoint="serving_default" | "representation")``, which finds the
  functions of the same names on the root object (signature functions
  themselves only accept keyword arguments).
* Patch models (Jigsaw, RPL; reference 8.3): when ``preprocess`` returns
  patches ``[N, P, h, w, C]`` (e.g. ``crop_patches(3)|standardize``), every
  function runs the trunk on the ``N * P`` patches, max-pools each rank-4
  endpoint of each patch to at most ``FEATURE_BUDGET`` (9000) features
  (reference 8.2, window = stride = ``ceil(sqrt(h w C / 9000))``, "valid")
  and averages every endpoint over the ``P`` patches, so all outputs are
  per image. A third signature ``patches`` takes ``patches`` float32
  ``[N, P, h, w, C]`` in [0, 1] directly (``patch_preprocess``, e.g.
  ``standardize``, runs inside) and returns the same dict as
  ``serving_default``.
* ``assets.extra/revisit_tf_export.json`` records the expected input (key,
  dtype, shape, value range), the endpoint shapes, the feature endpoint,
  the package version, the parity gate's report (``parity``), the sha256 of
  the ``extra_files`` copied next to it (e.g. ``operative_config.gin``) and
  optional caller metadata (``experiments.export_model`` puts the task,
  trunk, checkpoint, dataset and random_init there), readable without
  TensorFlow; ``load`` checks it.

Parity gate: after the SavedModel is written to its temporary directory and
before it is moved into place, every consumer in ``parity_consumers``
(``consumers.CONSUMERS``: ``tf.saved_model.load``, a TF1 graph session,
``keras.layers.TFSMLayer``, ``hub.KerasLayer`` and a TFLite conversion of
``serving_default``) runs a fixed probe batch and must reproduce the
in-memory model's outputs (its eager Python functions) within
``consumers.TOLERANCE`` scaled by the output's magnitude; otherwise
``ExportParityError`` names the consumer, function, output key and
difference, the temporary directory is removed and a previous export stays.
TFLite is skipped (logged, recorded) for weights beyond its 2 GiB FlatBuffer.
On the smoke trunk the gate adds about 5 s to a 3 s export (TFLite 2.3 s).

Why a ``tf.train.Checkpoint`` root and ``tf.saved_model.save`` rather than
``keras.export.ExportArchive`` (which style guide 4.6 suggests):
``ExportArchive`` registers every endpoint as a signature with a fixed input
signature, so it cannot hold ``__call__`` traced for the Python bool
``training``, and it has no public way to put ``regularization_losses`` on the
root; both would need its private ``_tf_trackable``. The root here does what
``ExportArchive`` does underneath (a generic trackable holding the model's
variables and ``tf.function`` s) with public API only. ``tf.Module`` is not used
because it reserves ``variables``/``trainable_variables`` as computed
properties, which are neither assignable nor saved.

Non-local paths: any ``tf.io.gfile`` filesystem works (``gs://``,
``ram://``); TF's ``ram://`` needs workarounds for its prefix-matching
``exists``/``listdir`` and its directory rename (``_exists``,
``_rename_dir``, ``_rmtree``), where the "rename" is a copy and delete and so
not atomic.

Writes are atomic and lose nothing: the SavedModel is written to a temporary
sibling ``<path>.tmp-<random>`` and renamed into place; an existing export is
moved aside to ``<path>.old-<random>`` first and deleted only after the new
one is in place, and is moved back if that rename fails. A process killed
between the two renames leaves no ``<path>``: the next write (or
``recover_interrupted_export``) first renames the newest complete
``<path>.old-*`` back. After a successful write every ``<path>.tmp-*`` and
``<path>.old-*`` is removed, so there must be one writer per ``path`` at a
time (the binaries hold a workdir lock). ``faults.point`` marks the moments
between the writes (``export.tmp_written``, ``export.old_moved_aside``,
``export.new_moved_in``, ``export.leftovers_removed``) for the kill tests.

Drift checks (used by ``experiments.export_model``): ``architecture_record``
describes the network a trunk computes (its Keras config without names of the
model itself and without shapes, plus its input shape); ``pretrain`` records
it for the trained trunk and ``architecture_differences`` lists what the
export's trunk changes; ``export_differences`` compares a new export's
settings with the export already at ``path``. Both feed ``ConfigDriftError``.

Restoring the trunk from a checkpoint (with ``assert_existing_objects_matched``)
is the caller's job; this module only sees the in-memory model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import revisit_tf
from revisit_tf import faults, files
from revisit_tf.export import consumers as consumers_lib

_logger = logging.getLogger(__name__)

INPUT_KEY = "images"
DEFAULT_OUTPUT_KEY = "default"
SERVING_SIGNATURE = "serving_default"
REPRESENTATION_SIGNATURE = "representation"
PATCHES_SIGNATURE = "patches"
PATCHES_INPUT_KEY = "patches"
# Reference 8.2: fixed target of 9000 features per endpoint (per patch, 8.3).
FEATURE_BUDGET = 9000
INPUT_VALUE_RANGE = (0.0, 1.0)
# Slack on INPUT_VALUE_RANGE for rounding; far below any real range mistake.
RANGE_TOLERANCE = 1e-3
METADATA_DIR = "assets.extra"
METADATA_FILE = "revisit_tf_export.json"
FORMAT_NAME = "revisit_tf.export.saved_model"
FORMAT_VERSION = 1
# Written by experiments.pretrain into the workdir: the trained trunk.
TRUNK_RECORD_FILE = "trunk_config.json"
TRUNK_RECORD_FORMAT = "revisit_tf.trunk_record"
# Written by revisit-train into the workdir; the export copies it to METADATA_DIR.
OPERATIVE_CONFIG_FILE = "operative_config.gin"
# Config keys that only carry shapes (the input shape is compared separately).
_SHAPE_KEYS = ("batch_shape", "build_config")

Preprocess = Callable[[tf.Tensor], tf.Tensor]


class ConfigDriftError(ValueError):
    """The export would differ from what was trained or already exported."""


ExportParityError = consumers_lib.ExportParityError
CONSUMERS = consumers_lib.CONSUMERS


def export_saved_model(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    image_shape: tuple[int | None, int | None, int],
    preprocess: Preprocess | None = None,
    feature_endpoint: str = "pre_logits",
    overwrite: bool = True,
    metadata: Mapping[str, Any] | None = None,
    patch_preprocess: Preprocess | None = None,
    parity_consumers: Sequence[str] = consumers_lib.CONSUMERS,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Exports ``model`` as a SavedModel with the contract of this module.

    Args:
      model: a built Keras 3 model with one image input whose call returns a
        dict ``{endpoint_name: tensor [N, ...]}``.
      path: the export directory (local or any ``tf.io.gfile`` filesystem). Its
        parent is created if needed.
      image_shape: ``(H, W, C)`` of the exported input ``images [N, H, W, C]``
        (float32 in [0, 1]); ``H`` and ``W`` may be ``None``.
      preprocess: maps the ``[N, H, W, C]`` batch in [0, 1] to what the trunk was
        trained on (e.g. ``lambda x: x * 2.0 - 1.0``); traced into every
        exported function. ``None`` feeds the images unchanged.
      feature_endpoint: the endpoint returned as ``default`` and by
        ``__call__``; rank 2 ``[N, D]`` or rank 4 ``[N, h, w, D]`` (averaged
        over ``h, w`` to ``[N, D]``).
      overwrite: replace an existing export at ``path``; if False, an existing
        ``path`` raises ``FileExistsError``. Either way an export that a
        killed writer left as ``<path>.old-*`` is first restored to ``path``
        (``recover_interrupted_export``).
      metadata: optional JSON-serializable mapping stored under
        ``"user_metadata"`` in the export's metadata file (e.g. the pretext task
        and the training step).
      patch_preprocess: for patch models (``preprocess`` returns
        ``[N, P, h, w, C]``): maps ``[N, P, h, w, C]`` patches in [0, 1] to the
        trunk's input (e.g. per-patch standardization) for the ``patches``
        signature. ``None``: patches are fed unchanged.
      parity_consumers: the parity gate: the consumers
        (``consumers.CONSUMERS``: ``saved_model``, ``graph_session``,
        ``tfsm_layer``, ``hub_keras_layer``, ``tflite``) that must compute the
        in-memory model's outputs on a fixed probe batch (within
        ``consumers.TOLERANCE``, scaled by the output's magnitude) before the
        new export replaces the old one. ``()`` skips the gate.
      extra_files: ``{file name: bytes}`` copied into ``assets.extra/`` (e.g.
        the operative gin config) and listed with their sha256 under
        ``extra_files`` in the metadata.

    Returns:
      ``path`` as a string (without a trailing separator).

    Raises:
      ValueError: a malformed argument, a model whose output is not a dict of
        endpoints, an unknown or wrongly ranked ``feature_endpoint``, or an
        endpoint named ``default``. Raised before anything is written.
      TypeError: ``metadata`` is not JSON-serializable.
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ExportParityError: (a ValueError) a consumer's outputs differ from the
        model's; nothing is moved into place, a previous export is kept.
    """
    path = _normalize_path(path)
    image_shape = _check_image_shape(image_shape)
    _check_model(model, image_shape, check_input_shape=preprocess is None)
    if preprocess is not None and not callable(preprocess):
        raise ValueError(
            f"preprocess must be a callable [N, H, W, C] -> tensor or None, got "
            f"{preprocess!r}."
        )
    if not isinstance(feature_endpoint, str) or not feature_endpoint:
        raise ValueError(
            f"feature_endpoint must be a non-empty endpoint name, got "
            f"{feature_endpoint!r}."
        )
    user_metadata = dict(metadata or {})
    try:
        json.dumps(user_metadata)
    except TypeError as e:
        raise TypeError(f"metadata must be JSON-serializable: {e}") from e
    parity_consumers = consumers_lib.check_consumers(parity_consumers)
    extra_files = dict(extra_files or {})
    for name, data in extra_files.items():
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or name == METADATA_FILE
        ):
            raise ValueError(f"extra_files names a file {name!r}: not a plain name.")
        if not isinstance(data, bytes):
            raise TypeError(f"extra_files[{name!r}] must be bytes.")
    recover_interrupted_export(path)  # An export moved aside counts as existing.
    if not overwrite and files.exists(path):
        raise FileExistsError(
            f"Export path {path!r} already exists and overwrite=False."
        )

    # Everything is traced (and so validated) before anything touches disk.
    if patch_preprocess is not None and not callable(patch_preprocess):
        raise ValueError(
            f"patch_preprocess must be a callable or None, got {patch_preprocess!r}."
        )
    root, signatures = _build_root(
        model,
        image_shape,
        preprocess or (lambda x: x),
        feature_endpoint,
        patch_preprocess or (lambda x: x),
    )
    meta = _make_metadata(signatures, image_shape, feature_endpoint, user_metadata)
    meta["extra_files"] = {
        name: hashlib.sha256(data).hexdigest()
        for name, data in sorted(extra_files.items())
    }
    inputs = reference = None
    if parity_consumers:
        # The in-memory model's numbers: the eager Python functions, untraced.
        specs = {}
        for signature in signatures.values():
            (spec,) = signature.structured_input_signature[0]
            specs[spec.name] = spec
        inputs = consumers_lib.probe_inputs(specs)
        reference = _reference_outputs(root, signatures, inputs)
    weight_bytes = sum(
        math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in model.variables
    )

    def write(directory: str) -> None:
        tf.saved_model.save(root, directory, signatures=signatures)
        meta["parity"] = None
        if parity_consumers:
            meta["parity"] = consumers_lib.check_parity(
                directory,
                inputs,
                reference,
                consumers=parity_consumers,
                weight_bytes=weight_bytes,
            )
        meta_dir = tf.io.gfile.join(directory, METADATA_DIR)
        tf.io.gfile.makedirs(meta_dir)
        for name, data in extra_files.items():
            with tf.io.gfile.GFile(tf.io.gfile.join(meta_dir, name), "wb") as f:
                f.write(data)
        # Last: recover_interrupted_export counts only exports with this file.
        with tf.io.gfile.GFile(tf.io.gfile.join(meta_dir, METADATA_FILE), "w") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))

    _write_atomically(path, write, overwrite=overwrite)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Returns the metadata dict of an export written by ``export_saved_model``.

    Args:
      path: the export directory.

    Returns:
      The parsed ``assets.extra/revisit_tf_export.json``: keys ``format``,
      ``format_version``, ``revisit_tf_version``, ``input`` (``key``,
      ``dtype``, ``shape`` ``[None, H, W, C]``, ``value_range`` ``[0.0, 1.0]``),
      ``feature_endpoint``, ``endpoints`` (name -> ``{"shape", "dtype"}``),
      ``signatures`` and ``user_metadata``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is not a revisit_tf export (no or unreadable metadata
        file, or another format version).
    """
    path = _normalize_path(path)
    if not (files.exists(path) and tf.io.gfile.isdir(path)):
        raise FileNotFoundError(f"No export directory at {path!r}.")
    meta_path = tf.io.gfile.join(path, METADATA_DIR, METADATA_FILE)
    if not tf.io.gfile.exists(meta_path):
        raise ValueError(
            f"{path!r} is not a revisit_tf export: {meta_path!r} is missing "
            "(expected a directory written by "
            "revisit_tf.export.export_saved_model)."
        )
    with tf.io.gfile.GFile(meta_path, "r") as f:
        text = f.read()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path!r} is not a revisit_tf export: {meta_path!r} is not JSON ({e})."
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path!r} is not a revisit_tf export: {meta_path!r} has format "
            f"{meta.get('format') if isinstance(meta, dict) else meta!r}, "
            f"expected {FORMAT_NAME!r}."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Export {path!r} has format_version {meta.get('format_version')!r}; "
            f"this revisit_tf reads version {FORMAT_VERSION}."
        )
    return meta


def load(path: str | os.PathLike) -> Any:
    """Loads an export after checking that it is a revisit_tf export.

    A thin wrapper over ``tf.saved_model.load``: the returned object has the
    signatures ``serving_default`` and ``representation``, the same functions as
    attributes, ``__call__(images, training=False)`` -> ``[N, D]``,
    ``variables``, ``trainable_variables`` and ``regularization_losses``. Feed
    it float32 images in [0, 1] of shape ``[N, H, W, C]``
    (``read_metadata(path)["input"]``). Keep the returned object alive while
    using its functions: they reference its variables only weakly.

    Args:
      path: the export directory.

    Returns:
      The object returned by ``tf.saved_model.load(path)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is not a revisit_tf export.
    """
    path = _normalize_path(path)
    read_metadata(path)
    return tf.saved_model.load(path)


def _normalize_path(path: str | os.PathLike) -> str:
    """Returns ``path`` as a str without trailing separators, or raises."""
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"path must be a str or os.PathLike, got {path!r}.")
    text = os.fspath(path)
    stripped = text.rstrip("/")
    if not stripped:
        raise ValueError(f"path must name a directory below a parent, got {text!r}.")
    return stripped


def _check_image_shape(
    image_shape: tuple[int | None, int | None, int],
) -> tuple[int | None, int | None, int]:
    """Validates ``(H, W, C)``: H, W positive ints or None; C a positive int."""

    def is_positive_int(d: object) -> bool:
        return isinstance(d, int) and not isinstance(d, bool) and d > 0

    ok = isinstance(image_shape, tuple | list) and len(image_shape) == 3
    if ok:
        h, w, c = image_shape
        ok = all(d is None or is_positive_int(d) for d in (h, w)) and is_positive_int(c)
    if not ok:
        raise ValueError(
            f"image_shape must be (H, W, C) with H, W positive ints or None and "
            f"C a positive int, got {image_shape!r}."
        )
    return tuple(image_shape)


def _check_model(
    model: keras.Model,
    image_shape: tuple[int | None, int | None, int],
    *,
    check_input_shape: bool,
) -> None:
    """Checks that ``model`` is a built single-input Keras model.

    Without a preprocess function, the exported input feeds the model directly,
    so ``image_shape`` must then be compatible with the model's input shape.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model must be a keras.Model mapping images to an endpoint dict, got "
            f"{type(model).__name__}."
        )
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built; call or build it first.")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None  # Subclassed model: the trace below checks the input.
    if inputs is None:
        return
    if len(inputs) != 1:
        raise ValueError(
            f"model {model.name!r} must have exactly one (image) input, got "
            f"{len(inputs)}: {[tuple(x.shape) for x in inputs]}."
        )
    model_shape = tuple(inputs[0].shape)
    if check_input_shape:
        compatible = len(model_shape) == 4 and all(
            m is None or m == d
            for m, d in zip(model_shape[1:], image_shape, strict=True)
        )
        if not compatible:
            raise ValueError(
                f"image_shape {image_shape} does not fit the input shape "
                f"{model_shape} of model {model.name!r}; give the model's (H, W, C) "
                "or a preprocess function that maps between them."
            )


def _check_value_range(x: tf.Tensor, name: str) -> tf.Tensor:
    """Returns ``x`` (float32, any shape) once its values are checked to be in [0, 1].

    Allows ``RANGE_TOLERANCE`` of rounding either side; an empty batch passes.
    The error names the range seen, e.g. ``[0.0000, 255.0000]`` for uint8
    values cast to float.
    """
    low, high = INPUT_VALUE_RANGE
    lowest, highest = tf.reduce_min(x), tf.reduce_max(x)
    in_range = tf.logical_and(
        lowest >= low - RANGE_TOLERANCE, highest <= high + RANGE_TOLERANCE
    )
    message = tf.strings.join(
        [
            f"{name} must be float32 in [0, 1] (tolerance {RANGE_TOLERANCE:g}); got "
            "values in [",
            tf.strings.as_string(lowest, precision=4),
            ", ",
            tf.strings.as_string(highest, precision=4),
            "]. Divide uint8 images by 255 (pp 'value_range(0, 1)') and clip "
            "resampled images to [0, 1] before calling the export.",
        ]
    )
    check = tf.debugging.Assert(
        tf.logical_or(tf.equal(tf.size(x), 0), in_range), [message]
    )
    with tf.control_dependencies([check]):
        return tf.identity(x)


def _pool_features(features: tf.Tensor, name: str) -> tf.Tensor:
    """Maps the feature endpoint to ``[N, D]``: rank 2 as is, rank 4 averaged."""
    rank = features.shape.rank
    if rank == 2:
        return tf.identity(features)
    if rank == 4:
        # [N, h, w, D] -> [N, D]; for VGG's [N, 1, 1, D] this is a squeeze.
        return tf.reduce_mean(features, axis=[1, 2])
    raise ValueError(
        f"feature endpoint {name!r} must be rank 2 [N, D] or rank 4 [N, h, w, D], "
        f"got shape {features.shape}."
    )


def pool_to_budget(x: tf.Tensor, budget: int = FEATURE_BUDGET) -> tf.Tensor:
    """Max-pools ``[N, h, w, C]`` so that ``h' * w' * C <= budget`` (ref 8.2).

    Window = stride = ``ceil(sqrt(h w C / budget))`` clamped to ``[1, min(h,
    w)]``, "valid" padding (border rows/columns that do not fill a window are
    dropped, reference 11.2 item 12). Other ranks are returned unchanged.
    """
    if x.shape.rank != 4:
        return x
    h, w, c = x.shape[1:]
    if h is None or w is None or c is None or h * w * c <= budget:
        return x
    window = min(max(1, math.ceil(math.sqrt(h * w * c / budget))), h, w)
    return tf.nn.max_pool2d(x, ksize=window, strides=window, padding="VALID")


def _combine_patches(
    outputs: Mapping[str, tf.Tensor], num_patches: int
) -> dict[str, tf.Tensor]:
    """Per-patch endpoints ``[N*P, ...]`` -> per-image means (reference 8.3).

    Rank-4 maps are first pooled to the feature budget per patch.
    """
    combined = {}
    for name, value in outputs.items():
        value = pool_to_budget(value)
        shape = value.shape[1:]
        per_image = tf.reshape(value, [-1, num_patches, *shape])  # [N, P, ...]
        combined[name] = tf.reduce_mean(per_image, axis=1)
    return combined


def _build_root(
    model: keras.Model,
    image_shape: tuple[int | None, int | None, int],
    preprocess: Preprocess,
    feature_endpoint: str,
    patch_preprocess: Preprocess = lambda x: x,
) -> tuple[tf.train.Checkpoint, dict[str, Any]]:
    """Builds and traces the object to save.

    Returns:
      ``(root, signatures)``: the trackable root with the endpoint functions and
      the Reusable SavedModel attributes, and the signature dict for
      ``tf.saved_model.save``.
    """
    image_spec = tf.TensorSpec([None, *image_shape], tf.float32, name=INPUT_KEY)

    expected = "[N, " + ", ".join("?" if d is None else str(d) for d in image_shape)
    expected += "] float32 in [0, 1]"

    def check_images(images: tf.Tensor) -> tf.Tensor:
        # Loaded signatures check the dtype but not the shape: check it here so
        # a wrong shape fails with a message instead of deep inside a conv.
        checks = [
            tf.debugging.assert_equal(
                tf.shape(images)[axis + 1],
                size,
                message=f"images must be {expected}; dimension {axis + 1} differs",
            )
            for axis, size in enumerate(image_shape)
            if size is not None
        ]
        with tf.control_dependencies(checks):
            return _check_value_range(images, INPUT_KEY)

    def run_model(inputs: tf.Tensor, training: bool) -> Mapping[str, tf.Tensor]:
        if inputs.shape.rank != 5:
            return model(inputs, training=training)
        # Patches [N, P, h, w, C]: one trunk pass over N*P patches, then the
        # per-image average of the (pooled) endpoints (reference 8.3).
        num_patches = inputs.shape[1]
        flat = tf.reshape(inputs, [-1, *inputs.shape[2:]])
        outputs = model(flat, training=training)
        if not isinstance(outputs, Mapping):
            return outputs
        return _combine_patches(outputs, num_patches)

    def endpoints(images: tf.Tensor, training: bool) -> dict[str, tf.Tensor]:
        outputs = run_model(preprocess(check_images(images)), training=training)
        return check_outputs(outputs)

    def check_outputs(outputs) -> dict[str, tf.Tensor]:
        if not isinstance(outputs, Mapping) or not all(
            isinstance(k, str) for k in outputs
        ):
            raise ValueError(
                f"model {model.name!r} must return a dict {{endpoint_name: "
                f"tensor}}, got {type(outputs).__name__}."
            )
        if DEFAULT_OUTPUT_KEY in outputs:
            raise ValueError(
                f"model {model.name!r} has an endpoint named "
                f"{DEFAULT_OUTPUT_KEY!r}, which the export reserves for the pooled "
                "feature vector; rename that endpoint."
            )
        if feature_endpoint not in outputs:
            raise ValueError(
                f"feature_endpoint {feature_endpoint!r} is not an endpoint of model "
                f"{model.name!r}; available: {sorted(outputs)}."
            )
        return dict(outputs)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = endpoints(images, training=False)
        pooled = _pool_features(outputs[feature_endpoint], feature_endpoint)
        return {**outputs, DEFAULT_OUTPUT_KEY: pooled}

    def representation(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return endpoints(images, training=False)

    def call(images: tf.Tensor, training: bool = False) -> tf.Tensor:
        outputs = endpoints(images, training=training)
        return _pool_features(outputs[feature_endpoint], feature_endpoint)

    serve_fn = tf.function(serve, input_signature=[image_spec], autograph=False)
    representation_fn = tf.function(
        representation, input_signature=[image_spec], autograph=False
    )
    # No input_signature: `training` is a Python bool, so trace both values.
    call_fn = tf.function(call, autograph=False)
    signatures = {
        SERVING_SIGNATURE: serve_fn.get_concrete_function(),
        REPRESENTATION_SIGNATURE: representation_fn.get_concrete_function(),
    }
    call_fn.get_concrete_function(image_spec, training=False)
    call_fn.get_concrete_function(image_spec, training=True)

    # Patch models: the trunk input after `preprocess` is [N, P, h, w, C].
    trunk_input = tf.function(preprocess, autograph=False).get_concrete_function(
        image_spec
    )
    trunk_input_shape = trunk_input.structured_outputs.shape
    patches_fn = None
    if trunk_input_shape.rank == 5:
        patch_spec = tf.TensorSpec(
            [None, *trunk_input_shape[1:]], tf.float32, name=PATCHES_INPUT_KEY
        )

        def serve_patches(patches: tf.Tensor) -> dict[str, tf.Tensor]:
            inputs = patch_preprocess(_check_value_range(patches, PATCHES_INPUT_KEY))
            outputs = check_outputs(run_model(inputs, training=False))
            pooled = _pool_features(outputs[feature_endpoint], feature_endpoint)
            return {**outputs, DEFAULT_OUTPUT_KEY: pooled}

        patches_fn = tf.function(
            serve_patches, input_signature=[patch_spec], autograph=False
        )
        signatures[PATCHES_SIGNATURE] = patches_fn.get_concrete_function()

    root = tf.train.Checkpoint()
    root.__call__ = call_fn
    # Also plain attributes: signature functions accept keyword arguments only,
    # while TFSMLayer(call_endpoint=...) calls its endpoint with one positional.
    setattr(root, SERVING_SIGNATURE, serve_fn)
    setattr(root, REPRESENTATION_SIGNATURE, representation_fn)
    if patches_fn is not None:
        setattr(root, PATCHES_SIGNATURE, patches_fn)
    # The tf.Variables underneath, not Keras 3's KerasVariable wrappers: the
    # SavedModel exporter maps each KerasVariable it finds to a *new*
    # tf.Variable copy, so the graph held two variables per weight and the TF1
    # saver (graph sessions, TF Serving, TFLite) restored only the copies the
    # functions never read ("Could not find variable ..." in a session, NaN
    # in TFLite). The parity gate checks exactly this.
    root.variables = [v.value for v in model.variables]
    root.trainable_variables = [v.value for v in model.trainable_variables]
    # Same terms as keras' Layer.losses: the regularizer of each trainable weight.
    root.regularization_losses = [
        _regularization_fn(v) for v in model.trainable_weights if v.regularizer
    ]
    return root, signatures


def _reference_outputs(
    root: tf.train.Checkpoint,
    signatures: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
) -> consumers_lib.Outputs:
    """The in-memory model's outputs on ``inputs`` for every exported function.

    Runs the Python functions behind the ``tf.function`` s eagerly (nothing
    traced or saved), so the parity gate compares each consumer with the
    model itself.
    """
    reference = {}
    for name, signature in signatures.items():
        (spec,) = signature.structured_input_signature[0]
        outputs = getattr(root, name).python_function(tf.constant(inputs[spec.name]))
        reference[name] = {k: v.numpy() for k, v in outputs.items()}
    default = root.__call__.python_function(
        tf.constant(inputs[INPUT_KEY]), training=False
    )
    reference[consumers_lib.CALL] = {DEFAULT_OUTPUT_KEY: default.numpy()}
    return reference


def _regularization_fn(
    variable: keras.Variable,
) -> tf.types.experimental.PolymorphicFunction:
    """Returns a traced zero-argument function -> scalar decay of ``variable``."""
    fn = tf.function(
        lambda: variable.regularizer(variable), input_signature=[], autograph=False
    )
    fn.get_concrete_function()
    return fn


def _make_metadata(
    signatures: Mapping[str, Any],
    image_shape: tuple[int | None, int | None, int],
    feature_endpoint: str,
    user_metadata: dict[str, Any],
) -> dict[str, Any]:
    """Returns the JSON-able description of the export (see ``read_metadata``)."""
    outputs = signatures[REPRESENTATION_SIGNATURE].structured_outputs
    patches = None
    if PATCHES_SIGNATURE in signatures:
        (spec,) = signatures[PATCHES_SIGNATURE].structured_input_signature[0]
        shape = spec.shape.as_list()
        patches = {
            "key": PATCHES_INPUT_KEY,
            "shape": shape,
            "num_patches": shape[1],
            "combine": "mean over patches after max-pooling each to "
            f"{FEATURE_BUDGET} features (reference 8.3)",
        }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "revisit_tf_version": revisit_tf.__version__,
        "input": {
            "key": INPUT_KEY,
            "dtype": "float32",
            "shape": [None, *image_shape],
            "value_range": list(INPUT_VALUE_RANGE),
        },
        "feature_endpoint": feature_endpoint,
        "default_output_key": DEFAULT_OUTPUT_KEY,
        "endpoints": {
            name: {"shape": t.shape.as_list(), "dtype": t.dtype.name}
            for name, t in sorted(outputs.items())
        },
        "signatures": sorted(signatures),
        "patches": patches,
        "user_metadata": user_metadata,
    }


def recover_interrupted_export(path: str | os.PathLike) -> str | None:
    """Puts back an export that a killed writer left only as ``<path>.old-*``.

    A writer killed between moving the old export aside and moving the new one
    in leaves no ``path``. If ``path`` is missing, the newest complete
    ``<path>.old-*`` (by the time its metadata file was written; directories
    without one are ignored) is renamed back to ``path``.

    Args:
      path: the export directory.

    Returns:
      The ``<path>.old-*`` directory restored, or None if ``path`` exists or
      nothing complete was moved aside.
    """
    path = _normalize_path(path)
    if files.exists(path):
        return None
    complete = []
    for candidate in _siblings(path, ".old-"):
        meta_path = tf.io.gfile.join(candidate, METADATA_DIR, METADATA_FILE)
        if tf.io.gfile.exists(meta_path):
            complete.append((tf.io.gfile.stat(meta_path).mtime_nsec, candidate))
    if not complete:
        return None
    _, newest = max(complete)
    _rename_dir(newest, path)
    _logger.warning(
        "Restored the export %s from %s, where an interrupted export had moved it.",
        path,
        newest,
    )
    return newest


def _rename_dir(src: str, dst: str) -> None:
    """``tf.io.gfile.rename`` of a directory (one atomic ``rename(2)`` locally).

    On ``ram://``, whose rename moves a directory's own entry but not its
    files, ``files.rename_tree`` moves file by file (not atomic there).
    """
    if files.scheme(src) == "ram":
        files.rename_tree(src, dst)
    else:
        tf.io.gfile.rename(src, dst)


def _siblings(path: str, infix: str) -> list[str]:
    """Sorted ``<path><infix>*`` entries next to ``path`` (``infix`` ``.tmp-``)."""
    parent, base = os.path.split(path)
    try:
        names = tf.io.gfile.listdir(parent or ".")
    except tf.errors.NotFoundError:
        return []
    prefix = base + infix
    return sorted(
        os.path.join(parent, name.rstrip("/"))
        for name in names
        if name.startswith(prefix)
    )


def _remove_leftovers(path: str) -> None:
    """Removes every ``<path>.tmp-*`` and ``<path>.old-*`` (one writer per path)."""
    for leftover in _siblings(path, ".tmp-") + _siblings(path, ".old-"):
        if tf.io.gfile.isdir(leftover):
            files.rmtree(leftover)
        else:
            tf.io.gfile.remove(leftover)
        _logger.info("Removed %s, left by an interrupted export.", leftover)


def _write_atomically(
    path: str, write: Callable[[str], None], *, overwrite: bool
) -> None:
    """Runs ``write(tmp)`` on a fresh sibling of ``path``, then renames it in.

    First restores an export a killed writer moved aside
    (``recover_interrupted_export``). On any failure the temporary directory
    is removed and an existing export at ``path`` is left (or put back) in
    place. After success, the leftovers of killed writers are removed.
    """
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    recover_interrupted_export(path)
    # Random, not derived from the pid or time: no other process can predict
    # (and pre-create) the names, and crashed writers never share one.
    suffix = secrets.token_hex(8)
    tmp = f"{path}.tmp-{suffix}"
    old = f"{path}.old-{suffix}"
    try:
        write(tmp)
        faults.point("export.tmp_written")
        if files.exists(path):
            if not overwrite:
                raise FileExistsError(
                    f"Export path {path!r} already exists and overwrite=False."
                )
            _rename_dir(path, old)
            faults.point("export.old_moved_aside")
            try:
                _rename_dir(tmp, path)
            except BaseException:
                _rename_dir(old, path)
                raise
        else:
            _rename_dir(tmp, path)
        faults.point("export.new_moved_in")
    finally:
        if files.exists(tmp):
            files.rmtree(tmp)
    _remove_leftovers(path)  # The old export, and what killed writers left.
    faults.point("export.leftovers_removed")


def architecture_record(model: keras.Model) -> dict[str, Any]:
    """Describes the network ``model`` computes, for ``architecture_differences``.

    Args:
      model: a built functional Keras model (a trunk) with one input.

    Returns:
      A JSON-able dict: ``format``; ``input_shape`` ``[H, W, C]`` of one
      input example (entries may be None); ``architecture``, the model's
      ``get_config()`` without the model's own name (the pretext model renames
      its trunk) and without shape-only keys (``batch_shape``,
      ``build_config``, tensor shapes), so the same trunk built for another
      input size compares equal; and ``sha256`` of that architecture. For a
      model without a config (subclassed), ``architecture`` and ``sha256``
      are None.
    """
    try:
        input_shape = list(model.inputs[0].shape[1:])
    except (AttributeError, IndexError, ValueError):
        input_shape = None
    try:
        config = model.get_config()
    except NotImplementedError:
        config = None
    architecture = sha256 = None
    if config is not None:
        config = dict(config)
        config.pop("name", None)
        text = json.dumps(config, sort_keys=True, default=_json_fallback)
        architecture = _strip_shapes(json.loads(text))
        canonical = json.dumps(architecture, sort_keys=True).encode()
        sha256 = hashlib.sha256(canonical).hexdigest()
    return {
        "format": TRUNK_RECORD_FORMAT,
        "format_version": 1,
        "input_shape": input_shape,
        "architecture": architecture,
        "sha256": sha256,
        "trunk": describe_trunk(model),
    }


_UNIT = re.compile(r"^block(\d+)_unit(\d+)_")


def describe_trunk(model: keras.Model) -> dict[str, Any]:
    """The trunk's builder options, read back from the built network.

    Read from the layers ``revisit_tf.models`` builds (their names and
    configs), not from the builder's arguments, so it needs no gin and
    describes what the network computes. Entries the model does not show
    (e.g. another model's) are None.

    Returns:
      A JSON-able dict: ``architecture`` (``resnet50_v1``, ``resnet50_v2``,
      ``revnet50``, ``vgg19`` or None), ``version`` (``v1``/``v2`` for ResNet),
      ``width`` (k: stem channels / 16, VGG's first conv / 8), ``units`` per
      stage (ResNet, RevNet), ``last_relu`` (False: the paper's "(-)"),
      ``stem_stride``, ``num_classes`` (the ``logits`` layer), ``weight_decay``
      (``2 x`` the kernels' L2 factor), ``dtype_policy``, ``input_shape`` and
      ``name``.
    """
    layers = {layer.name: layer for layer in model.layers}
    kinds = {type(layer).__name__ for layer in model.layers}
    architecture = version = units = last_relu = None
    stem = layers.get("root_conv")
    if "block1_unit1_preact_bn" in layers:
        architecture, version = "resnet50_v2", "v2"
    elif "block1_unit1_conv1" in layers:
        architecture, version = "resnet50_v1", "v1"
    elif "ReversibleStage" in kinds:
        architecture = "revnet50"
    elif "block1_1_conv" in layers:
        architecture, stem = "vgg19", layers["block1_1_conv"]
    if version is not None:
        counts: dict[int, int] = {}
        for name in layers:
            if match := _UNIT.match(name):
                stage, unit = int(match.group(1)), int(match.group(2))
                counts[stage] = max(counts.get(stage, 0), unit)
        units = [counts[stage] for stage in sorted(counts)]
        last_relu = True if version == "v1" else "post_relu" in layers
    elif architecture == "revnet50":
        stages = [
            layer for layer in model.layers if type(layer).__name__ == "ReversibleStage"
        ]
        units = [int(getattr(stage, "num_units", 0)) or None for stage in stages]
        last_relu = "post_relu" in layers
    width = stem_stride = weight_decay = None
    if stem is not None and architecture is not None:
        # Channels per unit of k of the first conv (resnet.py, revnet.py, vgg.py).
        per_k = {"vgg19": 8, "revnet50": 64}.get(architecture, 16)
        width = stem.filters / per_k
        width = int(width) if width == int(width) else width
        stem_stride = int(stem.strides[0])
        weight_decay = 0.0
        for layer in model.layers:  # The first decayed kernel (RevNet's stem has none).
            l2 = getattr(getattr(layer, "kernel_regularizer", None), "l2", None)
            decay = (
                2 * float(l2) if l2 is not None else getattr(layer, "weight_decay", 0)
            )
            if decay:
                weight_decay = float(decay)
                break
    logits = layers.get("logits")
    num_classes = getattr(logits, "units", None)
    try:
        input_shape = list(model.inputs[0].shape[1:])
    except (AttributeError, IndexError, ValueError):
        input_shape = None
    policy = getattr(model, "dtype_policy", None)
    return {
        "architecture": architecture,
        "version": version,
        "width": width,
        "units": units,
        "last_relu": last_relu,
        "stem_stride": stem_stride,
        "num_classes": None if num_classes is None else int(num_classes),
        "weight_decay": None if weight_decay is None else round(weight_decay, 12),
        "dtype_policy": getattr(policy, "name", None),
        "input_shape": input_shape,
        "name": model.name,
    }


def _json_fallback(value: object) -> str:
    """A stable stand-in for a config value JSON cannot hold (no address)."""
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _strip_shapes(value: Any) -> Any:
    """``value`` (a parsed Keras config) without its shape-only entries."""
    if isinstance(value, dict):
        is_tensor = "keras_history" in value
        return {
            k: _strip_shapes(v)
            for k, v in value.items()
            if k not in _SHAPE_KEYS and not (is_tensor and k == "shape")
        }
    if isinstance(value, list):
        return [_strip_shapes(v) for v in value]
    return value


def architecture_differences(
    trained: Mapping[str, Any], current: Mapping[str, Any], *, limit: int = 5
) -> list[str]:
    """What ``current`` changes relative to ``trained`` (``architecture_record`` s).

    Returns:
      Up to ``limit`` lines such as ``"layers[2] (root_conv).config.strides:
      [2, 2] (trained) vs [1, 1] (export)"``; the input shape is compared when
      both are fully known. Empty when they match (or a side has no config).
    """
    differences = []
    shapes = trained.get("input_shape"), current.get("input_shape")
    if all(s is not None and None not in s for s in shapes) and (
        list(shapes[0]) != list(shapes[1])
    ):
        differences.append(
            f"trunk input shape {list(shapes[0])} (trained) vs {list(shapes[1])} "
            "(export)"
        )
    a, b = trained.get("architecture"), current.get("architecture")
    if a is not None and b is not None:
        _diff(a, b, "", differences, limit)
    return differences[:limit]


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff(a: Any, b: Any, where: str, out: list[str], limit: int) -> None:
    """Appends ``"<where>: <a> (trained) vs <b> (export)"`` for each leaf change."""
    if len(out) >= limit:
        return
    here = where.lstrip(".") or "config"
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                side = "trained" if key in a else "export"
                value = a[key] if key in a else b[key]
                out.append(
                    f"{where}.{key}".lstrip(".")
                    + f": only in the {side} trunk ({_short(value)})"
                )
            else:
                _diff(a[key], b[key], f"{where}.{key}", out, limit)
            if len(out) >= limit:
                return
    elif isinstance(a, list) and isinstance(b, list) and _has_containers(a + b):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            tag = f"[{i}]"
            if isinstance(x, dict) and isinstance(x.get("name"), str):
                tag += f" ({x['name']})"
            _diff(x, y, f"{where}{tag}", out, limit)
            if len(out) >= limit:
                return
        if len(a) != len(b):
            out.append(f"{here}: {len(a)} entries (trained) vs {len(b)} (export)")
    elif a != b:
        out.append(f"{here}: {_short(a)} (trained) vs {_short(b)} (export)")


def _has_containers(values: list[Any]) -> bool:
    """Whether a config list holds dicts or lists (else it is compared whole)."""
    return any(isinstance(v, dict | list) for v in values)


def export_differences(
    path: str | os.PathLike,
    *,
    image_shape: Sequence[int | None],
    metadata: Mapping[str, Any],
    keys: Sequence[str],
) -> list[str]:
    """How a new export's settings differ from the export already at ``path``.

    Args:
      path: the export directory (call ``recover_interrupted_export`` first).
      image_shape: the new export's ``(H, W, C)``.
      metadata: the new export's user metadata.
      keys: the metadata keys compared (a key missing on either side, e.g.
        in an export older than the key, is not compared).

    Returns:
      One line per difference, e.g. ``"pp_export: 'a' (existing export) vs
      'b' (this export)"``; empty if nothing differs or there is no export
      (or no readable revisit_tf export) at ``path``.
    """
    try:
        existing = read_metadata(path)
    except (FileNotFoundError, ValueError):
        return []
    differences = []
    old_shape = existing.get("input", {}).get("shape", [None])[1:]
    if list(old_shape) != list(image_shape):
        differences.append(
            f"image_shape: {tuple(old_shape)} (existing export) vs "
            f"{tuple(image_shape)} (this export)"
        )
    old_metadata = existing.get("user_metadata", {})
    for key in keys:
        both = key in old_metadata and key in metadata
        if both and old_metadata[key] != metadata[key]:
            differences.append(
                f"{key}: {old_metadata[key]!r} (existing export) vs "
                f"{metadata[key]!r} (this export)"
            )
    return differences
