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

import math
from collections.abc import Callable, Sequence

import keras
import numpy as np

from revisit_tf.models.layers import (
    DATA_FORMAT,
    apply_conv,
    fixed_padding_amounts,
    l2_regularizer,
    make_batchnorm,
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

    Returns:
        ``[N, ceil(H / s), ceil(W / s), F]``.

    Raises:
        ValueError: if ``filters`` is not a positive multiple of 4, ``stride``
            is not a positive int, or ``C`` is unknown.
    """
    in_channels, inner = _check_unit_args(x, filters=filters, stride=stride, name=name)

    def bn(t: keras.KerasTensor, suffix: str) -> keras.KerasTensor:
        return make_batchnorm(name=f"{name}_{suffix}", synchronized=sync_batchnorm)(t)

    if stride > 1 or in_channels != filters:
        shortcut = apply_conv(
            x,
            filters=filters,
            kernel_size=1,
            stride=stride,
            name=f"{name}_proj_conv",
            weight_decay=weight_decay,
        )
        shortcut = bn(shortcut, "proj_bn")
    else:
        shortcut = x

    y = _apply_bottleneck_main(
        x,
        inner=inner,
        filters=filters,
        stride=stride,
        name=name,
        weight_decay=weight_decay,
        bn=bn,
    )
    y = bn(y, "bn3")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def apply_bottleneck_v2(
    x: keras.KerasTensor,
    *,
    filters: int,
    stride: int,
    name: str,
    weight_decay: float = 1e-4,
    sync_batchnorm: bool = False,
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

    Returns:
        ``[N, ceil(H / s), ceil(W / s), F]``, the raw residual sum.

    Raises:
        ValueError: if ``filters`` is not a positive multiple of 4, ``stride``
            is not a positive int, or ``C`` is unknown.
    """
    in_channels, inner = _check_unit_args(x, filters=filters, stride=stride, name=name)

    def bn(t: keras.KerasTensor, suffix: str) -> keras.KerasTensor:
        return make_batchnorm(name=f"{name}_{suffix}", synchronized=sync_batchnorm)(t)

    a = bn(x, "preact_bn")
    a = keras.layers.ReLU(name=f"{name}_preact_relu")(a)
    if stride > 1 or in_channels != filters:
        shortcut = apply_conv(
            a,
            filters=filters,
            kernel_size=1,
            stride=stride,
            name=f"{name}_proj_conv",
            weight_decay=weight_decay,
        )
    else:
        shortcut = x

    y = _apply_bottleneck_main(
        a,
        inner=inner,
        filters=filters,
        stride=stride,
        name=name,
        weight_decay=weight_decay,
        bn=bn,
    )
    return keras.layers.Add(name=f"{name}_add")([y, shortcut])


def _apply_bottleneck_main(
    x: keras.KerasTensor,
    *,
    inner: int,
    filters: int,
    stride: int,
    name: str,
    weight_decay: float,
    bn: Callable[[keras.KerasTensor, str], keras.KerasTensor],
) -> keras.KerasTensor:
    """The main path shared by v1 and v2 (reference 5.1), up to the last conv.

    1x1 conv to ``inner`` + BN + ReLU; 3x3 conv to ``inner`` with stride
    ``stride`` (fixed padding) + BN + ReLU; 1x1 conv to ``filters``. v1 adds a
    BN after it, v2 does not.
    """
    y = apply_conv(
        x, filters=inner, kernel_size=1, name=f"{name}_conv1", weight_decay=weight_decay
    )
    y = bn(y, "bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = apply_conv(
        y,
        filters=inner,
        kernel_size=3,
        stride=stride,
        name=f"{name}_conv2",
        weight_decay=weight_decay,
    )
    y = bn(y, "bn2")
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = apply_conv(
        y,
        filters=filters,
        kernel_size=1,
        name=f"{name}_conv3",
        weight_decay=weight_decay,
    )
    return y


def _check_unit_args(
    x: keras.KerasTensor, *, filters: int, stride: int, name: str
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
    if not _is_positive_int(stride):
        raise ValueError(f"stride must be a positive int, got {stride!r}.")
    in_channels = x.shape[-1]
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
    units = _check_four_positive_ints(units, "units")
    strides = _check_four_positive_ints(strides, "strides")
    if not _is_positive_int(stem_stride):
        raise ValueError(f"stem_stride must be a positive int, got {stem_stride!r}.")
    if num_classes is not None and not _is_positive_int(num_classes):
        raise ValueError(
            f"num_classes must be a positive int or None, got {num_classes!r}."
        )
    input_shape = _check_input_shape(input_shape)
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(
            f"weight_decay must be a finite float >= 0, got {weight_decay!r}."
        )
    if name is None:
        name = f"resnet{3 * sum(units) + 2}_{version}"
    elif not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty str without '/', got {name!r}.")

    inputs = keras.Input(shape=input_shape, name="image")  # [N, H, W, C]
    endpoints = {}
    x = _apply_root(
        inputs,
        version=version,
        filters=stem_channels,
        stride=stem_stride,
        weight_decay=weight_decay,
        sync_batchnorm=sync_batchnorm,
    )
    endpoints["after_root"] = x  # [N, ceil(H / 2s0), ceil(W / 2s0), 16k]

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
            )
        endpoints[f"block{i}"] = x  # [N, h_i, w_i, 64k * 2**(i-1)]

    x = _apply_head(
        x, version=version, last_relu=last_relu, sync_batchnorm=sync_batchnorm
    )
    x = keras.layers.GlobalAveragePooling2D(data_format=DATA_FORMAT, name="pre_logits")(
        x
    )
    endpoints["pre_logits"] = x  # [N, 512k]
    if num_classes is not None:
        endpoints["logits"] = keras.layers.Dense(
            num_classes,
            use_bias=True,
            kernel_initializer="glorot_uniform",
            bias_initializer="zeros",
            kernel_regularizer=l2_regularizer(weight_decay),
            name="logits",
        )(x)  # [N, num_classes]
    return keras.Model(inputs=inputs, outputs=endpoints, name=name)


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
    )
    if version == "v1":
        x = make_batchnorm(name="root_bn", synchronized=sync_batchnorm)(x)
        x = keras.layers.ReLU(name="root_relu")(x)
    elif version != "v2":
        raise ValueError(
            f"Unknown ResNet version {version!r}; expected one of {VERSIONS}."
        )
    # Zero padding (not -inf) before the pool, as in the original (reference
    # 11.2 item 19). For v2 the conv outputs can be negative, so a border zero
    # can win the max; for v1 the inputs are post-ReLU, but the window placement
    # (1 before, 1 after) still differs from Keras "same" on even sizes.
    before, after = fixed_padding_amounts(3)
    x = keras.layers.ZeroPadding2D(
        padding=((before, after), (before, after)),
        data_format=DATA_FORMAT,
        name="root_pool_pad",
    )(x)
    return keras.layers.MaxPooling2D(
        pool_size=3,
        strides=2,
        padding="valid",
        data_format=DATA_FORMAT,
        name="root_pool",
    )(x)


def _apply_head(
    x: keras.KerasTensor, *, version: str, last_relu: bool, sync_batchnorm: bool
) -> keras.KerasTensor:
    """Layers between ``block4`` and the pool (reference 5.1).

    v1: none (the last unit already ends with a ReLU). v2: BN (``post_bn``)
    and, if ``last_relu``, ReLU (``post_relu``); ``[N, h, w, C]`` unchanged.
    """
    if version == "v1":
        return x
    if version == "v2":
        x = make_batchnorm(name="post_bn", synchronized=sync_batchnorm)(x)
        if last_relu:
            x = keras.layers.ReLU(name="post_relu")(x)
        return x
    raise ValueError(f"Unknown ResNet version {version!r}; expected one of {VERSIONS}.")


def _is_positive_int(value: object) -> bool:
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and value > 0
    )


def _check_four_positive_ints(values: Sequence[int], arg: str) -> tuple[int, ...]:
    """Returns ``values`` as a 4-tuple of ints or raises a ValueError."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{arg} must be a sequence of 4 positive ints (one per stage), "
            f"got {values!r}."
        )
    if len(values) != 4 or not all(_is_positive_int(v) for v in values):
        raise ValueError(
            f"{arg} must be a sequence of 4 positive ints (one per stage), "
            f"got {tuple(values)!r}."
        )
    return tuple(int(v) for v in values)


def _channel_counts(width: float) -> tuple[int, tuple[int, ...]]:
    """Returns (stem channels 16k, stage output channels 64k * 2**i).

    Every count must be a positive integer: the stem ``16k``, the bottleneck
    widths ``16k * 2**i`` and the stage outputs ``64k * 2**i`` (reference 5.1).
    """
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float, np.integer, np.floating))
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ValueError(f"width must be a positive number, got {width!r}.")
    per_k = [("stem", _STEM_CHANNELS_PER_K)]
    for i, c in enumerate(_STAGE_CHANNELS_PER_K, start=1):
        per_k.append((f"block{i} bottleneck", c // _BOTTLENECK_DIVISOR))
        per_k.append((f"block{i} output", c))
    counts = {}
    for what, base in per_k:
        exact = base * float(width)
        rounded = round(exact)
        if rounded < 1 or abs(exact - rounded) > 1e-6:
            raise ValueError(
                f"width={width!r} gives a non-integer or zero channel count for "
                f"the {what} ({base} * {width!r} = {exact!r}); choose a width "
                f"whose multiple {_STEM_CHANNELS_PER_K} * width is a positive "
                "integer."
            )
        counts[what] = rounded
    stages = tuple(counts[f"block{i} output"] for i in range(1, 5))
    return counts["stem"], stages


def _check_input_shape(input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
    """Checks ``(H, W, C)``: H, W positive ints or None, C a positive int."""
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or len(input_shape) != 3
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels), got {input_shape!r}."
        )
    h, w, c = input_shape
    for dim_name, dim in (("height", h), ("width", w)):
        if dim is not None and not _is_positive_int(dim):
            raise ValueError(
                f"input_shape {dim_name} must be a positive int or None, "
                f"got {dim!r} in {tuple(input_shape)!r}."
            )
    if not _is_positive_int(c):
        raise ValueError(
            f"input_shape channels must be a known positive int, got {c!r} "
            f"in {tuple(input_shape)!r}."
        )
    return tuple(None if d is None else int(d) for d in input_shape)
