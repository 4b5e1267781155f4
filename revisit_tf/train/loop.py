"""The training loop (stage 4): an explicit loop under a tf.distribute strategy.

Structure (SimCLR tf2 / Model Garden, style guide 4.5):

* ``loss_and_gradients`` is the single-replica view of one step: flatten the
  pretext views ``[B, K, ...] -> [B*K, ...]`` (the one place this happens),
  forward in training mode, per-row loss averaged over the *global* number of
  rows with ``tf.nn.compute_average_loss``, plus the model's L2 regularization
  losses scaled by ``1 / num_replicas`` (reference section 6), gradients.
* ``train`` builds an outer ``tf.function`` that runs ``steps_per_loop`` steps
  (``strategy.run`` inside ``tf.range``); between outer loops it logs a
  progress line (loss, pretext accuracy, learning rate, images/s, ETA), writes
  TensorBoard scalars and saves checkpoints every ``checkpoint_every`` steps.
* A run resumes from the newest checkpoint of its workdir and stops at exactly
  ``total_steps``. SIGTERM (preemption) makes it save a checkpoint at the end of
  the current outer loop and exit cleanly.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import losses as losses_lib
from revisit_tf.train import strategy as strategy_lib

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# (labels [rows], logits [rows, C]) -> per-row values [rows], or a dict of
# them; the loop reports each as the fraction of rows (a tensor is "accuracy").
MetricFn = Callable[[tf.Tensor, tf.Tensor], "tf.Tensor | dict[str, tf.Tensor]"]


def flatten_views(batch: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """``{"image": [B, K, H, W, C], "label": [B, K]}`` -> ``[B*K, H, W, C]``, ``[B*K]``.

    Image-major order (all views of image 0, then image 1, ...), as reference
    4.1. A batch without a view axis (``[B, H, W, C]``, ``[B]``) is returned
    unchanged.
    """
    images, labels = batch["image"], batch["label"]
    if images.shape.rank == 5:
        images = tf.reshape(images, [-1, *images.shape[2:]])
    elif images.shape.rank != 4:
        raise ValueError(
            "Expected batch['image'] of rank 4 [B, H, W, C] or 5 [B, K, H, W, C]; "
            f"got shape {images.shape}."
        )
    return images, tf.reshape(labels, [-1])


def rows_per_example(element_spec: dict) -> int:
    """Loss rows per source image: ``K`` of the ``[B, K]`` labels, else 1.

    Rotation 4, Exemplar 8 (copies), Jigsaw 8 (permutations per image, while
    the image holds 9 patches), RPL 8 (pairs), supervised 1.
    """
    shape = element_spec["label"].shape
    if shape.rank is not None and shape.rank >= 2:
        return int(shape[1])
    return 1


def takes_labels(model: keras.Model) -> bool:
    """True for models fed the whole batch dict (``{"image", "label"}``).

    The patch-task models (``models.pretext``) read the permutation/pair
    indices that ``pp`` wrote as ``label`` to combine patch embeddings; their
    functional input is a dict with a ``label`` entry.
    """
    try:
        inputs = model.input
    except (AttributeError, ValueError):  # subclassed or unbuilt models
        return False
    return isinstance(inputs, dict) and "label" in inputs


def model_inputs(model: keras.Model, batch: dict) -> tuple:
    """``(inputs, labels [rows])``: what to feed ``model`` and the loss labels.

    Image models get ``flatten_views(batch)`` images; models that take labels
    get the batch dict (images ``[B, P, h, w, C]``, labels ``[B, K]``, the
    model flattens the patches itself) and the labels flattened image-major.
    """
    if takes_labels(model):
        inputs = {"image": batch["image"], "label": batch["label"]}
        return inputs, tf.reshape(batch["label"], [-1])
    return flatten_views(batch)


def metric_sums(metric_fn: MetricFn, labels, logits) -> dict[str, tf.Tensor]:
    """Sums of the per-row metrics over this replica's rows, by name."""
    values = metric_fn(labels, logits)
    if not isinstance(values, dict):
        values = {"accuracy": values}
    return {k: tf.reduce_sum(tf.cast(v, tf.float32)) for k, v in values.items()}


def loss_and_gradients(
    model: keras.Model,
    loss_fn: LossFn,
    batch: dict,
    *,
    global_rows: int,
    optimizer: keras.optimizers.Optimizer | None = None,
    metric_fn: MetricFn = losses_lib.correct_top1,
) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor], dict[str, tf.Tensor]]:
    """One replica's share of a training step (call inside ``strategy.run``).

    Args:
      model: returns a dict with ``logits`` ``[rows, num_classes]``.
      loss_fn: per-row loss ``(labels [rows], logits) -> [rows]``.
      batch: this replica's batch ``{"image", "label"}`` (see model_inputs).
      global_rows: loss rows in the *global* batch (global batch x K).
      metric_fn: per-row metric(s) (default: top-1 correct -> ``accuracy``).
      optimizer: the optimizer that will apply the gradients; for a
        ``keras.optimizers.LossScaleOptimizer`` (mixed_float16 trunks) the
        gradients are those of its scaled loss, which ``apply_gradients``
        unscales (skipping the step when they are not finite).

    Returns:
      ``(loss, task_loss, gradients, metric_sums)``: this replica's share of
      the total loss and of the task loss (they sum to the global values over
      replicas), its gradients (summed over replicas by the optimizer) and its
      sums of the per-row metrics, by name (``accuracy``: correct top-1).
    """
    inputs, labels = model_inputs(model, batch)
    with tf.GradientTape() as tape:
        logits = model(inputs, training=True)["logits"]
        per_row = loss_fn(labels, logits)
        task_loss = tf.nn.compute_average_loss(per_row, global_batch_size=global_rows)
        loss = task_loss
        if model.losses:
            loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        loss_for_grads = loss
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # mixed_float16: gradients of the scaled loss; apply_gradients
            # unscales them and skips the step if they are not finite.
            loss_for_grads = optimizer.scale_loss(loss)
    grads = tape.gradient(loss_for_grads, model.trainable_variables)
    correct = metric_sums(metric_fn, labels, logits)
    return loss, task_loss, grads, correct


def uses_float16(model: keras.Model) -> bool:
    """True if any layer computes in float16 (``mixed_float16`` policy).

    Such a model needs loss scaling; bfloat16 has float32's exponent range
    and does not.
    """
    return any(layer.compute_dtype == "float16" for layer in model.layers)


class _Preemption:
    """Turns SIGTERM into a flag checked between outer loops."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint after the current loop.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(
    *,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset],
    total_steps: int,
    global_batch_size: int,
    workdir: str,
    loss_fn: LossFn = losses_lib.softmax_xent,
    steps_per_loop: int = 100,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    on_first_loop: Callable[[], None] | None = None,
    metric_fn: MetricFn = losses_lib.correct_top1,
) -> dict[str, float]:
    """Trains ``model`` until the optimizer's step counter reaches ``total_steps``.

    ``model`` and ``optimizer`` must have been created under ``strategy.scope()``.

    Args:
      model: Keras model returning a dict with ``logits``.
      optimizer: Keras optimizer; its ``iterations`` is the global step.
      strategy: the distribution strategy.
      dataset_fn: ``InputContext -> tf.data.Dataset`` of per-replica batches
        (``make_train_dataset``), passed to
        ``strategy.distribute_datasets_from_function``.
      total_steps: stop when the global step reaches this.
      global_batch_size: source images per step over all replicas.
      workdir: checkpoints in ``workdir/checkpoints``, TensorBoard events in
        ``workdir/tensorboard``.
      loss_fn: per-row loss.
      steps_per_loop: steps per call of the compiled outer loop; logs, summaries
        and checkpoints happen between calls.
      checkpoint_every: save every this many steps (and at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      on_first_loop: called once after the first outer loop of this process
        (the trainer binary writes gin's operative config there).
      metric_fn: per-row pretext metric(s), reported as fractions of the rows
        (a tensor is ``accuracy``; a dict gives one metric per key).

    Returns:
      Metrics of the last outer loop: ``loss``, ``task_loss``, ``accuracy``
      (and any other ``metric_fn`` key), ``learning_rate``, ``step``,
      ``images_per_sec`` (empty if nothing ran).
    """
    if total_steps < 0 or steps_per_loop < 1 or checkpoint_every < 1:
        raise ValueError(
            f"total_steps ({total_steps}) must be >= 0, steps_per_loop "
            f"({steps_per_loop}) and checkpoint_every ({checkpoint_every}) >= 1."
        )
    chief = strategy_lib.is_chief(strategy)
    resolver = getattr(strategy, "cluster_resolver", None)
    with strategy.scope():
        if uses_float16(model) and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            # mixed_float16 gradients underflow without loss scaling.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            logging.info("mixed_float16 trunk: dynamic loss scaling.")
        optimizer.build(model.trainable_variables)
    ckpt = checkpoint_lib.Checkpointer(
        workdir,
        model=model,
        optimizer=optimizer,
        max_to_keep=keep_checkpoints,
        is_chief=chief,
        worker_id=getattr(resolver, "task_id", 0) or 0,
    )
    step = ckpt.restore_latest()
    if step >= total_steps:
        logging.info("Step %d >= total_steps %d: nothing to train.", step, total_steps)
        return {}

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    iterator = iter(dataset)
    # The per-replica element spec, from a throwaway (never iterated) dataset.
    views = rows_per_example(dataset_fn(tf.distribute.InputContext()).element_spec)
    global_rows = global_batch_size * views
    dummy_labels, dummy_logits = tf.zeros([2], tf.int32), tf.zeros([2, 8])
    metric_names = sorted(metric_sums(metric_fn, dummy_labels, dummy_logits))

    def step_fn(batch):
        loss, task_loss, grads, correct = loss_and_gradients(
            model,
            loss_fn,
            batch,
            global_rows=global_rows,
            optimizer=optimizer,
            metric_fn=metric_fn,
        )
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, task_loss, correct

    def _reduce_sum(value):
        return tf.cast(strategy.reduce("SUM", value, axis=None), tf.float32)

    @tf.function
    def train_loop(iterator, num_steps):
        loss_sum = task_sum = tf.constant(0.0)
        correct_sum = {k: tf.constant(0.0) for k in metric_names}
        for _ in tf.range(num_steps):
            loss, task_loss, correct = strategy.run(step_fn, args=(next(iterator),))
            loss_sum += _reduce_sum(loss)
            task_sum += _reduce_sum(task_loss)
            correct_sum = {
                k: correct_sum[k] + _reduce_sum(correct[k]) for k in metric_names
            }
        return loss_sum, task_sum, correct_sum

    writer = (
        tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        if chief
        else tf.summary.create_noop_writer()
    )
    logging.info(
        "Training from step %d to %d: global batch %d images x %d views = %d rows, "
        "%d replica(s), per-replica batch %d.",
        step,
        total_steps,
        global_batch_size,
        views,
        global_rows,
        strategy.num_replicas_in_sync,
        global_batch_size // strategy.num_replicas_in_sync,
    )
    recent = collections.deque(maxlen=10)  # (steps, seconds) of recent loops
    metrics: dict[str, float] = {}
    first_loop = True
    with _Preemption() as preemption:
        while step < total_steps:
            next_ckpt = (step // checkpoint_every + 1) * checkpoint_every
            num_steps = min(steps_per_loop, total_steps - step, next_ckpt - step)
            # Rate at the loop's first step (the schedule reads optimizer.iterations).
            lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            t0 = time.perf_counter()
            loss_sum, task_sum, correct_sum = train_loop(
                iterator, tf.constant(num_steps)
            )
            loss_sum = float(loss_sum)  # blocks until the loop is done
            seconds = time.perf_counter() - t0
            step = int(optimizer.iterations.numpy())
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"Loss is {loss_sum} at step {step}: training diverged. "
                    "Lower the learning rate or check the input pipeline."
                )
            if not first_loop:  # the first loop includes tracing time
                recent.append((num_steps, seconds))
            rate = (
                sum(n for n, _ in recent) / sum(s for _, s in recent)
                if recent
                else num_steps / seconds
            )
            metrics = {
                "step": step,
                "loss": loss_sum / num_steps,
                "task_loss": float(task_sum) / num_steps,
                **{
                    k: float(v) / (num_steps * global_rows)
                    for k, v in correct_sum.items()
                },
                "learning_rate": lr,
                "images_per_sec": rate * global_rows,
                "examples_per_sec": rate * global_batch_size,
            }
            logging.info(
                "step %d/%d  loss %.4f  acc %.2f%%  lr %.4g  %.0f img/s  ETA %s",
                step,
                total_steps,
                metrics["loss"],
                100 * metrics.get("accuracy", float("nan")),
                lr,
                metrics["images_per_sec"],
                _format_duration((total_steps - step) / rate),
            )
            with writer.as_default(step=step):
                for name in ("loss", "task_loss", *metric_names, "learning_rate"):
                    tf.summary.scalar(f"train/{name}", metrics[name])
                tf.summary.scalar("train/images_per_sec", metrics["images_per_sec"])
                tf.summary.scalar("train/examples_per_sec", metrics["examples_per_sec"])
            writer.flush()
            if first_loop:
                first_loop = False
                if on_first_loop is not None and chief:
                    on_first_loop()
            if step % checkpoint_every == 0 or step >= total_steps:
                ckpt.save(step)
            if preemption.requested and step < total_steps:
                ckpt.save(step)
                logging.warning("Preempted at step %d; checkpoint saved.", step)
                break
    writer.close()
    return metrics
