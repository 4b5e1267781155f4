"""VGG19 with batch norm, widening factor k, as in the 2019 release.

Contract: ``build_vgg19(...)`` returns a Keras functional model mapping
``image [N, H, W, C]`` (H, W static) to the endpoints

* ``block1`` .. ``block5``  ``[N, H / 2**(i-1), W / 2**(i-1), c_i]`` with
  ``c = (w, 2w, 4w, 8w, 8w)``, ``w = 8k`` (before each block's max pool),
* ``fc6``  ``[N, 1, 1, 512k]`` (a convolution whose kernel spans the map left
  after the fifth pool),
* ``pre_logits``  ``[N, 512k]`` (fc7, a 1x1 convolution), and ``logits``
  ``[N, num_classes]`` when asked.

Architecture (reference ``original-system.md`` 5.3): blocks of 2, 2, 4, 4, 4
3x3 "same" convolutions (no bias) + BN + ReLU, each block followed by a 2x2/2
max pool; fc6 = conv with kernel equal to the remaining spatial size, ``512k``
filters, "valid", BN, ReLU; fc7 = 1x1 conv ``512k``, BN, ReLU; logits = dense
with bias. No dropout (BN replaces it). VGG has no ``after_root`` endpoint and
no patch-task stride changes. 36,952,264 trainable parameters at k = 4, 224 px,
1000 classes (reference 5.4); k = 8 is the standard VGG19 width (64 .. 512,
fc 4096).

Two choices beyond the release, both identical to it for every input size the
paper uses (multiples of 32, e.g. 224 and 64):

* ``pool_padding="same"`` (default): a max pool on an odd-sized map keeps the
  last row/column instead of dropping it, so small inputs such as 28 px
  Fashion-MNIST work (28 -> 14 -> 7 -> 4 -> 2 -> 1). On even sizes "same" and
  the original's "valid" pools are the same operation; ``pool_padding="valid"``
  reproduces the original's flooring for other sizes.
* ``pre_logits`` is the fc7 output squeezed to ``[N, 512k]`` (the original
  returns it as ``[N, 1, 1, 512k]``), so every trunk's ``pre_logits`` has the
  same rank for heads, export and probes; ``fc6`` keeps its rank-4 shape.

Place in the data flow: stage 3 (models), selected by
``build_trunk(architecture="vgg19")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from revisit_tf.models import checks
from revisit_tf.models.layers import (
    DATA_FORMAT,
    apply_logits,
    as_endpoint,
    check_data_format,
    check_dtype_policy,
    head_dtype,
    l2_regularizer,
    make_batchnorm,
    to_layout,
)

# Reference 5.3: (convolutions, channels in units of w = 8k) per block.
VGG19_BLOCKS = ((2, 1), (2, 2), (4, 4), (4, 8), (4, 8))
_W_PER_K = 8
_FC_CHANNELS_PER_K = 512
POOL_PADDINGS = ("same", "valid")


def build_vgg19(
    *,
    width: float = 8,
    num_classes: int | None = None,
    input_shape: Sequence[int | None] = (224, 224, 3),
    weight_decay: float = 1e-4,
    sync_batchnorm: bool = False,
    ghost_group_size: int | None = None,
    pool_padding: str = "same",
    data_format: str = DATA_FORMAT,
    dtype_policy: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds VGG19-BN (reference 5.3) with widening factor k.

    Args:
        width: widening factor k (``w = 8k``; 8 is the standard VGG19); ``8k``
            must be a positive integer.
        num_classes: size of the ``logits`` layer, or None.
        input_shape: ``(H, W, C)`` with H and W known (fc6's kernel spans the
            final map: 7x7 at 224 px, 2x2 at 64 px).
        weight_decay: ``L2(weight_decay / 2)`` on every kernel. The original
            function's own default is 5e-4, but its factory always passes the
            flag value 1e-4 (reference 5.3), which is the default here.
        sync_batchnorm: batch statistics all-reduced across replicas.
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        pool_padding: ``"same"`` (default) or ``"valid"`` (see the module
            docstring; identical for sizes divisible by 32).
        data_format: layout inside the trunk (inputs/endpoints stay NHWC).
        dtype_policy: None (float32), ``mixed_float16`` or ``mixed_bfloat16``;
            the logits and the endpoints stay float32.
        name: model name (default ``"vgg19"``).

    Returns:
        A functional ``keras.Model`` with input ``image`` and the endpoints of
        the module docstring.

    Raises:
        ValueError: for a malformed argument, or an input too small for five
            pools with ``pool_padding="valid"``.
    """
    counts = checks.scaled_channels(
        width, [("block1", _W_PER_K), ("fc6", _FC_CHANNELS_PER_K)]
    )
    w = counts["block1"]
    num_classes = checks.check_num_classes(num_classes)
    input_shape = checks.check_input_shape(input_shape, static=True)
    weight_decay = checks.check_weight_decay(weight_decay)
    if pool_padding not in POOL_PADDINGS:
        raise ValueError(
            f"pool_padding must be one of {POOL_PADDINGS}, got {pool_padding!r}."
        )
    data_format = check_data_format(data_format)
    dtype = check_dtype_policy(dtype_policy)
    name = checks.check_name(name, "vgg19")
    layout = {"data_format": data_format, "dtype": dtype}

    def conv_bn_relu(x, filters, kernel, name, padding="same"):
        x = keras.layers.Conv2D(
            filters,
            kernel,
            padding=padding,
            data_format=data_format,
            use_bias=False,
            kernel_initializer="glorot_uniform",
            kernel_regularizer=l2_regularizer(weight_decay),
            dtype=dtype,
            name=f"{name}_conv",
        )(x)
        x = make_batchnorm(
            name=f"{name}_bn",
            synchronized=sync_batchnorm,
            ghost_group_size=ghost_group_size,
            **layout,
        )(x)
        return keras.layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)

    inputs = keras.Input(shape=input_shape, name="image")  # [N, H, W, C]
    x = to_layout(inputs, **layout)
    height, width_px = input_shape[:2]
    endpoints = {}
    for i, (num_convs, mult) in enumerate(VGG19_BLOCKS, start=1):
        for j in range(1, num_convs + 1):
            x = conv_bn_relu(x, w * mult, 3, f"block{i}_{j}")
        endpoints[f"block{i}"] = as_endpoint(x, name=f"block{i}", **layout)
        height, width_px = (
            _pooled(height, pool_padding),
            _pooled(width_px, pool_padding),
        )
        if min(height, width_px) < 1:
            raise ValueError(
                f"input_shape {input_shape} is too small for VGG19's five 2x2 "
                f"pools with pool_padding={pool_padding!r} (the map is empty "
                f"after block{i}); use at least 32 px or pool_padding='same'."
            )
        x = keras.layers.MaxPooling2D(
            pool_size=2,
            strides=2,
            padding=pool_padding,
            data_format=data_format,
            dtype=dtype,
            name=f"block{i}_pool",
        )(x)

    # fc6: kernel = remaining spatial size (7x7 at 224 px, 2x2 at 64 px).
    x = conv_bn_relu(x, counts["fc6"], (height, width_px), "fc6", padding="valid")
    endpoints["fc6"] = as_endpoint(x, name="fc6", **layout)  # [N, 1, 1, 512k]
    x = conv_bn_relu(x, counts["fc6"], 1, "fc7")  # [N, 1, 1, 512k]
    pooled = keras.layers.Flatten(
        data_format=data_format, dtype=head_dtype(dtype), name="pre_logits"
    )(x)
    endpoints["pre_logits"] = pooled  # [N, 512k]
    if num_classes is not None:
        endpoints["logits"] = apply_logits(
            pooled, num_classes=num_classes, weight_decay=weight_decay, dtype=dtype
        )  # [N, num_classes]
    return keras.Model(inputs=inputs, outputs=endpoints, name=name)


def _pooled(size: int, padding: str) -> int:
    """Output size of a 2x2/2 max pool."""
    return -(-size // 2) if padding == "same" else size // 2
