"""SGD probes on cached features: the paper's linear protocol and the MLP head.

Place in the data flow (stage 6): an alternative to ``probe/lbfgs.py`` that
trains the head the way the original release did (reference 8.4, 8.5):
momentum SGD (0.9, TF1 form ``a = 0.9 a + g; w -= lr a``, reference 7.3) on
mean softmax cross-entropy, batch 512, lr 0.1 at batch 256 scaled linearly,
x0.1 after epochs 30 and 50, 70 epochs, no weight decay (reference 10.6/10.7).
The paper's Fig. 8 shows that this protocol's result depends on the schedule
(longer schedules, first decay after 30/120/480 epochs, keep improving); the
epochs and decay epochs are arguments and the per-epoch curve (learning
rate, loss, top-1 of every eval set) is logged and returned, so that
behaviour can be reproduced.

Heads (pure TF variables, no Keras model, as the style guide asks for the
probe): ``"linear"`` (Glorot-uniform kernel, zero bias, reference 8.4) and
``"mlp"``, one hidden ReLU layer with dropout 0.5 (reference 8.4's
``--eval_model mlp``, default width 1000; the paper's Fig. 3).

Deviation from the original, by design: the head is trained on features
extracted once (central crops, from the feature cache) instead of on random
crops recomputed every step; that is what makes the protocol cheap enough to
repeat, and it is the same input the L-BFGS probe sees.

Contract: ``train_sgd_probe(train_x [N, D], train_y [N], eval_sets={name:
(x [M, D], y [M])}, ...)`` -> ``SGDResult`` (top-1 and int32 ``[M]``
predictions per eval set, per-epoch curve with every eval set's top-1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from revisit_tf import schedules
from revisit_tf.probe import arrays, validation

HEADS = ("linear", "mlp")
_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SGDResult:
    """Outcome of ``train_sgd_probe``.

    Attributes:
        top1: ``{eval set name: top-1 in [0, 1]}`` after the last epoch.
        train_top1: top-1 on the training features after the last epoch.
        curve: one dict per epoch: ``epoch``, ``lr`` (at the epoch's last
            step), ``loss`` (mean training loss over the epoch) and
            ``<name>_top1`` for every eval set, scored at the end of that
            epoch (paper Fig. 8); the last entry's ``<name>_top1`` is
            ``top1[name]``.
        steps: optimizer steps taken.
        seconds: wall time.
        params: the head's final variables as NumPy arrays.
        predictions: ``{eval set name: int32 [M]}``, the final head's
            predicted class (``argmax`` logit) per example of each eval set;
            ``top1[name] == mean(predictions[name] == labels)``.
    """

    top1: dict[str, float]
    train_top1: float
    curve: list[dict[str, float]]
    steps: int
    seconds: float
    params: dict[str, np.ndarray]
    predictions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


class Head:
    """Variables, momentum slots and forward pass of a linear or
    one-hidden-layer head (``[B, D] -> [B, C]``; reference 8.4: Glorot-uniform
    kernels, zero biases; the MLP's dropout is 0.5). Also ``probe.augmented``'s.
    """

    def __init__(
        self,
        head: str,
        dim: int,
        num_classes: int,
        hidden: int,
        rng: np.random.Generator,
    ):
        self.head = head
        if head == "linear":
            shapes = {"kernel": (dim, num_classes)}
        else:
            shapes = {"hidden_kernel": (dim, hidden), "kernel": (hidden, num_classes)}
        self.vars = {}
        for name, (fan_in, fan_out) in shapes.items():
            self.vars[name] = tf.Variable(_glorot(rng, fan_in, fan_out), name=name)
            bias = name.replace("kernel", "bias")
            self.vars[bias] = tf.Variable(tf.zeros([fan_out]), name=bias)
        self.names = sorted(self.vars)
        self.slots = {k: tf.Variable(tf.zeros_like(v)) for k, v in self.vars.items()}

    def logits(self, x: tf.Tensor, dropout_seed: tf.Tensor | None = None):
        if self.head == "mlp":
            h = tf.nn.relu(
                tf.matmul(x, self.vars["hidden_kernel"]) + self.vars["hidden_bias"]
            )  # [B, hidden]
            if dropout_seed is not None:  # reference 8.4: dropout 0.5
                h = tf.nn.experimental.stateless_dropout(h, 0.5, seed=dropout_seed)
            x = h
        return tf.matmul(x, self.vars["kernel"]) + self.vars["bias"]  # [B, C]


def _check_args(head, batch_size, epochs, decay_epochs, hidden, n):
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}; got {head!r}.")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    if not (isinstance(epochs, int | float) and epochs > 0):
        raise ValueError(f"epochs must be > 0; got {epochs!r}.")
    if list(decay_epochs) != sorted(decay_epochs) or any(e < 0 for e in decay_epochs):
        raise ValueError(
            f"decay_epochs must be increasing and >= 0; got {decay_epochs!r}."
        )
    if head == "mlp" and (not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"hidden must be an int >= 1; got {hidden!r}.")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples.")


def train_sgd_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    head: str = "linear",
    batch_size: int = 512,
    lr: float = 0.1,
    reference_batch_size: int = 256,
    epochs: float = 70,
    decay_epochs: Sequence[float] = (30, 50),
    decay_factor: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    hidden: int = 1000,
    seed: int = 0,
) -> SGDResult:
    """Trains a head with the paper's SGD protocol on fixed features.

    Args:
        train_x: ``[N, D]`` training features (float; used as float32).
        train_y: ``[N]`` labels in ``[0, num_classes)``.
        eval_sets: ``{name: (features [M, D], labels [M])}`` scored at the
            end of every epoch (``curve``) and after the last one.
        num_classes: C.
        head: ``"linear"`` or ``"mlp"``.
        batch_size: examples per step (reference 10.6: 512); an epoch is
            ``N // batch_size`` steps of a fresh seeded shuffle (reference 7.1).
        lr: learning rate at ``reference_batch_size`` (0.1 at 256).
        reference_batch_size: batch of the linear lr scaling.
        epochs: training length (reference 10.6: 70).
        decay_epochs: the rate is multiplied by ``decay_factor`` after each
            (reference 10.6: 30, 50).
        decay_factor: 0.1.
        momentum: 0.9.
        weight_decay: adds ``weight_decay / 2 * sum ||kernel||^2`` to the loss
            (the original's default 0).
        hidden: MLP hidden width (reference 8.4: 1000).
        seed: initialisation, shuffling and dropout seed.

    Returns:
        ``SGDResult``.

    Raises:
        ValueError: on malformed features/labels or bad settings.
    """
    x = validation.check_features(train_x, "train_x")
    num_classes = validation.check_num_classes(num_classes)
    y = validation.check_labels(train_y, "train_y", x.shape[0], num_classes)
    _check_args(head, batch_size, epochs, decay_epochs, hidden, x.shape[0])
    evals = {}
    for name, (ex, ey) in eval_sets.items():
        ex = validation.check_features(
            ex, f"eval_sets[{name!r}]", num_features=x.shape[1]
        )
        evals[name] = (
            ex.astype(np.float32),
            validation.check_labels(ey, name, len(ex), num_classes),
        )

    steps_per_epoch = schedules.steps_per_epoch(len(y), batch_size)
    total_steps = math.ceil(epochs * steps_per_epoch)
    schedule = schedules.reference_schedule(
        lr=lr,
        total_steps=total_steps,
        global_batch_size=batch_size,
        reference_batch_size=reference_batch_size,
        steps_per_epoch=steps_per_epoch,
        decay_epochs=decay_epochs,
        decay_factor=decay_factor,
    )
    model = Head(head, x.shape[1], num_classes, hidden, np.random.default_rng(seed))
    # float32, shared with x where possible (arrays.as_tensor): no [N, D] copy.
    features, labels = arrays.as_tensor(x, tf.float32), tf.constant(y)
    names = sorted(model.vars)

    @tf.function
    def run_epoch(epoch, first_step, num_steps):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(labels)[0]), seed=tf.stack([seed, epoch])
        )

        def step_fn(i, loss_sum):
            step = first_step + i
            rows = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = tf.gather(features, rows), tf.gather(labels, rows)
            with tf.GradientTape() as tape:
                logits = model.logits(xb, dropout_seed=tf.stack([seed + 1, step]))
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits)
                )
                if weight_decay:
                    loss += (
                        0.5
                        * weight_decay
                        * tf.add_n(
                            [
                                tf.reduce_sum(tf.square(v))
                                for k, v in model.vars.items()
                                if "kernel" in k
                            ]
                        )
                    )
            grads = tape.gradient(loss, [model.vars[k] for k in names])
            rate = schedule(step)
            for k, g in zip(names, grads, strict=True):
                model.slots[k].assign(momentum * model.slots[k] + g)  # TF1 form
                model.vars[k].assign_sub(rate * model.slots[k])
            return i + 1, loss_sum + loss

        _, loss_sum = tf.while_loop(
            lambda i, _: i < num_steps, step_fn, (tf.constant(0), tf.constant(0.0))
        )
        return loss_sum / tf.cast(num_steps, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, x.shape[1]], tf.float32)])
    def predict(xs):
        return tf.argmax(model.logits(xs), axis=1, output_type=tf.int32)

    def classes(xs):  # int32 [M]
        parts = [
            predict(tf.constant(xs[i : i + 8192])).numpy()
            for i in range(0, len(xs), 8192)
        ]
        return np.concatenate(parts) if parts else np.zeros([0], np.int32)

    def top1(pred, ys):
        return int(np.sum(pred == ys)) / len(ys)

    curve, step, epoch, start = [], 0, 0, time.perf_counter()
    while step < total_steps:
        num = min(steps_per_epoch, total_steps - step)
        loss = float(run_epoch(tf.constant(epoch), tf.constant(step), tf.constant(num)))
        step += num
        epoch += 1
        rate = float(schedule(step - 1))
        predictions = {name: classes(ex) for name, (ex, _) in evals.items()}
        scores = {name: top1(predictions[name], ey) for name, (_, ey) in evals.items()}
        curve.append(
            {
                "epoch": epoch,
                "lr": rate,
                "loss": loss,
                **{f"{name}_top1": v for name, v in scores.items()},
            }
        )
        elapsed = time.perf_counter() - start
        _logger.info(
            "SGD %s probe: epoch %d/%d, lr %.4g, loss %.4f, %.0f steps/s, ETA %.0fs.",
            head,
            epoch,
            math.ceil(epochs),
            rate,
            loss,
            step / elapsed,
            elapsed / step * (total_steps - step),
        )
        if scores:
            _logger.info(
                "SGD %s probe: epoch %d top-1 %s.",
                head,
                epoch,
                ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items()),
            )
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"SGD {head} probe diverged at epoch {epoch} (loss {loss}); lower "
                f"lr (now {lr} at batch {reference_batch_size}) or standardize."
            )
    return SGDResult(
        top1=scores,
        train_top1=top1(classes(x), y),
        curve=curve,
        steps=step,
        seconds=time.perf_counter() - start,
        params={k: v.numpy() for k, v in model.vars.items()},
        predictions=predictions,
    )
