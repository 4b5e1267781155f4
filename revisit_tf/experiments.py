"""The roots: pretrain, export, linear probe and report.

Each root reads top to bottom as the data flow and is the only place where the
stages meet:

    data source -> pp -> model -> train loop -> checkpoints      (pretrain)
    checkpoint -> model -> SavedModel                            (export_model)
    data source -> pp -> SavedModel -> feature cache -> probes   (linear_probe)
    results.jsonl -> markdown tables                             (report)

The roots take plain values and builder callables; ``configurables`` registers
them with gin and the ``revisit-*`` binaries bind them from gin files. Nothing
here reads flags or global config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from revisit_tf import __version__, files
from revisit_tf import data as data_lib
from revisit_tf import models as models_lib
from revisit_tf import pp as pp_lib
from revisit_tf import progress as progress_lib
from revisit_tf.export import keras_trunk as keras_trunk_lib
from revisit_tf.export import saved_model as export_lib
from revisit_tf.models import pretext as pretext_lib
from revisit_tf.pp import device as device_lib
from revisit_tf.pp import groups as groups_lib
from revisit_tf.probe import cache as cache_lib
from revisit_tf.probe import features as features_lib
from revisit_tf.probe import fingerprint as fingerprint_lib
from revisit_tf.probe import protocols as protocols_lib
from revisit_tf.probe import subsets as subsets_lib
from revisit_tf.report import results as results_lib
from revisit_tf.report import tables
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses as losses_lib
from revisit_tf.train import optim
from revisit_tf.train import strategy as strategy_lib
from revisit_tf.train import summaries as summaries_lib

_logger = logging.getLogger(__name__)

ModelFn = Callable[..., keras.Model]


def pretrain(
    workdir: str,
    *,
    dataset: str,
    pp_train: str,
    global_batch_size: int,
    model_fn: ModelFn,
    loss_fn: losses_lib.LossFn,
    metric_fn: losses_lib.MetricFn | None = None,
    optimizer_fn: Callable[..., keras.optimizers.Optimizer] = optim.sgd,
    schedule_fn: Callable[..., Any] = optim.reference_schedule,
    data_dir: str | None = None,
    train_split: str = "train",
    steps: int | None = None,
    epochs: float | None = None,
    examples: int | None = None,
    strategy: str = "default",
    tpu: str | None = None,
    steps_per_loop: int = 100,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    shuffle_buffer: int = 10_000,
    cache_source: bool = False,
    seed: int | None = None,
    on_first_loop: Callable[[], None] | None = None,
    pp_train_batch: str = "",
    ghost_group_size: int | None = None,
    online_eval_every: int = 0,
    online_eval_fn: Callable[..., loop_lib.Hook] | None = None,
    jit_compile: bool | None = None,
    pretext_on_device: bool = False,
) -> dict[str, float]:
    """Pretext (or supervised) training; checkpoints in ``workdir/checkpoints``.

    Args:
      workdir: output directory (checkpoints, TensorBoard, logs, configs).
      dataset: source name (``data.get_source``), e.g. ``fashion_mnist_idx``.
      pp_train: training preprocessing pipeline, e.g.
        ``"decode|flip_lr|rotate4|value_range(-1, 1)|keep('image', 'label')"``;
        it makes the labels (Rotation: ``rotate4``).
      global_batch_size: source images per step over all replicas (the
        original's ``batch_size``; Rotation feeds 4x as many network inputs).
        It is the loss denominator and the batch of the lr scaling.
      model_fn: the pretext model builder, called as
        ``model_fn(input_spec)`` with the per-example spec of the training
        batch (``models.pretext.build_pretext_model``).
      loss_fn: ``(batch, outputs) -> [B]`` per-example loss (``train.losses``).
      metric_fn: ``(batch, outputs) -> {name: [B]}`` logged by the loop
        (``accuracy`` etc.), or None.
      optimizer_fn: ``optimizer_fn(learning_rate) -> keras Optimizer``
        (``optim.sgd``, ``adam``, ``adamw``, ``lars``).
      schedule_fn: ``schedule_fn(global_batch_size=, steps_per_epoch=,
        total_steps=)`` -> learning-rate schedule (``optim.reference_schedule``,
        ``cosine_schedule``).
      data_dir: dataset directory (TFDS ``data_dir`` or the idx directory).
      train_split: split to train on (``train`` = official train minus the
        held-out ``val``, as the paper).
      steps, epochs, examples: the training duration, exactly one of them.
      strategy: ``default``, ``one_device``, ``mirrored``, ``multi_worker`` or
        ``tpu``.
      tpu: TPU name for ``strategy="tpu"``.
      steps_per_loop: steps per compiled outer loop (log interval).
      checkpoint_every: checkpoint interval in steps.
      keep_checkpoints: checkpoints kept.
      shuffle_buffer: example shuffle buffer (reference 2: 10,000).
      cache_source: cache decoded source examples in memory (small datasets).
      seed: seeds TF's global generator (model init, pipeline randomness).
      on_first_loop: callback after the first outer loop (operative config).
      pp_train_batch: pipeline applied to every per-replica *batch* after
        batching (e.g. ``"jigsaw_perms(100, 8)"``: one permutation subset per
        batch, reference 4.3); ``""`` for none.
      ghost_group_size: None, or ``G`` rows (trunk inputs) per ghost group
        (``pp.groups``): ``pp_train_batch`` runs on each group of ``G / K``
        images separately and ``G`` is checked against the per-replica batch
        before training. The trunk, heads and losses read the same ``G``
        through their own arguments (gin: ``pretext/ghost_groups.gin``).
      online_eval_every: every this many steps (and at the end), probe the
        live trunk (kNN and L-BFGS on fixed labelled subsets,
        ``probe.online``); rows go to ``workdir/online/results.jsonl``,
        scalars to TensorBoard under ``online/``, and its cost to the
        metrics (``online_seconds``, ``online_cost_fraction``); 0: off.
      online_eval_fn: builds that evaluator (gin: ``@online_evaluator``,
        bound by ``probe/online.gin``), called with ``every_steps``, the
        training source, a row writer, the model name, the workdir and the
        steps already recorded; None: ``probe.online.OnlineEvaluator``.
      jit_compile: XLA-compile the per-replica step; None: on when every
        replica is a GPU, off on CPUs and TPUs
        (``train.strategy.resolve_jit_compile``).
      pretext_on_device: build the pretext batch inside the training step
        (``pp.device``): ``pp_train`` is cut at its first batch pretext op
        (``rotate4``, ``crop_patches``), tf.data runs the part before it, and
        that op, the ones after it and ``pp_train_batch`` run on each
        per-replica batch on the accelerator. The batches are bit-identical
        to those built on the host (same seeds, same draws).

    Returns:
      The metrics of the last logged loop (loss, accuracy, examples/s, ...).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    files.makedirs(workdir)  # a local path or a URL (gs://, ram://)
    strategy_obj = strategy_lib.make_strategy(strategy, tpu=tpu)

    # 1. Data and 2. pretext preprocessing (labels are made by pp_train).
    num_train = data_lib.num_examples(dataset, train_split, data_dir=data_dir)
    if num_train < 1:
        raise ValueError(
            f"The training split {train_split!r} of {dataset!r} (data_dir "
            f"{data_dir!r}) has no examples."
        )
    if global_batch_size > num_train:
        raise ValueError(
            f"global_batch_size={global_batch_size} is larger than the "
            f"{num_train} examples of {dataset!r} {train_split!r}: not one "
            "full batch per epoch."
        )
    pp_fn = pp_lib.get_preprocess_fn(pp_train)
    batch_pp_fn = pp_lib.get_preprocess_fn(pp_train_batch) if pp_train_batch else None
    if batch_pp_fn is not None:  # one batch op per ghost group (pp.groups)
        batch_pp_fn = groups_lib.per_group(batch_pp_fn, ghost_group_size)
    device_fn = None  # the batch part, run in the training step
    if pretext_on_device:
        parts = device_lib.split(pp_train)
        device_fn = device_lib.device_batch_fn(parts, batch_pp_fn)
        pp_fn, batch_pp_fn = device_lib.host_example_fn(parts), device_lib.host_batch_fn
        _logger.info(
            "Pretext on the device: tf.data runs %r, the training step %r%s.",
            parts.host,
            parts.device,
            f" then {pp_train_batch!r}" if pp_train_batch else "",
        )
    data_seed = _data_seed(workdir, seed, strategy_lib.is_chief(strategy_obj))

    def dataset_fn(
        input_context: tf.distribute.InputContext, start_step: int = 0
    ) -> tf.data.Dataset:
        return data_lib.make_train_dataset(
            data_lib.get_source(dataset, train_split, data_dir=data_dir),
            pp_fn,
            global_batch_size=global_batch_size,
            input_context=input_context,
            shuffle_buffer=shuffle_buffer,
            seed=data_seed,
            cache=cache_source,
            batch_preprocess_fn=batch_pp_fn,
            start_step=start_step,
        )

    # The per-example spec of a training batch, from a throwaway (never
    # iterated) dataset: what the pretext model takes.
    try:
        element_spec = dataset_fn(tf.distribute.InputContext()).element_spec
        if device_fn is not None:  # what the batch part makes of it
            element_spec = device_lib.output_spec(device_fn, element_spec)
        input_spec = pretext_lib.example_spec(element_spec)
    except (KeyError, ValueError) as e:
        # The pp read a feature the source lacks (e.g. an unlabelled folder).
        data_lib.explain_missing_feature(
            dataset, train_split, data_dir=data_dir, error=e, used_by=pp_train
        )
        raise
    if ghost_group_size is not None:
        num_groups = groups_lib.check_training_batch(
            ghost_group_size,
            example_image_shape=input_spec["image"].shape,
            global_batch_size=global_batch_size,
            num_replicas=strategy_obj.num_replicas_in_sync,
        )
        _logger.info(
            "Ghost groups: %d per replica, %d rows each.", num_groups, ghost_group_size
        )

    # Durations and schedule (reference 7.1, 7.2).
    per_epoch = optim.steps_per_epoch(num_train, global_batch_size)
    total_steps = optim.to_steps(
        "training",
        steps=steps,
        epochs=epochs,
        examples=examples,
        num_examples=num_train,
        global_batch_size=global_batch_size,
    )
    if total_steps < 1:
        raise ValueError(
            f"The training duration is {total_steps} steps (steps={steps}, "
            f"epochs={epochs}, examples={examples}, batch {global_batch_size}): "
            "train for at least one step."
        )
    schedule = schedule_fn(
        global_batch_size=global_batch_size,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
    )
    for at in (0, total_steps - 1):
        if not math.isfinite(float(schedule(at))):
            raise ValueError(
                f"The learning rate is {float(schedule(at))} at step {at}: check "
                "the schedule's bindings (base learning rate, warmup, decay)."
            )
    _logger.info(
        "%s %s: %d examples, %d steps/epoch, %d steps in total; batch %s; "
        "lr at steps 0 and %d: %.4g, %.4g.",
        dataset,
        train_split,
        num_train,
        per_epoch,
        total_steps,
        ", ".join(f"{k} {v.dtype.name} {v.shape}" for k, v in input_spec.items()),
        max(total_steps - 1, 0),
        float(schedule(0)),
        float(schedule(max(total_steps - 1, 0))),
    )

    # 3. Model and 4. training under the strategy.
    with strategy_obj.scope():
        model = model_fn(input_spec)
        optimizer = optimizer_fn(schedule)
    _logger.info(
        "Model %s: %s trainable parameters (trunk %s).",
        model.name,
        f"{models_lib.count_params(model):,}",
        f"{models_lib.count_params(pretext_lib.get_trunk(model)):,}",
    )

    def write_inputs(step: int) -> None:
        # A few training inputs as TensorBoard images (train.summaries), drawn
        # from a small separate stream of the same pipelines at the step the
        # run starts (or resumes) at; a failure here never stops training.
        try:
            preview = data_lib.make_train_dataset(
                data_lib.get_source(dataset, train_split, data_dir=data_dir),
                pp_fn,
                global_batch_size=min(global_batch_size, summaries_lib.NUM_EXAMPLES),
                shuffle_buffer=1,
                seed=data_seed + step,
                batch_preprocess_fn=batch_pp_fn,
            )
            batch = next(iter(preview))
            if device_fn is not None:
                batch = device_fn(batch)
            tag = summaries_lib.write_pretext_inputs(batch, model, step=step)
            _logger.info("TensorBoard: training inputs as images (%s).", tag)
        except Exception:  # a picture must not stop a run
            _logger.warning("No TensorBoard images of the inputs:", exc_info=True)

    if strategy_lib.is_chief(strategy_obj):
        for name, data in pretext_lib.workdir_files(model).items():
            files.write_atomic(os.path.join(workdir, name), data)
            _logger.info("Recorded %s.", os.path.join(workdir, name))
        # The trained trunk's architecture, which export_model checks against,
        # and what it was trained on, which the export's metadata records.
        record_path = os.path.join(workdir, export_lib.TRUNK_RECORD_FILE)
        record = export_lib.architecture_record(pretext_lib.get_trunk(model))
        record["training"] = {
            "task": model.name,  # build_pretext_model's name, e.g. "rotation"
            "dataset": dataset,
            "train_split": train_split,
            "global_batch_size": global_batch_size,
            "total_steps": total_steps,
            "pp_train": pp_train,
            "seed": seed,
        }
        files.write_atomic(record_path, json.dumps(record, indent=1, sort_keys=True))
        _logger.info("Recorded %s.", record_path)
    metrics_path = os.path.join(workdir, TRAIN_METRICS_FILE)
    chief = strategy_lib.is_chief(strategy_obj)
    # Online evaluation (probe.online), a loop hook: built on every worker
    # (the loop stops its outer loops at the hook's steps on all of them) and
    # called on the chief only. Its rows go to a file of their own, never the
    # probe's results.jsonl, so offline tables never see them.
    hooks = []
    if online_eval_every:
        from revisit_tf.probe import online as online_lib  # the one use

        online_path = results_lib.online_results_path(workdir)
        done = set()
        if chief and files.exists(online_path):  # a resumed run's recorded steps
            done = {
                int(r["step"])
                for r in results_lib.read_results([online_path])
                if isinstance(r.get("step"), int)
            }
        evaluator = (online_eval_fn or online_lib.OnlineEvaluator)(
            every_steps=online_eval_every,
            training_dataset=dataset,
            training_data_dir=data_dir,
            write_row=lambda row: results_lib.append_result(online_path, row),
            model_name=os.path.basename(os.path.normpath(workdir)),
            workdir=files.absolute(workdir),
            done_steps=done,
        )
        evaluator.check_model(model)
        hooks.append(evaluator)
    try:
        metrics = loop_lib.train(
            model=model,
            optimizer=optimizer,
            strategy=strategy_obj,
            dataset_fn=dataset_fn,
            total_steps=total_steps,
            global_batch_size=global_batch_size,
            workdir=workdir,
            loss_fn=loss_fn,
            metric_fn=metric_fn,
            steps_per_loop=steps_per_loop,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            on_first_loop=on_first_loop,
            on_start=write_inputs,
            hooks=hooks,
            jit_compile=jit_compile,
            device_preprocess_fn=device_fn,
        )
    except loop_lib.PreemptedError as e:
        if chief:  # Marked incomplete: a rerun resumes and overwrites it.
            record = {**e.metrics, "complete": False, "step": e.step}
            record.update(total_steps=e.total_steps, stopped="preempted (SIGTERM)")
            files.write_atomic(
                metrics_path, json.dumps(record, indent=1, sort_keys=True)
            )
        raise
    if metrics and chief:
        record = {**metrics, "complete": True, "step": total_steps}
        record["total_steps"] = total_steps
        files.write_atomic(metrics_path, json.dumps(record, indent=1, sort_keys=True))
    return metrics


TRAIN_METRICS_FILE = "train_metrics.json"


SEED_FILE = "seed.json"


def _data_seed(workdir: str, seed: int | None, chief: bool) -> int:
    """The input stream's seed: ``seed``, else one drawn once per workdir.

    An unseeded run still needs a seed for exact resume (the stream is a
    function of its position): it is drawn on the first run and recorded in
    ``workdir/seed.json``, which every resume reads.
    """
    if seed is not None:
        return int(seed)
    path = os.path.join(workdir, SEED_FILE)
    if files.exists(path):
        with tf.io.gfile.GFile(path) as f:
            try:
                return int(json.loads(f.read())["data_seed"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path} is not a seed record ({e}); it was written "
                    'atomically as {"data_seed": <int>}: restore it or bind '
                    "pretrain.seed to the run's seed."
                ) from e
    drawn = secrets.randbits(31)
    if chief:
        files.write_atomic(path, json.dumps({"data_seed": drawn}))
    return drawn


def export_model(
    workdir: str,
    *,
    trunk_fn: ModelFn,
    image_shape: Sequence[int | None],
    pp_export: str = "value_range(-1, 1, 0, 1)",
    random_init: bool = False,
    seed: int | None = None,
    pp_export_patches: str = "",
    force: bool = False,
    export_format: str = "saved_model",
    parity_consumers: Sequence[str] = export_lib.CONSUMERS,
) -> str:
    """Writes ``workdir/export``: a SavedModel of the newest checkpoint's trunk.

    The trunk is built alone by ``trunk_fn`` and restored from the
    checkpoint's ``trunk`` key (``train.checkpoint.restore_trunk``), so the
    export is the same for every task and never builds a head. A
    ``pp_export`` that ends in patches ``[N, P, h, w, C]`` (e.g.
    ``"crop_patches(3, random=False)|standardize"``) makes an export that
    cuts the patches itself and averages the endpoints over them (reference
    8.3), with an extra ``patches`` signature.

    Nothing drifts: the trunk must be the trained one (its architecture and
    input shape as ``pretrain`` recorded them in ``workdir/trunk_config.json``;
    a workdir trained before that record exports with a warning), and
    ``image_shape``, ``pp_export``, ``pp_export_patches``, ``random_init``
    and the architecture must be those of the export already in
    ``workdir/export`` (the first export fixes them). An export that a killed
    run left only as ``workdir/export.old-*`` is restored first.

    Args:
      workdir: training workdir (its ``checkpoints/``); the export goes to
        ``workdir/export`` (written to a temporary path, then renamed).
      trunk_fn: the trunk builder of training (``build_pretext_model.trunk_fn``;
        gin: the ``TRUNK`` macro), called as ``trunk_fn(input_shape=(h, w, C))``
        with the shape one trunk input has after ``pp_export``.
      image_shape: ``(H, W, C)`` of the exported input: float32 images in
        [0, 1]. ``H``/``W`` may be None for fully convolutional trunks.
      pp_export: the evaluation preprocessing baked into the SavedModel, applied
        to the ``{"image": [N, H, W, C]}`` batch in [0, 1] (default: to [-1, 1]
        as Rotation was trained; reference 3.5, 7.6).
      random_init: export the freshly initialised model instead of a checkpoint
        (the random-init baseline of the probe report).
      seed: initialisation seed for ``random_init``.
      pp_export_patches: for patch exports, the preprocessing of the
        ``patches`` signature's input ``[N, P, h, w, C]`` in [0, 1] (e.g.
        ``"standardize"``); ``""`` feeds the patches unchanged.
      force: export despite the differences above (each is logged as a
        warning); for a deliberate change, e.g. of ``pp_export``.
      export_format: ``"saved_model"`` (``workdir/export``) or ``"keras"``:
        the restored trunk alone as ``workdir/trunk.keras``, checked to reload
        with ``keras.saving.load_model`` and compute the same numbers (see
        ``export.keras_trunk`` for what loading it needs: ``import
        revisit_tf.models``, inputs after ``pp_export``). The ``.keras`` file
        is checked against the trained trunk, not against ``workdir/export``.
      parity_consumers: the SavedModel's parity gate (``export.consumers``):
        the consumers that must reproduce the in-memory trunk's outputs
        before the export replaces the previous one (default all five:
        ``saved_model``, ``graph_session``, ``tfsm_layer``,
        ``hub_keras_layer``, ``tflite``; ``()`` skips the gate). Their
        measured differences are in the export's metadata under ``parity``.

    The export's metadata (``assets.extra/revisit_tf_export.json``, plain
    JSON) records under ``user_metadata``: ``task``, ``dataset`` and
    ``train_split`` (from ``workdir/trunk_config.json``, which ``pretrain``
    writes; None for a workdir that never trained), ``trunk`` (architecture,
    version, width, units, last_relu, ... read back from the built trunk:
    ``export.saved_model.describe_trunk``), ``checkpoint`` (``step`` and
    ``path``; None for ``random_init``), ``random_init``, ``seed``,
    ``pp_export``, ``pp_export_patches``, ``trunk_sha256`` and
    ``operative_config`` (``workdir/operative_config.gin``, copied to
    ``assets.extra/operative_config.gin``, and its sha256; None if the
    workdir has none); the package version and the input contract are at
    the top level.

    Returns:
      The export path (``workdir/export`` or ``workdir/trunk.keras``).

    Raises:
      FileNotFoundError: no checkpoint in ``workdir`` and not ``random_init``.
      CheckpointError: the checkpoint cannot be restored into ``trunk_fn()``.
      ConfigDriftError: (a ValueError) without ``force``, the trunk or the
        settings differ as described above; raised before anything is
        written, naming the first differences.
      ExportParityError: (a ValueError) a consumer of the new export (or the
        reloaded ``.keras`` file) computes other numbers than the trunk; the
        previous export is kept.
    """
    if export_format not in ("saved_model", "keras"):
        raise ValueError(
            f"export_format must be 'saved_model' or 'keras', got {export_format!r}."
        )
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or image_shape[-1] is None:
        raise ValueError(
            f"image_shape must be (H, W, C) with C known; got {image_shape}."
        )
    pp_fn = pp_lib.get_preprocess_fn(pp_export)

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        return pp_fn({"image": images})["image"]

    patch_pp_fn = pp_lib.get_preprocess_fn(pp_export_patches)

    def patch_preprocess(patches: tf.Tensor) -> tf.Tensor:
        return patch_pp_fn({"image": patches})["image"]

    probe_shape = [1 if d is None else d for d in image_shape]
    model_shape = tuple(preprocess(tf.zeros([1, *probe_shape])).shape[1:])
    if len(model_shape) == 4:  # patches [P, h, w, C]: the trunk sees one patch
        model_shape = model_shape[1:]
    if image_shape[0] is None or image_shape[1] is None:
        model_shape = (None, None, model_shape[-1])
    if seed is not None:
        keras.utils.set_random_seed(seed)
    trunk = trunk_fn(input_shape=model_shape)
    record = export_lib.architecture_record(trunk)
    export_path = os.path.join(workdir, "export")
    metadata = {
        "model": trunk.name,
        "pp_export": pp_export,
        "pp_export_patches": pp_export_patches,
        "random_init": bool(random_init),
        "trunk_sha256": record["sha256"],
        "seed": seed,
        "trunk": record["trunk"],
    }
    # The trunk trained, and the settings of the export already there.
    drift = []
    trained = {}
    record_path = os.path.join(workdir, export_lib.TRUNK_RECORD_FILE)
    if tf.io.gfile.exists(record_path):
        with tf.io.gfile.GFile(record_path) as f:
            text = f.read()
        try:
            trained = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{record_path} is not a trunk record ({e}); pretrain writes it "
                "atomically: restore it, or delete it to export unchecked."
            ) from e
        drift += [
            f"trunk ({record_path}): {d}"
            for d in export_lib.architecture_differences(trained, record)
        ]
    elif random_init:
        _logger.info("No %s: a random-init export is not checked.", record_path)
    else:
        _logger.warning(
            "No %s (trained before revisit_tf recorded the trunk): the trunk's "
            "architecture cannot be checked against training.",
            record_path,
        )
    training = trained.get("training") or {}
    for key in ("task", "dataset", "train_split"):
        metadata[key] = training.get(key)
    if export_format == "saved_model":
        export_lib.recover_interrupted_export(export_path)
        drift += export_lib.export_differences(
            export_path,
            image_shape=image_shape,
            metadata=metadata,
            keys=("pp_export", "pp_export_patches", "random_init", "trunk_sha256"),
        )
    if drift and not force:
        raise export_lib.ConfigDriftError(
            f"Refusing to write {export_path}: it would not be the network "
            f"trained (or already exported) in {workdir}:\n  "
            + "\n  ".join(drift)
            + "\nRestore the training config (operative_config.gin in the "
            "workdir lists what training used), or pass force=True (gin: "
            "export_model.force = True) to export anyway."
        )
    if drift:
        _logger.warning(
            "Exporting %s despite (force=True):\n  %s", export_path, "\n  ".join(drift)
        )
    metadata["checkpoint"] = None
    if random_init:
        _logger.info("Exporting %s at random initialisation.", trunk.name)
    else:
        path = checkpoint_lib.restore_trunk(workdir, trunk)
        _logger.info("Restored the trunk of %s.", path)
        step = re.fullmatch(r".*-(\d+)", os.path.basename(path))
        metadata["checkpoint"] = {
            "step": int(step.group(1)) if step else None,
            "path": path,
        }
    if export_format == "keras":
        keras_path = os.path.join(workdir, keras_trunk_lib.KERAS_FILE)
        probe = keras_trunk_lib.trunk_probe(image_shape, preprocess)
        parity = keras_trunk_lib.export_keras_trunk(trunk, keras_path, probe=probe)
        _logger.info(
            "Exported %s (reloaded: max |diff| %.3g); load it after `import "
            "revisit_tf.models`, on inputs after pp_export %r.",
            keras_path,
            parity["max_abs_diff"],
            pp_export,
        )
        return keras_path
    # The operative gin config of training (revisit-train writes it), if any.
    extra_files = {}
    config_path = os.path.join(workdir, export_lib.OPERATIVE_CONFIG_FILE)
    metadata["operative_config"] = None
    if tf.io.gfile.exists(config_path):
        with tf.io.gfile.GFile(config_path, "rb") as f:
            config = f.read()
        extra_files[export_lib.OPERATIVE_CONFIG_FILE] = config
        metadata["operative_config"] = {
            "file": f"{export_lib.METADATA_DIR}/{export_lib.OPERATIVE_CONFIG_FILE}",
            "sha256": hashlib.sha256(config).hexdigest(),
        }
    out = export_lib.export_saved_model(
        trunk,
        export_path,
        image_shape=image_shape,
        preprocess=preprocess,
        patch_preprocess=patch_preprocess,
        metadata=metadata,
        parity_consumers=parity_consumers,
        extra_files=extra_files,
    )
    _logger.info("Exported %s", out)
    return out


def linear_probe(
    workdir: str,
    *,
    dataset: str,
    data_dir: str | None = None,
    train_split: str = "train",
    val_split: str = "val",
    test_split: str = "test",
    pp_probe: str = "value_range(0, 1)",
    features: str = "export",
    export_dir: str | None = None,
    endpoints: Sequence[str] | str = ("pre_logits",),
    protocols: Sequence[str | protocols_lib.Protocol] = ("lbfgs",),
    subsets: Sequence[float] = (1.0,),
    seed: int = 0,
    strategy: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 256,
    model_name: str | None = None,
    published_top1: float | None = None,
) -> list[dict]:
    """Probes of frozen features; rows go to ``workdir/probe/results.jsonl``.

    Data flow: source -> pp -> SavedModel (or pixels) -> feature cache (one
    entry per endpoint and split, ``probe/cache.py``) -> one probe per
    (endpoint, protocol, label subset) (``probe/protocols.py``) -> one row
    each, with a protocol fingerprint (``probe/fingerprint.py``). A protocol
    that trains on images (``sgd_augmented``) reads the source itself, runs
    once for all endpoints and gives one row per endpoint.

    The default is the paper's linear evaluation solved exactly: L2 chosen on
    ``val_split`` from ``LbfgsProbe.l2_grid`` (warm-started path, largest
    first, extended past an edge pick), a final fit at that penalty on
    train + val, scored on ``test_split`` (Table 1 protocol: train on
    ``train``, select on the held-out ``val``).

    Args:
      workdir: where results go; also the default place of the export.
        Each L-BFGS row's accuracy against L2, and the augmented protocol's
        accuracy curve, also go to TensorBoard in ``workdir/probe/tensorboard``.
      dataset, data_dir: the labelled source (``data.get_source``).
      train_split, val_split, test_split: split names.
      pp_probe: preprocessing from the source example to the export's input,
        float32 ``[H, W, C]`` in [0, 1] (e.g. ``"value_range(0, 1)"``, or
        ``"resize_small(256)|central_crop(224)|value_range(0, 1)"``); the
        evaluation crops of ``sgd_augmented`` too.
      features: ``"export"`` (the SavedModel's endpoints) or ``"pixels"``
        (flattened preprocessed pixels: the raw-pixel baseline).
      export_dir: SavedModel path (default ``workdir/export``).
      endpoints: endpoints to probe (``pre_logits`` is the paper's number), or
        ``"all"`` for every endpoint of the export (paper Fig. 5).
      protocols: registered names (``protocols.REGISTRY``: ``"lbfgs"``
        (default), ``"sgd"`` (reference 8.5 schedule on cached features),
        ``"mlp"`` (paper Fig. 3), ``"knn"``, ``"sgd_augmented"`` (the
        release's protocol on re-drawn random crops)) or ``Protocol``
        instances (gin: ``@LbfgsProbe()``). Each protocol's own arguments
        are its class's (gin: ``LbfgsProbe.l2_grid = ...``, which names
        honour too).
      subsets: fractions of the training labels, class-balanced and seeded
        (paper Fig. 7: ``(0.01, 0.1, 0.5, 1.0)``).
      seed: label-subset, SGD, MLP and crop seed.
      strategy: None (one device) or a ``train.strategy`` name: the L-BFGS
        objective is then sharded over its replicas, and the augmented
        protocol trains under it.
      cache_dir: the feature cache, a local directory (default
        ``workdir/probe/feature_cache``; for a URL workdir such as ``gs://``,
        ``probe.cache.local_cache_dir()``).
      batch_size: feature extraction batch.
      model_name: label of the rows (default: the workdir's base name).
      published_top1: a published number to print beside ours (fraction).

    Returns:
      The rows written (endpoint x protocol x subset).
    """
    if features not in ("export", "pixels"):
        raise ValueError(f"features must be 'export' or 'pixels'; got {features!r}.")
    if isinstance(protocols, str | protocols_lib.Protocol):
        protocols = (protocols,)
    protocols = [protocols_lib.resolve(p) for p in protocols]
    on_images = [p for p in protocols if p.uses == "images"]
    on_features = [p for p in protocols if p.uses == "features"]
    subsets = [subsets_lib.check_fraction(f) for f in subsets]
    if on_images and features != "export":
        raise ValueError(
            f"protocol(s) {[p.name for p in on_images]} train through an export; "
            f"features={features!r} has none."
        )
    if on_images and subsets != [1.0]:
        raise ValueError(
            f"protocol(s) {[p.name for p in on_images]} train on all labels; "
            f"subsets={subsets} (use (1.0,), or a feature protocol for subsets)."
        )
    context = protocols_lib.Context(
        seed=seed,
        strategy=None if strategy is None else strategy_lib.make_strategy(strategy),
    )
    model_name = model_name or os.path.basename(os.path.normpath(workdir))
    pp_fn = pp_lib.get_preprocess_fn(pp_probe)
    splits = {"train": train_split, "val": val_split, "test": test_split}

    # Every split must have examples: fail before any model work.
    for split in splits.values():
        if data_lib.num_examples(dataset, split, data_dir=data_dir) < 1:
            raise ValueError(f"The split {split!r} of {dataset!r} has no examples.")
        data_lib.require_labels(
            dataset,
            split,
            data_dir=data_dir,
            needed_by="linear_probe (it fits and scores a classifier of them)",
        )

    # 1. The feature extractor and what identifies its features.
    if features == "export":
        export_dir = export_dir or os.path.join(workdir, "export")
        if not files.isdir(export_dir):
            raise FileNotFoundError(
                f"No export at {export_dir!r}: run revisit-export on this "
                "workdir first, or bind linear_probe.export_dir."
            )
        # Hashed first: it refuses links out of the export and non-regular
        # files (a /dev/zero link would hang TensorFlow's loader).
        source_id = "saved_model:" + cache_lib.hash_directory(export_dir)
        if isinstance(endpoints, str):
            if endpoints != "all":
                raise ValueError(
                    "endpoints must be a sequence of names or 'all'; got "
                    f"{endpoints!r}."
                )
            endpoints = features_lib.SavedModelFeatures.available_endpoints(export_dir)
        extractor = features_lib.SavedModelFeatures(export_dir, endpoints=endpoints)
    else:
        endpoints = ("pixels",)
        extractor = features_lib.PixelFeatures()
        source_id = "pixels"
    endpoints = tuple(endpoints)

    rows: list[dict] = []
    results_file = os.path.join(workdir, "probe", "results.jsonl")
    tensorboard_dir = os.path.join(workdir, "probe", "tensorboard")
    progress = progress_lib.Progress(
        len(endpoints) * (len(on_features) * len(subsets) + len(on_images))
    )

    def record(protocol, endpoint, subset, out, sizes) -> None:
        spec = protocols_lib.protocol_record(
            protocol, dataset=dataset, splits=splits, pp=pp_probe,
            pooling=features_lib.POOLING, subset=subset, seed=seed,
            version=__version__,
        )  # fmt: skip
        row = _probe_row(model_name, endpoint, spec, out, sizes, workdir)
        row["dataset"], row["features"] = dataset, features
        if published_top1 is not None:
            row["published_top1"] = published_top1
        for warning in row.get("warnings") or ():
            _logger.warning(
                "Probe %s/%s %s: %s", model_name, endpoint, spec["protocol"], warning
            )
        _logger.info(
            "Probe %s/%s %s %s: val %s, test %.2f%% (%.1fs); probes %s.",
            model_name, endpoint, spec["protocol"], subsets_lib.subset_name(subset),
            "-" if row["val_top1"] is None else f"{100 * row['val_top1']:.2f}%",
            100 * row["test_top1"], row["seconds"], progress.summary(len(rows) + 1),
        )  # fmt: skip
        results_lib.append_result(results_file, row)
        rows.append(row)
        try:
            summaries_lib.write_probe_sweep(tensorboard_dir, [row])
        except Exception:  # the row is written already
            _logger.warning("No TensorBoard L2 sweep:", exc_info=True)

    # 2. Protocols that train on images through the export: one run each.
    if on_images:
        num_classes = _num_classes(dataset, splits, data_dir)
        for protocol in on_images:
            outs = protocol.run_images(
                export_dir, dataset=dataset, data_dir=data_dir, splits=splits,
                pp_eval=pp_probe, endpoints=endpoints, num_classes=num_classes,
                context=context, logdir=tensorboard_dir,
            )  # fmt: skip
            for endpoint, out in outs.items():
                sizes = {k: out.pop(k) for k in ("n_val", "n_test", "dim")}
                record(protocol, endpoint, 1.0, out, sizes)
    if not on_features:
        return rows

    # 3. Features of every split, extracted once into the cache.
    if cache_dir is None:  # the cache needs a local disk: not in a URL workdir
        cache_dir = (
            cache_lib.local_cache_dir()
            if files.is_remote(workdir)
            else os.path.join(workdir, "probe", "feature_cache")
        )
    cache = cache_lib.FeatureCache(cache_dir)
    entries: dict[str, dict[str, cache_lib.CachedFeatures]] = {}
    for key, split in splits.items():
        t0 = time.perf_counter()
        specs = {
            e: {
                "features": source_id,
                "endpoint": e,
                "pooling": features_lib.POOLING,
                "pp": pp_probe,
                "dataset": dataset,
                "data_dir": data_dir,
                "split": split,
            }
            for e in endpoints
        }

        def build(split=split):
            source = data_lib.get_source(dataset, split, data_dir=data_dir)
            ds = data_lib.make_eval_dataset(source, pp_fn, batch_size=batch_size)
            return extractor.iter_batches(ds)

        entries[key] = cache.get_or_build(specs, build, verify=True)
        _logger.info(
            "Features of %s %s: %d examples, %s (%.1fs).",
            dataset,
            split,
            entries[key][endpoints[0]].num_examples,
            ", ".join(f"{e} {entries[key][e].dim}-d" for e in endpoints),
            time.perf_counter() - t0,
        )

    # 4. One probe per endpoint x protocol x subset, one row each.
    for endpoint in endpoints:
        split_entries = protocols_lib.SplitEntries(
            **{key: entries[key][endpoint] for key in splits}
        )
        sizes = {
            "n_val": split_entries.val.num_examples,
            "n_test": split_entries.test.num_examples,
            "dim": split_entries.test.dim,
        }
        for protocol in on_features:
            for subset in subsets:
                out = protocols_lib.run_protocol(
                    protocol, split_entries, subset=subset, context=context
                )
                record(protocol, endpoint, subset, out, sizes)
    return rows


def _num_classes(dataset: str, splits: dict[str, str], data_dir: str | None) -> int:
    """Classes of a labelled source: its class names, else the largest label + 1."""
    names = data_lib.class_names(dataset, data_dir=data_dir)
    if names is not None:
        return len(names)
    top = -1
    for split in splits.values():
        source = data_lib.get_source(dataset, split, data_dir=data_dir)
        for labels in source.map(lambda ex: ex["label"]).batch(4096):
            top = max(top, int(tf.reduce_max(labels)))
    return top + 1


def _probe_row(model_name, endpoint, protocol, out, sizes, workdir) -> dict:
    """A results.jsonl row: identity, fingerprint, result fields (linear_probe).

    ``sizes``: ``n_val``, ``n_test`` and ``dim`` (the probed feature width).
    """
    row = {
        "model": model_name,
        "endpoint": endpoint,
        "protocol": protocol["protocol"],
        "subset": protocol["subset"],
        "fingerprint": fingerprint_lib.protocol_fingerprint(protocol),
        "n_train": out.pop("n_train"),
        **sizes,
    }
    row.update(out)
    row.update(
        {
            "splits": protocol["splits"],
            "protocol_spec": protocol,
            "workdir": files.absolute(workdir),
            "version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    return row


def report(paths: Sequence[str], kind: str = "auto") -> str:
    """Markdown tables of the probe results found in ``paths`` (workdirs/files).

    Args:
      paths: workdirs or results.jsonl files.
      kind: ``"probe"`` (one line per result), ``"endpoints"`` (model x
        endpoint, paper Fig. 5), ``"subsets"`` (model x label fraction, paper
        Fig. 7), or ``"auto"``: the probe table plus each of the other two
        that has more than one column.
    """
    return tables.report_tables(results_lib.read_results(paths), kind=kind)
