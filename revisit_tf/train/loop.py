"""The training loop (stage 4): an explicit loop under a tf.distribute strategy.

Structure (SimCLR tf2 / Model Garden, style guide 4.5):

* ``loss_and_gradients`` is the single-replica view of one step: the
  pretext model is called on the replica's batch dict in training mode, the
  task's ``loss_fn(batch, outputs) -> [B]`` (``train.losses``) is averaged
  over the *global* batch in source examples with
  ``tf.nn.compute_average_loss``, the model's L2 regularization losses are
  added scaled by ``1 / num_replicas`` (reference section 6), and the
  gradients are taken. The loop knows nothing of views, patches, pixels or
  labels: that is the model's and the loss function's business.
* ``train`` builds an outer ``tf.function`` that runs ``steps_per_loop`` steps
  (``strategy.run`` inside ``tf.range``). The per-replica step (the batch
  part of a split pretext pipeline, ``pp.device``, then forward, backward and
  the optimizer's update) is one ``tf.function(jit_compile=True)`` when
  ``jit_compile`` resolves to True (``train.strategy.resolve_jit_compile``:
  by default on GPUs, off on CPUs and TPUs), as Keras's ``Model.fit`` and
  Model Garden compile theirs. Between outer loops it logs a
  progress line (loss, the task's metrics, learning rate, examples/s, ETA),
  writes TensorBoard scalars and saves checkpoints every ``checkpoint_every``
  steps.
* ``hooks`` (``Hook``: ``name``, ``every_steps``, ``__call__(step, model)``)
  run on the chief between outer loops, outside the compiled step, at every
  multiple of their ``every_steps`` and at the end (the loop stops its outer
  loops there); the loop times them and writes what they return to
  TensorBoard (online evaluation, ``probe.online``). Stage 4 knows nothing of
  what a hook measures.
* A run resumes from the newest checkpoint of its workdir and stops at exactly
  ``total_steps``. SIGTERM (preemption) makes it save a checkpoint at the end of
  the current outer loop and raise ``PreemptedError`` (exit code 75: rerun to
  resume).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import keras
import tensorflow as tf

from revisit_tf import progress as progress_lib
from revisit_tf.models import pretext as pretext_lib
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import losses as losses_lib
from revisit_tf.train import strategy as strategy_lib

_logger = logging.getLogger(__name__)

LossFn = losses_lib.LossFn
MetricFn = losses_lib.MetricFn


def _check_per_example(name: str, values: tf.Tensor, batch: dict) -> tf.Tensor:
    """``values`` must be ``[B]``: one value per source example of ``batch``."""
    if values.shape.rank != 1:
        raise ValueError(
            f"{name} must return one value per source example, shape [B]; got "
            f"shape {values.shape}. Reduce the rows of each example (views, "
            "patches, pixels) inside the loss (train.losses.per_example_mean)."
        )
    check = tf.debugging.assert_equal(
        tf.shape(values)[0],
        losses_lib.examples_in(batch),
        message=f"{name} must return [B] values for a batch of B source examples",
    )
    with tf.control_dependencies([check]):
        return tf.identity(values)


def metric_sums(
    metric_fn: MetricFn | None, batch: dict, outputs: dict
) -> dict[str, tf.Tensor]:
    """Sums of the per-example metrics over this replica's batch, by name."""
    if metric_fn is None:
        return {}
    values = metric_fn(batch, outputs)
    if not isinstance(values, dict):
        raise ValueError(
            f"metric_fn must return a dict {{name: [B]}}, got {type(values).__name__}."
        )
    return {
        k: tf.reduce_sum(
            tf.cast(_check_per_example(f"metric {k!r}", v, batch), tf.float32)
        )
        for k, v in values.items()
    }


def loss_and_gradients(
    model: keras.Model,
    loss_fn: LossFn,
    batch: dict,
    *,
    global_batch_size: int,
    optimizer: keras.optimizers.Optimizer | None = None,
    metric_fn: MetricFn | None = None,
) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor], dict[str, tf.Tensor]]:
    """One replica's share of a training step (call inside ``strategy.run``).

    Args:
      model: a pretext model (``models.pretext``): batch dict -> outputs.
      loss_fn: ``(batch, outputs) -> [B]`` per-example loss.
      batch: this replica's batch, as the input pipeline made it.
      global_batch_size: source examples in the *global* batch.
      optimizer: the optimizer that will apply the gradients; for a
        ``keras.optimizers.LossScaleOptimizer`` (mixed_float16 trunks) the
        gradients are those of its scaled loss, which ``apply_gradients``
        unscales (skipping the step when they are not finite).
      metric_fn: ``(batch, outputs) -> {name: [B]}`` or None.

    Returns:
      ``(loss, task_loss, gradients, metric_sums)``: this replica's share of
      the total loss and of the task loss (they sum to the global values over
      replicas), its gradients (summed over replicas by the optimizer) and its
      sums of the per-example metrics, by name.
    """
    with tf.GradientTape() as tape:
        outputs = model(batch, training=True)
        per_example = _check_per_example("loss_fn", loss_fn(batch, outputs), batch)
        task_loss = tf.nn.compute_average_loss(
            per_example, global_batch_size=global_batch_size
        )
        loss = task_loss
        if model.losses:
            loss += tf.cast(
                tf.nn.scale_regularization_loss(tf.add_n(model.losses)), loss.dtype
            )
        loss_for_grads = loss
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # mixed_float16: gradients of the scaled loss; apply_gradients
            # unscales them and skips the step if they are not finite.
            loss_for_grads = optimizer.scale_loss(loss)
    grads = tape.gradient(loss_for_grads, model.trainable_variables)
    return loss, task_loss, grads, metric_sums(metric_fn, batch, outputs)


def make_replica_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: LossFn,
    *,
    global_batch_size: int,
    metric_fn: MetricFn | None = None,
    jit_compile: bool = False,
    device_preprocess_fn: Callable[[dict], dict] | None = None,
) -> Callable[[dict], dict[str, tf.Tensor]]:
    """One replica's whole training step, as ``train`` runs it in ``strategy.run``.

    ``device_preprocess_fn`` (the batch part of a split pretext pipeline),
    then ``loss_and_gradients`` and the optimizer's update; with
    ``jit_compile`` all of it is one ``tf.function(jit_compile=True)``, i.e.
    one XLA cluster (call ``train.strategy.resolve_jit_compile`` first: under
    a Mirrored strategy that needs every replica on a GPU). The benchmarks
    time this same function.

    Returns:
      ``step(batch) -> {"loss", "task_loss", *metric sums}``: this replica's
      shares (see ``loss_and_gradients``); the variables are updated.
    """

    def step_fn(batch):
        if device_preprocess_fn is not None:
            batch = device_preprocess_fn(batch)
        loss, task_loss, grads, sums = loss_and_gradients(
            model,
            loss_fn,
            batch,
            global_batch_size=global_batch_size,
            optimizer=optimizer,
            metric_fn=metric_fn,
        )
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return {"loss": loss, "task_loss": task_loss, **sums}

    if jit_compile:  # the replica's whole step, update included, as one XLA cluster
        return tf.function(step_fn, jit_compile=True, reduce_retracing=True)
    return step_fn


def uses_float16(model: keras.Model) -> bool:
    """True if any layer, at any nesting depth, computes in float16.

    Such a model (``mixed_float16`` trunk) needs loss scaling; bfloat16 has
    float32's exponent range and does not.
    """

    def visit(layer: keras.layers.Layer) -> bool:
        return layer.compute_dtype == "float16" or any(
            visit(child) for child in getattr(layer, "layers", ())
        )

    return any(visit(layer) for layer in model.layers)


@runtime_checkable
class Hook(Protocol):
    """A periodic callback of the training loop (e.g. ``probe.online.OnlineEvaluator``).

    Attributes:
      name: names its TensorBoard scalars (``<name>/<key>``) and its cost in
        the loop metrics (``<name>_seconds``, ``<name>_cost_fraction``).
      every_steps: called at every step that is a multiple of this (>= 1),
        and at ``total_steps``.

    Called as ``hook(step, model)`` on the chief only, between outer loops
    (never inside the compiled step), after the checkpoint of that step (if
    any) is saved, with the TensorBoard writer of ``workdir/tensorboard`` as
    the default one. ``model`` is the live pretext model; a hook must not
    change its variables. It returns ``{key: float}`` scalars to log (or
    None). An optional ``has_run(step) -> bool`` lets a resumed run call the
    hook at the step it resumes at when that step is on the schedule and the
    previous process did not get to it (it was preempted there).
    """

    name: str
    every_steps: int

    def __call__(self, step: int, model: keras.Model) -> Mapping[str, float] | None: ...


def _check_hooks(hooks: Sequence[Hook]) -> tuple[Hook, ...]:
    hooks = tuple(hooks)
    names = set()
    for hook in hooks:
        every = getattr(hook, "every_steps", None)
        name = getattr(hook, "name", None)
        if (
            not callable(hook)
            or isinstance(every, bool)
            or not isinstance(every, int)
            or every < 1
            or not isinstance(name, str)
            or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name)
        ):
            raise ValueError(
                "Each hook must be callable with an int every_steps >= 1 and a "
                f"name of letters, digits, '_', '.', '-'; got {hook!r} "
                f"(every_steps {every!r}, name {name!r})."
            )
        if name in names:
            raise ValueError(f"Two hooks are named {name!r}.")
        names.add(name)
    return hooks


class _HookRunner:
    """Calls the hooks that are due, times them, logs their scalars.

    Cost accounting: ``<name>_seconds`` is the time spent in the hook over the
    whole run and ``<name>_cost_fraction`` that time over the loop's wall time
    (training, logging, checkpoints and hooks), both carried across resumes
    in the checkpoints' metrics. A hook that raises is logged with its
    traceback and the run goes on (see ``train``: ``hooks``).
    """

    def __init__(self, hooks: tuple[Hook, ...], restored: Mapping[str, float]):
        self.hooks = hooks
        self.seconds = {
            h.name: float(restored.get(f"{h.name}_seconds", 0.0)) for h in hooks
        }
        self.failures = {
            h.name: int(restored.get(f"{h.name}_failures", 0)) for h in hooks
        }
        self.wall_before = float(restored.get("loop_seconds", 0.0))
        self.t0 = time.perf_counter()

    def next_stop(self, step: int) -> int | None:
        """The next step after ``step`` at which some hook is due, or None."""
        if not self.hooks:
            return None
        return min((step // h.every_steps + 1) * h.every_steps for h in self.hooks)

    def run(
        self,
        step: int,
        model: keras.Model,
        *,
        total_steps: int,
        resumed: bool = False,
    ) -> None:
        for hook in self.hooks:
            if resumed:
                has_run = getattr(hook, "has_run", None)
                due = (
                    step > 0
                    and step % hook.every_steps == 0
                    and has_run is not None
                    and not has_run(step)
                )
            else:
                due = step % hook.every_steps == 0 or step >= total_steps
            if not due:
                continue
            t0 = time.perf_counter()
            try:
                values = hook(step, model) or {}
                values = {k: float(v) for k, v in dict(values).items()}
            except Exception:
                # Logged, not raised: a hook observes training, and on a
                # multi-worker run only the chief calls it, so raising there
                # would leave the other workers blocked in their next
                # collective; the checkpoint of this step is already saved.
                self.failures[hook.name] += 1
                values = {}
                _logger.exception(
                    "Hook %r failed at step %d (failure %d); training goes on.",
                    hook.name,
                    step,
                    self.failures[hook.name],
                )
            seconds = time.perf_counter() - t0
            self.seconds[hook.name] += seconds
            fraction = self.fraction(hook.name)
            for key, value in values.items():
                tf.summary.scalar(f"{hook.name}/{key}", value, step=step)
            tf.summary.scalar(f"{hook.name}/seconds", seconds, step=step)
            tf.summary.scalar(f"{hook.name}/cost_fraction", fraction, step=step)
            _logger.info(
                "Hook %r at step %d: %.1fs; %.1f%% of the run's time so far.",
                hook.name,
                step,
                seconds,
                100 * fraction,
            )

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def fraction(self, name: str) -> float:
        return min(1.0, self.seconds[name] / max(self.wall_seconds(), 1e-9))

    def metrics(self) -> dict[str, float]:
        """The cost metrics (empty without hooks, so plain runs are unchanged)."""
        if not self.hooks:
            return {}
        out: dict[str, float] = {"loop_seconds": self.wall_seconds()}
        for hook in self.hooks:
            out[f"{hook.name}_seconds"] = self.seconds[hook.name]
            out[f"{hook.name}_cost_fraction"] = self.fraction(hook.name)
            out[f"{hook.name}_failures"] = self.failures[hook.name]
        return out


class PreemptedError(Exception):
    """Training stopped early on SIGTERM, after saving a checkpoint.

    Attributes:
      step: the step of the checkpoint saved (the one checkpoint of the stop).
      total_steps: the steps the run was to train.
      metrics: the loop metrics at ``step`` (as ``train`` would return them).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        total_steps: int | None = None,
        metrics: dict | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.total_steps = total_steps
        self.metrics = dict(metrics or {})


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
        _logger.warning("SIGTERM: saving a checkpoint after the current loop.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _op_error_summary(e: tf.errors.OpError) -> str:
    """The informative lines of a graph error (no traceback, no node dumps)."""
    lines = [
        line.strip()
        for line in (e.message or "").splitlines()
        if line.strip()
        and not line.lstrip().startswith(("File ", "Detected at node", "[[", "<"))
        and "Graph execution error" not in line
    ]
    return " | ".join(lines[:4]) or str(e)[:500]


def _format_metric(name: str, value: float) -> str:
    if "accuracy" in name:
        return f"{name} {100 * value:.2f}%"
    return f"{name} {value:.4g}"


def train(
    *,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    dataset_fn: Callable[[tf.distribute.InputContext, int], tf.data.Dataset],
    total_steps: int,
    global_batch_size: int,
    workdir: str,
    loss_fn: LossFn,
    metric_fn: MetricFn | None = None,
    steps_per_loop: int = 100,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    on_first_loop: Callable[[], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    hooks: Sequence[Hook] = (),
    jit_compile: bool | None = None,
    device_preprocess_fn: Callable[[dict], dict] | None = None,
) -> dict[str, float]:
    """Trains ``model`` until the optimizer's step counter reaches ``total_steps``.

    ``model`` and ``optimizer`` must have been created under ``strategy.scope()``.

    Args:
      model: a pretext model (``models.pretext.build_pretext_model``): the
        batch dict in, a dict of outputs out; its trunk is checkpointed under
        its own key too (``models.pretext.get_trunk``) for the export.
      optimizer: Keras optimizer; its ``iterations`` is the global step.
      strategy: the distribution strategy.
      dataset_fn: ``(InputContext, start_step) -> tf.data.Dataset`` of
        per-replica batches (``make_train_dataset``), passed to
        ``strategy.distribute_datasets_from_function``; ``start_step`` is
        the step the run resumes at, and the stream must be the one an
        uninterrupted run sees from that step on (exact resume).
      total_steps: stop when the global step reaches this.
      global_batch_size: source examples per step over all replicas (the
        loss denominator).
      workdir: checkpoints in ``workdir/checkpoints``, TensorBoard events in
        ``workdir/tensorboard``.
      loss_fn: ``(batch, outputs) -> [B]`` (``train.losses``).
      metric_fn: ``(batch, outputs) -> {name: [B]}``, logged as means over the
        examples of each outer loop; None for the loss alone.
      steps_per_loop: steps per call of the compiled outer loop; logs, summaries
        and checkpoints happen between calls.
      checkpoint_every: save every this many steps (and at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      on_first_loop: called once after the first outer loop of this process
        (the trainer binary writes gin's operative config there).
      on_start: called once on the chief before the first step, with the
        step the run starts (or resumes) at, while the writer of
        ``workdir/tensorboard`` is the default one (``pretrain`` writes
        pictures of its inputs there, ``train.summaries``).
      hooks: ``Hook`` objects called on the chief at every multiple of their
        ``every_steps`` and at ``total_steps`` (outer loops stop there, on
        every worker alike, so pass the same hooks to every worker), after
        that step's checkpoint; not while stopping for SIGTERM. Their
        scalars go to TensorBoard as ``<name>/<key>``, with
        ``<name>/seconds`` (this call) and ``<name>/cost_fraction`` (the
        hook's share of the run's wall time so far). A hook that raises is
        logged with its traceback and counted in ``<name>_failures``, and
        training goes on: it only observes, and raising on the chief alone
        would leave other workers hanging in a collective.
      jit_compile: XLA-compile the per-replica step (True), not (False), or
        None for ``train.strategy.resolve_jit_compile``'s default (on when
        every replica is a GPU). Same losses and updates either way, up to
        float rounding (XLA fuses and reorders arithmetic).
      device_preprocess_fn: ``batch -> batch`` run on each replica's batch
        at the start of its step, inside the compiled step (the batch part of
        a split pretext pipeline, ``pp.device.device_batch_fn``); the loss,
        metrics and model see its output. None: the batch as it comes.

    Returns:
      Metrics of the last outer loop: ``loss``, ``task_loss``, each
      ``metric_fn`` key, ``learning_rate``, ``step``, ``examples_per_sec``;
      with hooks also ``loop_seconds`` (wall time of the loop over the run,
      resumes included) and per hook ``<name>_seconds``,
      ``<name>_cost_fraction`` (their ratio) and ``<name>_failures``.
      A run that finds nothing to train returns those saved with its newest
      checkpoint (empty for checkpoints written before they were saved).

    Raises:
      CheckpointError: checkpoints exist and none can be restored.
      FloatingPointError: the loss or the learning rate is not finite.
      PreemptedError: SIGTERM arrived; a checkpoint of the current step was saved.
      ValueError: bad arguments, or the first step failed inside the
        compiled loop (the message carries TensorFlow's own first lines).
    """
    if total_steps < 0 or steps_per_loop < 1 or checkpoint_every < 1:
        raise ValueError(
            f"total_steps ({total_steps}) must be >= 0, steps_per_loop "
            f"({steps_per_loop}) and checkpoint_every ({checkpoint_every}) >= 1."
        )
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1; got {global_batch_size}.")
    hooks = _check_hooks(hooks)
    jit = strategy_lib.resolve_jit_compile(strategy, jit_compile)
    chief = strategy_lib.is_chief(strategy)
    resolver = getattr(strategy, "cluster_resolver", None)
    with strategy.scope():
        if uses_float16(model) and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            # mixed_float16 gradients underflow without loss scaling.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            _logger.info("mixed_float16 trunk: dynamic loss scaling.")
        optimizer.build(model.trainable_variables)
    ckpt = checkpoint_lib.Checkpointer(
        workdir,
        model=model,
        optimizer=optimizer,
        trunk=pretext_lib.get_trunk(model),
        max_to_keep=keep_checkpoints,
        is_chief=chief,
        worker_id=getattr(resolver, "task_id", 0) or 0,
    )
    step = ckpt.restore_latest()
    if step >= total_steps:
        _logger.info("Step %d >= total_steps %d: nothing to train.", step, total_steps)
        return dict(ckpt.restored_metrics)

    dataset = strategy.distribute_datasets_from_function(
        lambda input_context: dataset_fn(input_context, step)
    )
    iterator = iter(dataset)

    step_fn = make_replica_step(
        model,
        optimizer,
        loss_fn,
        global_batch_size=global_batch_size,
        metric_fn=metric_fn,
        jit_compile=jit,
        device_preprocess_fn=device_preprocess_fn,
    )

    def run_step(iterator):
        values = strategy.run(step_fn, args=(next(iterator),))
        return {
            k: tf.cast(strategy.reduce("SUM", v, axis=None), tf.float32)
            for k, v in values.items()
        }

    @tf.function
    def train_loop(iterator, num_steps):
        # The first step is peeled off the loop so that the accumulators take
        # the structure of whatever metrics the task's metric_fn returns.
        sums = run_step(iterator)
        for _ in tf.range(num_steps - 1):
            values = run_step(iterator)
            sums = {k: sums[k] + values[k] for k in sums}
        return sums

    writer = (
        tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        if chief
        else tf.summary.create_noop_writer()
    )
    _logger.info(
        "Training from step %d to %d: global batch %d examples, %d replica(s), "
        "per-replica batch %d; step %s%s.",
        step,
        total_steps,
        global_batch_size,
        strategy.num_replicas_in_sync,
        global_batch_size // strategy.num_replicas_in_sync,
        "XLA-compiled" if jit else "not XLA-compiled",
        ", pretext batch built in the step" if device_preprocess_fn else "",
    )
    recent = collections.deque(maxlen=10)  # (steps, seconds) of recent loops
    runner = _HookRunner(hooks, ckpt.restored_metrics)
    if on_start is not None and chief:
        with writer.as_default(step=step):
            on_start(step)
        writer.flush()
    if chief and hooks:  # the step this run resumes at, if a hook missed it
        with writer.as_default(step=step):
            runner.run(step, model, total_steps=total_steps, resumed=True)
        writer.flush()
    metrics: dict[str, float] = {}
    first_loop = True
    with _Preemption() as preemption:
        while step < total_steps:
            next_ckpt = (step // checkpoint_every + 1) * checkpoint_every
            num_steps = min(steps_per_loop, total_steps - step, next_ckpt - step)
            next_hook = runner.next_stop(step)
            if next_hook is not None:
                num_steps = min(num_steps, next_hook - step)
            # Rate at the loop's first step (the schedule reads optimizer.iterations).
            lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            if not math.isfinite(lr):
                raise FloatingPointError(
                    f"The learning rate is {lr} at step {step}: check the "
                    "optimizer's and the schedule's bindings (base learning "
                    "rate, warmup, decay)."
                )
            t0 = time.perf_counter()
            try:
                sums = train_loop(iterator, tf.constant(num_steps))
                sums = {k: float(v) for k, v in sums.items()}  # blocks until done
            except tf.errors.OpError as e:
                if not first_loop:
                    raise
                hint = " (XLA-compiled: retry with jit_compile=False)" if jit else ""
                raise ValueError(
                    f"The first training step failed ({type(e).__name__}){hint}: "
                    f"{_op_error_summary(e)}"
                ) from e
            seconds = time.perf_counter() - t0
            step = int(optimizer.iterations.numpy())
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(
                    f"Loss is {sums['loss']} at step {step}: training diverged. "
                    "Lower the learning rate or check the input pipeline."
                )
            if not first_loop:  # the first loop includes tracing time
                recent.append((num_steps, seconds))
            rate = (
                sum(n for n, _ in recent) / sum(s for _, s in recent)
                if recent
                else num_steps / seconds
            )
            task_metrics = {
                k: v / (num_steps * global_batch_size)
                for k, v in sums.items()
                if k not in ("loss", "task_loss")
            }
            metrics = {
                "step": step,
                "loss": sums["loss"] / num_steps,
                "task_loss": sums["task_loss"] / num_steps,
                **task_metrics,
                "learning_rate": lr,
                "examples_per_sec": rate * global_batch_size,
                **runner.metrics(),
            }
            _logger.info(
                "step %d/%d  loss %.4f  %s%slr %.4g  %.0f examples/s  ETA %s",
                step,
                total_steps,
                metrics["loss"],
                "  ".join(_format_metric(k, v) for k, v in task_metrics.items()),
                "  " if task_metrics else "",
                lr,
                metrics["examples_per_sec"],
                progress_lib.format_duration((total_steps - step) / rate),
            )
            with writer.as_default(step=step):
                for name in ("loss", "task_loss", *task_metrics, "learning_rate"):
                    tf.summary.scalar(f"train/{name}", metrics[name])
                tf.summary.scalar("train/examples_per_sec", metrics["examples_per_sec"])
            writer.flush()
            if first_loop:
                first_loop = False
                if on_first_loop is not None and chief:
                    on_first_loop()
            at_checkpoint = step % checkpoint_every == 0 or step >= total_steps
            if at_checkpoint or preemption.requested:
                ckpt.save(step, metrics)
            if preemption.requested and step < total_steps:
                writer.close()
                _logger.warning("Preempted at step %d; checkpoint saved.", step)
                raise PreemptedError(
                    f"Preempted at step {step} of {total_steps}; checkpoint "
                    "saved: rerun the same command to resume.",
                    step=step,
                    total_steps=total_steps,
                    metrics=metrics,
                )
            if chief and hooks:
                with writer.as_default(step=step):
                    runner.run(step, model, total_steps=total_steps)
                writer.flush()
                metrics.update(runner.metrics())
                if at_checkpoint:
                    # Saved before the hooks ran: a resume from this step
                    # carries their cost over too.
                    ckpt.update_metrics(step, metrics)
    if chief and hooks:
        _logger.info(
            "Hooks over the run: %s of %.1fs.",
            ", ".join(
                f"{h.name} {runner.seconds[h.name]:.1f}s "
                f"({100 * runner.fraction(h.name):.1f}%)"
                for h in hooks
            ),
            runner.wall_seconds(),
        )
    writer.close()
    return metrics
