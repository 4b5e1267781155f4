"""Generic image preprocessing ops (stage 2, ``pp``).

Op contract (same for every op registered here): each op is a factory
``get_<op>(...)`` registered under ``<op>``; the factory validates its
arguments at build time (``ValueError`` naming the bad value) and returns
``fn(data: dict) -> dict``, which returns a *new* dict and never mutates its
input. Image ops read ``data[key]`` (default ``"image"``) and write
``data[key_result or key]`` (see :func:`revisit_tf.pp.utils.in_key_out_key`).
An image is ``[H, W, C]``; a stack of copies or patches is ``[K, H, W, C]``
(per-image ops and random ops act on each stack element independently, as
the original's ``map_fn`` over the leading axis, reference section 3).

These are the ops of the reference op catalogue (section 3.1) and of the
Inception crop (section 3.2, step 1), under big_vision-style names:

================  =================================================
``decode``        encoded bytes -> uint8 ``[H, W, C]`` (uint8 passes)
``resize``        exact ``h x w``, float32, value range kept
``resize_small``  shorter side -> ``size``, aspect kept, float32
``central_crop``  offset ``((H - h) // 2, (W - w) // 2)``
``random_crop``   uniformly random ``h x w`` window
``inception_crop``  distorted-bounding-box crop (+ optional resize)
``flip_lr``       random left-right flip, p = 0.5
``to_gray``       with probability p: channel mean, replicated
``value_range``   linear map ``[in_min, in_max] -> [vmin, vmax]``
``standardize``   per-image ``(x - mean) / max(std, 1/sqrt(n))``
``keep``          keep only the named keys
================  =================================================

Place in the data flow: ``data`` yields ``{"image", "label"}`` ->
``builder.get_preprocess_fn("decode|...")`` applies these ops (and the pretext
ops of ``ops_pretext``) inside ``tf.data.Dataset.map`` -> batched to
``models``.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from revisit_tf.pp import rng, utils
from revisit_tf.pp.registry import OpFn, register
from revisit_tf.pp.utils import ImageFn

# TF2 `tf.image.resize` methods accepted by `resize` / `resize_small`.
_RESIZE_METHODS = (
    "bilinear",
    "nearest",
    "bicubic",
    "area",
    "lanczos3",
    "lanczos5",
    "gaussian",
    "mitchellcubic",
)
# Methods of the TF1 kernels (`tf.compat.v1.image.resize`) for `legacy=True`.
_LEGACY_RESIZE_METHODS = {
    "bilinear": tf.compat.v1.image.ResizeMethod.BILINEAR,
    "nearest": tf.compat.v1.image.ResizeMethod.NEAREST_NEIGHBOR,
    "bicubic": tf.compat.v1.image.ResizeMethod.BICUBIC,
    "area": tf.compat.v1.image.ResizeMethod.AREA,
}


def _check_method(op: str, method: Any, legacy: bool) -> str:
    allowed = tuple(_LEGACY_RESIZE_METHODS) if legacy else _RESIZE_METHODS
    if method not in allowed:
        raise ValueError(
            f"{op}: `method` must be one of {allowed}"
            f"{' (legacy=True)' if legacy else ''}, got {method!r}."
        )
    return method


def resize_image(
    image: tf.Tensor, size: tuple[int, int], method: str, legacy: bool
) -> tf.Tensor:
    """Resizes ``[H, W, C]`` or ``[K, H, W, C]`` to ``size``; float32 output.

    Args:
        image: any numeric dtype, value range is kept (0..255 stays 0..255).
        size: ``(h, w)``.
        method: a TF resize method name (validated by the callers).
        legacy: use the TF1 kernels (``align_corners=False`` and no half-pixel
            centres, reference 3.1) instead of TF2's half-pixel centres.

    Returns:
        float32 ``[h, w, C]`` / ``[K, h, w, C]`` with static ``h, w``.
    """
    rank = utils.check_image_rank("resize", image)
    if rank > 4:  # tf.image.resize batches only one leading axis.
        return utils.map_per_image(
            "resize", lambda x: resize_image(x, size, method, legacy), image, tf.float32
        )
    if legacy:
        # TF1 maps output pixel i to input coordinate i * in / out (no
        # half-pixel offset): the resized image is shifted by up to half an
        # input pixel towards the top-left. Only for reproducing the original.
        out = tf.compat.v1.image.resize(
            image, size, method=_LEGACY_RESIZE_METHODS[method], align_corners=False
        )
    else:
        out = tf.image.resize(image, size, method=method)
    return tf.cast(out, tf.float32)


@register("decode")
@utils.in_key_out_key
def get_decode(channels: int = 3) -> ImageFn:
    """Decodes an encoded image (JPEG/PNG/GIF/BMP) to uint8 ``[H, W, channels]``.

    A uint8 tensor (an already decoded image, e.g. from a TFDS ``Image``
    feature or synthetic data) passes through unchanged, so the same pipeline
    string works for both kinds of source.

    Args:
        channels: 1, 3 or 4; the static channel count of the output.

    Returns:
        An image function: string ``[]`` or uint8 ``[H, W, C]`` -> uint8
        ``[H, W, channels]`` (first frame of an animated GIF).

    Raises:
        ValueError: bad ``channels`` (build time) or an input that is neither
            a string nor uint8 (trace time).
    """
    if not utils.is_int(channels) or channels not in (1, 3, 4):
        raise ValueError(f"decode: `channels` must be 1, 3 or 4, got {channels!r}.")

    def _decode(image: tf.Tensor) -> tf.Tensor:
        if image.dtype == tf.uint8:
            return image
        if image.dtype != tf.string or image.shape.rank not in (0, None):
            raise ValueError(
                "decode: expected an encoded image (string scalar) or a uint8 "
                f"image, got dtype {image.dtype.name} shape {image.shape}."
            )
        out = tf.io.decode_image(image, channels=channels, expand_animations=False)
        out.set_shape([None, None, channels])
        return out

    return _decode


@register("resize")
@utils.in_key_out_key
def get_resize(size: Any, method: str = "bilinear", legacy: bool = False) -> ImageFn:
    """Resizes to exactly ``size`` (aspect ratio not kept), reference 3.1.

    The default uses TF2's ``tf.image.resize`` (half-pixel centres). The TF1
    kernel used by the original (``legacy=True``) maps output pixel ``i`` to
    input ``i * in / out``, which shifts content towards the top-left; the
    shift is not equivariant under rotation, so a resize *before* the
    rotation pretext leaves a cue of the rotation angle (tensorflow#6720,
    big_vision's ``resize`` comment). ``legacy=True`` exists only to
    reproduce the original's numbers.

    Args:
        size: ``s`` (square) or ``(h, w)``, positive ints.
        method: ``tf.image.resize`` method; with ``legacy`` one of bilinear,
            nearest, bicubic, area.
        legacy: TF1 pixel mapping (``align_corners=False``, no half-pixel
            centres).

    Returns:
        An image function: ``[H, W, C]`` / ``[K, H, W, C]`` -> float32
        ``[h, w, C]`` / ``[K, h, w, C]`` in the input's value range.
    """
    hw = utils.parse_size("resize", "size", size)
    if not isinstance(legacy, bool):
        raise ValueError(f"resize: `legacy` must be a bool, got {legacy!r}.")
    _check_method("resize", method, legacy)
    return lambda image: resize_image(image, hw, method, legacy)


def _small_side_size(height, width, size: int):
    """``(round(h * s / m), round(w * s / m))``, ``m = min(h, w)`` (ref 3.1).

    Works on Python ints (static shapes) and on int32 tensors. Rounding is
    half-to-even in both (Python ``round``, ``tf.round``); float64 keeps the
    quotient exact enough for any image size that ties are detected exactly.
    """
    if isinstance(height, int) and isinstance(width, int):
        shorter = min(height, width)
        return round(height * size / shorter), round(width * size / shorter)
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    shorter = tf.minimum(h, w)
    new_h = tf.cast(tf.round(h * size / shorter), tf.int32)
    new_w = tf.cast(tf.round(w * size / shorter), tf.int32)
    return new_h, new_w


@register("resize_small")
@utils.in_key_out_key
def get_resize_small(size: int, method: str = "area") -> ImageFn:
    """Resizes so that the shorter side equals ``size``, keeping aspect ratio.

    Reference 3.1 (``resize_small``): the other side becomes
    ``round(side * size / shorter)``; area interpolation (TF1 and TF2 use the
    same area kernel). For a stack all elements share ``H, W``.

    Args:
        size: target length of the shorter side, int > 0.
        method: ``tf.image.resize`` method.

    Returns:
        An image function: ``[H, W, C]`` / ``[K, H, W, C]`` -> float32
        ``[h', w', C]`` with ``min(h', w') == size``; static when the input's
        ``H, W`` are static.
    """
    size = utils.check_positive_int("resize_small", "size", size)
    _check_method("resize_small", method, legacy=False)

    def _resize_small(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("resize_small", image)
        height, width = image.shape[-3], image.shape[-2]
        if height is None or width is None:
            dynamic = tf.shape(image)
            height, width = dynamic[-3], dynamic[-2]
        new_size = _small_side_size(height, width, size)
        return resize_image(image, new_size, method, legacy=False)

    return _resize_small


def _assert_fits(op: str, image: tf.Tensor, height: int, width: int) -> list:
    """Checks ``H >= height`` and ``W >= width``: statically if known, else at run
    time (returns the assert ops to depend on)."""
    static_h, static_w = image.shape[-3], image.shape[-2]
    if (static_h is not None and static_h < height) or (
        static_w is not None and static_w < width
    ):
        raise ValueError(
            f"{op}: image of size {static_h}x{static_w} (shape {image.shape}) is "
            f"smaller than the crop {height}x{width}."
        )
    shape = tf.shape(image)
    return [
        tf.debugging.assert_greater_equal(
            shape[-3], height, message=f"{op}: image height < crop height {height}"
        ),
        tf.debugging.assert_greater_equal(
            shape[-2], width, message=f"{op}: image width < crop width {width}"
        ),
    ]


@register("central_crop")
@utils.in_key_out_key
def get_central_crop(size: Any) -> ImageFn:
    """Central crop with top-left offset ``((H - h) // 2, (W - w) // 2)``.

    Reference 3.1 (``central_crop``, and ``crop`` at evaluation). A stack is
    cropped at the same offset in every element (all share ``H, W``).

    Args:
        size: ``s`` or ``(h, w)``, positive ints.

    Returns:
        An image function: ``[..., H, W, C]`` -> ``[..., h, w, C]`` (same
        dtype, static ``h, w``). An image smaller than the crop fails at
        trace time if its shape is static, else with a runtime
        ``InvalidArgumentError``.
    """
    h, w = utils.parse_size("central_crop", "size", size)

    def _central_crop(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("central_crop", image)
        with tf.control_dependencies(_assert_fits("central_crop", image, h, w)):
            shape = tf.shape(image)
            top = (shape[-3] - h) // 2
            left = (shape[-2] - w) // 2
        out = image[..., top : top + h, left : left + w, :]
        return utils.with_static_hw(out, h, w)

    return _central_crop


@register("random_crop")
@utils.in_key_out_key
def get_random_crop(size: Any) -> ImageFn:
    """Uniformly random ``h x w`` crop (reference 3.1, ``crop`` in training).

    Every valid top-left offset ``(0..H-h, 0..W-w)`` is equally likely; each
    element of a stack gets its own offset.

    Args:
        size: ``s`` or ``(h, w)``, positive ints.

    Returns:
        An image function: ``[H, W, C]`` / ``[K, H, W, C]`` -> ``[h, w, C]`` /
        ``[K, h, w, C]`` (same dtype, static ``h, w``).
    """
    h, w = utils.parse_size("random_crop", "size", size)

    def _random_crop(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("random_crop", image)
        with tf.control_dependencies(_assert_fits("random_crop", image, h, w)):
            shape = tf.shape(image)
        # Vectorised over the stack (no map_fn): flatten the leading axes to
        # [N, H, W, C] (N = 1 for one image), draw N offsets, gather rows/cols.
        flat = tf.reshape(image, tf.concat([[-1], shape[-3:]], axis=0))
        n = tf.shape(flat)[0]
        top = rng.uniform([n, 1], 0, shape[-3] - h + 1, dtype=tf.int32)
        left = rng.uniform([n, 1], 0, shape[-2] - w + 1, dtype=tf.int32)
        rows = top + tf.range(h)[None]  # [N, h]
        cols = left + tf.range(w)[None]  # [N, w]
        out = tf.gather(flat, rows, axis=1, batch_dims=1)  # [N, h, W, C]
        out = tf.gather(out, cols, axis=2, batch_dims=1)  # [N, h, w, C]
        out = tf.reshape(out, tf.concat([shape[:-3], [h, w], shape[-1:]], axis=0))
        static = image.shape.as_list()
        static[-3], static[-2] = h, w
        return tf.ensure_shape(out, static)

    return _random_crop


@register("inception_crop")
@utils.in_key_out_key
def get_inception_crop(
    size: Any = None,
    area_min: float = 0.05,
    area_max: float = 1.0,
    min_object_covered: float = 0.1,
    aspect_ratio_range: tuple[float, float] = (0.75, 1.33),
    max_attempts: int = 100,
    legacy: bool = False,
) -> ImageFn:
    """Inception-style random crop (reference 3.2, training step 1).

    The crop region is sampled by ``tf.image.sample_distorted_bounding_box``
    with the whole image as the only box: it covers at least
    ``min_object_covered`` of the image, has aspect ratio (w / h) in
    ``aspect_ratio_range`` and area fraction in ``[area_min, area_max]``; after
    ``max_attempts`` failures the whole image is used. Defaults are the
    reference's (0.1, [0.75, 1.33], [0.05, 1.0], 100).

    Args:
        size: if given (``s`` or ``(h, w)``), the crop is bilinearly resized to
            it (float32 output, value range kept, reference 3.2 step 2);
            otherwise the crop keeps its random size and dtype.
        area_min: minimum area fraction, in (0, 1].
        area_max: maximum area fraction, in [area_min, 1].
        min_object_covered: minimum fraction of the image the crop covers,
            in [0, 1].
        aspect_ratio_range: ``(lo, hi)`` with ``0 < lo <= hi``.
        max_attempts: int > 0.
        legacy: resize with the TF1 pixel mapping (see ``resize``).

    Returns:
        An image function: ``[H, W, C]`` -> ``[h, w, C]`` (random ``h, w``
        without ``size``); ``[K, H, W, C]`` -> ``[K, size, C]`` with one crop
        per element (a stack needs ``size``, crops would be ragged).
    """
    op = "inception_crop"
    hw = None if size is None else utils.parse_size(op, "size", size)
    if not (
        utils.is_number(area_min)
        and utils.is_number(area_max)
        and 0 < area_min <= area_max <= 1
    ):
        raise ValueError(
            f"{op}: need 0 < area_min <= area_max <= 1, got area_min={area_min!r}, "
            f"area_max={area_max!r}."
        )
    utils.check_probability(op, "min_object_covered", min_object_covered)
    if not (
        isinstance(aspect_ratio_range, tuple | list)
        and len(aspect_ratio_range) == 2
        and all(utils.is_number(r) for r in aspect_ratio_range)
        and 0 < aspect_ratio_range[0] <= aspect_ratio_range[1]
    ):
        raise ValueError(
            f"{op}: `aspect_ratio_range` must be (lo, hi) with 0 < lo <= hi, got "
            f"{aspect_ratio_range!r}."
        )
    utils.check_positive_int(op, "max_attempts", max_attempts)
    if not isinstance(legacy, bool):
        raise ValueError(f"{op}: `legacy` must be a bool, got {legacy!r}.")
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])

    def _crop_one(image: tf.Tensor) -> tf.Tensor:
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=whole_image,
            min_object_covered=float(min_object_covered),
            aspect_ratio_range=[float(r) for r in aspect_ratio_range],
            area_range=[float(area_min), float(area_max)],
            max_attempts=int(max_attempts),
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(image, begin, crop_size)
        crop.set_shape([None, None, image.shape[-1]])  # slice loses the depth.
        if hw is not None:
            crop = resize_image(crop, hw, "bilinear", legacy)
        return crop

    def _inception_crop(image: tf.Tensor) -> tf.Tensor:
        rank = utils.check_image_rank(op, image)
        if rank > 3 and hw is None:
            raise ValueError(
                f"{op}: a stack of shape {image.shape} needs `size`, otherwise the "
                "per-element crops have different sizes."
            )
        out_dtype = image.dtype if hw is None else tf.float32
        return utils.map_per_image(op, _crop_one, image, out_dtype)

    return _inception_crop


@register("flip_lr")
@utils.in_key_out_key
def get_flip_lr() -> ImageFn:
    """Random left-right flip with p = 0.5, one coin per image (reference 3.1).

    Returns:
        An image function: ``[..., H, W, C]`` -> same shape and dtype; each
        image of a stack is independently either unchanged or mirrored
        along W.
    """

    def _flip_lr(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("flip_lr", image)
        coin = utils.per_image_coin(image, 0.5)  # [..., 1, 1, 1]
        return tf.where(coin, tf.reverse(image, axis=[-2]), image)

    return _flip_lr


@register("to_gray")
@utils.in_key_out_key
def get_to_gray(p: float = 1.0) -> ImageFn:
    """With probability ``p``, replaces the image by its channel mean.

    Reference 3.1 (``to_gray``): the per-pixel mean over channels is
    replicated to the input's channel count. On integer images the mean is an
    integer mean with the fraction dropped (uint8 ``(1, 2, 2) -> 1``); on
    float images it is exact. One coin per ``[H, W, C]`` image, one per
    element of a stack. Like the original it is not tied to training mode.

    Args:
        p: probability of converting, in [0, 1].

    Returns:
        An image function: ``[..., H, W, C]`` -> same shape and dtype. A
        1-channel image (static C = 1) is returned unchanged.
    """
    p = utils.check_probability("to_gray", "p", p)

    def _to_gray(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("to_gray", image)
        if image.shape[-1] == 1 or p == 0.0:
            return image
        if image.dtype.is_integer:
            # Sum in int64 (uint8 sums overflow), then drop the fraction.
            channels = tf.cast(tf.shape(image)[-1], tf.int64)
            total = tf.reduce_sum(tf.cast(image, tf.int64), axis=-1, keepdims=True)
            gray = tf.cast(tf.truncatediv(total, channels), image.dtype)
        else:
            gray = tf.reduce_mean(image, axis=-1, keepdims=True)  # [..., H, W, 1]
        coin = utils.per_image_coin(image, p)  # [..., 1, 1, 1]
        # tf.where broadcasts gray over the channels and keeps static shapes.
        return tf.where(coin, gray, image)

    return _to_gray


@register("value_range")
@utils.in_key_out_key
def get_value_range(
    vmin: float = -1,
    vmax: float = 1,
    in_min: float = 0,
    in_max: float = 255,
    clip_values: bool = False,
) -> ImageFn:
    """Casts to float32 and maps ``[in_min, in_max]`` linearly to ``[vmin, vmax]``.

    The defaults give the original's ``-1_to_1`` (``-1 + 2 x / 255``,
    reference 3.1); ``value_range(0, 1)`` gives ``0_to_1``.

    Args:
        vmin: output value of ``in_min``.
        vmax: output value of ``in_max``.
        in_min: input value mapped to ``vmin``.
        in_max: input value mapped to ``vmax``; must differ from ``in_min``.
        clip_values: clip the output to ``[min(vmin, vmax), max(vmin, vmax)]``.

    Returns:
        An image function: any shape -> float32, same shape.
    """
    for name, value in (("vmin", vmin), ("vmax", vmax)):
        if not utils.is_number(value) or not math.isfinite(value):
            raise ValueError(f"value_range: `{name}` must be a number, got {value!r}.")
    for name, value in (("in_min", in_min), ("in_max", in_max)):
        if not utils.is_number(value) or not math.isfinite(value):
            raise ValueError(f"value_range: `{name}` must be a number, got {value!r}.")
    if in_min == in_max:
        raise ValueError(
            f"value_range: need in_min != in_max, got in_min={in_min!r}, "
            f"in_max={in_max!r}."
        )
    if not isinstance(clip_values, bool):
        raise ValueError(
            f"value_range: `clip_values` must be a bool, got {clip_values!r}."
        )
    scale = (float(vmax) - float(vmin)) / (float(in_max) - float(in_min))
    lo, hi = sorted((float(vmin), float(vmax)))

    def _value_range(image: tf.Tensor) -> tf.Tensor:
        out = float(vmin) + (tf.cast(image, tf.float32) - float(in_min)) * scale
        if clip_values:
            out = tf.clip_by_value(out, lo, hi)
        return out

    return _value_range


@register("standardize")
@utils.in_key_out_key
def get_standardize() -> ImageFn:
    """Per-image standardization (reference 3.1, ``standardization``).

    ``(x - mean) / max(std, 1 / sqrt(n))`` with mean and (population) std over
    all pixels and channels of each image / stack element and ``n = H W C``;
    the floor keeps a constant image finite (it maps to zeros). Same formula
    as ``tf.image.per_image_standardization``.

    Returns:
        An image function: ``[..., H, W, C]`` -> float32, same shape.
    """

    def _standardize(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("standardize", image)
        x = tf.cast(image, tf.float32)
        axes = [-3, -2, -1]
        n = tf.cast(tf.reduce_prod(tf.shape(x)[-3:]), tf.float32)
        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        std = tf.sqrt(tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True))
        return (x - mean) / tf.maximum(std, tf.math.rsqrt(n))

    return _standardize


@register("keep")
def get_keep(*keys: str) -> OpFn:
    """Keeps only ``keys`` of the data dict (e.g. ``keep("image", "label")``).

    Args:
        *keys: one or more distinct non-empty strings.

    Returns:
        ``fn(data) -> {k: data[k] for k in keys}``; a missing key raises
        ``ValueError`` naming it when the pipeline is applied (traced).
    """
    if not keys:
        raise ValueError('keep: expected at least one key, e.g. keep("image").')
    for k in keys:
        utils.check_key("keep", "key", k)
    if len(set(keys)) != len(keys):
        raise ValueError(f"keep: duplicate keys in {keys!r}.")

    def _keep(data: dict) -> dict:
        utils.check_has_keys("keep", data, keys)
        return {k: data[k] for k in keys}

    return _keep


def _to_unit_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 ``x / 255``; float images are assumed in [0, 1]."""
    if image.dtype.is_integer:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)


def _color_distort_one(
    image: tf.Tensor, brightness: float, saturation: tuple[float, float]
) -> tf.Tensor:
    """Fast-mode Inception colour distortion of one float image in [0, 1]."""
    if brightness > 0:
        delta = rng.uniform([], -brightness, brightness)
        image = image + delta
    if image.shape[-1] == 3 and saturation != (1.0, 1.0):
        factor = rng.uniform([], saturation[0], saturation[1])
        image = tf.image.adjust_saturation(image, factor)
    return tf.clip_by_value(image, 0.0, 1.0)


def _check_color_args(op: str, brightness: Any, saturation: Any):
    if not utils.is_number(brightness) or not 0 <= brightness <= 1:
        raise ValueError(
            f"{op}: `brightness` must be a number in [0, 1] (max |delta| on the "
            f"[0, 1] scale), got {brightness!r}."
        )
    if not (
        isinstance(saturation, tuple | list)
        and len(saturation) == 2
        and all(utils.is_number(s) for s in saturation)
        and 0 <= saturation[0] <= saturation[1]
    ):
        raise ValueError(
            f"{op}: `saturation` must be (lo, hi) with 0 <= lo <= hi, got "
            f"{saturation!r}."
        )
    return float(brightness), (float(saturation[0]), float(saturation[1]))


@register("color_distort")
@utils.in_key_out_key
def get_color_distort(
    brightness: float = 32.0 / 255.0, saturation: tuple[float, float] = (0.5, 1.5)
) -> ImageFn:
    """Inception "fast mode" colour distortion (reference 3.2, training step 4).

    On float images in [0, 1]: add a uniform brightness delta in
    ``[-brightness, brightness]``, then scale the saturation by a uniform
    factor in ``saturation`` (3-channel images only; it is a no-op on gray
    pixels), then clip to [0, 1]. One draw per image / stack element.

    Args:
        brightness: maximum |delta| (reference: 32 / 255).
        saturation: ``(lo, hi)`` factor range (reference: (0.5, 1.5)).

    Returns:
        An image function: float ``[..., H, W, C]`` in [0, 1] -> float32, same
        shape, in [0, 1].
    """
    brightness, saturation = _check_color_args("color_distort", brightness, saturation)

    def _color_distort(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("color_distort", image)
        return utils.map_per_image(
            "color_distort",
            lambda x: _color_distort_one(
                tf.cast(x, tf.float32), brightness, saturation
            ),
            image,
            tf.float32,
        )

    return _color_distort


def inception_preprocess_image(
    image: tf.Tensor,
    size: tuple[int, int],
    *,
    train: bool,
    legacy: bool = False,
    central_fraction: float = 0.875,
    brightness: float = 32.0 / 255.0,
    saturation: tuple[float, float] = (0.5, 1.5),
) -> tf.Tensor:
    """The full Inception preprocessing of one ``[H, W, C]`` image (ref 3.2).

    Training: distorted-bounding-box crop (covering >= 10% of the image,
    aspect ratio [0.75, 1.33], area [0.05, 1], 100 attempts, whole image as
    fallback), bilinear resize to ``size``, random left-right flip, fast-mode
    colour distortion (brightness then saturation, clip), map to [-1, 1].
    Evaluation: central crop keeping ``central_fraction`` of each side
    (offsets ``int((h - 0.875 h) / 2)``), bilinear resize, map to [-1, 1].

    Args:
        image: uint8 (divided by 255) or float in [0, 1], ``[H, W, C]``.
        size: ``(h, w)`` of the output.
        train: training or evaluation branch.
        legacy: TF1 resize pixel mapping (see ``resize``).
        central_fraction: evaluation crop fraction (0.875).
        brightness, saturation: colour distortion ranges (``color_distort``).

    Returns:
        float32 ``[h, w, C]`` in [-1, 1].
    """
    x = _to_unit_float(image)
    if train:
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(x),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            min_object_covered=0.1,
            aspect_ratio_range=[0.75, 1.33],
            area_range=[0.05, 1.0],
            max_attempts=100,
            use_image_if_no_bounding_boxes=True,
        )
        x = tf.slice(x, begin, crop_size)
        x.set_shape([None, None, image.shape[-1]])
        x = resize_image(x, size, "bilinear", legacy)
        flip = rng.uniform([]) < 0.5
        x = tf.where(flip, tf.reverse(x, axis=[-2]), x)
        x = _color_distort_one(x, brightness, saturation)
    else:
        shape = tf.shape(x)
        h = tf.cast(shape[0], tf.float64)
        w = tf.cast(shape[1], tf.float64)
        # int((h - fraction * h) / 2), as the slim code (truncation).
        top = tf.cast((h - central_fraction * h) / 2, tf.int32)
        left = tf.cast((w - central_fraction * w) / 2, tf.int32)
        x = x[top : shape[0] - top, left : shape[1] - left, :]
        x = resize_image(x, size, "bilinear", legacy)
    x = (x - 0.5) * 2.0
    return utils.with_static_hw(x, *size)


@register("inception_preprocess")
@utils.in_key_out_key
def get_inception_preprocess(
    size: Any = 224, train: bool = True, legacy: bool = False
) -> ImageFn:
    """The original's ``inception_preprocess`` op (reference 3.1, 3.2).

    The supervised baseline's whole training chain (and Rotation's first
    op): see :func:`inception_preprocess_image`. The composable equivalent
    is ``inception_crop(size)|flip_lr|value_range(0, 1)|color_distort|
    value_range(-1, 1, 0, 1)``.

    Args:
        size: ``s`` or ``(h, w)`` of the output.
        train: the training branch (random crop, flip, colour) or the
            evaluation branch (central 87.5% crop).
        legacy: TF1 resize pixel mapping.

    Returns:
        An image function: uint8 ``[H, W, C]`` (or float in [0, 1]) -> float32
        ``[h, w, C]`` in [-1, 1]; a stack ``[K, H, W, C]`` is processed per
        element.
    """
    hw = utils.parse_size("inception_preprocess", "size", size)
    for name, value in (("train", train), ("legacy", legacy)):
        if not isinstance(value, bool):
            raise ValueError(
                f"inception_preprocess: `{name}` must be a bool, got {value!r}."
            )

    def _inception_preprocess(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank("inception_preprocess", image)
        return utils.map_per_image(
            "inception_preprocess",
            lambda x: inception_preprocess_image(x, hw, train=train, legacy=legacy),
            image,
            tf.float32,
        )

    return _inception_preprocess
