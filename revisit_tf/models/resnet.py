"""ResNet50 trunks (v1 and v2) with a widening factor k, as in the 2019 release.

Contract: ``build_resnet(...)`` returns a Keras *functional* model mapping an
NHWC float image batch ``image [N, H, W, C]`` to a dict of endpoints

* ``after_root``  ``[N, ceil(H/(2*s0)), ceil(W/(2*s0)), 16k]`` (after the stem
  max pool; ``s0`` = stem stride),
* ``block1`` .. ``block4``  ``[N, h_i, w_i, 64k * 2**(i-1)]`` (output of the last
  unit of each stage; ``h_i = ceil(h_{i-1} / strides[i-1])``),
* ``pre_logits``  ``[N, 512k]`` (global average pool),
* ``logits``  ``[N, num_classes]`` (only when ``num_classes`` is given).

Place in the data flow: stage 3 (models). The pretext assembler puts a head on
these endpoints; training reads ``model.losses`` for weight decay; the export
stage serves the same endpoint dict; the linear probe trains on the endpoints
by name.

The architecture follows reference ``original-system.md`` section 5.1 (stem,
stages, bottleneck v1 and v2 units, head), 5.4 (endpoint shapes, parameter
counts), 11.2 items 19-20 (zero-padded stem pool, "(-)" variants) and section 6
(weight decay). Only built-in Keras layers are used, so models round trip
through ``get_config``/``from_config`` and ``.keras`` files without custom
objects. The versions differ in the unit function (``_UNIT_FNS``), the stem
(``_apply_root``: v2 has no BN/ReLU after the 7x7 conv) and the head
(``_apply_head``: v2 adds BN and an optional ReLU after ``block4``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np

from revisit_tf.models import checks
from revisit_tf.models.layers import (
    DATA_FORMAT,
    apply_conv,
    apply_logits,
    apply_stem_pool,
    as_endpoint,
    channel_axis,
    check_data_format,
    check_dtype_policy,
    head_dtype,
    make_batchnorm,
    to_layout,
)

# Endpoint names of the paper code (reference section 5.4), in data-flow order.
ENDPOINTS = ("after_root", "block1", "block2", "block3", "block4", "pre_logits")
# Reference 5.1: ResNet50 has 3, 4, 6, 3 bottleneck units per stage.
RESNET50_UNITS = (3, 4, 6, 3)
# Reference 5.1: stage 1 stride 1, then 2, 2, 2 ((2, 2, 1) for patch tasks).
DEFAULT_STRIDES = (1, 2, 2, 2)
PATCH_STRIDES = (1, 2, 2, 1)
# Reference 5.1 channel counts, in units of the widening factor k.
_STEM_CHANNELS_PER_K = 16
_STAGE_CHANNELS_PER_K = (64, 128, 256, 512)
# Reference 5.1: bottleneck width = stage output channels / 4.
_BOTTLENECK_DIVISOR = 4


def apply_bottleneck_v1(
    x: keras.KerasTensor,
    *,
    filters: int,
    stride: int,
    name: str,
    weight_decay: float = 1e-4,
    sync_batchnorm: bool = False,
    ghost_group_size: int | None = None,
    data_format: str = DATA_FORMAT,
    dtype: str | None = None,
) -> keras.KerasTensor:
    """Applies one ResNet v1 bottleneck unit (reference section 5.1).

    Shortcut: identity, unless ``stride > 1`` or the input channel count differs
    from ``filters``, in which case a 1x1 convolution (``filters``, stride
    ``stride``) + BN. Main path: 1x1 conv to ``filters / 4`` + BN + ReLU; 3x3
    conv to ``filters / 4`` with stride ``stride`` and fixed padding 1/1 + BN +
    ReLU; 1x1 conv to ``filters`` + BN. Output: ReLU(main + shortcut). The
    stride sits on the 3x3 convolution ("ResNet v1.5" placement).

    Layer names: ``{name}_proj_conv``, ``{name}_proj_bn`` (projection only),
    ``{name}_conv{1,2,3}``, ``{name}_bn{1,2,3}``, ``{name}_relu{1,2}``,
    ``{name}_conv2_pad`` (strided units only), ``{name}_add``, ``{name}_out``.

    Args:
        x: input ``[N, H, W, C]`` with a known channel count ``C``.
        filters: output channels ``F``, a positive multiple of 4.
        stride: stride ``s`` of the 3x3 conv and of the projection.
        name: prefix of all layer names, e.g. ``"block2_unit1"``.
        weight_decay: original weight-decay factor; every kernel gets
            ``L2(weight_decay / 2)`` (reference section 6).
        sync_batchnorm: use synchronized batch norm across replicas.
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        data_format: layout of ``x`` (shapes here are written NHWC).
        dtype: Keras dtype policy name (None: float32).

    Returns:
        ``[N, ceil(H / s), ceil(W / s), F]``.

    Raises:
        ValueError: if ``filters`` is not a positive multiple of 4, ``stride``
            is not a positive int, or ``C`` is unknown.
    """
    in_channels, inner = _check_unit_args(
        x, filters=filters, stride=stride, name=name, data_format=data_format
    )

    bn, conv, relu = _unit_layer_fns(
        name,
        weight_decay=weight_decay,
        sync_batchnorm=sync_batchnorm,
        ghost_group_size=ghost_group_size,
        data_format=data_format,
        dtype=dtype,
    )

    if stride > 1 or in_channels != filters:
        shortcut = conv(x, "proj_conv", filters=filters, kernel_size=1, stride=stride)
        shortcut = bn(shortcut, "proj_bn")
    else:
        shortcut = x

    y = _apply_bottleneck_main(
        x,
        inner=inner,
        filters=filters,
        stride=stride,
        bn=bn,
        conv=conv,
        relu=relu,
    )
    y = bn(y, "bn3")
    y = keras.layers.Add(dtype=dtype, name=f"{name}_add")([y, shortcut])
    return relu(y, "out")


def apply_bottleneck_v2(
    x: keras.KerasTensor,
    *,
    filters: int,
    stride: int,
    name: str,
    weight_decay: float = 1e-4,
    sync_batchnorm: bool = False,
    ghost_group_size: int | None = None,
    data_format: str = DATA_FORMAT,
    dtype: str | None = None,
) -> keras.KerasTensor:
    """Applies one ResNet v2 (pre-activation) bottleneck unit (reference 5.1).

    ``a = ReLU(BN(x))``. Shortcut: the raw input ``x``, unless ``stride > 1``
    or the input channel count differs from ``filters``, in which case a 1x1
    convolution (``filters``, stride ``stride``, no BN) applied to ``a``. Main
    path on ``a``: 1x1 conv to ``filters / 4`` + BN + ReLU; 3x3 conv to
    ``filters / 4`` with stride ``stride`` and fixed padding 1/1 + BN + ReLU;
    1x1 conv to ``filters``. Output: main + shortcut, with no activation.

    Layer names: ``{name}_preact_bn``, ``{name}_preact_relu``,
    ``{name}_proj_conv`` (projection only), ``{name}_conv{1,2,3}``,
    ``{name}_bn{1,2}``, ``{name}_relu{1,2}``, ``{name}_conv2_pad`` (strided
    units only), ``{name}_add``.

    Args:
        x: input ``[N, H, W, C]`` with a known channel count ``C``.
        filters: output channels ``F``, a positive multiple of 4.
        stride: stride ``s`` of the 3x3 conv and of the projection.
        name: prefix of all layer names, e.g. ``"block2_unit1"``.
        weight_decay: original weight-decay factor; every kernel gets
            ``L2(weight_decay / 2)`` (reference section 6).
        sync_batchnorm: use synchronized batch norm across replicas.
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        data_format: layout of ``x`` (shapes here are written NHWC).
        dtype: Keras dtype policy name (None: float32).

    Returns:
        ``[N, ceil(H / s), ceil(W / s), F]``, the raw residual sum.

    Raises:
        ValueError: if ``filters`` is not a positive multiple of 4, ``stride``
            is not a positive int, or ``C`` is unknown.
    """
    in_channels, inner = _check_unit_args(
        x, filters=filters, stride=stride, name=name, data_format=data_format
    )

    bn, conv, relu = _unit_layer_fns(
        name,
        weight_decay=weight_decay,
        sync_batchnorm=sync_batchnorm,
        ghost_group_size=ghost_group_size,
        data_format=data_format,
        dtype=dtype,
    )

    a = bn(x, "preact_bn")
    a = relu(a, "preact_relu")
    if stride > 1 or in_channels != filters:
        shortcut = conv(a, "proj_conv", filters=filters, kernel_size=1, stride=stride)
    else:
        shortcut = x

    y = _apply_bottleneck_main(
        a,
        inner=inner,
        filters=filters,
        stride=stride,
        bn=bn,
        conv=conv,
        relu=relu,
    )
    return keras.layers.Add(dtype=dtype, name=f"{name}_add")([y, shortcut])


def _unit_layer_fns(
    name: str,
    *,
    weight_decay: float,
    sync_batchnorm: bool,
    ghost_group_size: int | None = None,
    data_format: str,
    dtype: str | None,
) -> tuple[Callable[..., keras.KerasTensor], ...]:
    """``bn(t, suffix)``, ``conv(t, suffix, ...)``, ``relu(t, suffix)`` of a unit.

    Each creates one layer named ``{name}_{suffix}`` with the unit's options
    and applies it to ``t``.
    """

    def bn(t: keras.KerasTensor, suffix: str) -> keras.KerasTensor:
        return make_batchnorm(
            name=f"{name}_{suffix}",
            synchronized=sync_batchnorm,
            ghost_group_size=ghost_group_size,
            data_format=data_format,
            dtype=dtype,
        )(t)

    def conv(t: keras.KerasTensor, suffix: str, **kwargs) -> keras.KerasTensor:
        return apply_conv(
            t,
            name=f"{name}_{suffix}",
            weight_decay=weight_decay,
            data_format=data_format,
            dtype=dtype,
            **kwargs,
        )

    def relu(t: keras.KerasTensor, suffix: str) -> keras.KerasTensor:
        return keras.layers.ReLU(dtype=dtype, name=f"{name}_{suffix}")(t)

    return bn, conv, relu


def _apply_bottleneck_main(
    x: keras.KerasTensor,
    *,
    inner: int,
    filters: int,
    stride: int,
    bn: Callable[[keras.KerasTensor, str], keras.KerasTensor],
    conv: Callable[..., keras.KerasTensor],
    relu: Callable[[keras.KerasTensor, str], keras.KerasTensor],
) -> keras.KerasTensor:
    """The main path shared by v1 and v2 (reference 5.1), up to the last conv.

    1x1 conv to ``inner`` + BN + ReLU; 3x3 conv to ``inner`` with stride
    ``stride`` (fixed padding) + BN + ReLU; 1x1 conv to ``filters``. v1 adds a
    BN after it, v2 does not. ``bn(t, suffix)``, ``conv(t, suffix, ...)`` and
    ``relu(t, suffix)`` create the unit's named layers.
    """
    y = conv(x, "conv1", filters=inner, kernel_size=1)
    y = bn(y, "bn1")
    y = relu(y, "relu1")
    y = conv(y, "conv2", filters=inner, kernel_size=3, stride=stride)
    y = bn(y, "bn2")
    y = relu(y, "relu2")
    return conv(y, "conv3", filters=filters, kernel_size=1)


def _check_unit_args(
    x: keras.KerasTensor,
    *,
    filters: int,
    stride: int,
    name: str,
    data_format: str = DATA_FORMAT,
) -> tuple[int, int]:
    """Validates bottleneck arguments; returns (input channels, inner width)."""
    if (
        isinstance(filters, bool)
        or not isinstance(filters, int)
        or filters < _BOTTLENECK_DIVISOR
        or filters % _BOTTLENECK_DIVISOR
    ):
        raise ValueError(
            f"filters must be a positive multiple of {_BOTTLENECK_DIVISOR}, "
            f"got {filters!r} (unit {name!r})."
        )
    if not checks.is_positive_int(stride):
        raise ValueError(f"stride must be a positive int, got {stride!r}.")
    in_channels = x.shape[channel_axis(data_format)]
    if in_channels is None:
        raise ValueError(f"Unit {name!r} needs a known channel count, got {x.shape}.")
    return in_channels, filters // _BOTTLENECK_DIVISOR


# Unit function per version (reference 5.1).
_UNIT_FNS: dict[str, Callable[..., keras.KerasTensor]] = {
    "v1": apply_bottleneck_v1,
    "v2": apply_bottleneck_v2,
}
VERSIONS = tuple(_UNIT_FNS)


def build_resnet(
    *,
    version: str = "v1",
    width: float = 4,
    units: Sequence[int] = RESNET50_UNITS,
    num_classes: int | None = None,
    input_shape: Sequence[int | None] = (224, 224, 3),
    stem_stride: int = 2,
    strides: Sequence[int] = DEFAULT_STRIDES,
    last_relu: bool = True,
    weight_decay: float = 1e-4,
    sync_batchnorm: bool = False,
    ghost_group_size: int | None = None,
    data_format: str = DATA_FORMAT,
    dtype_policy: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds a ResNet (default: ResNet50 v1, k = 4) trunk with named endpoints.

    Reference section 5.1. Stem: 7x7 conv with ``16k`` filters, stride
    ``stem_stride``, fixed padding 3/3, BN + ReLU (v1 only; v2 has nothing
    here), zero padding 1/1 and a 3x3 max pool with stride 2 (zero padding, not
    -inf, also for v2 whose pooled values can be negative; reference 11.2 item
    19). Four stages of ``units[i]`` bottleneck units (``apply_bottleneck_v1``
    or ``apply_bottleneck_v2``) with ``64k, 128k, 256k, 512k`` output
    channels; the first unit of stage ``i`` has stride ``strides[i]``. Head:
    v2 only, BN (``post_bn``) and, if ``last_relu``, ReLU (``post_relu``) after
    the last unit (``block4`` of v2 is the raw residual sum before ``post_bn``);
    then global average pool (``pre_logits``) and, if ``num_classes`` is given,
    a dense layer with bias (``logits``; the original's 1x1 conv on the pooled
    features has the same parameters).

    At k = 4, 224x224x3 input and 1000 classes the model has 25,557,032
    (v1; the standard ResNet-50 count) or 25,549,352 (v2) trainable parameters
    (reference section 5.4).

    Example:

    >>> trunk = build_resnet(width=1, units=(1, 1, 1, 1), input_shape=(32, 32, 3))
    >>> sorted(trunk.output)  # doctest: +SKIP
    ['after_root', 'block1', 'block2', 'block3', 'block4', 'pre_logits']

    Args:
        version: ``"v1"`` (post-activation) or ``"v2"`` (pre-activation).
        width: widening factor k (reference 5.1); may be fractional as long
            as ``16k`` (and hence every channel count) is a positive integer.
        units: number of bottleneck units in each of the 4 stages.
        num_classes: size of the ``logits`` layer, or None for no logits.
        input_shape: ``(H, W, C)``; H and W may be None, C must be known.
        stem_stride: stride of the 7x7 stem conv (2; 1 for patch tasks,
            reference 5.5).
        strides: stride of the first unit of each stage (``(1, 2, 2, 2)``;
            ``(1, 2, 2, 1)`` for patch tasks, reference 5.1 / 5.5).
        last_relu: v2: apply a ReLU after the final BN (True) or not (False,
            the paper's "(-)" variant). Must be True for v1; the "(-)"
            variants exist for v2 and RevNet only (reference 11.2 #20).
        weight_decay: every conv kernel and the logits kernel get
            ``keras.regularizers.L2(weight_decay / 2)``; biases and BN
            parameters are not regularized (reference section 6).
        sync_batchnorm: use ``BatchNormalization(synchronized=True)``, which
            all-reduces batch statistics over the replicas of a
            ``tf.distribute`` strategy (TensorFlow backend).
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        data_format: layout inside the trunk, ``"channels_last"`` (NHWC, best
            on CPUs/TPUs) or ``"channels_first"`` (NCHW, often faster on
            GPUs with cuDNN). The input and the returned feature maps are NHWC
            either way (one transpose in, one per feature-map endpoint out).
        dtype_policy: None (float32), ``"mixed_float16"`` or
            ``"mixed_bfloat16"``: variables stay float32, the trunk computes in
            16 bits; the global pool, the logits layer and every returned
            endpoint are float32 (keras-hub's ``head_dtype`` rule), so losses
            and probes see float32. ``mixed_float16`` needs loss scaling,
            which the training loop applies.
        name: model name; defaults to ``"resnet{depth}_{version}"`` with
            ``depth = 3 * sum(units) + 2`` (so ``"resnet50_v1"`` or
            ``"resnet50_v2"``).

    Returns:
        A functional ``keras.Model`` with input layer ``image`` and a dict of
        outputs keyed by ``ENDPOINTS`` (plus ``"logits"``); shapes are given in
        the module docstring.

    Raises:
        ValueError: for an unknown ``version``, v1 with ``last_relu=False``, a
            width giving a non-integer channel count, or malformed ``units``,
            ``strides``, ``stem_stride``, ``num_classes``, ``input_shape``,
            ``weight_decay`` or ``name``.
    """
    if version not in _UNIT_FNS:
        raise ValueError(
            f"Unknown ResNet version {version!r}; expected one of {VERSIONS}."
        )
    if version == "v1" and not last_relu:
        raise ValueError(
            "last_relu=False is not supported for version='v1': the last v1 unit "
            "already ends with a ReLU, so there is no final ReLU to remove. The "
            "paper's '(-)' variants exist for v2 and RevNet only (reference "
            "section 11.2, item 20)."
        )
    stem_channels, stage_channels = _channel_counts(width)
    units = checks.check_four_positive_ints(units, "units")
    strides = checks.check_four_positive_ints(strides, "strides")
    stem_stride = checks.check_positive_int(stem_stride, "stem_stride")
    num_classes = checks.check_num_classes(num_classes)
    input_shape = checks.check_input_shape(input_shape)
    data_format = check_data_format(data_format)
    dtype = check_dtype_policy(dtype_policy)
    weight_decay = checks.check_weight_decay(weight_decay)
    name = checks.check_name(name, f"resnet{3 * sum(units) + 2}_{version}")

    inputs = keras.Input(shape=input_shape, name="image")  # [N, H, W, C]
    layout = {"data_format": data_format, "dtype": dtype}
    endpoints = {}
    x = _apply_root(
        to_layout(inputs, **layout),
        version=version,
        filters=stem_channels,
        stride=stem_stride,
        weight_decay=weight_decay,
        sync_batchnorm=sync_batchnorm,
        ghost_group_size=ghost_group_size,
        **layout,
    )
    # [N, ceil(H / 2s0), ceil(W / 2s0), 16k]
    endpoints["after_root"] = as_endpoint(x, name="after_root", **layout)

    unit_fn = _UNIT_FNS[version]
    for i, (num_units, stride, filters) in enumerate(
        zip(units, strides, stage_channels, strict=True), start=1
    ):
        for j in range(1, num_units + 1):
            x = unit_fn(
                x,
                filters=filters,
                stride=stride if j == 1 else 1,
                name=f"block{i}_unit{j}",
                weight_decay=weight_decay,
                sync_batchnorm=sync_batchnorm,
                ghost_group_size=ghost_group_size,
                **layout,
            )
        # [N, h_i, w_i, 64k * 2**(i-1)]
        endpoints[f"block{i}"] = as_endpoint(x, name=f"block{i}", **layout)

    x = apply_head_norm(
        x,
        version=version,
        last_relu=last_relu,
        sync_batchnorm=sync_batchnorm,
        ghost_group_size=ghost_group_size,
        **layout,
    )
    endpoints.update(
        pool_and_classify(
            x,
            num_classes=num_classes,
            weight_decay=weight_decay,
            data_format=data_format,
            dtype=dtype,
        )
    )
    return keras.Model(inputs=inputs, outputs=endpoints, name=name)


def pool_and_classify(
    x: keras.KerasTensor,
    *,
    num_classes: int | None,
    weight_decay: float,
    data_format: str = DATA_FORMAT,
    dtype: str | None = None,
) -> dict[str, keras.KerasTensor]:
    """The float32 head shared by ResNet and RevNet (reference 5.1, 5.2).

    Global average pool -> ``pre_logits [N, C]``; if ``num_classes`` is given,
    a dense layer with bias -> ``logits [N, num_classes]`` (the original's 1x1
    convolution on the pooled features has the same parameters). Both layers
    are float32 whatever the trunk's dtype policy, so mixed precision keeps the
    pooled features and the logits in full precision.
    """
    pooled = keras.layers.GlobalAveragePooling2D(
        data_format=data_format, dtype=head_dtype(dtype), name="pre_logits"
    )(x)
    out = {"pre_logits": pooled}  # [N, C]
    if num_classes is not None:
        out["logits"] = apply_logits(
            pooled, num_classes=num_classes, weight_decay=weight_decay, dtype=dtype
        )  # [N, num_classes]
    return out


def count_params(model: keras.Model) -> int:
    """Returns the number of trainable parameters of ``model``.

    This is the quantity of the reference's parameter table (section 5.4):
    kernels, biases and BN scale/offset; BN moving statistics (non-trainable)
    are excluded.
    """
    return int(sum(np.prod(v.shape, dtype=np.int64) for v in model.trainable_weights))


def _apply_root(
    x: keras.KerasTensor,
    *,
    version: str,
    filters: int,
    stride: int,
    weight_decay: float,
    sync_batchnorm: bool,
    ghost_group_size: int | None = None,
    data_format: str,
    dtype: str,
) -> keras.KerasTensor:
    """Stem (reference 5.1): ``[N, H, W, C] -> [N, ceil(H/2s), ceil(W/2s), F]``.

    v1: conv, BN, ReLU, zero pad, max pool. v2: conv, zero pad, max pool (no
    BN/ReLU; the first unit's pre-activation follows).
    """
    x = apply_conv(
        x,
        filters=filters,
        kernel_size=7,
        stride=stride,
        name="root_conv",
        weight_decay=weight_decay,
        pad_name="root_pad",
        data_format=data_format,
        dtype=dtype,
    )
    if version == "v1":
        x = make_batchnorm(
            name="root_bn",
            synchronized=sync_batchnorm,
            ghost_group_size=ghost_group_size,
            data_format=data_format,
            dtype=dtype,
        )(x)
        x = keras.layers.ReLU(dtype=dtype, name="root_relu")(x)
    elif version != "v2":
        raise ValueError(
            f"Unknown ResNet version {version!r}; expected one of {VERSIONS}."
        )
    return apply_stem_pool(x, data_format=data_format, dtype=dtype)


def apply_head_norm(
    x: keras.KerasTensor,
    *,
    version: str,
    last_relu: bool,
    sync_batchnorm: bool,
    ghost_group_size: int | None = None,
    data_format: str,
    dtype: str,
) -> keras.KerasTensor:
    """Layers between ``block4`` and the pool (reference 5.1).

    v1: none (the last unit already ends with a ReLU). v2: BN (``post_bn``)
    and, if ``last_relu``, ReLU (``post_relu``); ``[N, h, w, C]`` unchanged.
    """
    if version == "v1":
        return x
    if version == "v2":
        x = make_batchnorm(
            name="post_bn",
            synchronized=sync_batchnorm,
            ghost_group_size=ghost_group_size,
            data_format=data_format,
            dtype=dtype,
        )(x)
        if last_relu:
            x = keras.layers.ReLU(dtype=dtype, name="post_relu")(x)
        return x
    raise ValueError(f"Unknown ResNet version {version!r}; expected one of {VERSIONS}.")


def _channel_counts(width: float) -> tuple[int, tuple[int, ...]]:
    """Returns (stem channels 16k, stage output channels 64k * 2**i).

    Every count must be a positive integer: the stem ``16k``, the bottleneck
    widths ``16k * 2**i`` and the stage outputs ``64k * 2**i`` (reference 5.1).
    """
    per_k = [("stem", _STEM_CHANNELS_PER_K)]
    for i, c in enumerate(_STAGE_CHANNELS_PER_K, start=1):
        per_k.append((f"block{i} bottleneck", c / _BOTTLENECK_DIVISOR))
        per_k.append((f"block{i} output", c))
    counts = checks.scaled_channels(width, per_k)
    stages = tuple(counts[f"block{i} output"] for i in range(1, 5))
    return counts["stem"], stages
