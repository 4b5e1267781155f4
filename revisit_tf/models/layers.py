"""Shared building blocks for the trunks in ``revisit_tf.models``.

Contract: small plain functions that create *built-in* Keras layers only
(``Conv2D``, ``ZeroPadding2D``, ``BatchNormalization``), so that every trunk
built from them is an ordinary functional model that serializes with
``get_config``/``from_config`` and ``.keras`` files without custom objects.

Place in the data flow: stage 3 (models). The trunk builders (``resnet.py``;
later RevNet and VGG) call these helpers; nothing outside ``revisit_tf.models``
needs them. All tensors are NHWC (``channels_last`` is set explicitly so the
global Keras image-data-format setting cannot change the layout).

Conventions shared by all trunks (reference ``original-system.md`` section 5,
"Common building blocks", and section 6):

* convolutions have no bias; kernels use Glorot-uniform initialisation;
* batch norm uses momentum 0.99 and epsilon 1e-3 (the TF1 layer defaults);
* "fixed padding": a layer with kernel ``K`` zero-pads ``(K - 1) // 2`` before
  and the rest after on both spatial axes, then runs a ``"valid"`` op;
* weight decay ``wd`` is ``keras.regularizers.L2(wd / 2)`` on kernels only,
  because TF1's ``tf.nn.l2_loss`` carries a factor 1/2.
"""

from __future__ import annotations

import keras

# Reference section 5, "Common building blocks": TF1 layer defaults.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DATA_FORMAT = "channels_last"


def fixed_padding_amounts(kernel_size: int) -> tuple[int, int]:
    """Returns the (before, after) zero padding of "fixed padding" for a kernel.

    Reference section 5: pad ``(K - 1) // 2`` before and the rest after, i.e.
    1/1 for K = 3 and 3/3 for K = 7. Keras ``padding="same"`` with a stride of
    2 on an even-sized input instead pads 0 before and 1 after (for K = 3), so
    the sampled windows differ.

    Args:
        kernel_size: positive int ``K``.

    Returns:
        ``(before, after)`` with ``before + after == K - 1``.

    Raises:
        ValueError: if ``kernel_size`` is not a positive int.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}.")
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size}.")
    total = kernel_size - 1
    before = total // 2
    return before, total - before


def l2_regularizer(weight_decay: float) -> keras.regularizers.Regularizer | None:
    """Returns the kernel regularizer implementing the original weight decay.

    Reference section 6: each regularized kernel ``W`` adds
    ``weight_decay * sum(W**2) / 2`` to the loss (TF1 ``l2_loss`` has the
    factor 1/2), which is ``keras.regularizers.L2(weight_decay / 2)``.

    Args:
        weight_decay: non-negative float; 0 disables the regularizer.

    Returns:
        A fresh ``keras.regularizers.L2`` instance, or ``None`` when
        ``weight_decay == 0`` (so no zero-valued losses are collected).
    """
    if weight_decay == 0:
        return None
    return keras.regularizers.L2(weight_decay / 2)


def make_batchnorm(*, name: str, synchronized: bool = False) -> keras.layers.Layer:
    """Creates the trunks' batch-normalization layer.

    Args:
        name: layer name.
        synchronized: if True, ``keras.layers.BatchNormalization(
            synchronized=True)``: under a ``tf.distribute`` strategy the batch
            mean and variance are all-reduced over the replicas at each
            training step (TensorFlow backend only). Outside a strategy it
            behaves like ordinary batch norm.

    Returns:
        A ``BatchNormalization`` layer over the last (channel) axis with
        momentum 0.99 and epsilon 1e-3 (reference section 5); its scale and
        offset are not regularized (reference section 6).
    """
    return keras.layers.BatchNormalization(
        axis=-1,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        center=True,
        scale=True,
        synchronized=synchronized,
        name=name,
    )


def apply_conv(
    x: keras.KerasTensor,
    *,
    filters: int,
    kernel_size: int,
    stride: int = 1,
    name: str,
    weight_decay: float = 0.0,
    pad_name: str | None = None,
) -> keras.KerasTensor:
    """Applies a bias-free 2-D convolution with the original's fixed padding.

    A ``ZeroPadding2D`` with the fixed amounts followed by a ``"valid"``
    convolution is emitted where it matters (a stride > 1 or an even kernel)
    or where ``pad_name`` asks for it (reference section 5). Otherwise a single
    ``Conv2D`` is used: for an odd kernel at stride 1 TensorFlow's "same"
    padding is exactly ``(K-1)//2`` on both sides, identical to fixed padding,
    and a 1x1 kernel needs no padding at any stride; this saves a padding
    layer (and a copy of the activations) per unit.

    Args:
        x: input ``[N, H, W, C]``.
        filters: number of output channels ``F`` (positive int).
        kernel_size: square kernel size ``K``.
        stride: spatial stride ``s``.
        name: name of the ``Conv2D`` layer.
        weight_decay: original weight-decay factor (see ``l2_regularizer``).
        pad_name: name of the padding layer; giving one forces the explicit
            ``ZeroPadding2D`` even where "same" would be equivalent, so that a
            layer of that name always exists (used by the stems).

    Returns:
        ``[N, ceil(H / s), ceil(W / s), F]`` (for odd ``K``).
    """
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise ValueError(f"filters must be a positive int, got {filters!r}.")
    before, after = fixed_padding_amounts(kernel_size)
    if pad_name is not None:
        explicit = True
    elif before == after == 0:
        # K = 1: "valid" needs no padding at any stride and equals "same".
        explicit = False
    else:
        explicit = stride > 1 or before != after
    if explicit:
        x = keras.layers.ZeroPadding2D(
            padding=((before, after), (before, after)),
            data_format=DATA_FORMAT,
            name=pad_name or f"{name}_pad",
        )(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="valid" if explicit or kernel_size == 1 else "same",
        data_format=DATA_FORMAT,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=l2_regularizer(weight_decay),
        name=name,
    )(x)
