"""Inpainting's masked L2 and PSNR vs NumPy, and their normalisation."""

import math

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.train import reconstruction


def _numpy_masked_mse(pred, target, mask):
    """Per example: mean of (pred - target)^2 over masked pixels and channels."""
    pred, target = pred.astype(np.float64), target.astype(np.float64)
    out = np.zeros(len(pred))
    for b in range(len(pred)):
        total, count = 0.0, 0
        for h, w in zip(*np.nonzero(mask[b, :, :, 0]), strict=True):
            total += float(np.sum((pred[b, h, w] - target[b, h, w]) ** 2))
            count += pred.shape[-1]
        out[b] = total / count if count else 0.0
    return out


def _box_masks(sizes, hw):
    """``[B, hw, hw, 1]`` masks with a ``size x size`` box at a per-example spot."""
    mask = np.zeros((len(sizes), hw, hw, 1), np.float32)
    for b, size in enumerate(sizes):
        top = b % (hw - size + 1)
        mask[b, top : top + size, hw - size :, 0] = 1.0
    return mask


def _inputs(rng, b, hw, c):
    target = rng.uniform(-1, 1, (b, hw, hw, c)).astype(np.float32)
    pred = rng.uniform(-1, 1, (b, hw, hw, c)).astype(np.float32)
    return pred, target


def _call(fn, pred, target, mask, **kwargs):
    batch = {"image": target * (1 - mask), "target": target, "mask": mask}
    return fn(batch, {"logits": tf.constant(pred)}, **kwargs)


def test_masked_l2_matches_numpy_with_per_example_mask_sizes():
    rng = np.random.default_rng(0)
    pred, target = _inputs(rng, 4, 8, 3)
    mask = _box_masks([1, 3, 4, 8], 8)
    got = _call(reconstruction.masked_l2, pred, target, mask)
    assert got.dtype == tf.float32 and got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), _numpy_masked_mse(pred, target, mask), 1e-6)
    # Errors outside the mask do not count.
    changed = pred + 5.0 * (1 - mask)
    np.testing.assert_allclose(
        _call(reconstruction.masked_l2, changed, target, mask).numpy(), got.numpy()
    )


def test_masked_l2_float64_and_tf_function():
    rng = np.random.default_rng(1)
    pred, target = _inputs(rng, 3, 8, 3)
    mask = _box_masks([2, 5, 6], 8)
    fn = tf.function(reconstruction.masked_l2)
    got = _call(fn, pred.astype(np.float64), target, mask)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(
        got.numpy(), _numpy_masked_mse(pred, target, mask), 1e-12
    )


@pytest.mark.parametrize("hw", [8, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_same_pixel_error_gives_same_loss_at_any_size(hw, channels):
    # Every masked value is off by 0.25, so every example's MSE is 0.0625,
    # whatever H, W, C and the region's size.
    rng = np.random.default_rng(hw + channels)
    target = rng.uniform(-1, 1, (3, hw, hw, channels)).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], target.shape).astype(np.float32)
    pred = target + 0.25 * sign
    mask = _box_masks([2, 4, hw // 2], hw)
    got = _call(reconstruction.masked_l2, pred, target, mask)
    np.testing.assert_allclose(got.numpy(), np.full(3, 0.0625), rtol=1e-6)


def test_average_over_the_global_batch_is_the_mean_of_per_example_mse():
    # What the loop does with the values: compute_average_loss(values, B) sums
    # them and divides by the global batch B. Per-row values ([B * H], each
    # row's masked MSE) would be summed over B * H rows and divided by B: off
    # by a factor of about H. Per-pixel means over the whole image would be
    # off by the masked fraction. Both are checked to differ below.
    rng = np.random.default_rng(2)
    b, hw, c = 4, 16, 3
    pred, target = _inputs(rng, b, hw, c)
    mask = _box_masks([3, 5, 8, 16], hw)
    per_example = _numpy_masked_mse(pred, target, mask)
    values = _call(reconstruction.masked_l2, pred, target, mask)
    assert values.shape == (b,)
    average = float(tf.nn.compute_average_loss(values, global_batch_size=b))
    np.testing.assert_allclose(average, per_example.mean(), rtol=1e-6)
    squared = (pred - target) ** 2 * mask  # [B, H, W, C]
    rows = mask.sum(axis=(2, 3)) * c  # masked values per row, [B, H]
    per_row = np.where(rows > 0, squared.sum(axis=(2, 3)) / np.maximum(rows, 1), 0)
    assert per_row.sum() / b > 2 * average  # the per-row loop's value
    whole_image = np.mean(squared.sum(axis=(1, 2, 3)) / (hw * hw * c))
    assert whole_image < 0.7 * average


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    rng = np.random.default_rng(3)
    pred, target = _inputs(rng, 2, 8, 3)
    mask = _box_masks([3, 3], 8)
    mask[1] = 0.0
    logits = tf.Variable(pred)
    batch = {"target": target, "mask": mask}
    with tf.GradientTape() as tape:
        loss = reconstruction.masked_l2(batch, {"logits": logits})
        total = tf.reduce_sum(loss)
    grad = tape.gradient(total, logits).numpy()
    assert loss.numpy()[1] == 0.0 and loss.numpy()[0] > 0
    assert np.isfinite(grad).all()
    assert np.all(grad[1] == 0) and np.any(grad[0] != 0)
    assert np.all(grad[0][mask[0, :, :, 0] == 0] == 0)  # only masked pixels
    psnr = reconstruction.reconstruction_metrics(batch, {"logits": logits})["psnr"]
    assert np.isfinite(psnr.numpy()).all()


def test_psnr_closed_form():
    rng = np.random.default_rng(4)
    target = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    mask = _box_masks([4, 4, 4], 8)
    errors = np.array([0.1, 0.5, 0.0], np.float32)
    pred = target + errors[:, None, None, None]
    got = _call(reconstruction.reconstruction_metrics, pred, target, mask)
    assert set(got) == {"psnr"} and got["psnr"].dtype == tf.float32
    psnr = got["psnr"].numpy()
    # mse = e^2 -> 10 log10(2^2 / e^2) = 20 log10(2 / e); 0.1 -> 26.02 dB.
    np.testing.assert_allclose(psnr[:2], 20 * np.log10(2 / errors[:2]), rtol=1e-5)
    np.testing.assert_allclose(psnr[2], 10 * math.log10(4 / 1e-10), rtol=1e-5)
    # Images in [0, 1]: peak-to-peak 1.
    unit = _call(
        reconstruction.reconstruction_metrics, pred, target, mask, peak_to_peak=1.0
    )["psnr"].numpy()
    np.testing.assert_allclose(unit[:2], 20 * np.log10(1 / errors[:2]), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_predictions_give_float32(dtype):
    rng = np.random.default_rng(5)
    pred, target = _inputs(rng, 2, 8, 3)
    mask = _box_masks([3, 6], 8)
    batch = {"target": target, "mask": mask}
    outputs = {"logits": tf.cast(pred, dtype)}
    loss = reconstruction.masked_l2(batch, outputs)
    psnr = reconstruction.reconstruction_metrics(batch, outputs)["psnr"]
    assert loss.dtype == tf.float32 and psnr.dtype == tf.float32
    rounded = tf.cast(tf.cast(pred, dtype), tf.float32).numpy()
    np.testing.assert_allclose(
        loss.numpy(), _numpy_masked_mse(rounded, target, mask), rtol=1e-5
    )


def test_other_keys_and_mask_errors():
    rng = np.random.default_rng(6)
    pred, target = _inputs(rng, 2, 8, 1)
    mask = _box_masks([2, 3], 8)
    batch = {"original": target, "hole": mask}
    got = reconstruction.masked_l2(
        batch, {"recon": pred}, key="recon", target_key="original", mask_key="hole"
    )
    np.testing.assert_allclose(got.numpy(), _numpy_masked_mse(pred, target, mask), 1e-6)
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        reconstruction.masked_l2(
            {"target": target, "mask": np.repeat(mask, 3, axis=-1)}, {"logits": pred}
        )
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        reconstruction.masked_l2(
            {"target": target, "mask": mask[..., 0]}, {"logits": pred}
        )
