"""Pretext heads: builders ``head_fn(endpoints, inputs) -> outputs`` (stage 3).

Contract: a head builder is called by ``models.pretext.build_pretext_model``
with the trunk's endpoint dict (symbolic Keras tensors, rows ``[B * K, ...]``
image-major) and the batch inputs (``{"image", "label", ...}``), creates its
layers and returns a dict of outputs that always has ``logits``; other keys
(``patch_embedding``) are added to the model's outputs. Options are keyword
arguments bound in gin (``jigsaw_head.hidden = 512``). Rotation, Exemplar and
the supervised baseline need no head: the trunk's own final linear layer
(``build_trunk(num_classes=...)`` -> endpoint ``logits``, reference 4.1, 4.2,
4.5) is theirs.

Heads:

* :func:`jigsaw_head`, :func:`rel_patch_head` (reference 4.3, 4.4):
  :class:`PatchCombine` gathers, for every image and every label, the
  per-patch embeddings in the order of that label's row of a fixed table
  (Jigsaw: the permutation set ``[100, 9]``; RPL: the pairs
  ``(neighbour, centre)`` ``[8, 2]``) and concatenates them; then
  :func:`build_patch_head`: FC 4096 - BN - ReLU - dropout - FC to the number
  of classes, with its own initialisers, weight decay and BN constants.
* :func:`projection_head` (SimCLR, Chen et al. 2020): a 2-layer MLP on
  ``pre_logits``; its output ``logits`` is the projection ``z``.
* :func:`inpainting_decoder` (context encoder, Pathak et al. 2016): strided
  transposed convolutions from a trunk feature map back to the image size;
  ``logits`` is the reconstruction ``[B, H, W, C]``.

Place in the data flow: ``pp`` (labels, masks) -> trunk -> **heads** ->
``train`` (the task's loss reads ``logits``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from revisit_tf.models import layers
from revisit_tf.pp import groups as groups_lib
from revisit_tf.pp import ops_patches
from revisit_tf.pp import permutations as permutations_lib

# Reference 4.3: the AlexNet-style fc7/fc8 head of the patch tasks.
HEAD_HIDDEN = 4096
HEAD_DROPOUT = 0.5  # keep probability 0.5
HEAD_WEIGHT_DECAY = 5e-4  # fixed, not the trunk's --weight_decay (reference 6)
HEAD_BN_MOMENTUM = 0.997
HEAD_BN_EPSILON = 1e-5
HEAD_INIT_STDDEV = 0.005
HEAD_HIDDEN_BIAS = 0.1
LAYOUTS = ("interleaved", "block")


@keras.saving.register_keras_serializable(package="revisit_tf")
class PatchCombine(keras.layers.Layer):
    """Concatenates per-patch embeddings in the order given by a label's table row.

    Inputs ``(embeddings [B * P, D], labels [B, m])``: the trunk's output for
    the ``P`` patches of ``B`` images (image-major) and ``m`` labels per image
    (indices into ``table``). Output ``[B * m, k * D]`` (image-major): row
    ``b * m + j`` concatenates the embeddings of patches
    ``table[labels[b, j]]``. Reference 4.3: permuting embeddings is
    equivalent to permuting input patches because the trunk sees each patch
    alone.

    ``layout="interleaved"`` (default) puts feature ``c`` of table position
    ``q`` at index ``c * k + q``, the original's channel layout (so weights
    line up with it); ``"block"`` puts it at ``q * D + c``. The two differ
    only by a fixed permutation of the next layer's inputs.

    Example:

        combine = PatchCombine(table=[[1, 0, 2], [2, 1, 0]], num_patches=3)
        out = combine([emb, labels])  # emb [B*3, D], labels [B, m] -> [B*m, 3D]

    Args:
        table: int ``[num_classes, k]`` of patch indices in ``[0, P)``.
        num_patches: ``P`` (9 for the 3x3 grid).
        layout: ``"interleaved"`` or ``"block"``.
        record_as: if set (Jigsaw: ``"permutations"``), the table is kept in
            the training workdir as ``<record_as>.bin`` (the original binary
            format, reference 4.6) and ``<record_as>.json`` (Hamming
            statistics, SHA-256) through :meth:`workdir_files`.
    """

    def __init__(
        self,
        table: Sequence[Sequence[int]],
        num_patches: int = 9,
        layout: str = "interleaved",
        record_as: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        array = np.asarray(table)
        if (
            array.ndim != 2
            or array.size == 0
            or not np.issubdtype(array.dtype, np.integer)
        ):
            raise ValueError(
                f"PatchCombine: `table` must be an int [num_classes, k] array, got "
                f"shape {list(array.shape)} dtype {array.dtype}."
            )
        if array.min() < 0 or array.max() >= num_patches:
            raise ValueError(
                f"PatchCombine: table values must lie in [0, {num_patches}), got "
                f"[{array.min()}, {array.max()}]."
            )
        if layout not in LAYOUTS:
            raise ValueError(
                f"PatchCombine: `layout` must be one of {LAYOUTS}, got {layout!r}."
            )
        self.table = array.astype(np.int32).tolist()
        self.num_patches = int(num_patches)
        self.layout = layout
        self.record_as = record_as
        self._table = tf.constant(array, tf.int32)

    @property
    def num_classes(self) -> int:
        """Rows of the table (classes of the head)."""
        return len(self.table)

    def workdir_files(self) -> dict[str, bytes]:
        """``{record_as}.bin`` and ``.json`` (see ``record_as``), or nothing."""
        if not self.record_as:
            return {}
        table = np.asarray(self.table, np.int32)
        info = permutations_lib.describe_permutations(table)
        return {
            f"{self.record_as}.bin": permutations_lib.permutation_file_bytes(table),
            f"{self.record_as}.json": json.dumps(
                info, indent=1, sort_keys=True
            ).encode(),
        }

    def call(self, inputs):
        embeddings, labels = inputs
        dim = embeddings.shape[-1]
        k = len(self.table[0])
        per_image = tf.reshape(embeddings, [-1, self.num_patches, dim])  # [B, P, D]
        order = tf.gather(self._table, tf.cast(labels, tf.int32))  # [B, m, k]
        gathered = tf.gather(per_image, order, batch_dims=1)  # [B, m, k, D]
        if self.layout == "interleaved":
            gathered = tf.transpose(gathered, [0, 1, 3, 2])  # [B, m, D, k]
        return tf.reshape(gathered, [-1, k * dim])  # [B*m, k*D]

    def compute_output_shape(self, input_shapes):
        embeddings_shape, _ = input_shapes
        dim = embeddings_shape[-1]
        return (None, None if dim is None else len(self.table[0]) * dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "table": self.table,
                "num_patches": self.num_patches,
                "layout": self.layout,
                "record_as": self.record_as,
            }
        )
        return config


def build_patch_head(
    input_dim: int,
    num_classes: int,
    *,
    hidden: int = HEAD_HIDDEN,
    dropout: float = HEAD_DROPOUT,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    bn_momentum: float = HEAD_BN_MOMENTUM,
    bn_epsilon: float = HEAD_BN_EPSILON,
    bn_ghost_group_size: int | None = None,
    name: str = "patch_head",
) -> keras.Model:
    """The Jigsaw/RPL head of reference 4.3 (and 4.4).

    ``[N, input_dim]`` -> FC ``hidden`` (truncated normal stddev 0.005, bias
    0.1, L2 ``weight_decay``) -> BN (momentum 0.997, epsilon 1e-5) -> ReLU ->
    dropout (rate 0.5, training only) -> FC ``num_classes`` (truncated normal
    stddev 0.005, bias 0, L2 ``weight_decay``) -> logits ``[N, num_classes]``.
    Weight decay is ``L2(wd / 2)`` on kernels (TF1 ``l2_loss``, reference 6).

    Args:
        input_dim: ``k * D`` (Jigsaw: 9 x 1000; RPL: 2 x 1000).
        num_classes: 100 (Jigsaw permutations) or 8 (RPL positions).
        hidden: width of the hidden layer (4096).
        dropout: drop rate (the original's keep probability 0.5).
        weight_decay: the head's own decay (5e-4).
        bn_momentum, bn_epsilon: the head's BN constants.
        bn_ghost_group_size: None, or the BN's training statistics per group
            of that many consecutive head rows (``layers.BatchNormalization``
            ghost groups; :func:`patch_head` derives it from the trunk's).
        name: model name.

    Returns:
        A functional ``keras.Model`` ``[N, input_dim] -> [N, num_classes]``;
        trainable parameters ``input_dim * hidden + hidden`` (FC) ``+ 2 hidden``
        (BN) ``+ hidden * num_classes + num_classes``.
    """
    for what, value in (
        ("input_dim", input_dim),
        ("num_classes", num_classes),
        ("hidden", hidden),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"build_patch_head: `{what}` must be an int >= 1, got {value!r}."
            )
    if not 0 <= dropout < 1:
        raise ValueError(
            f"build_patch_head: `dropout` must be in [0, 1), got {dropout!r}."
        )
    regularizer = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
    x = inputs = keras.Input((input_dim,), name=f"{name}_input")
    x = keras.layers.Dense(
        hidden,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=HEAD_INIT_STDDEV),
        bias_initializer=keras.initializers.Constant(HEAD_HIDDEN_BIAS),
        kernel_regularizer=regularizer,
        name="fc7",
    )(x)
    if bn_ghost_group_size is None:
        bn = keras.layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon, name="fc7_bn"
        )
    else:  # the same variables, statistics per group of head rows
        bn = layers.BatchNormalization(
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            ghost_group_size=bn_ghost_group_size,
            name="fc7_bn",
        )
    x = bn(x)
    x = keras.layers.ReLU(name="fc7_relu")(x)
    x = keras.layers.Dropout(dropout, name="fc7_dropout")(x)
    x = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=HEAD_INIT_STDDEV),
        bias_initializer="zeros",
        kernel_regularizer=regularizer,
        dtype=_output_dtype(),
        name="fc8",
    )(x)
    return keras.Model(inputs, x, name=name)


def _output_dtype() -> str:
    """A head's output layer policy: float32 under a global mixed policy, else it.

    Keeps logits in float32 under mixed precision and float64 in the float64
    replica-parity tests.
    """
    return layers.head_dtype(keras.config.dtype_policy().name)


def _l2(weight_decay: float):
    """``L2(wd / 2)`` on kernels, the trunks' form of weight decay (reference 6)."""
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def patch_head(
    endpoints: dict[str, Any],
    inputs: dict[str, Any],
    *,
    table: np.ndarray | Sequence[Sequence[int]],
    hidden: int = HEAD_HIDDEN,
    dropout: float = HEAD_DROPOUT,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    layout: str = "interleaved",
    label_key: str = "label",
    record_as: str | None = None,
    ghost_group_size: int | None = None,
) -> dict[str, Any]:
    """Per-patch embeddings -> :class:`PatchCombine` -> :func:`build_patch_head`.

    Args:
        endpoints: the trunk's endpoints on the ``B * P`` patches; the
            embedding is ``logits`` (``build_trunk.num_classes``, 1000 in the
            original) or, without it, ``pre_logits``.
        inputs: the batch inputs; ``image [B, P, h, w, C]`` gives ``P`` and
            ``inputs[label_key]`` ``[B, m]`` the table rows to combine.
        table: int ``[num_classes, k]`` patch indices per class.
        hidden, dropout, weight_decay: see :func:`build_patch_head`.
        layout: concatenation layout (:class:`PatchCombine`).
        label_key: batch key of the table indices.
        record_as: see :class:`PatchCombine`.
        ghost_group_size: None, or ``G`` trunk rows (patches) per ghost group
            (``pp.groups``): the head's BN then computes its statistics over
            the head rows of the same ``G / P`` images, ``G / P * m`` rows
            (original, 8 cores: 144 patches = 16 images -> 128 head rows).

    Returns:
        ``{"logits": [B * m, num_classes], "patch_embedding": [B * P, D]}``.
    """
    image_shape = tuple(inputs["image"].shape)
    if len(image_shape) != 5:
        raise ValueError(
            "A patch head needs images [B, P, h, w, C] (crop_patches); got "
            f"{list(image_shape)}."
        )
    if label_key not in inputs:
        raise ValueError(
            f"A patch head needs the table indices in the batch as {label_key!r} "
            f"(jigsaw_perms / rel_patch_pairs); batch keys {sorted(inputs)}."
        )
    embedding = endpoints.get("logits", endpoints["pre_logits"])
    head_group_size = None
    if groups_lib.check_ghost_group_size(ghost_group_size) is not None:
        num_patches = image_shape[1]
        labels_per_image = inputs[label_key].shape[1]
        if num_patches is None or labels_per_image is None:
            raise ValueError(
                "Ghost groups in a patch head need static patch and label counts; "
                f"got image {list(image_shape)}, {label_key!r} "
                f"{list(inputs[label_key].shape)}."
            )
        if ghost_group_size % num_patches:
            raise ValueError(
                f"ghost_group_size={ghost_group_size} is not a multiple of the "
                f"{num_patches} patches per image: a group must hold whole images."
            )
        head_group_size = ghost_group_size // num_patches * labels_per_image
    combine = PatchCombine(
        table=np.asarray(table),
        num_patches=image_shape[1],
        layout=layout,
        record_as=record_as,
        name="combine",
    )
    combined = combine([embedding, inputs[label_key]])  # [B*m, k*D]
    head = build_patch_head(
        int(combined.shape[-1]),
        combine.num_classes,
        hidden=hidden,
        dropout=dropout,
        weight_decay=weight_decay,
        bn_ghost_group_size=head_group_size,
    )
    return {"logits": head(combined), "patch_embedding": embedding}


def jigsaw_head(
    endpoints: dict[str, Any],
    inputs: dict[str, Any],
    *,
    permutations: np.ndarray,
    **kwargs: Any,
) -> dict[str, Any]:
    """Jigsaw (reference 4.3): :func:`patch_head` over the permutation set.

    Args:
        endpoints, inputs: see :func:`patch_head`.
        permutations: int ``[num_permutations, 9]`` 0-based
            (``pp.permutations.get_permutations``); label ``i`` = row ``i``.
            The set is recorded in the workdir as ``permutations.{bin,json}``.
        **kwargs: further :func:`patch_head` options.
    """
    return patch_head(
        endpoints,
        inputs,
        table=np.asarray(permutations),
        record_as=kwargs.pop("record_as", "permutations"),
        **kwargs,
    )


# Reference 4.4: the (neighbour, centre) pairs, in the order of the labels
# that the pp op rel_patch_pairs writes.
REL_PATCH_TABLE = tuple(
    (i, ops_patches.CENTRE_PATCH) for i in ops_patches.REL_PATCH_NEIGHBOURS
)


def rel_patch_head(
    endpoints: dict[str, Any], inputs: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    """Relative Patch Location (reference 4.4): pairs (neighbour, centre).

    Label ``l`` concatenates the embeddings of patch ``REL_PATCH_TABLE[l][0]``
    and of the centre patch 4; the head has 8 outputs.
    """
    return patch_head(endpoints, inputs, table=np.asarray(REL_PATCH_TABLE), **kwargs)


def projection_head(
    endpoints: dict[str, Any],
    inputs: dict[str, Any],
    *,
    endpoint: str = "pre_logits",
    hidden: int | None = None,
    output_dim: int = 128,
    batch_norm: bool = True,
    weight_decay: float = 0.0,
    sync_batchnorm: bool = False,
) -> dict[str, Any]:
    """SimCLR's projection head g (Chen et al. 2020, section 2.1): a 2-layer MLP.

    ``h = endpoints[endpoint]`` ``[N, D]`` -> Dense(hidden) -> BN -> ReLU ->
    Dense(output_dim) = ``z``; the contrastive loss is computed on ``z`` and
    the representation used downstream is ``h`` (the paper's finding that
    the layer before the projection is better). The paper uses hidden = D
    (2048 for ResNet-50) and output 128.

    Args:
        endpoints: trunk endpoints; ``endpoint`` must be rank 2 ``[N, D]``.
        inputs: unused (the projections need no batch input).
        endpoint: the representation fed to the head (``pre_logits``).
        hidden: width of the hidden layer; None = D.
        output_dim: size of ``z`` (128).
        batch_norm: BN after the hidden layer (SimCLR's code; no bias then).
        weight_decay: ``L2(wd / 2)`` on both kernels (SimCLR: 1e-6 with LARS).
        sync_batchnorm: batch statistics over all replicas (SimCLR's "global
            BN", section B.1: per-device statistics let the positive pairs
            of one device be recognised by their statistics).

    Returns:
        ``{"logits": z [N, output_dim]}`` (float32).
    """
    del inputs
    h = endpoints[endpoint]
    if len(h.shape) != 2:
        raise ValueError(
            f"projection_head: endpoint {endpoint!r} must be [N, D], got "
            f"{list(h.shape)}."
        )
    hidden = int(h.shape[-1]) if hidden is None else hidden
    for what, value in (("hidden", hidden), ("output_dim", output_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"projection_head: `{what}` must be an int >= 1, got {value!r}."
            )
    x = keras.layers.Dense(
        hidden,
        use_bias=not batch_norm,
        kernel_regularizer=_l2(weight_decay),
        name="projection_hidden",
    )(h)
    if batch_norm:
        x = layers.make_batchnorm(name="projection_bn", synchronized=sync_batchnorm)(x)
    x = keras.layers.ReLU(name="projection_relu")(x)
    z = keras.layers.Dense(
        output_dim,
        kernel_regularizer=_l2(weight_decay),
        dtype=_output_dtype(),
        name="projection",
    )(x)
    return {"logits": z}


def inpainting_decoder(
    endpoints: dict[str, Any],
    inputs: dict[str, Any],
    *,
    endpoint: str = "block4",
    filters: Sequence[int] | None = None,
    weight_decay: float = 1e-4,
    image_key: str = "image",
    sync_batchnorm: bool = False,
) -> dict[str, Any]:
    """Context-encoder decoder (Pathak et al. 2016, section 3.1), made small.

    From the trunk feature map ``endpoints[endpoint]`` ``[N, h, w, c]``,
    ``n = ceil(log2(H / h))`` stages of 4x4 transposed convolution with
    stride 2 - BN - ReLU upsample it to at least the image size ``H x W``;
    a bilinear resize to exactly ``H x W`` (when the trunk's ceil strides
    overshoot, e.g. 28 px -> 2x2 -> 32 px) and a linear 3x3 convolution to
    the image's ``C`` channels give the reconstruction. The original's
    decoder has five up-convolutions after a channel-wise fully connected
    layer; here the trunk is the encoder and the decoder is only as deep as
    the stride demands.

    Args:
        endpoints: trunk endpoints; ``endpoint`` is a rank-4 map.
        inputs: the batch inputs; ``inputs[image_key]`` ``[B, H, W, C]``
            gives the output size.
        endpoint: the feature map to decode (``block4``: the deepest, so the
            representation must carry the context).
        filters: channels of each up-sampling stage; None halves from
            ``min(c // 2, 512)`` down to at least 16.
        weight_decay: ``L2(wd / 2)`` on the decoder kernels.
        image_key: batch key of the (masked) input image.
        sync_batchnorm: batch statistics over all replicas.

    Returns:
        ``{"logits": reconstruction [B, H, W, C]}`` (float32, linear).
    """
    x = endpoints[endpoint]
    if len(x.shape) != 4 or any(d is None for d in x.shape[1:]):
        raise ValueError(
            f"inpainting_decoder: endpoint {endpoint!r} must be a static feature "
            f"map [N, h, w, c], got {list(x.shape)}."
        )
    image_shape = tuple(inputs[image_key].shape[1:])
    if len(image_shape) != 3 or any(d is None for d in image_shape):
        raise ValueError(
            "inpainting_decoder: the input image must be a static [H, W, C] per "
            f"example, got {list(image_shape)}."
        )
    height, width, channels = image_shape
    stages = max(0, math.ceil(math.log2(max(height / x.shape[1], width / x.shape[2]))))
    if filters is None:
        first = min(int(x.shape[-1]) // 2, 512)
        filters = [max(16, first // 2**i) for i in range(stages)]
    filters = list(filters)
    if len(filters) != stages:
        raise ValueError(
            f"inpainting_decoder: {endpoint!r} is {x.shape[1]}x{x.shape[2]} and the "
            f"image {height}x{width}, which takes {stages} up-sampling stages; got "
            f"filters={filters}."
        )
    for i, f in enumerate(filters):
        x = keras.layers.Conv2DTranspose(
            f,
            4,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_regularizer=_l2(weight_decay),
            name=f"decoder_up{i + 1}",
        )(x)
        x = layers.make_batchnorm(
            name=f"decoder_up{i + 1}_bn", synchronized=sync_batchnorm
        )(x)
        x = keras.layers.ReLU(name=f"decoder_up{i + 1}_relu")(x)
    if tuple(x.shape[1:3]) != (height, width):
        x = keras.layers.Resizing(height, width, name="decoder_resize")(x)
    x = keras.layers.Conv2D(
        channels,
        3,
        padding="same",
        kernel_regularizer=_l2(weight_decay),
        dtype=_output_dtype(),
        name="decoder_output",
    )(x)
    return {"logits": x}
