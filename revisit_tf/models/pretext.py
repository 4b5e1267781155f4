"""The one assembler of every pretext model: trunk + optional head (stage 3).

Contract (README "Adding a pretext task"):

* :func:`build_pretext_model` takes the per-example spec of the training
  batch (``{"image": [K, H, W, C] or [H, W, C], "label": ..., ...}``, what
  ``pp`` made, without the batch axis) and builds a functional
  ``keras.Model`` whose input is the whole batch dict, one ``keras.Input``
  per key, so the loop calls ``model(batch)`` and never chooses inputs.
* Inside the model the views (rotated copies, crops, patches) are flattened
  image-major, ``image [B, K, H, W, C] -> [B * K, H, W, C]``: the one place
  this happens (reference 4.1-4.4). The trunk, built by
  ``trunk_fn(input_shape=(H, W, C))``, is nested under the fixed name
  :data:`TRUNK_NAME`; the loop checkpoints it under that name and the export
  restores it alone (:func:`get_trunk`), never by searching layer names.
* ``head_fn(endpoints, inputs) -> {"logits": ..., ...}`` (``models.heads``)
  receives the trunk's endpoint dict (rows ``[B * K, ...]``) and the batch
  inputs (e.g. Jigsaw's permutation ``label``), and returns its outputs. Without
  a head the trunk's own ``logits`` endpoint is the head (Rotation,
  Exemplar, supervised: the trunk's final linear layer, reference 4.1, 4.2,
  4.5).
* Output: ``{**trunk endpoints, **head outputs}``; it always has ``logits``.
  Losses and metrics (``train.losses``) read it with the batch.

Layers of the model may describe files to keep in the training workdir by
defining ``workdir_files() -> {name: bytes}`` (the Jigsaw permutation set);
:func:`workdir_files` collects them for the ``pretrain`` root.

Place in the data flow: ``pp`` -> **models.pretext** -> ``train``; the export
builds the trunk alone and restores it from the checkpoint's ``trunk``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

_logger = logging.getLogger(__name__)

TRUNK_NAME = "trunk"

# head_fn(endpoints, inputs) -> outputs, on symbolic (Keras) tensors.
HeadFn = Callable[[dict[str, Any], dict[str, Any]], Mapping[str, Any]]


def example_spec(batch_spec: Mapping[str, tf.TensorSpec]) -> dict[str, tf.TensorSpec]:
    """The per-example spec of a batched element spec (drops axis 0).

    Args:
        batch_spec: ``dataset.element_spec`` of per-replica batches, e.g.
            ``{"image": TensorSpec([B, 4, 28, 28, 1]), "label": ([B, 4])}``.

    Returns:
        ``{key: TensorSpec(shape[1:], dtype)}``.
    """
    out = {}
    for key, spec in batch_spec.items():
        if not isinstance(spec, tf.TensorSpec) or spec.shape.rank in (None, 0):
            raise ValueError(
                f"Batch entry {key!r} must be a batched tensor, got {spec!r}; keep "
                "only tensors in the training pipeline (e.g. keep('image', 'label'))."
            )
        out[key] = tf.TensorSpec(spec.shape[1:], spec.dtype, name=key)
    return out


def build_pretext_model(
    input_spec: Mapping[str, tf.TensorSpec | tuple[Sequence[int | None], Any]],
    *,
    trunk_fn: Callable[..., keras.Model],
    head_fn: HeadFn | None = None,
    name: str = "pretext",
) -> keras.Model:
    """Builds a pretext model: batch dict -> ``{"logits", ..., **endpoints}``.

    Example:

        spec = {"image": tf.TensorSpec([4, 28, 28, 1]),
                "label": tf.TensorSpec([4], tf.int32)}
        model = build_pretext_model(
            spec, trunk_fn=functools.partial(build_trunk, "resnet50_v1",
                                             num_classes=4))
        out = model({"image": x, "label": y})  # out["logits"]: [B * 4, 4]

    Args:
        input_spec: per-example shape and dtype of every batch key
            (``example_spec`` of the training dataset), as ``tf.TensorSpec``
            or ``(shape, dtype)``; ``image`` must be ``[..., H, W, C]``
            with a known channel count.
        trunk_fn: trunk builder called as ``trunk_fn(input_shape=(H, W, C))``
            (bind its options in gin, e.g. ``build_trunk.num_classes``);
            returns a model whose output is a dict of endpoints.
        head_fn: optional head builder (``models.heads``) called as
            ``head_fn(endpoints, inputs)``; it must return a dict with
            ``logits``. None: the trunk's ``logits`` endpoint is the head.
        name: model name (the task, e.g. ``"rotation"``).

    Returns:
        The functional model; its nested trunk is named :data:`TRUNK_NAME`.

    Raises:
        ValueError: a malformed spec, a trunk without a dict of endpoints, or
            no ``logits`` output.
    """
    specs = {k: _as_spec(k, v) for k, v in input_spec.items()}
    if "image" not in specs:
        raise ValueError(
            f"input_spec needs an 'image' entry; got keys {sorted(specs)}."
        )
    image_shape = tuple(specs["image"].shape.as_list())
    if len(image_shape) < 3 or image_shape[-1] is None:
        raise ValueError(
            "input_spec['image'] must be [H, W, C] or [K, ..., H, W, C] with C "
            f"known; got {list(image_shape)}."
        )
    inputs = {
        key: keras.Input(tuple(spec.shape.as_list()), dtype=spec.dtype.name, name=key)
        for key, spec in sorted(specs.items())
    }
    trunk_shape = image_shape[-3:]
    images = inputs["image"]
    if len(image_shape) > 3:  # [B, K, ..., H, W, C] -> [B * K * ..., H, W, C]
        images = keras.ops.reshape(images, (-1, *trunk_shape))
    trunk = trunk_fn(input_shape=trunk_shape)
    _logger.info(
        "Pretext model %r: trunk %s on %s inputs, nested as %r; head %s.",
        name,
        trunk.name,
        "x".join(str(d) for d in trunk_shape),
        TRUNK_NAME,
        _callable_name(head_fn),
    )
    trunk.name = TRUNK_NAME
    endpoints = trunk(images)
    if not isinstance(endpoints, Mapping):
        raise ValueError(
            f"trunk_fn must build a model whose output is a dict of endpoints; "
            f"got {type(endpoints).__name__}."
        )
    outputs = dict(endpoints)
    if head_fn is not None:
        head_outputs = head_fn(dict(endpoints), dict(inputs))
        if not isinstance(head_outputs, Mapping):
            raise ValueError(
                f"head_fn must return a dict of outputs, got "
                f"{type(head_outputs).__name__}."
            )
        outputs.update(head_outputs)
    if "logits" not in outputs:
        raise ValueError(
            f"The pretext model has no 'logits' output (outputs {sorted(outputs)}): "
            "give the trunk a final layer (build_trunk.num_classes) or a head_fn."
        )
    return keras.Model(inputs, outputs, name=name)


def _callable_name(fn: Callable | None) -> str:
    """``jigsaw_head`` for a function, a gin configurable or a partial of one."""
    if fn is None:
        return "none (the trunk's logits)"
    return getattr(fn, "__name__", None) or _callable_name(getattr(fn, "func", None))


def _as_spec(key: str, value: Any) -> tf.TensorSpec:
    if isinstance(value, tf.TensorSpec):
        spec = value
    else:
        try:
            shape, dtype = value
            spec = tf.TensorSpec(shape, tf.as_dtype(dtype))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"input_spec[{key!r}] must be a tf.TensorSpec or (shape, dtype), "
                f"got {value!r}."
            ) from e
    if spec.shape.rank is None or not (
        spec.dtype.is_floating or spec.dtype.is_integer or spec.dtype.is_bool
    ):
        raise ValueError(
            f"input_spec[{key!r}] must have a known rank and a numeric dtype, got "
            f"{spec}."
        )
    return spec


def get_trunk(model: keras.Model) -> keras.Model:
    """The trunk of a pretext model: its nested model named :data:`TRUNK_NAME`."""
    try:
        trunk = model.get_layer(TRUNK_NAME)
    except ValueError:
        trunk = None
    if not isinstance(trunk, keras.Model):
        raise ValueError(
            f"Model {model.name!r} has no nested trunk named {TRUNK_NAME!r}; build "
            "pretext models with models.pretext.build_pretext_model."
        )
    return trunk


def workdir_files(model: keras.Model) -> dict[str, bytes]:
    """Files that layers of ``model`` ask to keep in the workdir, by name.

    Any layer (at any nesting depth) with a ``workdir_files()`` method
    contributes its ``{file name: bytes}``; two layers naming the same file
    is an error.
    """
    files: dict[str, bytes] = {}

    def visit(layer: keras.layers.Layer) -> None:
        method = getattr(layer, "workdir_files", None)
        if callable(method):
            for file_name, data in method().items():
                if file_name in files:
                    raise ValueError(
                        f"Two layers of {model.name!r} write {file_name!r}."
                    )
                files[file_name] = data
        for child in getattr(layer, "layers", ()):
            visit(child)

    for layer in model.layers:
        visit(layer)
    return files
