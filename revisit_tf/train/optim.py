"""Optimizers, learning-rate schedules and durations (stage 4, training).

The root ``pretrain`` takes two gin references (style guide 4.2, 4.12):

* ``schedule_fn(*, global_batch_size, steps_per_epoch, total_steps)`` returns a
  ``keras.optimizers.schedules.LearningRateSchedule`` evaluated on the
  optimizer's step counter: ``reference_schedule`` (the original, reference
  7.2) or ``cosine_schedule`` (SimCLR's warm-up + cosine). Each builder's own
  hyper-parameters are further keyword arguments bound by gin.
* ``optimizer_fn(learning_rate)`` returns a ``keras.optimizers.Optimizer``:
  ``sgd`` (the original, reference 7.3), ``adam`` (the original's
  ``--optimizer adam``), ``adamw`` or ``lars`` (``lars.LARS``).

Numbers of the original release (reference section 7.1-7.3):

* ``steps_per_epoch = num_train_examples // global_batch_size`` (integer
  division, global batch) and ``total_steps = ceil(epochs * steps_per_epoch)``;
* linear batch scaling ``base_lr = lr * global_batch_size / reference_batch``
  (``reference_batch`` = 256 in every shipped config);
* linear warm-up over ``warmup_steps``, then a piecewise-constant rate that
  drops by ``decay_factor`` *after* each boundary (a step equal to a boundary
  still uses the previous rate);
* momentum SGD (0.9, not Nesterov).

Weight decay of the original is the trunk's L2 regularizers in the loss
(reference 6), not an optimizer option; only ``adamw`` (and ``lars`` with a
non-zero ``weight_decay``) add a decay of their own.

Durations are given as exactly one of steps, epochs or examples, like
big_vision's ``utils.steps``; the loop only ever sees steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import keras
import tensorflow as tf

from revisit_tf.train import lars as lars_lib


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


# Optimizers: optimizer_fn(learning_rate).

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule


def _rate(learning_rate: LearningRate) -> LearningRate:
    """Keras optimizers reject an int (or np.float32) rate: make it a float."""
    if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
        return float(learning_rate)
    return learning_rate


def sgd(
    learning_rate: LearningRate,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> keras.optimizers.SGD:
    """Momentum SGD as the original (reference 7.3).

    Keras' update ``v = m v - lr g; w += v`` equals TF1's ``a = m a + g;
    w -= lr a`` while the rate is constant; they differ slightly during warm-up
    and at decay steps (the TF1 form rescales past momentum by the new rate).
    Weight decay is not applied here: it is the L2 regularizers of the model's
    kernels, summed into the loss, exactly as reference section 6.

    Args:
      learning_rate: float or schedule (from ``schedule_fn``).
      momentum: momentum (0.9, the original's).
      nesterov: Nesterov momentum (False, the original's).

    Returns:
      ``keras.optimizers.SGD``.
    """
    return keras.optimizers.SGD(
        learning_rate=_rate(learning_rate),
        momentum=float(momentum),  # Keras rejects an int momentum.
        nesterov=nesterov,
    )


def adam(
    learning_rate: LearningRate,
    *,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-8,
) -> keras.optimizers.Adam:
    """Adam as the original's ``--optimizer adam`` (reference 7.3).

    The defaults are TF1 ``tf.train.AdamOptimizer``'s; Keras' default epsilon
    is 1e-7, so it is set explicitly. Keras and TF1 both add epsilon to
    ``sqrt(v)`` before bias correction ("epsilon hat" of Kingma and Ba). No
    weight decay: that is the trunk's L2 regularizers in the loss (reference 6).

    Args:
      learning_rate: float or schedule (from ``schedule_fn``).
      beta_1: first-moment decay (0.9, TF1).
      beta_2: second-moment decay (0.999, TF1).
      epsilon: added to ``sqrt(v)`` (1e-8, TF1; not Keras' 1e-7).

    Returns:
      ``keras.optimizers.Adam``.
    """
    return keras.optimizers.Adam(
        learning_rate=_rate(learning_rate),
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
    )


@keras.saving.register_keras_serializable(package="revisit_tf")
class KernelDecayAdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` whose decay skips variables of rank <= 1.

    Biases and batch-norm gamma/beta are not decayed; kernels (rank >= 2) are.
    Keras 3 selects decayed variables only through
    ``exclude_from_weight_decay(var_list=..., var_names=...)``, which needs the
    variables (or regexes on their names) before ``build``; this class calls it
    from ``build`` with the variables of rank <= 1, which replaces any earlier
    exclusion set on the same optimizer.

    Example: ``KernelDecayAdamW(1e-3, weight_decay=1e-4)`` on a Dense layer
    decays its ``kernel`` by ``1 - 1e-3 * 1e-4`` per step and leaves its
    ``bias`` to Adam alone.
    """

    def build(self, variables):
        """Excludes the variables of rank <= 1 from decay, then builds AdamW."""
        if self.built:
            return
        self.exclude_from_weight_decay(
            var_list=[v for v in variables if len(v.shape) < 2]
        )
        super().build(variables)


def adamw(
    learning_rate: LearningRate,
    *,
    weight_decay: float = 1e-4,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-8,
) -> KernelDecayAdamW:
    """AdamW (Loshchilov and Hutter 2019) decaying kernels only.

    Keras applies the decoupled decay before the Adam step as ``w -= w *
    weight_decay * lr(step)`` (the rate includes the schedule, as PyTorch's
    AdamW), to variables of rank >= 2 only (``KernelDecayAdamW``). Use it with
    the trunk's L2 regularizers switched off, or the kernels are decayed twice.

    Args:
      learning_rate: float or schedule (from ``schedule_fn``).
      weight_decay: decoupled decay per unit rate (1e-4, the L2 weight of the
        reference's trunks, reference 6; Keras' default is 4e-3).
      beta_1: first-moment decay (0.9, TF1 and Keras).
      beta_2: second-moment decay (0.999, TF1 and Keras).
      epsilon: added to ``sqrt(v)`` (1e-8 as TF1; Keras' default is 1e-7).

    Returns:
      ``KernelDecayAdamW``, a registered ``keras.optimizers.AdamW`` subclass.
    """
    return KernelDecayAdamW(
        learning_rate=_rate(learning_rate),
        weight_decay=float(weight_decay),
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
    )


def lars(
    learning_rate: LearningRate,
    *,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    weight_decay: float = 0.0,
    epsilon: float = 0.0,
    nesterov: bool = False,
    exclude_from_adaptation: Sequence[str] | None = None,
) -> lars_lib.LARS:
    """LARS (You et al. 2017) as SimCLR tf2 trains with it.

    In this project weight decay normally comes from the trunk's L2
    regularizers in the loss (reference 6), so the L2 term is already in the
    gradient and ``weight_decay`` defaults to 0.

    Args:
      learning_rate: float or schedule (from ``schedule_fn``; SimCLR pairs LARS
        with ``cosine_schedule``).
      momentum: momentum (0.9, You et al. and SimCLR).
      trust_coefficient: trust coefficient ``eta`` (0.001, SimCLR's ``eeta``).
      weight_decay: coupled decay added to the gradient (0; SimCLR uses 1e-6
        with no L2 in its loss).
      epsilon: added to the gradient norm of the trust ratio (0, as SimCLR).
      nesterov: Nesterov momentum (False, SimCLR's default).
      exclude_from_adaptation: None excludes variables of rank <= 1 (biases,
        batch-norm gamma/beta) from the trust ratio and the decay; a sequence
        of path substrings (e.g. ``["bias", "bn"]``) excludes those instead.

    Returns:
      ``lars.LARS``.
    """
    return lars_lib.LARS(
        _rate(learning_rate),
        momentum=float(momentum),
        trust_coefficient=trust_coefficient,
        weight_decay=weight_decay,
        epsilon=epsilon,
        nesterov=nesterov,
        exclude_from_adaptation=exclude_from_adaptation,
    )
