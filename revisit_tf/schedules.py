"""Durations and learning-rate schedules shared by training and the probe.

Place in the data flow: used by stage 4 (``train``: ``pretrain`` turns its
durations into steps and binds ``schedule_fn=@reference_schedule``) and by
stage 6 (``probe``: the SGD probes, ``probe/sgd.py`` on cached features and
``probe/augmented.py`` on re-augmented images, train their heads with the
same schedule, reference 8.5 "same trainer as pretext training"). One module
so that both stages compute the same rate at the same step and the probe
never imports the trainer. ``train/optim.py`` re-exports every name here.

Numbers of the original release (reference section 7.1-7.2):

* ``steps_per_epoch = num_train_examples // global_batch_size`` (integer
  division, global batch) and ``total_steps = ceil(epochs * steps_per_epoch)``
  (``to_steps``);
* linear batch scaling ``base_lr = lr * global_batch_size / reference_batch``
  (``reference_batch`` = 256 in every shipped config);
* linear warm-up over ``warmup_steps``, then a piecewise-constant rate that
  drops by ``decay_factor`` *after* each boundary (a step equal to a boundary
  still uses the previous rate).

Schedule builders share the signature ``schedule_fn(*, global_batch_size,
steps_per_epoch, total_steps, **hyper_parameters)`` and return a
``keras.optimizers.schedules.LearningRateSchedule`` evaluated on the 0-based
step before its update: ``reference_schedule`` (the original) and
``cosine_schedule`` (SimCLR's warm-up + cosine). Durations are given as
exactly one of steps, epochs or examples, like big_vision's ``utils.steps``
(``to_steps``).
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


@keras.saving.register_keras_serializable(package="revisit_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up followed by a cosine decay (SimCLR, Chen et al. 2020 B.1).

    ``lr(step) = base_lr * (step + 1) / warmup_steps`` for ``step <
    warmup_steps`` (the convention of ``WarmupPiecewiseConstant``; SimCLR tf2's
    ``WarmUpAndCosineDecay`` uses ``step / warmup_steps``, whose first update is
    wasted), then with ``p = (step - warmup_steps) / (total_steps -
    warmup_steps)`` clipped to [0, 1]:
    ``base_lr * (end_factor + (1 - end_factor) * 0.5 * (1 + cos(pi * p)))``,
    i.e. ``keras.optimizers.schedules.CosineDecay(base_lr, total_steps -
    warmup_steps, alpha=end_factor)`` shifted by the warm-up. The rate is
    ``base_lr`` at ``warmup_steps`` and ``end_factor * base_lr`` from
    ``total_steps`` on. If ``total_steps <= warmup_steps`` (a smoke run shorter
    than the warm-up) the decay takes one step.

    Example: ``WarmupCosine(1.0, warmup_steps=10, total_steps=110)`` gives 0.1
    at step 0, 1.0 at steps 9 and 10, 0.5 at step 60 and 0.0 from step 110 on.
    """

    def __init__(
        self,
        base_lr: float,
        *,
        total_steps: int,
        warmup_steps: int = 0,
        end_factor: float = 0.0,
    ):
        super().__init__()
        if base_lr < 0 or warmup_steps < 0 or total_steps < 0 or end_factor < 0:
            raise ValueError(
                f"base_lr ({base_lr}), warmup_steps ({warmup_steps}), total_steps "
                f"({total_steps}) and end_factor ({end_factor}) must be >= 0."
            )
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.end_factor = float(end_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        lr = self.base_lr * (self.end_factor + (1.0 - self.end_factor) * cosine)
        if self.warmup_steps > 0:
            warm = self.base_lr * (step + 1.0) / self.warmup_steps
            lr = tf.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "end_factor": self.end_factor,
        }


# Schedules: schedule_fn(*, global_batch_size, steps_per_epoch, total_steps).


def reference_schedule(
    *,
    global_batch_size: int,
    steps_per_epoch: int,
    total_steps: int,
    lr: float = 0.1,
    reference_batch_size: int = 256,
    warmup_epochs: float = 0.0,
    decay_epochs: Sequence[float] = (),
    decay_factor: float = 0.1,
    warmup_from_zero: bool = False,
) -> WarmupPiecewiseConstant:
    """The original's schedule from epoch-based settings (reference 7.2).

    ``base_lr = lr * global_batch_size / reference_batch_size``, a linear
    warm-up over ``round(warmup_epochs * steps_per_epoch)`` steps, then
    ``base_lr * decay_factor ** j`` after the ``j``-th boundary
    ``round(decay_epochs[j] * steps_per_epoch)``.

    Args:
      global_batch_size: global batch in images (Rotation: source images, not
        the 4x rotated copies, as the original scales by ``batch_size``).
      steps_per_epoch: from ``steps_per_epoch()``.
      total_steps: training length in steps; accepted for the common
        ``schedule_fn`` signature and unused (the last rate holds to the end).
      lr: learning rate at ``reference_batch_size`` (0.1, the original's
        default; the shipped configs set it).
      reference_batch_size: batch at which ``lr`` is given (256, the
        original's ``lr_scale_batch_size`` in every shipped config).
      warmup_epochs: linear warm-up length in epochs (0: none).
      decay_epochs: epochs after which the rate is multiplied by
        ``decay_factor`` (none: constant rate, as the original's ``[epochs]``).
      decay_factor: multiplicative decay per boundary (0.1, the original's
        ``lr_decay_factor`` default).
      warmup_from_zero: reproduce the original's zero first step
        (reference 11.2 item 18).

    Returns:
      A ``WarmupPiecewiseConstant`` (rate per optimizer step).
    """
    del total_steps  # The piecewise-constant rate needs no end.
    base_lr = lr * global_batch_size / reference_batch_size
    return WarmupPiecewiseConstant(
        base_lr,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        boundaries=[round(e * steps_per_epoch) for e in decay_epochs],
        decay_factor=decay_factor,
        warmup_from_zero=warmup_from_zero,
    )


SCALINGS = ("linear", "sqrt")


def cosine_schedule(
    *,
    global_batch_size: int,
    steps_per_epoch: int,
    total_steps: int,
    lr: float = 0.3,
    reference_batch_size: int = 256,
    scaling: str = "linear",
    warmup_epochs: float = 10.0,
    end_factor: float = 0.0,
) -> WarmupCosine:
    """SimCLR's warm-up + cosine schedule (Chen et al. 2020, section B.1).

    ``base_lr = lr * global_batch_size / reference_batch_size`` (``"linear"``,
    SimCLR's 0.3 x B / 256) or ``lr * sqrt(global_batch_size)`` (``"sqrt"``,
    SimCLR's 0.075 x sqrt(B) for small batches / long runs), a linear warm-up
    over ``round(warmup_epochs * steps_per_epoch)`` steps, then a cosine decay
    to ``end_factor * base_lr`` at ``total_steps`` (see ``WarmupCosine``).

    Args:
      global_batch_size: global batch in images.
      steps_per_epoch: from ``steps_per_epoch()``.
      total_steps: training length in steps; the decay ends there.
      lr: rate at ``reference_batch_size`` (``"linear"``) or per sqrt(image)
        (``"sqrt"``); 0.3 is SimCLR's linear default.
      reference_batch_size: batch at which a linear ``lr`` is given (256, as
        SimCLR); unused with ``"sqrt"``.
      scaling: ``"linear"`` or ``"sqrt"`` (SimCLR's
        ``learning_rate_scaling``).
      warmup_epochs: warm-up length in epochs (10, SimCLR's default).
      end_factor: final rate as a fraction of ``base_lr`` (0, SimCLR's
        cosine decay to zero).

    Returns:
      A ``WarmupCosine`` (rate per optimizer step).

    Raises:
      ValueError: unknown ``scaling``.
    """
    if scaling == "linear":
        base_lr = lr * global_batch_size / reference_batch_size
    elif scaling == "sqrt":
        base_lr = lr * math.sqrt(global_batch_size)
    else:
        raise ValueError(
            f"Unknown scaling {scaling!r}; expected one of {', '.join(SCALINGS)}."
        )
    return WarmupCosine(
        base_lr,
        total_steps=total_steps,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        end_factor=end_factor,
    )
