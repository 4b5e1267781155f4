"""Stage 5 of the data flow: export a trained trunk as a reusable SavedModel.

Contract:

* Input: a trained Keras 3 model ``images -> {endpoint_name: tensor}`` (as built
  by ``revisit_tf.models``, weights restored by the caller), the exported input
  shape ``(H, W, C)`` and the training preprocessing of a [0, 1] image batch.
* Output: a SavedModel directory (written atomically) whose input is
  ``images`` float32 ``[N, H, W, C]`` in [0, 1] everywhere, with
  signatures ``serving_default`` (every endpoint plus ``default`` = pooled
  ``pre_logits`` ``[N, D]``) and ``representation`` (the endpoint dict), both
  in inference mode, and the TF Hub Reusable SavedModel attributes
  (``__call__(images, training)``, ``variables``, ``trainable_variables``,
  ``regularization_losses``) for fine-tuning. Metadata describing the input
  lives in ``assets.extra/revisit_tf_export.json``.
* Patch models (Jigsaw, RPL; reference 8.3): the export cuts the patches
  itself, runs the trunk per patch, max-pools each map to at most 9000
  features (``pool_to_budget``, reference 8.2) and averages every endpoint
  over the patches; signature ``patches`` takes ``[N, P, h, w, C]`` patches
  in [0, 1].
* Safety: every function refuses float input outside [0, 1] (e.g. 0..255);
  writes are atomic and an export a killed writer moved aside is restored
  (``recover_interrupted_export``); ``architecture_record`` /
  ``architecture_differences`` / ``export_differences`` let the export root
  refuse a trunk or settings that drifted (``ConfigDriftError``).
* Consumers: the linear probe (stage 6) via ``load`` or ``tf.saved_model.load``;
  Keras 3 via ``keras.layers.TFSMLayer(path, call_endpoint=...)``; Keras 2
  (``tf_keras``) via ``hub.KerasLayer(path, trainable=...)``; TF1 graph
  sessions / TF Serving; TFLite (``serving_default``). Every export is
  checked through all of them before it replaces the previous one
  (``consumers``; ``ExportParityError``), and the result is in its metadata.
* ``.keras``: ``keras_trunk.export_keras_trunk`` writes the bare trunk
  (inputs after the export preprocessing; load after ``import
  revisit_tf.models``), checked on reload.

See ``revisit_tf.export.saved_model`` for the details and design choices.
"""

from revisit_tf.export.keras_trunk import export_keras_trunk
from revisit_tf.export.saved_model import (
    CONSUMERS,
    DEFAULT_OUTPUT_KEY,
    FEATURE_BUDGET,
    INPUT_KEY,
    INPUT_VALUE_RANGE,
    PATCHES_SIGNATURE,
    REPRESENTATION_SIGNATURE,
    SERVING_SIGNATURE,
    ConfigDriftError,
    ExportParityError,
    describe_trunk,
    export_saved_model,
    load,
    pool_to_budget,
    read_metadata,
    recover_interrupted_export,
)

__all__ = [
    "DEFAULT_OUTPUT_KEY",
    "FEATURE_BUDGET",
    "INPUT_KEY",
    "INPUT_VALUE_RANGE",
    "PATCHES_SIGNATURE",
    "REPRESENTATION_SIGNATURE",
    "SERVING_SIGNATURE",
    "CONSUMERS",
    "ConfigDriftError",
    "ExportParityError",
    "describe_trunk",
    "export_keras_trunk",
    "export_saved_model",
    "load",
    "pool_to_budget",
    "read_metadata",
    "recover_interrupted_export",
]
