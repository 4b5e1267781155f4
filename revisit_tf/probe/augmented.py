"""The release's linear evaluation: heads trained on re-augmented images.

Place in the data flow (stage 6): the export (stage 5) is run *inside* the
training step, on random crops drawn anew every time an image is seen, as
the original's ``--task linear_eval`` (reference 8.1-8.5; paper Table 2 and
Fig. 8). The feature-cache probes (``lbfgs``, ``sgd``, ``mlp``) instead see
one central crop per image; this protocol is the one the release measured.

Protocol (reference 8.1-8.5, configs 10.6/10.7):

* Trunk frozen: the export's ``representation`` signature (``patches`` for
  a pp that makes ``[P, h, w, C]`` patches, reference 8.3), batch norm in
  inference mode, no gradient reaches it (``FrozenTrunk``).
* Every endpoint is made rank 4, max-pooled to at most 9000 features
  (``features.pool_to_budget``, reference 8.2 ``pool_mode=max``) and
  flattened row-major, channels fastest (8.4); every endpoint gets its own
  head, all trained at once on the same batches: loss = sum over endpoints
  of each head's mean softmax cross-entropy (8.4).
* Heads: ``linear`` (Glorot-uniform kernel, zero bias) or ``mlp`` (one
  hidden ReLU layer, dropout 0.5; 8.4 ``--eval_model mlp``, width 1000).
* SGD with momentum 0.9 in the TF1 form ``a = 0.9 a + g; w -= lr a``
  (7.3), lr 0.1 at batch 256 scaled linearly (batch 512: 0.2), x0.1 after
  epochs 30 and 50, 70 epochs, no warm-up, no weight decay (8.5, 10.6):
  ``schedules.reference_schedule``, the trainer's schedule. An epoch is
  ``num_train // batch_size`` steps (7.1).
* Training pp: random crops, no flips (8.5), re-drawn every time an image
  is seen: the stream is ``data.make_train_dataset`` with a seed, so each
  example's crop is stateless in (seed, epoch, index) (``pp.rng``) and a
  run is reproducible. Evaluation pp: central crops; every eval example is
  scored (top-1 and top-5, 8.4) every ``eval_every_epochs`` and at the end.

Distribution (style guide 4.5): datasets through
``strategy.distribute_datasets_from_function``, the forward pass and the
gradients per replica in ``strategy.run``, the gradients summed over
replicas (``strategy.reduce``; each replica's loss is already divided by the
global batch, ``tf.nn.compute_average_loss``) and the heads updated once in
cross-replica context. Any single-worker strategy (default, one-device,
``MirroredStrategy``) gives the same numbers up to summation order.

Contract: ``train_augmented_probe(export_dir, dataset=..., ...)`` ->
``{endpoint: AugmentedResult}``; TensorBoard scalars under ``logdir``
(``<protocol>/<endpoint>/<split>_top1`` etc. against the step, and
``<protocol>/epoch``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from revisit_tf import data as data_lib
from revisit_tf import pp as pp_lib
from revisit_tf import progress as progress_lib
from revisit_tf import schedules
from revisit_tf.export import saved_model as export_lib
from revisit_tf.probe import sgd
from revisit_tf.probe.features import POOLING, pool_to_budget

_logger = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
# Protocol name per head: the prefix of the TensorBoard tags.
PROTOCOLS = {"linear": "sgd_augmented", "mlp": "mlp_augmented"}
TOP_K = 5  # reference 8.4: top1_accuracy_<name> and top5_accuracy_<name>
DROPOUT = 0.5  # reference 8.4, the MLP head
LOG_EVERY_S = 30.0


@dataclasses.dataclass
class AugmentedResult:
    """One endpoint's head after ``train_augmented_probe``.

    Attributes:
        endpoint: the export's endpoint name.
        head: ``"linear"`` or ``"mlp"``.
        top1: ``{eval split: top-1 in [0, 1]}`` after the last step.
        top5: ``{eval split: top-5 in [0, 1]}`` after the last step.
        curve: one dict per evaluation, in order: ``epoch`` (float; the last
            one is ``epochs``), ``step`` (optimizer steps done), ``lr`` (the
            rate of the last step), ``loss`` (this head's mean training
            cross-entropy since the previous evaluation) and
            ``<split>_top1`` / ``<split>_top5`` per eval split. The last
            entry's accuracies are ``top1`` / ``top5``.
        predictions: ``{eval split: int32 [M]}``, the final head's class per
            example in source order; ``top1[s] == mean(predictions[s] ==
            labels[s])``.
        labels: ``{eval split: int32 [M]}``, the labels in source order.
        steps: optimizer steps taken.
        seconds: wall time of the whole run (all heads train together).
        num_examples: ``{split: examples}`` for the train and eval splits.
        settings: the protocol's settings as JSON values (for fingerprints).
        params: the head's final variables as NumPy arrays.
    """

    endpoint: str
    head: str
    top1: dict[str, float]
    top5: dict[str, float]
    curve: list[dict[str, float]]
    predictions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    steps: int
    seconds: float
    num_examples: dict[str, int]
    settings: dict[str, Any]
    params: dict[str, np.ndarray]


class FrozenTrunk:
    """An export's inference-mode endpoints, pooled and flattened (ref 8.1-8.3).

    ``trunk(images)`` -> ``{endpoint: float32 [B, D]}`` for ``images``
    ``[B, H, W, C]`` (the ``representation`` signature) or patches ``[B, P,
    h, w, C]`` (the ``patches`` signature), float32 in [0, 1]. Batch norm
    uses its moving statistics, so an example's features do not depend on
    the rest of its batch, and nothing here changes the export's variables.

    Example:
        trunk = FrozenTrunk(path, ["pre_logits"], image_shape=(224, 224, 3))
        trunk.dims  # {"pre_logits": 2048}

    Args:
        export_dir: a ``revisit-export`` SavedModel directory.
        endpoints: endpoint names of its ``representation`` signature.
        image_shape: the static shape of one preprocessed example (what the
            pp makes): ``(H, W, C)`` or ``(P, h, w, C)`` for patches.
        strategy: load the variables under this strategy's scope (mirrored
            copies on every replica's device); None: the current strategy.

    Raises:
        FileNotFoundError: no SavedModel at ``export_dir``.
        ValueError: not a revisit_tf export, unknown endpoints, or an
            ``image_shape`` the export does not take.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        endpoints: Sequence[str],
        *,
        image_shape: Sequence[int],
        strategy: tf.distribute.Strategy | None = None,
    ):
        path = os.fspath(export_dir)
        if not tf.saved_model.contains_saved_model(path):
            raise FileNotFoundError(
                f"No SavedModel at {path!r}: run revisit-export on the training "
                "workdir first."
            )
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self._loaded = export_lib.load(path)
        signatures = self._loaded.signatures
        rep = signatures[export_lib.REPRESENTATION_SIGNATURE]
        available = sorted(rep.structured_outputs)
        endpoints = list(endpoints)
        if not endpoints or len(set(endpoints)) != len(endpoints):
            raise ValueError(f"endpoints must be distinct names; got {endpoints}.")
        unknown = [e for e in endpoints if e not in available]
        if unknown:
            raise ValueError(
                f"Endpoints {unknown} are not in the export {path!r}; available: "
                f"{available}."
            )
        self.endpoints = tuple(endpoints)
        self.image_shape = tuple(int(d) for d in image_shape)
        if len(self.image_shape) == 4:  # patches [P, h, w, C], reference 8.3
            if export_lib.PATCHES_SIGNATURE not in signatures:
                raise ValueError(
                    f"The pp makes patches {list(self.image_shape)} but the export "
                    f"{path!r} has no {export_lib.PATCHES_SIGNATURE!r} signature "
                    "(it is not a patch model); make images [H, W, C]."
                )
            self._fn = signatures[export_lib.PATCHES_SIGNATURE]
        elif len(self.image_shape) == 3:
            self._fn = rep
        else:
            raise ValueError(
                f"image_shape must be (H, W, C) or patches (P, h, w, C); got "
                f"{self.image_shape}."
            )
        ((self._key, spec),) = self._fn.structured_input_signature[1].items()
        if not spec.shape[1:].is_compatible_with(self.image_shape):
            raise ValueError(
                f"The pp makes examples of shape {list(self.image_shape)}; the "
                f"export {path!r} takes {spec.shape[1:].as_list()} (None: any)."
            )
        # One eager example fixes every endpoint's spatial shape, so that the
        # traced steps pool (reference 8.2) exactly as this call does even
        # when the export was saved with H, W = None.
        probe = self._fn(**{self._key: tf.zeros([1, *self.image_shape])})
        self._shapes = {e: probe[e].shape[1:] for e in self.endpoints}
        self.dims = {e: int(v.shape[1]) for e, v in self._pooled(probe).items()}

    @property
    def variables(self) -> list[tf.Variable]:
        """The export's variables (to check that training leaves them alone)."""
        return list(self._loaded.variables)

    def _pooled(self, outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = {}
        for e in self.endpoints:
            x = tf.ensure_shape(outputs[e], [None, *self._shapes[e]])
            x = pool_to_budget(x)  # [B, h', w', C] with h' w' C <= 9000
            out[e] = tf.reshape(x, [-1, math.prod(x.shape[1:])])  # [B, D]
        return out

    def __call__(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """``images`` ``[B, *image_shape]`` in [0, 1] -> ``{endpoint: [B, D]}``."""
        images = tf.cast(images, tf.float32)
        outputs = self._fn(**{self._key: images})
        return {e: tf.stop_gradient(x) for e, x in self._pooled(outputs).items()}


def make_train_input(
    dataset: str,
    split: str,
    pp: str,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    shuffle_buffer: int = 10_000,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """The endless training stream of one input pipeline (reference 8.5).

    ``get_source(dataset, split)`` -> ``make_train_dataset`` with ``pp``
    (random crops) and a seed: an epoch-wise reshuffled stream in which each
    example's crop is drawn anew at every epoch, statelessly in (seed,
    epoch, index), so runs and strategies see the same crops.

    Returns:
        Batches ``{"image": float32 [b, *image_shape], "label": int32 [b]}``,
        ``b = global_batch_size / replicas``.
    """
    pp_fn = _labelled_pp(pp)
    return data_lib.make_train_dataset(
        lambda: data_lib.get_source(dataset, split, data_dir=data_dir),
        pp_fn,
        global_batch_size=global_batch_size,
        input_context=input_context,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
    )


def make_eval_input(
    dataset: str,
    split: str,
    pp: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """One ordered pass of ``split`` with ``pp`` (central crops; deterministic).

    Returns:
        Batches ``{"image": float32 [b, ...], "label": int32 [b], "index":
        int64 [b]}`` (``index``: the example's position in the source), the
        last one partial.
    """
    pp_fn = _labelled_pp(pp)

    def source():
        ds = data_lib.get_source(dataset, split, data_dir=data_dir)
        return ds.enumerate().map(lambda i, ex: {**ex, "index": i})

    def preprocess(example):
        out = pp_fn({k: v for k, v in example.items() if k != "index"})
        return {**out, "index": example["index"]}

    return data_lib.make_eval_dataset(
        source, preprocess, batch_size=batch_size, input_context=input_context
    )


def _labelled_pp(pp: str):
    fn = pp_lib.get_preprocess_fn(pp, log_data=False)

    def preprocess(example):
        out = fn(example)
        if "label" not in out:
            raise ValueError(f"The pp {pp!r} drops the 'label' the probe needs.")
        return {
            "image": tf.cast(out["image"], tf.float32),
            "label": tf.cast(out["label"], tf.int32),
        }

    return preprocess


class _Heads:
    """Every endpoint's head, trained together on the frozen trunk's features.

    ``train(iterator, n)`` runs ``n`` steps (traced once); ``evaluate(...)``
    scores every head on every eval set. Variables live under the strategy.
    """

    def __init__(
        self, trunk, endpoints, *, head, num_classes, hidden, seed, schedule,
        momentum, batch_size, strategy,
    ):  # fmt: skip
        self.trunk, self.endpoints, self.strategy = trunk, endpoints, strategy
        self.seed, self.schedule, self.momentum = seed, schedule, momentum
        self.batch_size, self.top_k = batch_size, min(TOP_K, num_classes)
        rng = np.random.default_rng(seed)
        with strategy.scope():
            self.heads = {
                e: sgd.Head(head, trunk.dims[e], num_classes, hidden, rng)
                for e in endpoints
            }
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.train = tf.function(self._train)
        self._eval_step = tf.function(self._eval_step_fn)

    def _replica_step(self, batch):
        features = self.trunk(batch["image"])  # frozen, outside the tape
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        dropout_seed = tf.stack(
            [
                tf.constant(self.seed, tf.int64),
                self.step * self.strategy.num_replicas_in_sync
                + tf.cast(replica, tf.int64),
            ]
        )
        with tf.GradientTape() as tape:
            losses = {}
            for i, e in enumerate(self.endpoints):
                seed_e = tf.random.experimental.stateless_fold_in(dropout_seed, i)
                logits = self.heads[e].logits(features[e], dropout_seed=seed_e)
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    batch["label"], logits
                )  # [b]
                # This replica's share of the global mean (reference 8.4).
                losses[e] = tf.nn.compute_average_loss(
                    per_example, global_batch_size=self.batch_size
                )
            total = tf.add_n(list(losses.values()))  # reference 8.4: the sum
        variables = [h.vars[k] for h in self.heads.values() for k in h.names]
        return tape.gradient(total, variables), losses

    def _train_step(self, iterator):
        strategy = self.strategy
        grads, losses = strategy.run(self._replica_step, args=(next(iterator),))
        rate = self.schedule(self.step)  # reference 7.2: the step before its update
        grads = iter(grads)
        for h in self.heads.values():
            for k in h.names:
                # Summed over replicas: each replica's loss is already divided
                # by the global batch, so this is the global mean's gradient.
                g = strategy.reduce("SUM", next(grads), axis=None)
                h.slots[k].assign(self.momentum * h.slots[k] + g)  # TF1 form, 7.3
                h.vars[k].assign_sub(rate * h.slots[k])
        self.step.assign_add(1)
        return {e: strategy.reduce("SUM", v, axis=None) for e, v in losses.items()}

    def _train(self, iterator, num_steps):
        sums = {e: tf.constant(0.0) for e in self.endpoints}
        for _ in tf.range(num_steps):
            losses = self._train_step(iterator)
            sums = {e: sums[e] + losses[e] for e in self.endpoints}
        return sums

    def _eval_step_fn(self, batch):
        def replica_fn(batch):
            features = self.trunk(batch["image"])
            out = {"label": batch["label"], "index": batch["index"]}
            for e, h in self.heads.items():
                logits = h.logits(features[e])  # [b, C]
                out[f"{e}/pred"] = tf.argmax(logits, axis=1, output_type=tf.int32)
                out[f"{e}/top5"] = tf.math.in_top_k(batch["label"], logits, self.top_k)
            return out

        return self.strategy.run(replica_fn, args=(batch,))

    def evaluate(self, eval_sets, sizes):
        """``({(endpoint, "<split>_top1"|"<split>_top5"): float},
        {(endpoint, split): int32 [M] predictions in source order},
        {split: int32 [M] labels in source order})``."""
        scores, predictions, split_labels = {}, {}, {}
        for split, ds in eval_sets.items():
            parts: dict[str, list[np.ndarray]] = {}
            for batch in ds:
                for k, v in self._eval_step(batch).items():
                    for t in self.strategy.experimental_local_results(v):
                        parts.setdefault(k, []).append(t.numpy())
            got = {k: np.concatenate(v) for k, v in parts.items()}
            order = np.argsort(got["index"], kind="stable")
            if len(order) != sizes[split]:  # e.g. a multi-worker strategy
                raise RuntimeError(
                    f"Evaluated {len(order)} of the {sizes[split]} examples of "
                    f"{split!r}: use a single-worker strategy."
                )
            labels = split_labels[split] = got["label"][order]
            for e in self.endpoints:
                pred = got[f"{e}/pred"][order]
                predictions[e, split] = pred
                scores[e, f"{split}_top1"] = float(np.mean(pred == labels))
                scores[e, f"{split}_top5"] = float(np.mean(got[f"{e}/top5"]))
        return scores, predictions, split_labels


def _write_point(writer, protocol: str, points: Mapping[str, Mapping]) -> None:
    """One evaluation's scalars at its step: ``<protocol>/epoch``,
    ``<protocol>/learning_rate`` and ``<protocol>/<endpoint>/<key>``."""
    first = next(iter(points.values()))
    with writer.as_default(step=int(first["step"])):
        tf.summary.scalar(f"{protocol}/epoch", first["epoch"])
        tf.summary.scalar(f"{protocol}/learning_rate", first["lr"])
        for e, point in points.items():
            for key, value in point.items():
                if key not in ("epoch", "step", "lr"):
                    tf.summary.scalar(f"{protocol}/{e}/{key}", value)
    writer.flush()


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return int(value)


def _check_settings(head, epochs, decay_epochs, lr, momentum, hidden):
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}; got {head!r}.")
    if (
        isinstance(epochs, bool)
        or not isinstance(epochs, int | float)
        or not (epochs > 0 and math.isfinite(epochs))
    ):
        raise ValueError(f"epochs must be a finite number > 0; got {epochs!r}.")
    decay = list(decay_epochs)
    if decay != sorted(decay) or any(e < 0 for e in decay):
        raise ValueError(
            f"decay_epochs must be increasing and >= 0; got {decay_epochs!r}."
        )
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be > 0; got {lr!r}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}.")
    if head == "mlp":
        _check_positive_int("hidden", hidden)


def _example_shape(ds: tf.data.Dataset, what: str) -> tuple[int, ...]:
    shape = ds.element_spec["image"].shape[1:]
    if not shape.is_fully_defined():
        raise ValueError(
            f"The {what} pp makes images of shape {shape}; the probe needs a fixed "
            "shape (end it with a crop, e.g. 'central_crop(224)')."
        )
    return tuple(shape.as_list())


def train_augmented_probe(
    export_dir: str | os.PathLike | FrozenTrunk,
    *,
    dataset: str,
    data_dir: str | None = None,
    train_split: str = "trainval",
    eval_splits: Sequence[str] = ("test",),
    pp_train: str = "resize_small(256)|random_crop(224)|value_range(0, 1)",
    pp_eval: str = "resize_small(256)|central_crop(224)|value_range(0, 1)",
    endpoints: Sequence[str] = ("pre_logits",),
    num_classes: int | None = None,
    head: str = "linear",
    hidden: int = 1000,
    epochs: float = 70,
    decay_epochs: Sequence[float] = (30, 50),
    decay_factor: float = 0.1,
    batch_size: int = 512,
    lr: float = 0.1,
    reference_batch_size: int = 256,
    momentum: float = 0.9,
    eval_batch_size: int = 256,
    eval_every_epochs: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
    steps_per_loop: int = 100,
    strategy: tf.distribute.Strategy | None = None,
    logdir: str | None = None,
) -> dict[str, AugmentedResult]:
    """Trains one head per endpoint on random crops through the frozen export.

    The release's linear evaluation (module docstring; reference 8.1-8.5):
    ImageNet's shipped protocol (10.6) is the default, ``trainval`` /
    ``test`` with 224 crops of the 256-resized image.

    Args:
        export_dir: the ``revisit-export`` directory, or a ``FrozenTrunk``
            already loaded under ``strategy`` with the pp's example shape.
        dataset, data_dir: the labelled source (``data.get_source``).
        train_split: split the heads train on (reference 10.6: ``trainval``;
            Table 1's protocol: ``train``).
        eval_splits: splits scored every ``eval_every_epochs`` and at the end.
        pp_train: training pp with random crops, no flips (8.5), ending in
            float32 images in [0, 1] of a fixed shape.
        pp_eval: evaluation pp with central crops, same output shape.
        endpoints: endpoints of the export, each its own head (8.1).
        num_classes: classes; None: the source's class names' count.
        head: ``"linear"`` or ``"mlp"`` (8.4).
        hidden: MLP hidden width (8.4: 1000).
        epochs: training length in epochs of ``train_split`` (8.5: 70).
        decay_epochs: the rate is multiplied by ``decay_factor`` after each
            (8.5: 30, 50).
        decay_factor: 0.1.
        batch_size: global batch (10.6: 512); a multiple of the replicas.
        lr: rate at ``reference_batch_size``, scaled linearly (0.1 at 256).
        reference_batch_size: 256.
        momentum: 0.9 (TF1 form, reference 7.3).
        eval_batch_size: global evaluation batch (10.6 uses 32; with batch
            norm frozen and every example scored the result does not depend
            on it); a multiple of the replicas.
        eval_every_epochs: evaluate after every this many whole epochs (and
            always at the end).
        seed: the crops, the order, the heads' initialisation and dropout.
        shuffle_buffer: examples in the shuffle buffer (reference 2: 10,000).
        steps_per_loop: steps per traced loop between progress checks.
        strategy: a single-worker ``tf.distribute.Strategy``; None: default.
        logdir: TensorBoard directory (``workdir/probe/tensorboard``); None
            writes nothing.

    Returns:
        ``{endpoint: AugmentedResult}``.

    Raises:
        ValueError: unknown endpoint or head, a non-positive epoch count or
            rate, a batch larger than the train split or not a multiple of
            the replicas, a pp without labels or of the wrong shape, ...;
            all before any training.
        FloatingPointError: the loss became NaN or infinite.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    _check_settings(head, epochs, decay_epochs, lr, momentum, hidden)
    batch_size = _check_positive_int("batch_size", batch_size)
    eval_batch_size = _check_positive_int("eval_batch_size", eval_batch_size)
    eval_every_epochs = _check_positive_int("eval_every_epochs", eval_every_epochs)
    steps_per_loop = _check_positive_int("steps_per_loop", steps_per_loop)
    for name, value in (
        ("batch_size", batch_size),
        ("eval_batch_size", eval_batch_size),
    ):
        if value % replicas:
            raise ValueError(
                f"{name}={value} is not a multiple of the {replicas} replicas."
            )
    if isinstance(endpoints, str):
        raise ValueError(
            f"endpoints must be a sequence of endpoint names; got {endpoints!r}."
        )
    eval_splits = list(eval_splits)
    if not eval_splits:
        raise ValueError("eval_splits must name at least one split.")
    sizes = {}
    for split in [train_split, *eval_splits]:
        data_lib.require_labels(
            dataset, split, data_dir=data_dir, needed_by="the augmented SGD probe"
        )
        sizes[split] = data_lib.num_examples(dataset, split, data_dir=data_dir)
    if batch_size > sizes[train_split]:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {sizes[train_split]} examples of "
            f"{dataset!r} {train_split!r}."
        )
    if num_classes is None:
        names = data_lib.class_names(dataset, data_dir=data_dir)
        if names is None:
            raise ValueError(f"{dataset!r} has no class names: give num_classes.")
        num_classes = len(names)
    num_classes = _check_positive_int("num_classes", num_classes)

    def train_fn(ctx):
        return make_train_input(
            dataset, train_split, pp_train, global_batch_size=batch_size, seed=seed,
            data_dir=data_dir, shuffle_buffer=shuffle_buffer, input_context=ctx,
        )  # fmt: skip

    def eval_fn(split):
        return lambda ctx: make_eval_input(
            dataset, split, pp_eval, batch_size=eval_batch_size, data_dir=data_dir,
            input_context=ctx,
        )  # fmt: skip

    # Shapes are known before anything is read: fail on a mismatch now.
    shape = _example_shape(train_fn(None), "training")
    eval_shape = _example_shape(eval_fn(eval_splits[0])(None), "evaluation")
    if shape != eval_shape:
        raise ValueError(
            f"pp_train makes examples of shape {list(shape)} but pp_eval makes "
            f"{list(eval_shape)}; the heads need one shape."
        )
    if isinstance(export_dir, FrozenTrunk):
        trunk = export_dir
        if trunk.image_shape != shape:
            raise ValueError(
                f"The FrozenTrunk takes {list(trunk.image_shape)}; the pp makes "
                f"{list(shape)}."
            )
        unknown = [e for e in endpoints if e not in trunk.endpoints]
        if unknown:
            raise ValueError(f"Endpoints {unknown} are not in {trunk.endpoints}.")
    else:
        trunk = FrozenTrunk(export_dir, endpoints, image_shape=shape, strategy=strategy)
    endpoints = tuple(endpoints)

    steps_per_epoch = schedules.steps_per_epoch(sizes[train_split], batch_size)
    total_steps = math.ceil(epochs * steps_per_epoch)
    schedule = schedules.reference_schedule(
        global_batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        lr=lr,
        reference_batch_size=reference_batch_size,
        decay_epochs=decay_epochs,
        decay_factor=decay_factor,
    )
    heads = _Heads(
        trunk, endpoints, head=head, num_classes=num_classes, hidden=hidden,
        seed=seed, schedule=schedule, momentum=momentum, batch_size=batch_size,
        strategy=strategy,
    )  # fmt: skip
    eval_sets = {
        s: strategy.distribute_datasets_from_function(eval_fn(s)) for s in eval_splits
    }

    eval_steps = sorted(
        {
            min(k * eval_every_epochs * steps_per_epoch, total_steps)
            for k in range(1, math.ceil(epochs / eval_every_epochs) + 1)
        }
        | {total_steps}
    )
    protocol = PROTOCOLS[head]
    writer = tf.summary.create_file_writer(logdir) if logdir else None
    _logger.info(
        "Augmented %s probe of %s on %s %s (%d examples): %d steps (%s epochs of "
        "%d) of global batch %d on %d replica(s), base lr %.4g; evaluating %s "
        "at %d points.",
        head, ", ".join(endpoints), dataset, train_split, sizes[train_split],
        total_steps, epochs, steps_per_epoch, batch_size, replicas,
        lr * batch_size / reference_batch_size, ", ".join(eval_splits),
        len(eval_steps),
    )  # fmt: skip

    iterator = iter(strategy.distribute_datasets_from_function(train_fn))
    curves: dict[str, list[dict[str, float]]] = {e: [] for e in endpoints}
    progress = progress_lib.Progress(total_steps, every_s=LOG_EVERY_S)
    start = time.perf_counter()
    step, loss_sums, since = 0, dict.fromkeys(endpoints, 0.0), 0
    predictions: dict[tuple[str, str], np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for target in eval_steps:
        while step < target:
            num = min(steps_per_loop, target - step)
            sums = heads.train(iterator, tf.constant(num))
            for e in endpoints:
                loss_sums[e] += float(sums[e])
            step, since = step + num, since + num
            total_loss = sum(loss_sums.values())
            if not math.isfinite(total_loss):
                raise FloatingPointError(
                    f"The augmented {head} probe diverged by step {step} (loss "
                    f"{total_loss}); lower lr (now {lr} at batch "
                    f"{reference_batch_size})."
                )
            if progress.due():
                _logger.info(
                    "Augmented %s probe: step %s, loss %.4f, %.0f images/s.",
                    head, progress.summary(step), total_loss / since,
                    step * batch_size / max(progress.elapsed(), 1e-9),
                )  # fmt: skip
        epoch = min(step / steps_per_epoch, float(epochs))
        rate = float(schedule(step - 1))
        scores, predictions, labels = heads.evaluate(eval_sets, sizes)
        for e in endpoints:
            point = {"epoch": epoch, "step": step, "lr": rate}
            point["loss"] = loss_sums[e] / since
            point.update({k: v for (name, k), v in scores.items() if name == e})
            curves[e].append(point)
        _logger.info(
            "Augmented %s probe: epoch %.4g/%s (step %s): %s.",
            head, epoch, epochs, progress.summary(step),
            "; ".join(
                f"{e} " + ", ".join(
                    f"{s} top-1 {100 * curves[e][-1][f'{s}_top1']:.2f}%"
                    for s in eval_splits
                )
                for e in endpoints
            ),
        )  # fmt: skip
        if writer is not None:
            _write_point(writer, protocol, {e: c[-1] for e, c in curves.items()})
        loss_sums, since = dict.fromkeys(endpoints, 0.0), 0
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - start

    settings = {
        "protocol": protocol, "head": head, "dataset": dataset,
        "train_split": train_split, "eval_splits": eval_splits,
        "pp_train": pp_train, "pp_eval": pp_eval, "pooling": POOLING,
        "epochs": epochs, "decay_epochs": list(decay_epochs),
        "decay_factor": decay_factor, "batch_size": batch_size, "lr": lr,
        "reference_batch_size": reference_batch_size, "momentum": momentum,
        "seed": seed, "num_classes": num_classes,
        **({"hidden": hidden} if head == "mlp" else {}),
    }  # fmt: skip
    return {
        e: AugmentedResult(
            endpoint=e,
            head=head,
            top1={s: curves[e][-1][f"{s}_top1"] for s in eval_splits},
            top5={s: curves[e][-1][f"{s}_top5"] for s in eval_splits},
            curve=curves[e],
            predictions={s: predictions[e, s] for s in eval_splits},
            labels=labels,
            steps=step,
            seconds=seconds,
            num_examples=dict(sizes),
            settings=settings,
            params={k: v.numpy() for k, v in heads.heads[e].vars.items()},
        )
        for e in endpoints
    }
