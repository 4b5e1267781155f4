"""Shared building blocks for the trunks in ``revisit_tf.models``.

Contract: small plain functions that create *built-in* Keras layers only
(``Conv2D``, ``ZeroPadding2D``, ``BatchNormalization``), so that every trunk
built from them is an ordinary functional model that serializes with
``get_config``/``from_config`` and ``.keras`` files without custom objects.

Place in the data flow: stage 3 (models). The trunk builders (``resnet.py``,
``revnet.py``, ``vgg.py``) call these helpers; nothing outside
``revisit_tf.models`` needs them. Every helper takes the layout explicitly
(``data_format``: ``channels_last`` by default, ``channels_first`` for GPUs
that prefer NCHW), so the global Keras image-data-format setting cannot change
it, and a ``dtype`` (a Keras dtype policy name such as ``mixed_bfloat16``, or
None for float32), so the global Keras dtype policy cannot change it either.

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
import tensorflow as tf

from revisit_tf.pp import groups as groups_lib

# Reference section 5, "Common building blocks": TF1 layer defaults.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DATA_FORMAT = "channels_last"
DATA_FORMATS = ("channels_last", "channels_first")
DTYPE_POLICIES = ("float32", "float64", "mixed_float16", "mixed_bfloat16")


def check_data_format(data_format: str) -> str:
    """Returns ``data_format`` or raises a ValueError naming the choices."""
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"data_format must be one of {DATA_FORMATS}, got {data_format!r}."
        )
    return data_format


def check_dtype_policy(dtype_policy: str | None) -> str | None:
    """Returns ``dtype_policy`` or raises a ValueError naming the choices.

    None keeps Keras' global dtype policy (float32 unless changed, e.g. to
    float64 for exact parity tests). ``mixed_float16`` (GPUs) and
    ``mixed_bfloat16`` (TPUs, recent CPUs/GPUs) keep variables in float32 and
    compute in 16 bits; the builders keep the pool, the logits layer and the
    returned endpoints in float32 (``head_dtype``).
    """
    if dtype_policy is not None and dtype_policy not in DTYPE_POLICIES:
        raise ValueError(
            f"dtype_policy must be None or one of {DTYPE_POLICIES}, "
            f"got {dtype_policy!r}."
        )
    return dtype_policy


def head_dtype(dtype_policy: str | None) -> str | None:
    """The policy of the head and the endpoints: float32 under mixed precision."""
    if dtype_policy is not None and dtype_policy.startswith("mixed_"):
        return "float32"
    return dtype_policy


def channel_axis(data_format: str) -> int:
    """The channel axis of a rank-4 tensor: -1 (NHWC) or 1 (NCHW)."""
    return -1 if check_data_format(data_format) == "channels_last" else 1


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


@keras.saving.register_keras_serializable(package="revisit_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` with TensorFlow's fused kernel in training.

    Keras 3 normalises with ``tf.nn.moments`` + ``tf.nn.batch_normalization``,
    about ten elementwise passes forward and more backward. In training mode,
    for NHWC inputs without a mask, this layer calls ``FusedBatchNormV3``
    (one pass each way, as TF1's ``tf.layers.batch_normalization(fused=True)``
    of the original release), then updates the moving statistics exactly as
    Keras does, with the biased batch variance (the fused kernel returns the
    unbiased one, so it is rescaled by ``(n - 1) / n``). Everything else (the
    synchronized cross-replica path when a strategy has several replicas,
    NCHW, inference, masks) is Keras' own code, and the variables, config and
    checkpoints are those of the Keras layer. ``revisit-benchmark trunks``
    measures the effect.

    Ghost batch norm (``ghost_group_size=G``, default None = off): in
    training the batch ``[N, ...]`` is cut into ``N / G`` groups of ``G``
    consecutive rows and each group is normalised with its own statistics,
    exactly as ``N / G`` replicas with unsynchronised batch norm would
    (``pp.groups``; the original's per-TPU-core statistics, reference 7.3).
    The moving statistics are updated once per step with the *first* group's
    statistics: under a ``MirroredStrategy`` each replica updates its own copy
    of the (``aggregation="none"``) moving statistics with its own batch and
    checkpoints save replica 0's copy, as the original's TPU cores updated
    theirs and the checkpoint held core 0's. (tf-keras' ``virtual_batch_size``
    averages the groups' statistics instead; that differs from either
    multi-device run by sampling noise only.) Inference is unchanged. ``G``
    must divide ``N`` (a clear ``ValueError`` for a static ``N``, a runtime
    check otherwise); ``G = N`` is today's computation exactly. Ghost groups
    and ``synchronized=True`` exclude each other.

    Example:

        bn = BatchNormalization(axis=-1, ghost_group_size=32)
        y = bn(x, training=True)  # x [256, H, W, C]: 8 groups of 32 rows
    """

    def __init__(self, *args, ghost_group_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ghost_group_size = groups_lib.check_ghost_group_size(ghost_group_size)
        if self.ghost_group_size is not None and self.synchronized:
            raise ValueError(
                f"BatchNormalization {self.name!r}: ghost_group_size="
                f"{self.ghost_group_size} (statistics per group of rows within a "
                "replica) and synchronized=True (statistics over all replicas) "
                "exclude each other; set one of them."
            )

    def get_config(self):
        config = super().get_config()
        if self.ghost_group_size is not None:  # absent when off: configs unchanged
            config["ghost_group_size"] = self.ghost_group_size
        return config

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and mask is None and not self.renorm:
            return self.normalize_in_training(inputs)
        if training and self.trainable and self.ghost_group_size is not None:
            raise ValueError(
                f"BatchNormalization {self.name!r}: ghost groups support neither "
                "masks nor renorm."
            )
        return super().call(inputs, training=training, mask=mask)

    def normalize_in_training(self, inputs, update_statistics: bool = True):
        """Training-mode normalisation with batch statistics.

        Args:
            inputs: ``[N, ..., C]`` (or channels first).
            update_statistics: also update the moving mean and variance (the
                forward pass does; a recomputation, such as RevNet's
                reversible backward pass, does not). Either way the output is
                computed by the same kernel, so a recomputation is bit-exact.

        Returns:
            The normalised, scaled and shifted ``inputs`` in the layer's
            compute dtype.
        """
        if self.ghost_group_size is None:
            y, mean, variance = self._normalize_batch(inputs)
        else:
            y, mean, variance = self._normalize_ghost_groups(inputs)
        if update_statistics:
            m = self.momentum
            self.moving_mean.assign(
                keras.ops.cast(self.moving_mean, mean.dtype) * m + mean * (1.0 - m)
            )
            self.moving_variance.assign(
                keras.ops.cast(self.moving_variance, variance.dtype) * m
                + variance * (1.0 - m)
            )
        return keras.ops.cast(y, self.compute_dtype)

    def _normalize_batch(self, inputs):
        """``(y, mean, biased variance)`` of one batch (or group) ``[n, ...]``."""
        if self._can_fuse(inputs, None):
            x = inputs
            if x.dtype not in (tf.float16, tf.bfloat16, tf.float32):
                x = tf.cast(x, tf.float32)
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=tf.cast(self.gamma, tf.float32),
                offset=tf.cast(self.beta, tf.float32),
                mean=tf.constant([], tf.float32),
                variance=tf.constant([], tf.float32),
                epsilon=self.epsilon,
                data_format="NHWC",
                is_training=True,
            )
            shape = tf.shape(x)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            variance = variance * tf.maximum(n - 1.0, 0.0) / n  # -> biased
        else:
            # Keras' own training computation (synchronized moments included).
            dtype = keras.backend.result_type(inputs.dtype, "float32")
            x = keras.ops.cast(inputs, dtype)
            mean, variance = self._moments(x, None)
            y = keras.ops.batch_normalization(
                x=x,
                mean=mean,
                variance=variance,
                axis=self.axis,
                offset=keras.ops.cast(self.beta, x.dtype),
                scale=keras.ops.cast(self.gamma, x.dtype),
                epsilon=self.epsilon,
            )
        return y, mean, variance

    def _normalize_ghost_groups(self, inputs):
        """``_normalize_batch`` per group of ``G`` rows; the first group's statistics.

        ``inputs [N, ...]`` -> ``[N / G, G, ...]``; ``tf.map_fn`` runs the
        same kernel on every group as a replica would run on its batch (so
        the values equal the per-replica run's), and works for a dynamic
        ``N`` (the export's training-mode trace).
        """
        g = self.ghost_group_size
        inputs = tf.convert_to_tensor(inputs)
        rows = inputs.shape[0]
        checks = []
        if rows is not None:
            groups_lib.check_groups(g, rows=rows, what=f"the input of {self.name!r}")
            if rows == g:  # one group: the plain computation
                return self._normalize_batch(inputs)
        else:
            checks.append(
                tf.debugging.assert_equal(
                    tf.math.floormod(tf.shape(inputs)[0], g),
                    0,
                    message=f"BatchNormalization {self.name!r}: ghost_group_size="
                    f"{g} must divide the number of rows of the batch",
                )
            )
        with tf.control_dependencies(checks):
            shape = tf.shape(inputs)
            grouped = tf.reshape(inputs, tf.concat([[-1, g], shape[1:]], axis=0))
        group_shape = [g, *inputs.shape[1:]]
        grouped = tf.ensure_shape(grouped, [None, *group_shape])
        if self._can_fuse(inputs, None):
            y_dtype = inputs.dtype
            if y_dtype not in (tf.float16, tf.bfloat16, tf.float32):
                y_dtype = tf.float32
            stat_dtype = tf.float32
        else:
            y_dtype = tf.as_dtype(keras.backend.result_type(inputs.dtype, "float32"))
            stat_dtype = y_dtype
        channels = [inputs.shape[self.axis]]
        y, means, variances = tf.map_fn(
            self._normalize_batch,
            grouped,
            fn_output_signature=(
                tf.TensorSpec(group_shape, y_dtype),
                tf.TensorSpec(channels, stat_dtype),
                tf.TensorSpec(channels, stat_dtype),
            ),
        )
        return tf.reshape(y, shape), means[0], variances[0]

    def _can_fuse(self, inputs, mask) -> bool:
        if (
            mask is not None
            or self.renorm
            or not (self.center and self.scale)
            or len(inputs.shape) != 4
            or self.axis not in (-1, 3)
            or inputs.dtype == tf.float64
        ):
            return False
        if self.synchronized and tf.distribute.has_strategy():
            # Cross-replica statistics need Keras' all-reduced moments.
            return tf.distribute.get_strategy().num_replicas_in_sync == 1
        return True


def make_batchnorm(
    *,
    name: str,
    synchronized: bool = False,
    ghost_group_size: int | None = None,
    data_format: str = DATA_FORMAT,
    dtype: str | None = None,
) -> keras.layers.Layer:
    """Creates the trunks' batch-normalization layer.

    Args:
        name: layer name.
        synchronized: if True, under a ``tf.distribute`` strategy with several
            replicas the batch mean and variance are all-reduced over the
            replicas at each training step (Keras' ``synchronized=True``,
            TensorFlow backend). Outside a strategy it behaves like ordinary
            batch norm.
        ghost_group_size: None (off) or ``G``: training statistics per group
            of ``G`` consecutive rows of the batch (ghost batch norm, the
            original's per-core statistics; see ``BatchNormalization`` and
            ``pp.groups``).
        data_format: layout of the inputs (sets the channel axis).
        dtype: Keras dtype policy name (None: the global policy). The
            statistics are computed in float32 whatever the policy.

    Returns:
        A ``BatchNormalization`` (the fused subclass above) over the channel
        axis with momentum 0.99 and epsilon 1e-3 (reference section 5); its
        scale and offset are not regularized (reference section 6).
    """
    return BatchNormalization(
        axis=channel_axis(data_format),
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        center=True,
        scale=True,
        synchronized=synchronized,
        ghost_group_size=ghost_group_size,
        dtype=check_dtype_policy(dtype),
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
    data_format: str = DATA_FORMAT,
    dtype: str | None = None,
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
        data_format: ``channels_last`` (shapes as written here) or
            ``channels_first`` (``[N, C, H, W]``).
        dtype: Keras dtype policy name (None: float32).

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
    dtype = check_dtype_policy(dtype)
    if explicit:
        x = keras.layers.ZeroPadding2D(
            padding=((before, after), (before, after)),
            data_format=check_data_format(data_format),
            dtype=dtype,
            name=pad_name or f"{name}_pad",
        )(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="valid" if explicit or kernel_size == 1 else "same",
        data_format=check_data_format(data_format),
        dtype=dtype,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=l2_regularizer(weight_decay),
        name=name,
    )(x)


def apply_stem_pool(
    x: keras.KerasTensor,
    *,
    data_format: str = DATA_FORMAT,
    dtype: str | None = None,
) -> keras.KerasTensor:
    """The stems' 3x3 max pool, stride 2, after zero padding 1/1 (reference 5.1).

    Zero padding (not -inf) as in the original (reference 11.2 item 19): when
    the pooled values can be negative (ResNet v2, RevNet: no ReLU before the
    pool) a border zero can win the max; and the window placement (1 before,
    1 after) differs from Keras ``"same"`` on even sizes. Layers
    ``root_pool_pad`` and ``root_pool``.

    Returns:
        ``[N, ceil(H / 2), ceil(W / 2), C]`` (in ``data_format``).
    """
    before, after = fixed_padding_amounts(3)
    dtype = check_dtype_policy(dtype)
    x = keras.layers.ZeroPadding2D(
        padding=((before, after), (before, after)),
        data_format=data_format,
        dtype=dtype,
        name="root_pool_pad",
    )(x)
    return keras.layers.MaxPooling2D(
        pool_size=3,
        strides=2,
        padding="valid",
        data_format=data_format,
        dtype=dtype,
        name="root_pool",
    )(x)


def to_layout(
    image: keras.KerasTensor, *, data_format: str, dtype: str | None
) -> keras.KerasTensor:
    """Moves the NHWC model input to the trunk's layout (``channels_first``: NCHW).

    The trunks' inputs and returned endpoints are always NHWC (the contract of
    ``revisit_tf.models``); ``data_format`` only changes the layout inside the
    trunk, at the cost of one transpose in and one per returned feature map.
    """
    if check_data_format(data_format) == "channels_last":
        return image
    return keras.layers.Permute(
        (3, 1, 2), dtype=check_dtype_policy(dtype), name="to_channels_first"
    )(image)


def as_endpoint(
    x: keras.KerasTensor, *, name: str, data_format: str, dtype: str | None
) -> keras.KerasTensor:
    """Returns a feature-map endpoint as NHWC float32 ``[N, h, w, c]``.

    In the default configuration (``channels_last``, float32) this adds no
    layer. Otherwise an NCHW map is transposed back (``{name}_nhwc``) and a
    16-bit map is cast to float32 (``{name}_float32``), so consumers (heads,
    export, probes) see the same endpoints whatever the trunk's layout and
    precision.
    """
    if check_data_format(data_format) == "channels_first":
        x = keras.layers.Permute((2, 3, 1), dtype=dtype, name=f"{name}_nhwc")(x)
    if head_dtype(dtype) != dtype:
        x = keras.layers.Activation(
            "linear", dtype=head_dtype(dtype), name=f"{name}_float32"
        )(x)
    return x


def apply_logits(
    x: keras.KerasTensor,
    *,
    num_classes: int,
    weight_decay: float,
    dtype: str | None = None,
) -> keras.KerasTensor:
    """The trunks' final layer: ``[N, C] -> [N, num_classes]``, always float32.

    A dense layer with bias (the original's 1x1 convolution on the pooled
    features has the same parameters, reference 5.1-5.3), kernel with
    ``L2(weight_decay / 2)``, bias unregularized (reference 6), layer
    ``logits``. Float32 under mixed precision (keras-hub's ``head_dtype``).
    """
    return keras.layers.Dense(
        num_classes,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=l2_regularizer(weight_decay),
        dtype=head_dtype(dtype),
        name="logits",
    )(x)
