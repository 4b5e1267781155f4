"""Pretext heads on top of a trunk (stage 3, ``models``).

Contract: the Rotation, Exemplar and supervised heads are the trunk's own
final linear layer (``build_trunk(num_classes=...)`` -> endpoint ``logits``,
reference 4.1, 4.2, 4.5), so nothing lives here for them. The patch tasks
(Jigsaw, Relative Patch Location, reference 4.3, 4.4) share one head:

1. :class:`PatchCombine` gathers, for every image and every label, the
   per-patch embeddings in the order of that label's row of a fixed table
   (Jigsaw: the permutation set ``[100, 9]``; RPL: the pairs
   ``(neighbour, centre)`` ``[8, 2]``) and concatenates them;
2. :func:`build_patch_head`: FC 4096 - BN - ReLU - dropout - FC to the number
   of classes, with its own initialisers, weight decay and BN constants.

Place in the data flow: ``models.pretext`` wires trunk -> ``PatchCombine`` ->
``build_patch_head``; the training loop feeds the ``label`` written by the
``pp`` ops ``jigsaw_perms`` / ``rel_patch_pairs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

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
    """

    def __init__(
        self,
        table: Sequence[Sequence[int]],
        num_patches: int = 9,
        layout: str = "interleaved",
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
        self._table = tf.constant(array, tf.int32)

    @property
    def num_classes(self) -> int:
        """Rows of the table (classes of the head)."""
        return len(self.table)

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
    x = keras.layers.BatchNormalization(
        momentum=bn_momentum, epsilon=bn_epsilon, name="fc7_bn"
    )(x)
    x = keras.layers.ReLU(name="fc7_relu")(x)
    x = keras.layers.Dropout(dropout, name="fc7_dropout")(x)
    x = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=HEAD_INIT_STDDEV),
        bias_initializer="zeros",
        kernel_regularizer=regularizer,
        dtype="float32",
        name="fc8",
    )(x)
    return keras.Model(inputs, x, name=name)
