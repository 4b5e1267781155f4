"""Pretext models: trunk + head assembled into one Keras model (stage 3).

Contract:

* Rotation, Exemplar, supervised: the trunk itself is the pretext model
  (``build_trunk(num_classes=4 | embed_dim | 1000)``; its ``logits`` endpoint
  is the head, reference 4.1, 4.2, 4.5).
* Jigsaw and Relative Patch Location (reference 4.3, 4.4):
  :func:`build_jigsaw_model` / :func:`build_rel_patch_model` return a
  functional model with inputs ``{"image": [B, P, h, w, C], "label": [B, m]}``
  (``P = 9`` patches from ``crop_patches``; ``m`` labels written by the ``pp``
  ops ``jigsaw_perms`` / ``rel_patch_pairs``) and outputs
  ``{"logits": [B * m, num_classes], "patch_embedding": [B * P, D],
  "after_root", "block1".."block4", "pre_logits": per-patch endpoints
  [B * P, ...]}``. The trunk is applied to the ``B * P`` patches with shared
  weights (it is one nested model, see :func:`get_trunk`); the head
  (``models.heads``) combines the embeddings per label.
* The training loop feeds such a model the batch dict (it has a ``label``
  input) and averages the loss over the ``B * m`` rows.

Place in the data flow: ``pp`` -> **models.pretext** -> ``train``; the export
takes :func:`get_trunk` of the restored model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from revisit_tf.models import heads

REL_PATCH_TABLE = tuple((i, 4) for i in (0, 1, 2, 3, 5, 6, 7, 8))  # reference 4.4
NUM_PATCHES = 9


def build_patch_model(
    input_shape: Sequence[int | None],
    *,
    trunk_fn: Callable[..., keras.Model],
    table: np.ndarray | Sequence[Sequence[int]],
    num_patches: int = NUM_PATCHES,
    hidden: int = heads.HEAD_HIDDEN,
    dropout: float = heads.HEAD_DROPOUT,
    head_weight_decay: float = heads.HEAD_WEIGHT_DECAY,
    layout: str = "interleaved",
    name: str = "patch_model",
) -> keras.Model:
    """Trunk on every patch + :class:`heads.PatchCombine` + patch head.

    Args:
        input_shape: ``(h, w, C)`` of ONE patch (what ``pretrain`` passes: the
            last three axes of the pp output ``[P, h, w, C]``).
        trunk_fn: builder called as ``trunk_fn(input_shape=(h, w, C))``; bind
            its options in gin (``build_trunk.patch_variant = True``,
            ``build_trunk.num_classes = 1000`` for the per-patch embedding).
        table: int ``[num_classes, k]`` patch indices per class.
        num_patches: ``P``.
        hidden, dropout, head_weight_decay: see ``heads.build_patch_head``.
        layout: concatenation layout (``heads.PatchCombine``).
        name: model name.

    Returns:
        The pretext model described in the module docstring.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be the (h, w, C) of one patch, got {input_shape}."
        )
    trunk = trunk_fn(input_shape=input_shape)
    image = keras.Input((num_patches, *input_shape), name="image")
    label = keras.Input((None,), dtype="int32", name="label")
    patches = keras.ops.reshape(image, (-1, *input_shape))  # [B*P, h, w, C]
    endpoints = dict(trunk(patches))
    embedding = endpoints.pop("logits", None)
    if embedding is None:
        embedding = endpoints["pre_logits"]
    combine = heads.PatchCombine(
        table=np.asarray(table), num_patches=num_patches, layout=layout, name="combine"
    )
    combined = combine([embedding, label])  # [B*m, k*D]
    head = heads.build_patch_head(
        int(combined.shape[-1]),
        combine.num_classes,
        hidden=hidden,
        dropout=dropout,
        weight_decay=head_weight_decay,
    )
    outputs = {"logits": head(combined), "patch_embedding": embedding, **endpoints}
    return keras.Model({"image": image, "label": label}, outputs, name=name)


def build_jigsaw_model(
    input_shape: Sequence[int | None],
    *,
    trunk_fn: Callable[..., keras.Model],
    permutations: np.ndarray,
    **kwargs,
) -> keras.Model:
    """Jigsaw (reference 4.3): :func:`build_patch_model` with the permutation set.

    Args:
        input_shape: ``(h, w, C)`` of one patch.
        trunk_fn: the trunk builder (see :func:`build_patch_model`).
        permutations: int ``[num_permutations, 9]`` 0-based
            (``pp.permutations.get_permutations``); label ``i`` = row ``i``.
        **kwargs: head options of :func:`build_patch_model`.
    """
    perms = np.asarray(permutations)
    return build_patch_model(
        input_shape,
        trunk_fn=trunk_fn,
        table=perms,
        num_patches=perms.shape[-1],
        name=kwargs.pop("name", "jigsaw"),
        **kwargs,
    )


def build_rel_patch_model(
    input_shape: Sequence[int | None],
    *,
    trunk_fn: Callable[..., keras.Model],
    **kwargs,
) -> keras.Model:
    """Relative Patch Location (reference 4.4): pairs (neighbour, centre).

    Label ``l`` concatenates the embeddings of patch ``REL_PATCH_TABLE[l][0]``
    and of the centre patch 4; the head has 8 outputs.
    """
    return build_patch_model(
        input_shape,
        trunk_fn=trunk_fn,
        table=np.asarray(REL_PATCH_TABLE),
        name=kwargs.pop("name", "rel_patch_location"),
        **kwargs,
    )


def get_trunk(model: keras.Model) -> keras.Model:
    """The trunk of a pretext model: its nested model, or ``model`` itself.

    Rotation/Exemplar/supervised models are trunks; patch models hold the
    trunk as their only nested ``keras.Model`` (the head is the other one,
    named ``patch_head``).
    """
    nested = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and not layer.name.endswith("patch_head")
    ]
    if len(nested) > 1:
        raise ValueError(
            f"Model {model.name!r} holds several nested models "
            f"{[m.name for m in nested]}; cannot tell which is the trunk."
        )
    return nested[0] if nested else model


def get_table(model: keras.Model) -> np.ndarray | None:
    """The ``PatchCombine`` table of a patch model (the Jigsaw permutations)."""
    for layer in model.layers:
        if isinstance(layer, heads.PatchCombine):
            return np.asarray(layer.table, np.int32)
    return None
