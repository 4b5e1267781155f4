"""Context-encoder inpainting's objective: L2 over the removed region (stage 4).

Pathak et al. 2016, "Context Encoders: Feature Learning by Inpainting",
section 3.2: the reconstruction loss is the L2 distance between the original
and the prediction inside the removed region, ``||M * (x - F((1 - M) * x))||^2``
for the binary mask ``M``; the paper adds an adversarial term
(``lambda_rec = 0.999``, ``lambda_adv = 0.001``), which is not used here.

The input pipeline gives ``image`` (the masked input), ``target`` (the
original) ``[B, H, W, C]`` and ``mask`` ``[B, H, W, 1]``, 1 inside the
removed region; the model's ``logits`` are the reconstruction
``[B, H, W, C]``. The loss is normalised per example by the number of
masked values, so it does not depend on the image size, the channel count or
the size of an example's region.

Contract: ``train.losses`` (``loss_fn(batch, outputs) -> [B]``,
``metric_fn(batch, outputs) -> {name: [B]}``).
"""

from __future__ import annotations

import tensorflow as tf

from revisit_tf.train import losses

# Floor of the MSE in the PSNR, so that a perfect (or empty) region gives a
# finite value: 10 log10(4 / 1e-10) = 106 dB for images in [-1, 1].
_MSE_FLOOR = 1e-10


def masked_l2(
    batch: losses.Batch,
    outputs: losses.Outputs,
    *,
    key: str = "logits",
    target_key: str = "target",
    mask_key: str = "mask",
) -> tf.Tensor:
    """Mean squared error over each example's removed region (Pathak et al. 2016).

    Example ``b`` gets ``sum_{h, w, c} m * (pred - target)^2 / (C * sum_{h, w} m)``
    with ``m = mask[b, h, w, 0]``: the MSE over its masked pixels and channels
    (a soft mask gives the mask-weighted mean). An example with an empty mask
    gets 0, with zero gradient.

    Args:
        batch: ``{target_key: [B, H, W, C], mask_key: [B, H, W, 1], ...}``;
            the mask is 1 inside the removed region, 0 elsewhere.
        outputs: ``{key: [B, H, W, C]}``, the reconstruction (half precision is
            computed in float32).
        key: the reconstruction's key in ``outputs``.
        target_key: the original image's key in ``batch``.
        mask_key: the mask's key in ``batch``.

    Returns:
        ``[B]`` float32 (float64 for float64 predictions).

    Raises:
        ValueError: the mask is not ``[B, H, W, 1]``.
    """
    prediction = losses.full_precision(outputs[key])  # [B, H, W, C]
    target = tf.cast(batch[target_key], prediction.dtype)  # [B, H, W, C]
    mask = tf.cast(batch[mask_key], prediction.dtype)  # [B, H, W, 1]
    rank = mask.shape.rank
    if rank is not None and (rank != 4 or mask.shape[-1] not in (1, None)):
        raise ValueError(f"The mask must be [B, H, W, 1], got shape {mask.shape}.")
    squared = tf.square(prediction - target) * mask  # mask broadcast over C
    channels = tf.cast(tf.shape(prediction)[-1], prediction.dtype)
    total = tf.reduce_sum(squared, axis=[1, 2, 3])  # [B]
    count = tf.reduce_sum(mask, axis=[1, 2, 3]) * channels  # [B]
    # Dividing by the masked count per example, never by a row count such as
    # B * H, keeps the value independent of H, W, C and the region's size.
    return tf.math.divide_no_nan(total, count)


def reconstruction_metrics(
    batch: losses.Batch,
    outputs: losses.Outputs,
    *,
    key: str = "logits",
    target_key: str = "target",
    mask_key: str = "mask",
    peak_to_peak: float = 2.0,
) -> dict[str, tf.Tensor]:
    """``{"psnr": [B]}``: PSNR in dB of each example's removed region.

    ``10 log10(peak_to_peak^2 / mse)`` with ``mse`` the :func:`masked_l2`
    value floored at 1e-10 (so a perfect reconstruction, or an empty mask,
    gives a finite 106 dB for ``peak_to_peak = 2``).

    Args:
        batch: as :func:`masked_l2`.
        outputs: as :func:`masked_l2`.
        key: the reconstruction's key in ``outputs``.
        target_key: the original image's key in ``batch``.
        mask_key: the mask's key in ``batch``.
        peak_to_peak: the image value range: 2.0 for images in ``[-1, 1]``,
            1.0 for ``[0, 1]``, 255.0 for ``[0, 255]``.

    Returns:
        ``{"psnr": [B]}`` float32.
    """
    mse = masked_l2(batch, outputs, key=key, target_key=target_key, mask_key=mask_key)
    mse = tf.maximum(tf.cast(tf.stop_gradient(mse), tf.float32), _MSE_FLOOR)
    psnr = 10.0 * tf.math.log(float(peak_to_peak) ** 2 / mse) / tf.math.log(10.0)
    return {"psnr": psnr}
