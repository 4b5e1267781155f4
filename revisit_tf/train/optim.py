"""Optimizer, learning-rate schedule and durations (stage 4, training).

Numbers follow the original release (reference section 7.1-7.3):

* ``steps_per_epoch = num_train_examples // global_batch_size`` (integer
  division, global batch) and ``total_steps = ceil(epochs * steps_per_epoch)``;
* linear batch scaling ``base_lr = lr * global_batch_size / reference_batch``
  (``reference_batch`` = 256 in every shipped config);
* linear warm-up over ``warmup_steps``, then a piecewise-constant rate that
  drops by ``decay_factor`` *after* each boundary (a step equal to a boundary
  still uses the previous rate);
* momentum SGD (0.9, not Nesterov).

Durations are given as exactly one of steps, epochs or examples, like
big_vision's ``utils.steps``; the loop only ever sees steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """``num_examples // global_batch_size`` (reference 7.1), at least 1."""
    if num_examples <= 0 or global_batch_size <= 0:
        raise ValueError(
            f"num_examples ({num_examples}) and global_batch_size "
            f"({global_batch_size}) must be positive."
        )
    return max(1, num_examples // global_batch_size)


def to_steps(
    name: str,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    examples: int | None = None,
    num_examples: int | None = None,
    global_batch_size: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """Converts a duration given in steps, epochs or examples into steps.

    Args:
      name: what the duration is for (used in error messages), e.g. "total".
      steps: a number of optimizer steps.
      epochs: a (possibly fractional) number of epochs of ``num_examples``;
        ``ceil(epochs * steps_per_epoch)`` as reference 7.1.
      examples: a number of training examples (images); ``ceil(examples /
        global_batch_size)``.
      num_examples: size of the training split (needed for ``epochs``).
      global_batch_size: global batch in images (needed for epochs/examples).
      allow_none: return None when no duration is given instead of failing.

    Returns:
      The number of steps (>= 0), or None.

    Raises:
      ValueError: none or several of steps/epochs/examples given, or negative.
    """
    given = {
        k: v
        for k, v in (("steps", steps), ("epochs", epochs), ("examples", examples))
        if v is not None
    }
    if not given:
        if allow_none:
            return None
        raise ValueError(f"Give the {name} duration as steps, epochs or examples.")
    if len(given) > 1:
        raise ValueError(
            f"Give the {name} duration as exactly one of steps, epochs or "
            f"examples; got {given}."
        )
    ((unit, value),) = given.items()
    if value < 0:
        raise ValueError(f"The {name} duration must be >= 0; got {unit}={value}.")
    if unit == "steps":
        if int(value) != value:
            raise ValueError(f"{name}_steps must be an integer; got {value}.")
        return int(value)
    if global_batch_size is None:
        raise ValueError(f"global_batch_size is needed to convert {name}_{unit}.")
    if unit == "examples":
        return math.ceil(value / global_batch_size)
    if num_examples is None:
        raise ValueError(f"num_examples is needed to convert {name}_epochs.")
    return math.ceil(value * steps_per_epoch(num_examples, global_batch_size))


@keras.saving.register_keras_serializable(package="revisit_tf")
class WarmupPiecewiseConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up followed by step decays (reference 7.2).

    ``lr(step) = base_lr * (step + 1) / warmup_steps`` for ``step <
    warmup_steps`` (or ``step / warmup_steps`` with ``warmup_from_zero``), then
    ``base_lr * decay_factor ** j`` where ``j`` counts the boundaries strictly
    below ``step``.

    The original starts warm-up at exactly 0, so its first update is wasted
    (reference 11.2 item 18). That is kept only behind ``warmup_from_zero=True``;
    by default the first step already uses ``base_lr / warmup_steps``.

    Example: ``WarmupPiecewiseConstant(0.1, warmup_steps=10, boundaries=[100])``
    gives 0.01 at step 0, 0.1 at steps 9..100 and 0.01 from step 101 on.
    """

    def __init__(
        self,
        base_lr: float,
        *,
        warmup_steps: int = 0,
        boundaries: Sequence[int] = (),
        decay_factor: float = 0.1,
        warmup_from_zero: bool = False,
    ):
        super().__init__()
        boundaries = [int(b) for b in boundaries]
        if base_lr < 0 or warmup_steps < 0 or decay_factor < 0:
            raise ValueError(
                f"base_lr ({base_lr}), warmup_steps ({warmup_steps}) and "
                f"decay_factor ({decay_factor}) must be >= 0."
            )
        if boundaries != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing; got {boundaries}.")
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries
        self.decay_factor = float(decay_factor)
        self.warmup_from_zero = bool(warmup_from_zero)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.base_lr, tf.float32)
        for boundary in self.boundaries:
            lr = tf.where(step > boundary, lr * self.decay_factor, lr)
        if self.warmup_steps > 0:
            done = step if self.warmup_from_zero else step + 1.0
            warm = self.base_lr * done / self.warmup_steps
            lr = tf.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "decay_factor": self.decay_factor,
            "warmup_from_zero": self.warmup_from_zero,
        }


def build_schedule(
    *,
    lr: float,
    global_batch_size: int,
    reference_batch_size: int = 256,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    decay_epochs: Sequence[float] = (),
    decay_factor: float = 0.1,
    warmup_from_zero: bool = False,
) -> WarmupPiecewiseConstant:
    """The reference schedule from epoch-based settings (reference 7.2).

    Args:
      lr: learning rate at ``reference_batch_size``.
      global_batch_size: global batch in images (Rotation: source images, not
        the 4x rotated copies, as the original scales by ``batch_size``).
      reference_batch_size: batch size at which ``lr`` is given (256).
      steps_per_epoch: from ``steps_per_epoch()``.
      warmup_epochs: linear warm-up length in epochs.
      decay_epochs: epochs after which the rate is multiplied by
        ``decay_factor``.
      decay_factor: multiplicative decay per boundary.
      warmup_from_zero: reproduce the original's zero first step.
    """
    base_lr = lr * global_batch_size / reference_batch_size
    return WarmupPiecewiseConstant(
        base_lr,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        boundaries=[round(e * steps_per_epoch) for e in decay_epochs],
        decay_factor=decay_factor,
        warmup_from_zero=warmup_from_zero,
    )


def build_sgd(
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> keras.optimizers.Optimizer:
    """Momentum SGD as the original (reference 7.3).

    Keras' update ``v = m v - lr g; w += v`` equals TF1's ``a = m a + g;
    w -= lr a`` while the rate is constant; they differ slightly during warm-up
    and at decay steps (the TF1 form rescales past momentum by the new rate).
    Weight decay is not applied here: it is the L2 regularizers of the model's
    kernels, summed into the loss, exactly as reference section 6.
    """
    return keras.optimizers.SGD(
        learning_rate=learning_rate, momentum=momentum, nesterov=nesterov
    )
