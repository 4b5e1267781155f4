"""Optimizers (stage 4, training); schedules and durations re-exported.

The root ``pretrain`` takes two gin references (style guide 4.2, 4.12):

* ``schedule_fn(*, global_batch_size, steps_per_epoch, total_steps)`` returns a
  ``keras.optimizers.schedules.LearningRateSchedule`` evaluated on the
  optimizer's step counter: ``reference_schedule`` (the original, reference
  7.2) or ``cosine_schedule`` (SimCLR's warm-up + cosine). Each builder's own
  hyper-parameters are further keyword arguments bound by gin.
* ``optimizer_fn(learning_rate)`` returns a ``keras.optimizers.Optimizer``:
  ``sgd`` (the original, reference 7.3), ``adam`` (the original's
  ``--optimizer adam``), ``adamw`` or ``lars`` (``lars.LARS``).

The schedules and the duration helpers (``steps_per_epoch``, ``to_steps``,
``WarmupPiecewiseConstant``, ``WarmupCosine``, ``reference_schedule``,
``cosine_schedule``, ``SCALINGS``) live in ``revisit_tf/schedules.py``, which
the probe's SGD protocols import too (one schedule for both stages, reference
8.5); they are re-exported here under their old names, and gin registers them
from here (``configurables.py``: ``reference_schedule`` keeps its gin name).

Numbers of the original release (reference section 7.3): momentum SGD (0.9,
not Nesterov). Weight decay of the original is the trunk's L2 regularizers in
the loss (reference 6), not an optimizer option; only ``adamw`` (and ``lars``
with a non-zero ``weight_decay``) add a decay of their own.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras

from revisit_tf.schedules import (
    SCALINGS,
    WarmupCosine,
    WarmupPiecewiseConstant,
    cosine_schedule,
    reference_schedule,
    steps_per_epoch,
    to_steps,
)
from revisit_tf.train import lars as lars_lib

__all__ = [
    "SCALINGS",
    "KernelDecayAdamW",
    "LearningRate",
    "WarmupCosine",
    "WarmupPiecewiseConstant",
    "adam",
    "adamw",
    "cosine_schedule",
    "lars",
    "reference_schedule",
    "sgd",
    "steps_per_epoch",
    "to_steps",
]

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
