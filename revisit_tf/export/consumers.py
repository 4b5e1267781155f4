"""The export's consumers, run on a written SavedModel, and the parity gate.

Place in the data flow: stage 5 (export), after ``tf.saved_model.save`` and
before the new export is moved into place (``saved_model.export_saved_model``).
Input: the directory just written, a fixed probe batch and the in-memory
model's outputs on it (its eager Python functions, before saving). Output: one
report per consumer, or ``ExportParityError``.

The five ways an export is read (``CONSUMERS``), each run by one function:

* ``saved_model``: ``tf.saved_model.load`` (TF2 eager), every signature
  (``serving_default``, ``representation`` and, for patch exports,
  ``patches``) and ``__call__(images, training=False)``.
* ``graph_session``: TF1-style graph loading in a fresh ``tf.Graph`` and
  ``tf.compat.v1.Session``, every ``signature_def`` run by tensor name; this
  is what TF Serving and ``saved_model_cli run`` do.
* ``tfsm_layer``: Keras 3 ``keras.layers.TFSMLayer(path,
  call_endpoint="serving_default")``.
* ``hub_keras_layer``: ``tensorflow_hub.KerasLayer(path, trainable=True)``
  called with ``training=False`` (the Reusable SavedModel ``__call__`` that
  fine-tuning uses, with the trainable variables and regularization losses
  attached). It needs ``tensorflow_hub``; without it the consumer is skipped
  with a warning.
* ``tflite``: ``tf.lite.TFLiteConverter.from_saved_model(path,
  signature_keys=["serving_default"])`` and the interpreter's signature
  runner. A FlatBuffer cannot exceed 2 GiB, so trunks whose weights take
  more than ``TFLITE_MAX_WEIGHT_BYTES`` (e.g. ImageNet ResNet50 at width 16)
  are skipped with a warning, as is a conversion that reports that limit.

Every consumer reads the export through ``tf.io.gfile`` (tested on ``ram://``),
so non-local paths need no local copy.

Tolerance: consumer output ``y`` and in-memory output ``r`` of one output key
match when ``max |y - r| <= TOLERANCE * max(1, max |r|)``, i.e. an absolute
1e-5 for outputs of magnitude up to 1 and 1e-5 relative to the output's own
largest magnitude above that. Why scaled: consumers run other kernels (TFLite
folds batch norm into the convolutions and runs XNNPACK), whose float32
rounding (eps = 1.2e-7) grows with the activation scale, so a fixed 1e-5
would fail a healthy trunk whose endpoints reach the tens or hundreds, while
a purely relative bound means nothing for outputs near zero. Measured on
random-init trunks (ResNet50 v1/v2, RevNet50, VGG19, width 0.25, units
(1, 1, 1, 1), 32x32x3, outputs up to 1.1-1.5): ``saved_model``,
``graph_session``, ``tfsm_layer`` and ``hub_keras_layer`` differ by exactly
0.0 and ``tflite`` by 1.2e-7 to 7.2e-7. A broken export (variables not
restored, wrong batch norm mode, a missing preprocessing) is off by far
more: the Keras-variable copies of issue 13 gave a session error and NaN.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

_logger = logging.getLogger(__name__)

SAVED_MODEL = "saved_model"
GRAPH_SESSION = "graph_session"
TFSM_LAYER = "tfsm_layer"
HUB_KERAS_LAYER = "hub_keras_layer"
TFLITE = "tflite"
CONSUMERS = (SAVED_MODEL, GRAPH_SESSION, TFSM_LAYER, HUB_KERAS_LAYER, TFLITE)
TOLERANCE = 1e-5
# The FlatBuffer limit is 2 GiB for everything; leave room for the graph.
TFLITE_MAX_WEIGHT_BYTES = 2**31 - 2**27
# Examples in the probe batch; small, since every consumer runs it.
PROBE_BATCH = 2
# Size of an unknown (None) image height or width in the probe batch.
PROBE_SIZE = 32
PROBE_SEED = 0
CALL = "__call__"
SERVING = "serving_default"
_SIZE_LIMIT_ERROR = re.compile(r"2\s*Gi?B", re.IGNORECASE)

# Function name -> output key -> array.
Outputs = dict[str, dict[str, np.ndarray]]


class ExportParityError(ValueError):
    """A consumer of the export computes other numbers than the model."""


def probe_inputs(
    input_specs: Mapping[str, tf.TensorSpec], seed: int = PROBE_SEED
) -> dict[str, np.ndarray]:
    """Deterministic float32 inputs in [0, 1], one per input key.

    Args:
      input_specs: input key (``images``, ``patches``) -> its spec; the batch
        dimension becomes ``PROBE_BATCH`` and other unknown ones
        ``PROBE_SIZE``.
      seed: the NumPy generator's seed.

    Returns:
      Input key -> array of that shape.
    """
    rng = np.random.default_rng(seed)
    inputs = {}
    for key, spec in sorted(input_specs.items()):
        shape = [PROBE_SIZE if d is None else d for d in spec.shape.as_list()]
        shape[0] = PROBE_BATCH
        inputs[key] = rng.uniform(size=shape).astype(np.float32)
    return inputs


def compare(
    outputs: Outputs, reference: Outputs, tolerance: float = TOLERANCE
) -> tuple[float, list[str]]:
    """Compares one consumer's outputs with the reference.

    Every function and output key of ``outputs`` must be in ``reference`` with
    the same shape, and ``reference`` must cover every key of a function the
    consumer ran.

    Returns:
      ``(max_abs_diff, mismatches)``: the largest absolute difference over all
      outputs and one line per output beyond the tolerance (see the module
      docstring), e.g. ``"serving_default/block4: max |diff| 3.1e-02 >
      1e-05 x scale 12.4"``.
    """
    worst, mismatches = 0.0, []
    for function, values in sorted(outputs.items()):
        expected = reference[function]
        if sorted(values) != sorted(expected):
            mismatches.append(
                f"{function}: output keys {sorted(values)} instead of "
                f"{sorted(expected)}"
            )
            continue
        for key, value in sorted(values.items()):
            value, want = np.asarray(value), np.asarray(expected[key])
            if value.shape != want.shape:
                mismatches.append(
                    f"{function}/{key}: shape {value.shape} instead of {want.shape}"
                )
                continue
            diff = float(np.max(np.abs(value - want))) if want.size else 0.0
            if not np.isfinite(diff):
                diff = float("inf")
            worst = max(worst, diff)
            scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
            if not diff <= tolerance * scale:
                mismatches.append(
                    f"{function}/{key}: max |diff| {diff:.3g} > {tolerance:g} x "
                    f"scale {scale:.3g}"
                )
    return worst, mismatches


def _load(path: str, cache: dict[str, Any]) -> Any:
    """``tf.saved_model.load(path)``, once per ``check_parity`` call."""
    if "loaded" not in cache:
        cache["loaded"] = tf.saved_model.load(path)
    return cache["loaded"]


def run_saved_model(
    path: str, inputs: Mapping[str, np.ndarray], cache: dict[str, Any]
) -> Outputs:
    """Every signature and ``__call__`` through ``tf.saved_model.load``."""
    loaded = _load(path, cache)
    outputs = {}
    for name, signature in loaded.signatures.items():
        (key,) = signature.structured_input_signature[1]
        result = signature(**{key: tf.constant(inputs[key])})
        outputs[name] = {k: v.numpy() for k, v in result.items()}
    default = loaded(tf.constant(inputs["images"]), training=False)
    outputs[CALL] = {"default": default.numpy()}
    return outputs


def run_graph_session(
    path: str, inputs: Mapping[str, np.ndarray], cache: dict[str, Any]
) -> Outputs:
    """Every ``signature_def`` in a TF1 session on a fresh graph (TF Serving)."""
    outputs = {}
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        # TF logs the TF1 loader's deprecation as a WARNING: the point here.
        tf_logger = logging.getLogger("tensorflow")
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta_graph = tf.compat.v1.saved_model.loader.load(
                    session, [tf.saved_model.SERVING], path
                )
        finally:
            tf_logger.setLevel(level)
        for name, signature in meta_graph.signature_def.items():
            if name.startswith("__"):  # e.g. __saved_model_init_op
                continue
            feeds = {t.name: inputs[key] for key, t in signature.inputs.items()}
            fetches = {key: t.name for key, t in signature.outputs.items()}
            outputs[name] = session.run(fetches, feeds)
    return outputs


def run_tfsm_layer(
    path: str, inputs: Mapping[str, np.ndarray], cache: dict[str, Any]
) -> Outputs:
    """``serving_default`` through Keras 3 ``keras.layers.TFSMLayer``."""
    import keras

    layer = keras.layers.TFSMLayer(path, call_endpoint=SERVING)
    result = layer(inputs["images"])
    return {SERVING: {k: np.asarray(v) for k, v in result.items()}}


def run_hub_keras_layer(
    path: str, inputs: Mapping[str, np.ndarray], cache: dict[str, Any]
) -> Outputs:
    """``__call__`` through ``hub.KerasLayer(..., trainable=True)``.

    The layer wraps the object ``saved_model`` loaded when that consumer ran
    (``hub.KerasLayer(path)`` itself is ``tf.saved_model.load(path)`` and
    this wrapping), saving a second load.
    """
    import tensorflow_hub as hub

    layer = hub.KerasLayer(
        _load(path, cache) if "loaded" in cache else path, trainable=True
    )
    default = layer(tf.constant(inputs["images"]), training=False)
    return {CALL: {"default": np.asarray(default)}}


def run_tflite(
    path: str, inputs: Mapping[str, np.ndarray], cache: dict[str, Any]
) -> Outputs:
    """``serving_default`` converted to TFLite and run by its signature runner."""
    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=[SERVING])
    flatbuffer = converter.convert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation.
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    runner = interpreter.get_signature_runner(SERVING)
    result = runner(images=inputs["images"])
    return {SERVING: {k: np.asarray(v) for k, v in result.items()}}


Runner = Callable[[str, Mapping[str, np.ndarray], dict[str, Any]], Outputs]
RUNNERS: dict[str, Runner] = {
    SAVED_MODEL: run_saved_model,
    GRAPH_SESSION: run_graph_session,
    TFSM_LAYER: run_tfsm_layer,
    HUB_KERAS_LAYER: run_hub_keras_layer,
    TFLITE: run_tflite,
}


def check_consumers(consumers: Sequence[str]) -> tuple[str, ...]:
    """Validates consumer names (``CONSUMERS``); returns them as a tuple."""
    if isinstance(consumers, str):
        raise ValueError(
            f"consumers must be a sequence of names, got the string {consumers!r}."
        )
    consumers = tuple(consumers)
    unknown = [c for c in consumers if c not in RUNNERS]
    if unknown or len(set(consumers)) != len(consumers):
        raise ValueError(
            f"consumers must be distinct names from {CONSUMERS}, got {consumers}."
        )
    return consumers


def check_parity(
    path: str,
    inputs: Mapping[str, np.ndarray],
    reference: Outputs,
    *,
    consumers: Sequence[str] = CONSUMERS,
    weight_bytes: int = 0,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Runs every consumer on the export at ``path`` and compares its outputs.

    Args:
      path: the written SavedModel (any ``tf.io.gfile`` path).
      inputs: ``probe_inputs`` of the export's input specs.
      reference: the in-memory model's outputs on ``inputs``: function name
        (``serving_default``, ``representation``, ``patches``, ``__call__``)
        -> output key -> array.
      consumers: names from ``CONSUMERS`` to run, in order.
      weight_bytes: the model's variable bytes; above
        ``TFLITE_MAX_WEIGHT_BYTES`` TFLite is skipped.
      tolerance: see the module docstring.

    Returns:
      The JSON-able report stored in the export's metadata: ``tolerance``,
      ``probe`` (input shapes and seed) and ``consumers``: name ->
      ``{"status": "passed", "max_abs_diff", "seconds", "functions"}`` or
      ``{"status": "skipped", "reason"}``.

    Raises:
      ExportParityError: a consumer failed or differs beyond the tolerance;
        the message names every failing consumer, function, output key and
        difference. Raised after all consumers ran.
    """
    consumers = check_consumers(consumers)
    report: dict[str, Any] = {}
    failures = []
    cache: dict[str, Any] = {}
    for name in consumers:
        if name == TFLITE and weight_bytes > TFLITE_MAX_WEIGHT_BYTES:
            reason = (
                f"weights take {weight_bytes / 2**30:.2f} GiB, beyond what a TFLite "
                "FlatBuffer holds (2 GiB)"
            )
            _logger.warning("Parity check: skipped %s: %s.", name, reason)
            report[name] = {"status": "skipped", "reason": reason}
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            outputs = RUNNERS[name](path, inputs, cache)
        except ImportError as e:
            reason = f"not installed: {e}"
            _logger.warning("Parity check: skipped %s: %s.", name, reason)
            report[name] = {"status": "skipped", "reason": reason}
            continue
        except Exception as e:  # noqa: BLE001 - any failure fails the gate.
            if name == TFLITE and _SIZE_LIMIT_ERROR.search(str(e)):
                reason = f"the converter hit the 2 GiB FlatBuffer limit: {e}"
                _logger.warning("Parity check: skipped %s: %s", name, reason)
                report[name] = {"status": "skipped", "reason": reason[:500]}
                continue
            failures.append(f"{name}: failed: {type(e).__name__}: {e}"[:2000])
            report[name] = {"status": "failed", "error": type(e).__name__}
            continue
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        worst, mismatches = compare(outputs, reference, tolerance)
        failures += [f"{name}: {m}" for m in mismatches]
        report[name] = {
            "status": "failed" if mismatches else "passed",
            "max_abs_diff": worst,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "functions": sorted(outputs),
        }
        _logger.info(
            "Parity check: %s %s (max |diff| %.3g, %.2fs).",
            name,
            report[name]["status"],
            worst,
            seconds,
        )
    if failures:
        raise ExportParityError(
            f"The export at {path} does not compute what the model computes "
            f"(tolerance {tolerance:g} x max(1, |output|)):\n  " + "\n  ".join(failures)
        )
    return {
        "tolerance": tolerance,
        "tolerance_rule": "max |consumer - model| <= tolerance * max(1, max |model|) "
        "per output",
        "probe": {
            "seed": PROBE_SEED,
            "shapes": {k: list(v.shape) for k, v in sorted(inputs.items())},
        },
        "consumers": report,
    }
