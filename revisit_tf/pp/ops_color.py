"""SimCLR colour and blur augmentations (stage 2, ``pp``).

Contract: the op contract of ``ops_image`` (a registered factory that
validates its arguments at build time, ``fn(data) -> new dict`` reading
``data[key]`` and writing ``data[key_result or key]``). Both ops take float
images in [0, 1], ``[H, W, C]`` or stacks ``[K, H, W, C]`` (any leading
axes), and make one random draw per image / stack element.

Ops (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", appendix A; the SimCLR v2 code's
``data_util.py``):

* ``color_jitter`` - with probability ``p``: brightness, contrast,
  saturation and hue in a random order, each followed by a clip to [0, 1].
* ``gaussian_blur`` - with probability ``p``: separable Gaussian blur with a
  random sigma, kernel about 10% of the image side, reflect padding.
* Random grayscale is the existing ``to_gray(p)`` of ``ops_image``.

Randomness: every random number of an op is drawn by a handful of
vectorised ops (one value per image) in the graph that calls the op; the
per-image work (``tf.map_fn``, ``tf.cond``, ``tf.switch_case``) is
deterministic. Inside ``tf.data`` with a global seed, TF numbers the op
seeds per graph, so a random op inside a ``map_fn``/``cond`` body would get
the same seed as the first random op of the outer graph and repeat its
numbers.

The components (:func:`brightness`, :func:`contrast`, :func:`saturation`,
:func:`hue`, :func:`apply_color_jitter`, :func:`gaussian_kernel`,
:func:`blur_images`) are plain functions with explicit factors, so that each
can be checked against its closed form.

Place in the data flow: ``data`` -> ``pp`` (``decode|copies(2,
"inception_crop(224, area_min=0.08)|flip_lr|value_range(0, 1)|color_jitter|
to_gray(0.2)|gaussian_blur")|...``) -> ``models``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from revisit_tf.pp import rng, utils
from revisit_tf.pp.registry import register
from revisit_tf.pp.utils import ImageFn

# SimCLR v2 `color_jitter`: brightness/contrast/saturation ranges 0.8 s,
# hue range 0.2 s (appendix A; data_util.py).
_JITTER_SCALE = 0.8
_HUE_SCALE = 0.2
# tf.image.random_hue's limit: a hue shift of 0.5 is half a turn of the hue
# circle, larger ones are redundant; 0.2 s <= 0.5 gives s <= 2.5.
_MAX_STRENGTH = 2.5
# Canonical order (the SimCLR code's order when random_order=False).
COMPONENTS = ("brightness", "contrast", "saturation", "hue")


def _check_float_image(op: str, image: tf.Tensor) -> None:
    if not image.dtype.is_floating:
        raise ValueError(
            f"{op}: expected a float image in [0, 1], got dtype {image.dtype.name} "
            f"(shape {image.shape}); put value_range(0, 1) before it."
        )


def _flatten(image: tf.Tensor) -> tf.Tensor:
    """``[..., H, W, C]`` -> ``[N, H, W, C]`` with static ``H, W, C`` kept."""
    return tf.reshape(image, tf.concat([[-1], tf.shape(image)[-3:]], axis=0))


def _unflatten(flat: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    out = tf.reshape(flat, tf.shape(like))
    return tf.ensure_shape(out, like.shape)


# --------------------------------------------------------------------------- #
# Colour jitter.
# --------------------------------------------------------------------------- #


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
    """``clip(image * factor, 0, 1)`` (SimCLR v2's multiplicative brightness)."""
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
    """``clip((x - mean) * factor + mean, 0, 1)``, mean per channel over H, W.

    ``tf.image.adjust_contrast``, as SimCLR's ``tf.image.random_contrast``.
    """
    return tf.clip_by_value(tf.image.adjust_contrast(image, factor), 0.0, 1.0)


def saturation(image: tf.Tensor, factor) -> tf.Tensor:
    """HSV saturation times ``factor`` (clipped), then clip to [0, 1]; RGB only."""
    return tf.clip_by_value(tf.image.adjust_saturation(image, factor), 0.0, 1.0)


def hue(image: tf.Tensor, delta) -> tf.Tensor:
    """HSV hue rotated by ``delta`` (fraction of a turn), then clip; RGB only."""
    return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


_COMPONENT_FNS: tuple[Callable[[tf.Tensor, Any], tf.Tensor], ...] = (
    brightness,
    contrast,
    saturation,
    hue,
)


def jitter_ranges(strength: float) -> tuple[tuple[float, float], ...]:
    """Sampling ranges of the 4 components for a jitter ``strength`` ``s``.

    Returns:
        ``((b_lo, b_hi), (c_lo, c_hi), (s_lo, s_hi), (h_lo, h_hi))``: the
        brightness, contrast and saturation factors are uniform in
        ``[max(0, 1 - 0.8 s), 1 + 0.8 s]`` and the hue delta in
        ``[-0.2 s, 0.2 s]`` (SimCLR v2 ``color_jitter``, appendix A).
    """
    lo, hi = max(0.0, 1.0 - _JITTER_SCALE * strength), 1.0 + _JITTER_SCALE * strength
    delta = _HUE_SCALE * strength
    return (lo, hi), (lo, hi), (lo, hi), (-delta, delta)


def _branch(fn: Callable, image: tf.Tensor, value) -> Callable[[], tf.Tensor]:
    return lambda: fn(image, value)


def apply_color_jitter(
    image: tf.Tensor, factors: Sequence | tf.Tensor, order: tf.Tensor | None = None
) -> tf.Tensor:
    """Applies the first ``n`` jitter components to one image, deterministically.

    Args:
        image: float ``[H, W, C]`` in [0, 1].
        factors: ``n`` values (``n`` = 2 for brightness and contrast only,
            4 for all), in the canonical order of :data:`COMPONENTS`: the
            brightness, contrast and saturation factors and the hue delta.
        order: int32 ``[n]``, a permutation of ``range(n)``: step ``i``
            applies component ``order[i]``; ``None`` means ``range(n)``.

    Returns:
        float ``[H, W, C]`` in [0, 1]; every component is followed by a clip
        to [0, 1], as in the SimCLR code.
    """
    factors = tf.convert_to_tensor(factors, tf.float32)
    n = factors.shape[0]
    if n not in (2, 4):
        raise ValueError(
            f"color_jitter: expected 2 or 4 factors {COMPONENTS[:n]}, got {n}."
        )
    x = image
    for i in range(n):
        if order is None:
            x = _COMPONENT_FNS[i](x, factors[i])
        else:
            branches = [_branch(_COMPONENT_FNS[j], x, factors[j]) for j in range(n)]
            x = tf.switch_case(order[i], branches)
            x.set_shape(image.shape)
    return x


def sample_color_jitter(
    num_images: tf.Tensor, num_components: int, strength: float, random_order: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws the jitter parameters of ``num_images`` images (vectorised).

    Args:
        num_images: ``N``, int32 scalar.
        num_components: 2 (1-channel images) or 4 (RGB).
        strength: jitter strength ``s`` (see :func:`jitter_ranges`).
        random_order: draw a uniformly random order per image (argsort of
            uniform noise), else the canonical order.

    Returns:
        ``(factors, order)``: float32 ``[N, n]`` and int32 ``[N, n]``.
    """
    ranges = jitter_ranges(strength)[:num_components]
    factors = tf.stack(
        [rng.uniform([num_images], lo, hi) for lo, hi in ranges], axis=1
    )  # [N, n]
    if random_order:
        noise = rng.uniform([num_images, num_components])
        order = tf.argsort(noise, axis=1, stable=True)  # [N, n], a permutation
    else:
        order = tf.tile(tf.range(num_components)[None], [num_images, 1])
    return factors, tf.cast(order, tf.int32)


@register("color_jitter")
@utils.in_key_out_key
def get_color_jitter(
    strength: float = 1.0, p: float = 0.8, *, random_order: bool = True
) -> ImageFn:
    """SimCLR colour jitter (Chen et al. 2020, appendix A; SimCLR v2 code).

    With probability ``p`` per image: brightness (multiply by a factor
    uniform in ``[max(0, 1 - 0.8 s), 1 + 0.8 s]``), contrast
    (``tf.image.adjust_contrast``, factor in the same range), saturation
    (same range) and hue (delta uniform in ``[-0.2 s, 0.2 s]``), in a random
    order per image when ``random_order`` (else in that order), each
    followed by a clip to [0, 1] as in the SimCLR code. 1-channel images
    (Fashion-MNIST) get brightness and contrast only. SimCLR uses ``s = 1``
    on ImageNet and ``s = 0.5`` on CIFAR-10, ``p = 0.8``.

    Args:
        strength: ``s``, a number in [0, 2.5] (the hue delta 0.2 s stays
            within half a turn); ``s = 0`` is the identity.
        p: probability of jittering an image; ``p = 0`` is the identity.
        random_order: random order of the components per image.

    Returns:
        An image function: float ``[..., H, W, C]`` in [0, 1], ``C`` in
        (1, 3) -> float32, same shape, in [0, 1] (the input unchanged when
        ``s = 0`` or ``p = 0``).

    Raises:
        ValueError: bad arguments (build time); an integer image or ``C``
            not 1 or 3 (trace time).
    """
    op = "color_jitter"
    if (
        not utils.is_number(strength)
        or not math.isfinite(strength)
        or not 0 <= strength <= _MAX_STRENGTH
    ):
        raise ValueError(
            f"{op}: `strength` must be a number in [0, {_MAX_STRENGTH}], got "
            f"{strength!r}."
        )
    strength = float(strength)
    p = utils.check_probability(op, "p", p)
    if not isinstance(random_order, bool):
        raise ValueError(f"{op}: `random_order` must be a bool, got {random_order!r}.")

    def _color_jitter(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank(op, image)
        _check_float_image(op, image)
        channels = image.shape[-1]
        if channels not in (1, 3):
            raise ValueError(
                f"{op}: expected 1 or 3 channels, got shape {image.shape}."
            )
        x = tf.cast(image, tf.float32)
        if strength == 0.0 or p == 0.0:
            return x
        n = 4 if channels == 3 else 2
        flat = _flatten(x)  # [N, H, W, C]
        num_images = tf.shape(flat)[0]
        coins = rng.uniform([num_images]) < p  # [N]
        factors, order = sample_color_jitter(num_images, n, strength, random_order)

        def _one(args):
            coin, img, f, o = args
            return tf.cond(
                coin,
                lambda: apply_color_jitter(img, f, o if random_order else None),
                lambda: img,
            )

        out = tf.map_fn(
            _one,
            (coins, flat, factors, order),
            fn_output_signature=tf.TensorSpec(flat.shape[1:], tf.float32),
        )
        return _unflatten(out, x)

    return _color_jitter


# --------------------------------------------------------------------------- #
# Gaussian blur.
# --------------------------------------------------------------------------- #


def blur_kernel_size(height: int, width: int, kernel_fraction: float) -> int:
    """``max(3, 2 * (k // 2) + 1)`` with ``k = int(kernel_fraction * min(H, W))``.

    An even ``k`` is rounded up to the next odd size, as SimCLR's
    ``radius = int(k / 2); size = 2 * radius + 1`` (``k = H // 10`` there).
    """
    k = int(kernel_fraction * min(height, width))
    return max(3, 2 * (k // 2) + 1)


def gaussian_kernel(sigma: tf.Tensor, size: int) -> tf.Tensor:
    """Normalised 1-D Gaussian kernels ``exp(-x^2 / (2 sigma^2)) / sum``.

    Args:
        sigma: float32 ``[N]``, one sigma per image.
        size: odd kernel size ``k``; taps at ``x = -(k // 2) .. k // 2``.

    Returns:
        float32 ``[N, k]``, each row summing to 1.
    """
    radius = size // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)  # [k]
    g = tf.exp(-tf.square(x)[None] / (2.0 * tf.square(sigma)[:, None]))  # [N, k]
    return g / tf.reduce_sum(g, axis=1, keepdims=True)


def _blur_axis(flat: tf.Tensor, kernel: tf.Tensor, axis: int) -> tf.Tensor:
    """Reflect-pads ``flat`` [N, H, W, C] along ``axis`` (1 or 2) and convolves."""
    size = kernel.shape[1]
    radius = size // 2
    paddings = [[0, 0]] * 4
    paddings[axis] = [radius, radius]
    padded = tf.pad(flat, paddings, mode="REFLECT")
    length = tf.shape(flat)[axis]
    out = tf.zeros_like(flat)
    for j in range(size):  # out[i] = sum_j g[j] * padded[i + j]
        window = [slice(None)] * 4
        window[axis] = slice(j, j + length)
        out += kernel[:, j, None, None, None] * padded[tuple(window)]
    return out


def blur_images(flat: tf.Tensor, sigma: tf.Tensor, size: int) -> tf.Tensor:
    """Separable Gaussian blur of ``N`` images, each with its own sigma.

    Args:
        flat: float32 ``[N, H, W, C]``; ``H, W > size // 2`` (reflect pad).
        sigma: float32 ``[N]``.
        size: odd kernel size.

    Returns:
        float32 ``[N, H, W, C]``: per channel, the 2-D convolution with the
        outer product of :func:`gaussian_kernel`, on the image extended by
        reflection (``numpy.pad(mode="reflect")``, edge pixel not repeated).
    """
    kernel = gaussian_kernel(sigma, size)  # [N, k]
    return _blur_axis(_blur_axis(flat, kernel, 1), kernel, 2)


@register("gaussian_blur")
@utils.in_key_out_key
def get_gaussian_blur(
    p: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_fraction: float = 0.1,
) -> ImageFn:
    """SimCLR random Gaussian blur (Chen et al. 2020, appendix A).

    With probability ``p`` per image: a separable Gaussian blur, sigma
    uniform in ``sigma``, kernel size ``max(3, odd(int(kernel_fraction *
    min(H, W))))`` (SimCLR: 10% of the side, 23 taps at 224), SAME output
    size with reflect padding, each channel separately. SimCLR blurs
    ImageNet views with ``p = 0.5`` (v1; v2 uses 1.0 and 0.1 for its two
    views) and does not blur CIFAR-10.

    Args:
        p: probability of blurring an image, in [0, 1].
        sigma: ``(lo, hi)`` with ``0 < lo <= hi``, in pixels.
        kernel_fraction: kernel size as a fraction of ``min(H, W)``, in
            (0, 1].

    Returns:
        An image function: float ``[..., H, W, C]`` with static ``H, W`` ->
        float32, same shape (the input unchanged when ``p = 0``).

    Raises:
        ValueError: bad arguments (build time); an integer image, unknown
            ``H, W`` or an image too small for the reflect padding (trace
            time).
    """
    op = "gaussian_blur"
    p = utils.check_probability(op, "p", p)
    if not (
        isinstance(sigma, tuple | list)
        and len(sigma) == 2
        and all(utils.is_number(s) and math.isfinite(s) for s in sigma)
        and 0 < sigma[0] <= sigma[1]
    ):
        raise ValueError(
            f"{op}: `sigma` must be (lo, hi) with 0 < lo <= hi, got {sigma!r}."
        )
    sigma_lo, sigma_hi = float(sigma[0]), float(sigma[1])
    if not utils.is_number(kernel_fraction) or not 0 < kernel_fraction <= 1:
        raise ValueError(
            f"{op}: `kernel_fraction` must be a number in (0, 1], got "
            f"{kernel_fraction!r}."
        )

    def _gaussian_blur(image: tf.Tensor) -> tf.Tensor:
        utils.check_image_rank(op, image)
        _check_float_image(op, image)
        height, width = image.shape[-3], image.shape[-2]
        if height is None or width is None:
            raise ValueError(
                f"{op}: needs a static height and width, got shape {image.shape}; "
                "crop or resize to a fixed size first."
            )
        size = blur_kernel_size(height, width, float(kernel_fraction))
        if min(height, width) <= size // 2:
            raise ValueError(
                f"{op}: image {height}x{width} is too small for the reflect "
                f"padding of a {size}-tap kernel."
            )
        x = tf.cast(image, tf.float32)
        if p == 0.0:
            return x
        flat = _flatten(x)  # [N, H, W, C]
        num_images = tf.shape(flat)[0]
        coins = rng.uniform([num_images]) < p  # [N]
        sigmas = rng.uniform([num_images], sigma_lo, sigma_hi)  # [N]
        blurred = blur_images(flat, sigmas, size)
        out = tf.where(coins[:, None, None, None], blurred, flat)
        return _unflatten(out, x)

    return _gaussian_blur
