"""The roots: pretrain, export, linear probe and report.

Each root reads top to bottom as the data flow and is the only place where the
stages meet:

    data source -> pp -> model -> train loop -> checkpoints      (pretrain)
    checkpoint -> model -> SavedModel                            (export_model)
    data source -> pp -> SavedModel -> features -> L-BFGS probe  (linear_probe)
    results.jsonl -> markdown table                              (report)

The roots take plain values and builder callables; ``configurables`` registers
them with gin and the ``revisit-*`` binaries bind them from gin files. Nothing
here reads flags or global config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from revisit_tf import __version__
from revisit_tf import data as data_lib
from revisit_tf import pp as pp_lib
from revisit_tf.export import saved_model as export_lib
from revisit_tf.probe import features as features_lib
from revisit_tf.probe import lbfgs
from revisit_tf.report import results as results_lib
from revisit_tf.report import tables
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses as losses_lib
from revisit_tf.train import optim
from revisit_tf.train import strategy as strategy_lib

ModelFn = Callable[..., keras.Model]

# L2 penalties tried by the probe (objective: mean cross-entropy + l2/2 |W|^2).
DEFAULT_L2_GRID = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
_PRECISIONS = {"float32": tf.float32, "float64": tf.float64}


def _pp_output_shape(source: tf.data.Dataset, pp_fn) -> tf.TensorShape:
    """Static shape of ``pp_fn(example)["image"]``, traced without running."""
    return source.map(pp_fn).element_spec["image"].shape


def pretrain(
    workdir: str,
    *,
    dataset: str,
    pp_train: str,
    global_batch_size: int,
    model_fn: ModelFn,
    data_dir: str | None = None,
    train_split: str = "train",
    loss_fn: loop_lib.LossFn = losses_lib.softmax_xent,
    steps: int | None = None,
    epochs: float | None = None,
    examples: int | None = None,
    lr: float = 0.1,
    reference_batch_size: int = 256,
    warmup_epochs: float = 0.0,
    decay_epochs: Sequence[float] = (),
    decay_factor: float = 0.1,
    warmup_from_zero: bool = False,
    momentum: float = 0.9,
    strategy: str = "default",
    tpu: str | None = None,
    steps_per_loop: int = 100,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    shuffle_buffer: int = 10_000,
    cache_source: bool = False,
    seed: int | None = None,
    on_first_loop: Callable[[], None] | None = None,
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
      model_fn: builder called as ``model_fn(input_shape=(H, W, C))`` returning
        a Keras model whose output dict has ``logits``.
      data_dir: dataset directory (TFDS ``data_dir`` or the idx directory).
      train_split: split to train on (``train`` = official train minus the
        held-out ``val``, as the paper).
      loss_fn: per-row loss.
      steps, epochs, examples: the training duration, exactly one of them.
      lr: learning rate at ``reference_batch_size`` (reference 7.2).
      reference_batch_size: batch for linear lr scaling (256).
      warmup_epochs, decay_epochs, decay_factor, warmup_from_zero: the schedule
        (``optim.build_schedule``).
      momentum: SGD momentum (0.9).
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

    Returns:
      The metrics of the last logged loop (loss, accuracy, images/s, ...).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    os.makedirs(workdir, exist_ok=True)
    strategy_obj = strategy_lib.make_strategy(strategy, tpu=tpu)

    # 1. Data and 2. pretext preprocessing (labels are made by pp_train).
    num_train = data_lib.num_examples(dataset, train_split, data_dir=data_dir)
    pp_fn = pp_lib.get_preprocess_fn(pp_train)
    source = data_lib.get_source(dataset, train_split, data_dir=data_dir)
    image_shape = _pp_output_shape(source, pp_fn)

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        return data_lib.make_train_dataset(
            data_lib.get_source(dataset, train_split, data_dir=data_dir),
            pp_fn,
            global_batch_size=global_batch_size,
            input_context=input_context,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            cache=cache_source,
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
    schedule = optim.build_schedule(
        lr=lr,
        global_batch_size=global_batch_size,
        reference_batch_size=reference_batch_size,
        steps_per_epoch=per_epoch,
        warmup_epochs=warmup_epochs,
        decay_epochs=decay_epochs,
        decay_factor=decay_factor,
        warmup_from_zero=warmup_from_zero,
    )
    logging.info(
        "%s %s: %d examples, %d steps/epoch, %d steps in total; input %s -> "
        "network input %s; base lr %.4g.",
        dataset,
        train_split,
        num_train,
        per_epoch,
        total_steps,
        source.element_spec["image"].shape,
        image_shape,
        schedule.base_lr,
    )

    # 3. Model and 4. training under the strategy.
    with strategy_obj.scope():
        model = model_fn(input_shape=tuple(image_shape[-3:]))
        optimizer = optim.build_sgd(schedule, momentum=momentum)
    logging.info(
        "Model %s: %s trainable parameters.",
        model.name,
        f"{sum(int(np.prod(v.shape)) for v in model.trainable_variables):,}",
    )
    metrics = loop_lib.train(
        model=model,
        optimizer=optimizer,
        strategy=strategy_obj,
        dataset_fn=dataset_fn,
        total_steps=total_steps,
        global_batch_size=global_batch_size,
        workdir=workdir,
        loss_fn=loss_fn,
        steps_per_loop=steps_per_loop,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        on_first_loop=on_first_loop,
    )
    if metrics and strategy_lib.is_chief(strategy_obj):
        _write_json_atomic(os.path.join(workdir, "train_metrics.json"), metrics)
    return metrics


def export_model(
    workdir: str,
    *,
    model_fn: ModelFn,
    image_shape: Sequence[int | None],
    pp_export: str = "value_range(-1, 1, 0, 1)",
    random_init: bool = False,
    seed: int | None = None,
) -> str:
    """Writes ``workdir/export``: a SavedModel of the newest checkpoint's trunk.

    Args:
      workdir: training workdir (its ``checkpoints/``); the export goes to
        ``workdir/export`` (written to a temporary path, then renamed).
      model_fn: the same builder as training (called with ``input_shape``).
      image_shape: ``(H, W, C)`` of the exported input: float32 images in
        [0, 1]. ``H``/``W`` may be None for fully convolutional trunks.
      pp_export: the evaluation preprocessing baked into the SavedModel, applied
        to the ``{"image": [N, H, W, C]}`` batch in [0, 1] (default: to [-1, 1]
        as Rotation was trained; reference 3.5, 7.6).
      random_init: export the freshly initialised model instead of a checkpoint
        (the random-init baseline of the probe report).
      seed: initialisation seed for ``random_init``.

    Returns:
      The export path.

    Raises:
      FileNotFoundError: no checkpoint in ``workdir`` and not ``random_init``.
      CheckpointError: the checkpoint cannot be restored into ``model_fn()``.
    """
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or image_shape[-1] is None:
        raise ValueError(
            f"image_shape must be (H, W, C) with C known; got {image_shape}."
        )
    pp_fn = pp_lib.get_preprocess_fn(pp_export)

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        return pp_fn({"image": images})["image"]

    probe_shape = [1 if d is None else d for d in image_shape]
    model_shape = tuple(preprocess(tf.zeros([1, *probe_shape])).shape[1:])
    if image_shape[0] is None or image_shape[1] is None:
        model_shape = (None, None, model_shape[-1])
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = model_fn(input_shape=model_shape)
    if random_init:
        logging.info("Exporting %s at random initialisation.", model.name)
    else:
        path = checkpoint_lib.restore_model(workdir, model)
        logging.info("Restored %s.", path)
    out = export_lib.export_saved_model(
        model,
        os.path.join(workdir, "export"),
        image_shape=image_shape,
        preprocess=preprocess,
    )
    logging.info("Exported %s", out)
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
    endpoints: Sequence[str] = ("pre_logits",),
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    standardize: bool = True,
    max_iterations: int = 1000,
    precision: str = "float32",
    tolerance: float = 1e-4,
    batch_size: int = 256,
    model_name: str | None = None,
    published_top1: float | None = None,
) -> list[dict]:
    """Linear logistic-regression probe; rows go to ``workdir/probe/results.jsonl``.

    Features are computed once per split; the L2 penalty is chosen on
    ``val_split`` from ``l2_grid`` (warm-started path, largest first) and the
    chosen model is scored on ``test_split`` (as the paper's Table 1 protocol:
    train on ``train``, select on the held-out ``val``).

    Args:
      workdir: where results go; also the default place of the export.
      dataset, data_dir: the labelled source (``data.get_source``).
      train_split, val_split, test_split: split names.
      pp_probe: preprocessing from the source example to the export's input,
        float32 ``[H, W, C]`` in [0, 1] (e.g. ``"value_range(0, 1)"``, or
        ``"resize_small(256)|central_crop(224)|value_range(0, 1)"``).
      features: ``"export"`` (the SavedModel's endpoints) or ``"pixels"``
        (flattened preprocessed pixels: the raw-pixel baseline).
      export_dir: SavedModel path (default ``workdir/export``).
      endpoints: endpoints to probe (``pre_logits`` is the paper's number).
      l2_grid: penalties to select from (objective: mean cross-entropy +
        l2/2 ||W||^2).
      standardize: standardize features with training-split statistics.
      max_iterations: L-BFGS iteration cap per fit.
      precision: ``"float32"`` (default: about 3x faster per iteration on a
        CPU, and accurate to well below 0.1% top-1 at ``tolerance=1e-4``) or
        ``"float64"`` (use ``tolerance=1e-6`` or smaller) for the solver.
      tolerance: L-BFGS stops when the largest gradient entry is below this.
      batch_size: feature extraction batch.
      model_name: label of the rows (default: the workdir's base name).
      published_top1: a published number to print beside ours (fraction).

    Returns:
      The rows written (one per endpoint).
    """
    if precision not in _PRECISIONS:
        raise ValueError(
            f"precision must be one of {sorted(_PRECISIONS)}; got {precision!r}."
        )
    if features not in ("export", "pixels"):
        raise ValueError(f"features must be 'export' or 'pixels'; got {features!r}.")
    model_name = model_name or os.path.basename(os.path.normpath(workdir))
    pp_fn = pp_lib.get_preprocess_fn(pp_probe)
    splits = {"train": train_split, "val": val_split, "test": test_split}
    if features == "export":
        export_dir = export_dir or os.path.join(workdir, "export")
        extractor = features_lib.SavedModelFeatures(export_dir, endpoints=endpoints)
    else:
        endpoints = ("pixels",)
        extractor = features_lib.PixelFeatures()
    feats, labels = {}, {}
    for key, split in splits.items():
        t0 = time.perf_counter()
        source = data_lib.get_source(dataset, split, data_dir=data_dir)
        ds = data_lib.make_eval_dataset(source, pp_fn, batch_size=batch_size)
        feats[key], labels[key] = extractor.extract(ds)
        logging.info(
            "Features of %s %s: %d examples in %.1fs (%s).",
            dataset,
            split,
            len(labels[key]),
            time.perf_counter() - t0,
            ", ".join(f"{k} {v.shape[1]}-d" for k, v in feats[key].items()),
        )
    num_classes = int(max(labels["train"].max(), labels["val"].max())) + 1
    rows = []
    for endpoint in endpoints:
        t0 = time.perf_counter()
        sweep = lbfgs.sweep_l2(
            feats["train"][endpoint],
            labels["train"],
            feats["val"][endpoint],
            labels["val"],
            l2_grid=l2_grid,
            num_classes=num_classes,
            standardize=standardize,
            max_iterations=max_iterations,
            tolerance=tolerance,
            dtype=_PRECISIONS[precision],
        )
        best, point = sweep.best, sweep.best_point
        row = {
            "model": model_name,
            "endpoint": endpoint,
            "dataset": dataset,
            "features": features,
            "l2": best.l2,
            "n_train": len(labels["train"]),
            "n_val": len(labels["val"]),
            "n_test": len(labels["test"]),
            "dim": int(feats["test"][endpoint].shape[1]),
            "iterations": best.iterations,
            "converged": bool(best.converged),
            "train_top1": point.train_top1,
            "val_top1": point.val_top1,
            "test_top1": sweep.accuracy(feats["test"][endpoint], labels["test"]),
            "seconds": time.perf_counter() - t0,
            "l2_path": [
                {"l2": p.l2, "val_top1": p.val_top1, "iterations": p.iterations}
                for p in sweep.table
            ],
            "splits": splits,
            "solver": {
                "precision": precision,
                "tolerance": tolerance,
                "max_iterations": max_iterations,
                "standardize": standardize,
                "l2_grid": list(l2_grid),
                "pp_probe": pp_probe,
            },
            "workdir": os.path.abspath(workdir),
            "version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if published_top1 is not None:
            row["published_top1"] = published_top1
        logging.info(
            "Probe %s/%s: l2 %.0e, train %.2f%%, val %.2f%%, test %.2f%% "
            "(%d iterations, converged %s, %.1fs).",
            model_name,
            endpoint,
            row["l2"],
            100 * row["train_top1"],
            100 * row["val_top1"],
            100 * row["test_top1"],
            row["iterations"],
            row["converged"],
            row["seconds"],
        )
        results_lib.append_result(os.path.join(workdir, "probe", "results.jsonl"), row)
        rows.append(row)
    return rows


def report(paths: Sequence[str]) -> str:
    """Markdown table of the probe results found in ``paths`` (workdirs/files)."""
    return tables.probe_table(results_lib.read_results(paths))


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
