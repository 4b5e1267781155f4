"""RevNet50: the reversible ResNet of the 2019 release, with a widening factor k.

Contract: ``build_revnet(...)`` returns a Keras functional model mapping
``image [N, H, W, C]`` to the endpoints

* ``after_root``  ``[N, ceil(H/(2*s0)), ceil(W/(2*s0)), 64k]``,
* ``block1`` .. ``block4``  ``[N, h_i, w_i, 64k * 2**(i-1)]``,
* ``pre_logits``  ``[N, 512k]``, and ``logits`` ``[N, num_classes]`` when asked.

Architecture (reference ``original-system.md`` 5.2): a 7x7 stem with ``64k``
filters (4x the ResNet stem), no BN, no ReLU and no weight decay (a fixed
random projection that widens the input), then the stems' zero-padded 3x3/2
max pool; four stages of 3, 4, 6, 3 reversible units at ``64k .. 512k``
channels; between stages an average pool (window = stride, "same") when the
next stage's stride is > 1, then ``C/2`` zero channels before and after the
existing ``C`` (channel doubling); head: BN, ReLU unless "(-)", global average
pool, dense logits. 7,457,640 trainable parameters at k = 4 with 1000 classes
(reference 5.4).

A reversible unit on ``x = [x1, x2]`` (channel halves) computes
``y1 = x1 + F(x2)``, ``y2 = x2`` and returns ``[y2, y1]`` (the halves swap
places), where ``F`` is the pre-activation bottleneck main path
``BN-ReLU-1x1(C/8)-BN-ReLU-3x3(C/8)-BN-ReLU-1x1(C/2)``. It is invertible:
``x2 = y2``, ``x1 = y1 - F(y2)`` (``ReversibleUnit.invert``).

Beyond the release (which "happens to be invertible" but stores every
activation, reference 5.2): ``memory_saving=True`` trains with a custom
gradient per unit that keeps only the unit's output and recomputes ``F`` in
the backward pass (the input half it needs is a slice of the output), so the
activations inside ``F`` are never stored. Gradients equal the plain ones
(tests/test_models_revnet.py); ``revisit-benchmark trunks --revnet_memory``
measures the peak memory of both.

Place in the data flow: stage 3 (models), selected by
``build_trunk(architecture="revnet50")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

# Pauses every active gradient tape. Internal, but it is what the public
# tf.recompute_grad uses for the same purpose (TensorFlow is pinned).
from tensorflow.python.eager.record import stop_recording as _stop_recording

from revisit_tf.models import checks
from revisit_tf.models.layers import (
    DATA_FORMAT,
    apply_conv,
    apply_stem_pool,
    as_endpoint,
    channel_axis,
    check_data_format,
    check_dtype_policy,
    l2_regularizer,
    make_batchnorm,
    to_layout,
)
from revisit_tf.models.resnet import (
    DEFAULT_STRIDES,
    RESNET50_UNITS,
    apply_head_norm,
    pool_and_classify,
)
from revisit_tf.pp import groups as groups_lib

# Reference 5.2: stem 64k (4x the ResNet stem), stages 64k .. 512k channels.
_STEM_CHANNELS_PER_K = 64
_STAGE_CHANNELS_PER_K = (64, 128, 256, 512)
# Reference 5.2: F's inner width is C/8 and its output C/2 for a unit of C.
_INNER_DIVISOR = 8


@keras.saving.register_keras_serializable(package="revisit_tf")
class ReversibleUnit(keras.layers.Layer):
    """One reversible RevNet unit (reference 5.2), ``[N, H, W, C] -> same``.

    ``x = [x1, x2]`` split on the channel axis; ``y = [x2, x1 + F(x2)]`` with
    ``F = BN-ReLU-1x1(C/8)-BN-ReLU-3x3(C/8)-BN-ReLU-1x1(C/2)`` (no shortcut,
    stride 1, biases off, kernels with ``L2(weight_decay / 2)``).

    Example:

    >>> unit = ReversibleUnit(channels=64, name="block1_unit1")
    >>> x = keras.random.normal((2, 8, 8, 64))
    >>> y = unit(x)
    >>> x_again = unit.invert(y)  # equals x up to float rounding

    Args:
        channels: C, the input (= output) channel count, a multiple of 8.
        weight_decay: original weight decay (reference section 6).
        sync_batchnorm: batch statistics all-reduced across replicas.
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        data_format: ``channels_last`` or ``channels_first``.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``).
    """

    def __init__(
        self,
        channels: int,
        *,
        weight_decay: float = 1e-4,
        sync_batchnorm: bool = False,
        ghost_group_size: int | None = None,
        data_format: str = DATA_FORMAT,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not checks.is_positive_int(channels) or channels % _INNER_DIVISOR:
            raise ValueError(
                f"ReversibleUnit channels must be a positive multiple of "
                f"{_INNER_DIVISOR}, got {channels!r}."
            )
        self.channels = int(channels)
        self.weight_decay = checks.check_weight_decay(weight_decay)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.ghost_group_size = groups_lib.check_ghost_group_size(ghost_group_size)
        self.data_format = check_data_format(data_format)
        self._axis = channel_axis(self.data_format)
        half, inner = self.channels // 2, self.channels // _INNER_DIVISOR
        policy = self.dtype_policy.name

        def bn(name: str) -> keras.layers.BatchNormalization:
            return make_batchnorm(
                name=name,
                synchronized=self.sync_batchnorm,
                ghost_group_size=self.ghost_group_size,
                data_format=self.data_format,
                dtype=policy,
            )

        def conv(filters: int, kernel: int, name: str) -> keras.layers.Conv2D:
            # Stride 1 with an odd kernel: "same" is the original's fixed
            # padding (1/1 for 3x3).
            return keras.layers.Conv2D(
                filters,
                kernel,
                padding="same",
                data_format=self.data_format,
                use_bias=False,
                kernel_initializer="glorot_uniform",
                kernel_regularizer=l2_regularizer(self.weight_decay),
                dtype=policy,
                name=name,
            )

        self.bn1, self.conv1 = bn("bn1"), conv(inner, 1, "conv1")
        self.bn2, self.conv2 = bn("bn2"), conv(inner, 3, "conv2")
        self.bn3, self.conv3 = bn("bn3"), conv(half, 1, "conv3")
        self._residual_layers = (
            (self.bn1, self.conv1),
            (self.bn2, self.conv2),
            (self.bn3, self.conv3),
        )

    def build(self, input_shape):
        channels = input_shape[self._axis]
        if channels != self.channels:
            raise ValueError(
                f"ReversibleUnit {self.name!r} was configured for {self.channels} "
                f"channels but got input shape {tuple(input_shape)} "
                f"({self.data_format})."
            )
        shape = list(input_shape)
        shape[self._axis] = self.channels // 2
        for bn, conv in self._residual_layers:
            bn.build(tuple(shape))
            conv.build(tuple(shape))
            shape = list(conv.compute_output_shape(tuple(shape)))

    def call(self, inputs, training=None):
        x1, x2 = self._split(inputs)
        return self._join(x2, x1 + self.residual(x2, training=training))

    def residual(self, x2, training=None, update_statistics: bool = True):
        """``F(x2)``: ``[N, H, W, C/2] -> [N, H, W, C/2]`` (in ``data_format``).

        Args:
            x2: the second channel half.
            training: batch statistics (True) or moving statistics.
            update_statistics: in training, also update the BN moving
                statistics (the forward pass does; recomputation and
                inversion do not, so statistics move once per step).
        """
        y = x2
        for bn, conv in self._residual_layers:
            if training and not update_statistics:
                y = bn.normalize_in_training(y, update_statistics=False)
            else:
                y = bn(y, training=training)
            y = conv(keras.ops.relu(y))
        return y

    def invert(self, outputs, training=None):
        """Recovers the unit's input from its output: ``[y2, y1] -> [x1, x2]``.

        ``x2 = y2`` and ``x1 = y1 - F(y2)`` (reference 5.2). With
        ``training=True`` ``F`` uses the batch statistics of ``y2`` (the same
        batch as the forward pass saw), without updating moving statistics.
        """
        y2, y1 = self._split(outputs)
        return self._join(
            y1 - self.residual(y2, training=training, update_statistics=False), y2
        )

    def _split(self, x):
        half = self.channels // 2
        if self._axis == -1:
            return x[..., :half], x[..., half:]
        return x[:, :half], x[:, half:]

    def _join(self, a, b):
        return keras.ops.concatenate([a, b], axis=self._axis)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            weight_decay=self.weight_decay,
            sync_batchnorm=self.sync_batchnorm,
            data_format=self.data_format,
        )
        if self.ghost_group_size is not None:
            config["ghost_group_size"] = self.ghost_group_size
        return config


@keras.saving.register_keras_serializable(package="revisit_tf")
class ReversibleStage(keras.layers.Layer):
    """A stage of ``num_units`` reversible units, ``[N, H, W, C] -> same``.

    Plain mode runs the units one after the other; autodiff stores their
    activations. With ``memory_saving=True`` a training call is one custom
    gradient (Gomez et al. 2017, "The Reversible Residual Network"): the
    forward pass keeps only the stage's output, and the backward pass walks
    the units in reverse, recovering each unit's input from its output with
    ``ReversibleUnit.invert`` and recomputing ``F`` to get the gradients. The
    activation memory of a stage is then that of one unit instead of all of
    them. BN moving statistics are updated once, in the forward pass; the
    recomputation normalises with the same batch statistics.

    Sublayers ``unit1`` .. ``unit{num_units}`` (``ReversibleUnit``).

    Args:
        channels: C (a multiple of 8).
        num_units: units in the stage (RevNet50: 3, 4, 6, 3).
        weight_decay: original weight decay (reference section 6).
        sync_batchnorm: batch statistics all-reduced across replicas.
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        memory_saving: see above; no effect on inference or on the values.
        data_format: ``channels_last`` or ``channels_first``.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``).
    """

    def __init__(
        self,
        channels: int,
        num_units: int,
        *,
        weight_decay: float = 1e-4,
        sync_batchnorm: bool = False,
        ghost_group_size: int | None = None,
        memory_saving: bool = False,
        data_format: str = DATA_FORMAT,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.num_units = checks.check_positive_int(num_units, "num_units")
        self.weight_decay = checks.check_weight_decay(weight_decay)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.ghost_group_size = groups_lib.check_ghost_group_size(ghost_group_size)
        self.memory_saving = bool(memory_saving)
        self.data_format = check_data_format(data_format)
        self.units = [
            ReversibleUnit(
                channels,
                weight_decay=self.weight_decay,
                sync_batchnorm=self.sync_batchnorm,
                ghost_group_size=self.ghost_group_size,
                data_format=self.data_format,
                dtype=self.dtype_policy.name,
                name=f"unit{j}",
            )
            for j in range(1, self.num_units + 1)
        ]

    def build(self, input_shape):
        for unit in self.units:
            unit.build(input_shape)

    def call(self, inputs, training=None):
        if training and self.memory_saving:
            return self._call_memory_saving(inputs)
        x = inputs
        for unit in self.units:
            x = unit(x, training=training)
        return x

    def invert(self, outputs, training=None):
        """The stage's input from its output (the units inverted in reverse)."""
        x = outputs
        for unit in reversed(self.units):
            x = unit.invert(x, training=training)
        return x

    def _call_memory_saving(self, inputs):
        """Training forward whose gradient inverts and recomputes every unit."""

        @tf.custom_gradient
        def forward(x):
            # Not recorded on the outer tape: the units' activations (and
            # their outputs, except the last) are released during the forward
            # pass. tf.recompute_grad pauses the tapes the same way.
            with _stop_recording():
                y = x
                for unit in self.units:
                    y = unit(y, training=True)

            def grad(dy, variables=None):
                variables = list(variables or [])
                var_grads = [None] * len(variables)
                y_j, dy_j = y, dy
                for unit in reversed(self.units):
                    # The unit's input from its output: x2 = y2, x1 = y1 - F(y2).
                    # The control dependency keeps graph executors from running
                    # the recomputation early (as soon as y exists), which would
                    # hold every unit's activations at once again.
                    with tf.control_dependencies([dy_j]):
                        y2, y1 = unit._split(tf.identity(y_j))
                    with tf.GradientTape() as tape:
                        tape.watch(y2)
                        f = unit.residual(y2, training=True, update_statistics=False)
                    dy2, dy1 = unit._split(dy_j)
                    # y1 = x1 + F(x2), y2 = x2: dL/dx1 = dy1,
                    # dL/dx2 = dy2 + (dF/dx2)^T dy1, dL/dw = (dF/dw)^T dy1.
                    # Each variable belongs to one unit: the others get None.
                    g = tape.gradient(
                        f,
                        [y2, *variables],
                        output_gradients=dy1,
                        unconnected_gradients=tf.UnconnectedGradients.NONE,
                    )
                    for k, gv in enumerate(g[1:]):
                        if gv is not None:
                            var_grads[k] = gv
                    y_j = unit._join(y1 - tf.stop_gradient(f), y2)
                    dy_j = unit._join(dy1, dy2 + g[0])
                return dy_j, var_grads

            return y, grad

        return forward(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            num_units=self.num_units,
            weight_decay=self.weight_decay,
            sync_batchnorm=self.sync_batchnorm,
            memory_saving=self.memory_saving,
            data_format=self.data_format,
        )
        if self.ghost_group_size is not None:
            config["ghost_group_size"] = self.ghost_group_size
        return config


@keras.saving.register_keras_serializable(package="revisit_tf")
class ZeroPadChannels(keras.layers.Layer):
    """Doubles the channels with zeros: ``C/2`` before, ``C/2`` after (ref. 5.2).

    ``[N, H, W, C] -> [N, H, W, 2C]`` with the input in channels
    ``C/2 .. 3C/2``. C must be even.

    Args:
        data_format: ``channels_last`` or ``channels_first``.
        **kwargs: ``keras.layers.Layer`` arguments.
    """

    def __init__(self, data_format: str = DATA_FORMAT, **kwargs):
        super().__init__(**kwargs)
        self.data_format = check_data_format(data_format)
        self._axis = channel_axis(self.data_format)

    def _amount(self, channels: int) -> int:
        if channels is None or channels % 2:
            raise ValueError(
                f"ZeroPadChannels needs an even, known channel count, got {channels!r}."
            )
        return channels // 2

    def call(self, inputs):
        pad = self._amount(inputs.shape[self._axis])
        widths = [[0, 0]] * 4
        widths[self._axis] = [pad, pad]
        return keras.ops.pad(inputs, widths)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        shape[self._axis] = 2 * shape[self._axis]
        self._amount(input_shape[self._axis])
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(data_format=self.data_format)
        return config


def build_revnet(
    *,
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
    memory_saving: bool = False,
    data_format: str = DATA_FORMAT,
    dtype_policy: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds RevNet50 (reference 5.2) with widening factor k and named endpoints.

    At k = 4, 224 px and 1000 classes: 7,457,640 trainable parameters
    (reference 5.4); endpoints ``after_root`` 56x56x256, ``block1`` 56x56x256,
    ``block2`` 28x28x512, ``block3`` 14x14x1024, ``block4`` 7x7x2048,
    ``pre_logits`` 2048.

    Args:
        width: widening factor k; ``8k`` (the smallest inner width, ``C/8`` of
            the first stage) must be a positive integer.
        units: reversible units per stage (RevNet50: 3, 4, 6, 3).
        num_classes: size of the ``logits`` layer, or None.
        input_shape: ``(H, W, C)``; H and W may be None.
        stem_stride: stride of the 7x7 stem conv (2; 1 for patch tasks).
        strides: per-stage strides ``(s1, s2, s3, s4)``; stage ``i > 1`` is
            preceded by an average pool of window and stride ``s_i`` when
            ``s_i > 1`` (default ``(1, 2, 2, 2)``; ``(1, 2, 2, 1)`` for patch
            tasks). A stride ``s1 > 1`` pools before the first stage.
        last_relu: ReLU after the final BN (True, the paper's "RevNet50");
            False is "RevNet50 (-)" (reference 5.2, 11.2).
        weight_decay: ``L2(weight_decay / 2)`` on every kernel except the stem
            (reference 5.2, 6).
        sync_batchnorm: batch statistics all-reduced across replicas.
        ghost_group_size: None, or training batch statistics per group of
            that many consecutive rows (ghost batch norm, ``pp.groups``).
        memory_saving: recompute each unit's ``F`` in the backward pass
            instead of storing its activations (same gradients, less memory).
        data_format: layout inside the trunk (inputs/endpoints stay NHWC).
        dtype_policy: None (float32), ``mixed_float16`` or ``mixed_bfloat16``;
            the pool, the logits and the endpoints stay float32.
        name: model name (default ``"revnet50"`` for the standard units).

    Returns:
        A functional ``keras.Model`` with input ``image`` and a dict of
        endpoints (see the module docstring).

    Raises:
        ValueError: for a malformed argument (the message names it).
    """
    counts = checks.scaled_channels(
        width,
        [("stem", _STEM_CHANNELS_PER_K)]
        + [
            (f"block{i} inner", c / _INNER_DIVISOR)
            for i, c in enumerate(_STAGE_CHANNELS_PER_K, start=1)
        ]
        + [(f"block{i}", c) for i, c in enumerate(_STAGE_CHANNELS_PER_K, start=1)],
    )
    units = checks.check_four_positive_ints(units, "units")
    strides = checks.check_four_positive_ints(strides, "strides")
    stem_stride = checks.check_positive_int(stem_stride, "stem_stride")
    num_classes = checks.check_num_classes(num_classes)
    input_shape = checks.check_input_shape(input_shape)
    weight_decay = checks.check_weight_decay(weight_decay)
    data_format = check_data_format(data_format)
    dtype = check_dtype_policy(dtype_policy)
    name = checks.check_name(name, f"revnet{3 * sum(units) + 2}")
    layout = {"data_format": data_format, "dtype": dtype}

    inputs = keras.Input(shape=input_shape, name="image")  # [N, H, W, C]
    # Stem: no BN/ReLU, no weight decay (reference 5.2).
    x = apply_conv(
        to_layout(inputs, **layout),
        filters=counts["stem"],
        kernel_size=7,
        stride=stem_stride,
        name="root_conv",
        weight_decay=0.0,
        pad_name="root_pad",
        **layout,
    )
    x = apply_stem_pool(x, **layout)
    endpoints = {"after_root": as_endpoint(x, name="after_root", **layout)}

    for i, (num_units, stride) in enumerate(zip(units, strides, strict=True), start=1):
        channels = counts[f"block{i}"]
        if stride > 1:
            x = keras.layers.AveragePooling2D(
                pool_size=stride,
                strides=stride,
                padding="same",
                data_format=data_format,
                dtype=dtype,
                name=f"block{i}_pool",
            )(x)
        if i > 1:  # [N, h, w, C/2] -> [N, h, w, C]
            x = ZeroPadChannels(data_format, dtype=dtype, name=f"block{i}_pad")(x)
        x = ReversibleStage(
            channels,
            num_units,
            weight_decay=weight_decay,
            sync_batchnorm=sync_batchnorm,
            ghost_group_size=ghost_group_size,
            memory_saving=memory_saving,
            data_format=data_format,
            dtype=dtype,
            name=f"block{i}",
        )(x)
        endpoints[f"block{i}"] = as_endpoint(x, name=f"block{i}", **layout)

    x = apply_head_norm(
        x,
        version="v2",
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


def reversible_units(model: keras.Model) -> list[ReversibleUnit]:
    """The model's reversible units in forward order."""
    return [
        unit
        for layer in model.layers
        if isinstance(layer, ReversibleStage)
        for unit in layer.units
    ]


__all__ = [
    "ReversibleStage",
    "ReversibleUnit",
    "ZeroPadChannels",
    "build_revnet",
    "reversible_units",
]
