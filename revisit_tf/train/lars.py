"""LARS: layer-wise adaptive rate scaling (stage 4, training).

You et al. 2017, "Large Batch Training of Convolutional Networks", with the
update of SimCLR tf2's ``lars_optimizer.py`` (``classic_momentum=True``), as
SimCLR trains its large batches (Chen et al. 2020, section B.1). For each
variable ``w`` with (already all-reduced) gradient ``g``:

    g' = g + weight_decay * w                           # unless excluded
    trust = trust_coefficient * ||w|| / (||g'|| + epsilon)
            if ||w|| > 0 and ||g'|| > 0 else 1          # adapted variables
    scaled_lr = lr * trust                              # lr if excluded
    v = momentum * v + scaled_lr * g'                   # the momentum slot
    w -= v                  (nesterov: w -= momentum * v + scaled_lr * g')

Norms are Frobenius norms over the whole variable (one trust ratio per
variable, i.e. per layer and parameter kind). The optimizer is built through
``optim.lars``; ``pretrain`` binds it with ``optimizer_fn=@lars``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="revisit_tf")
class LARS(keras.optimizers.Optimizer):
    """Momentum SGD with a per-variable trust ratio (You et al. 2017).

    Weight decay: in this project it normally comes from the trunk's L2
    regularizers, summed into the loss (reference section 6), so the L2 term
    is already in ``g`` and ``weight_decay`` defaults to 0. A non-zero
    ``weight_decay`` adds ``weight_decay * w`` to the gradient (coupled decay,
    as SimCLR; it therefore also enters ``||g'||``). Keras' own decoupled
    ``weight_decay`` of the base class is not used: ``self.weight_decay`` stays
    None and the rate lives in ``self.lars_weight_decay``.

    Exclusion: excluded variables get neither the decay nor the trust ratio
    (plain momentum SGD at ``lr``), as SimCLR excludes the same variables from
    both by default. With ``exclude_from_adaptation=None`` the excluded
    variables are those of rank <= 1 (biases, batch-norm gamma/beta; SimCLR
    excludes ``batch_normalization`` and ``bias`` by name); a sequence of
    strings instead excludes every variable whose path (e.g.
    ``"trunk/block1/bn/gamma"``, or the TF name for a bare ``tf.Variable``)
    contains one of them, and ``()`` adapts every variable. The decision is
    made once in ``build()``, where the Keras variables and their paths are
    known (under the TF backend ``update_step`` only sees the per-replica
    ``tf.Variable``).

    Works under ``tf.distribute`` (the base class all-reduces the replicas'
    gradients by summation before ``update_step``, so every replica computes
    the norms of the same global gradient) and inside ``tf.function``; the
    momentum slots are tracked and checkpoint with ``tf.train.Checkpoint``.

    Example:
      ``LARS(0.1, momentum=0.9, trust_coefficient=0.001)`` on a kernel ``w``
      with ``||w|| = 2`` and ``||g|| = 4`` steps it with rate
      ``0.1 * 0.001 * 2 / 4 = 5e-5``; its bias is stepped with rate 0.1.

    Args:
      learning_rate: float or ``LearningRateSchedule``; the global rate ``lr``.
      momentum: momentum ``m`` in [0, 1) (0.9 as You et al. and SimCLR);
        0 creates no slots.
      trust_coefficient: ``eta`` of You et al. (0.001, SimCLR's ``eeta``).
      weight_decay: coupled decay rate added to the gradient (0; see above).
      epsilon: added to ``||g'||`` in the trust ratio (0, as SimCLR).
      nesterov: Nesterov momentum (False, as SimCLR's default).
      exclude_from_adaptation: None (exclude rank <= 1) or path substrings.
      name: optimizer name.
      **kwargs: further ``keras.optimizers.Optimizer`` arguments (``clipnorm``,
        ``gradient_accumulation_steps``, ...), except ``weight_decay``.

    Raises:
      ValueError: a hyper-parameter out of range, or ``exclude_from_adaptation``
        a single string instead of a sequence of strings.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        weight_decay: float = 0.0,
        epsilon: float = 0.0,
        nesterov: bool = False,
        exclude_from_adaptation: Sequence[str] | None = None,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, name=name, weight_decay=None, **kwargs
        )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
        if trust_coefficient <= 0 or weight_decay < 0 or epsilon < 0:
            raise ValueError(
                f"trust_coefficient ({trust_coefficient}) must be > 0, "
                f"weight_decay ({weight_decay}) and epsilon ({epsilon}) >= 0."
            )
        if isinstance(exclude_from_adaptation, str):
            raise ValueError(
                "exclude_from_adaptation must be None or a sequence of name "
                f"substrings, not the string {exclude_from_adaptation!r}; "
                f"write [{exclude_from_adaptation!r}]."
            )
        self.momentum = float(momentum)
        self.trust_coefficient = float(trust_coefficient)
        self.lars_weight_decay = float(weight_decay)
        self.epsilon = float(epsilon)
        self.nesterov = bool(nesterov)
        self.exclude_from_adaptation = (
            None
            if exclude_from_adaptation is None
            else tuple(str(s) for s in exclude_from_adaptation)
        )

    def is_adapted(self, variable) -> bool:
        """Whether ``variable`` gets the decay and the trust ratio (see class)."""
        if self.exclude_from_adaptation is None:
            return len(variable.shape) > 1
        name = getattr(variable, "path", None) or variable.name
        return not any(s in name for s in self.exclude_from_adaptation)

    def build(self, variables):
        """Creates the momentum slots and fixes which variables are adapted.

        Args:
          variables: the trainable variables the optimizer will update.
        """
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        # A tuple of Python bools, indexed like the variables; one decision per
        # variable, taken while paths are known (see the class docstring).
        self._adapted = tuple(self.is_adapted(v) for v in variables)

    def update_step(self, gradient, variable, learning_rate):
        """One LARS update of ``variable`` (formulas in the module docstring)."""
        dtype = variable.dtype
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)  # the norm needs all rows
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        index = self._get_variable_index(variable)
        if self._adapted[index]:
            if self.lars_weight_decay:
                gradient = gradient + ops.cast(self.lars_weight_decay, dtype) * variable
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            both = ops.logical_and(w_norm > 0, g_norm > 0)
            # The inner where keeps the untaken branch finite (0 / 0).
            denominator = ops.where(both, g_norm + self.epsilon, 1.0)
            trust = ops.where(both, self.trust_coefficient * w_norm / denominator, 1.0)
            lr = lr * ops.cast(trust, dtype)
        step = ops.multiply(gradient, lr)  # scaled_lr * g'
        if self.momentum == 0:
            self.assign_sub(variable, step)
            return
        m = self.momentums[index]
        momentum = ops.cast(self.momentum, dtype)
        self.assign(m, ops.add(ops.multiply(m, momentum), step))
        if self.nesterov:
            self.assign_sub(variable, ops.add(ops.multiply(m, momentum), step))
        else:
            self.assign_sub(variable, m)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "trust_coefficient": self.trust_coefficient,
                "weight_decay": self.lars_weight_decay,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "exclude_from_adaptation": (
                    None
                    if self.exclude_from_adaptation is None
                    else list(self.exclude_from_adaptation)
                ),
            }
        )
        return config
