"""Online evaluation: probes of the live trunk while it trains (issue 14, item 6).

Place in the data flow: stage 6 run from inside stage 4. ``experiments.pretrain``
builds an ``OnlineEvaluator`` and hands it to ``train.loop.train`` as a
``Hook`` (the loop never imports the probe); every ``every_steps`` steps and
at the end, on the chief, between compiled loops:

    fixed labelled subsets (fit: M, score: M'), preprocessed once and kept
      -> live trunk, inference mode (``training=False``: BN moving statistics)
      -> each endpoint pooled as the offline probe pools it
      -> kNN top-1 (``knn.knn_top1``) and a fast L-BFGS top-1
         (``lbfgs.sweep_l2`` at one fixed l2, standardized, capped iterations)
      -> one row per (step, endpoint, method) and TensorBoard scalars.

The subsets: ``subsets.balanced_subset`` of the first ``pool_examples``
examples of ``fit_split`` and of ``score_split`` (sources are always in the
same order, so the subsets are fixed by the seed), preprocessed by
``pp_probe`` (source example -> the export's input, float32 in [0, 1]) and
then ``pp_export`` (what the export bakes in), i.e. exactly the inputs the
exported trunk would see. Bind both to the config's ``linear_probe.pp_probe``
and ``export_model.pp_export``. Patch exports (``pp_export`` ending in
``[N, P, h, w, C]``) run the trunk on the ``N * P`` patches and average each
endpoint over the patches after pooling it per patch, as
``export.saved_model`` does (reference 8.3); rank-4 endpoints are max-pooled
to at most 9000 features and flattened (``features.pool_to_budget``,
reference 8.2), so the online features of a step equal the offline probe's
features of an export of that step's trunk.

Why one fixed ``l2`` and not the offline sweep: selecting ``l2`` on the
scored subset would report a selection-biased number, and a third subset
would cost another extraction per call; a fixed penalty tracks the trend the
online curve is for. The offline probe (``linear_probe``) remains the number
to publish.

Rows (``OnlineEvaluator.rows_at``) carry ``online: true``, ``step`` and a
protocol (``protocol_spec``) whose name starts with ``online_`` and which
has ``online: true``, so its fingerprint (``fingerprint.protocol_fingerprint``)
never equals an offline one; ``step`` is a row field, not part of the
protocol, so the rows of one run at different steps share a fingerprint and
form one curve (as different models share one offline column).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from revisit_tf import __version__
from revisit_tf import data as data_lib
from revisit_tf import pp as pp_lib
from revisit_tf.models import pretext as pretext_lib
from revisit_tf.probe import features as features_lib
from revisit_tf.probe import fingerprint as fingerprint_lib
from revisit_tf.probe import knn as knn_lib
from revisit_tf.probe import lbfgs
from revisit_tf.probe import subsets as subsets_lib

_logger = logging.getLogger(__name__)

HOOK_NAME = "online"  # TensorBoard prefix and loop-metric prefix
METHODS = ("knn", "lbfgs")


def endpoint_features(
    outputs: Mapping[str, tf.Tensor],
    endpoints: Sequence[str],
    num_patches: int | None = None,
) -> dict[str, tf.Tensor]:
    """The probe's features of trunk outputs: ``{endpoint: float32 [N, D]}``.

    Args:
      outputs: the trunk's endpoint dict, each ``[N, ...]`` (``[N * P, ...]``
        for patch inputs).
      endpoints: the endpoints to keep.
      num_patches: P for patch inputs, None otherwise.

    Returns:
      Per endpoint, rank-4 maps max-pooled to at most 9000 features
      (``features.pool_to_budget``), averaged over the P patches of each image
      when ``num_patches`` is set (as the export's patch signatures), then
      flattened row-major, channels fastest: ``[N, D]`` float32.
    """
    out = {}
    for name in endpoints:
        value = features_lib.pool_to_budget(tf.cast(outputs[name], tf.float32))
        if num_patches is not None:  # [N * P, ...] -> [N, P, ...] -> [N, ...]
            value = tf.reshape(value, [-1, num_patches, *value.shape[1:]])
            value = tf.reduce_mean(value, axis=1)
        out[name] = tf.reshape(value, [tf.shape(value)[0], -1])
    return out


class OnlineEvaluator:
    """kNN and L-BFGS probes of the live trunk every ``every_steps`` steps.

    A ``train.loop.Hook``: ``name``, ``every_steps``, ``__call__(step, model)``
    and ``has_run(step)``. Construction only checks its settings; the subsets
    are read and preprocessed at the first call (so their cost is in the
    hook's measured time) and kept.

    Example:
      evaluator = OnlineEvaluator(
          every_steps=100, training_dataset="fashion_mnist_idx",
          num_fit=500, num_score=500, write_row=rows.append)
      loop.train(..., hooks=[evaluator])

    Args:
      every_steps: evaluate at every multiple of this step (>= 1).
      training_dataset, training_data_dir: the pretraining source (passed by
        ``pretrain``), used when ``dataset`` is None.
      dataset, data_dir: a labelled source to evaluate on (for label-free
        pretraining data such as an unlabelled image folder); None: the
        pretraining source.
      fit_split: split of the fitted subset (kNN references, L-BFGS training).
      score_split: split of the scored subset (held out from ``fit_split``;
        the default ``val`` is the held-out tail of train, never ``test``).
      num_fit, num_score: class-balanced subset sizes M and M' (about: the
        same number per class, ``subsets.balanced_subset``).
      pool_examples: the subsets are drawn from the first this many examples
        of each split (bounds the one labels pass on large datasets).
      pp_probe: source example -> export input in [0, 1] (``linear_probe.pp_probe``).
      pp_export: export input batch -> trunk input (``export_model.pp_export``).
      endpoints: trunk endpoints to probe.
      knn_k: neighbours of the cosine kNN.
      l2: the L-BFGS penalty (objective: mean cross-entropy + l2/2 ||W||^2 on
        standardized features).
      max_iterations, tolerance: L-BFGS caps (float32 solver).
      batch_size: trunk batch for feature extraction.
      seed: subset seed.
      write_row: called with each result row (``pretrain`` appends them to
        ``workdir/online/results.jsonl``); None keeps them only in ``rows``.
      model_name: the rows' ``model``.
      workdir: the rows' ``workdir``.
      done_steps: steps whose rows exist already (a resumed run's
        ``has_run``).

    Raises:
      ValueError: bad settings, an unlabelled dataset, or an empty split.
    """

    name = HOOK_NAME

    def __init__(
        self,
        *,
        every_steps: int,
        training_dataset: str | None = None,
        training_data_dir: str | None = None,
        dataset: str | None = None,
        data_dir: str | None = None,
        fit_split: str = "train",
        score_split: str = "val",
        num_fit: int = 1000,
        num_score: int = 1000,
        pool_examples: int = 10_000,
        pp_probe: str = "value_range(0, 1)",
        pp_export: str = "value_range(-1, 1, 0, 1)",
        endpoints: Sequence[str] = ("pre_logits",),
        knn_k: int = 20,
        l2: float = 1e-3,
        max_iterations: int = 100,
        tolerance: float = 1e-4,
        batch_size: int = 256,
        seed: int = 0,
        write_row: Callable[[dict], None] | None = None,
        model_name: str = "model",
        workdir: str | None = None,
        done_steps: Collection[int] = (),
    ):
        for key, value, low in (
            ("every_steps", every_steps, 1),
            ("num_fit", num_fit, 1),
            ("num_score", num_score, 1),
            ("pool_examples", pool_examples, 1),
            ("knn_k", knn_k, 1),
            ("max_iterations", max_iterations, 1),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}; got {value!r}.")
        if knn_k > num_fit:
            raise ValueError(f"knn_k ({knn_k}) must be <= num_fit ({num_fit}).")
        if not (isinstance(l2, int | float) and np.isfinite(l2) and l2 >= 0):
            raise ValueError(f"l2 must be a finite number >= 0; got {l2!r}.")
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError(
                f"endpoints must be a non-empty sequence of names; got {endpoints!r}."
            )
        if dataset is None:
            if training_dataset is None:
                raise ValueError("Online evaluation needs a dataset (none given).")
            dataset, data_dir = training_dataset, training_data_dir
        for split in (fit_split, score_split):
            if data_lib.num_examples(dataset, split, data_dir=data_dir) < 1:
                raise ValueError(f"The split {split!r} of {dataset!r} has no examples.")
            data_lib.require_labels(
                dataset,
                split,
                data_dir=data_dir,
                needed_by="online evaluation (bind online_evaluator.dataset to a "
                "labelled source)",
            )
        self.every_steps = every_steps
        self.dataset, self.data_dir = dataset, data_dir
        self.splits = {"fit": fit_split, "score": score_split}
        self.sizes = {"fit": num_fit, "score": num_score}
        self.pool_examples = pool_examples
        self.pp_probe, self.pp_export = pp_probe, pp_export
        self._pp_probe_fn = pp_lib.get_preprocess_fn(pp_probe)
        self._pp_export_fn = pp_lib.get_preprocess_fn(pp_export)
        self.endpoints = tuple(endpoints)
        self.knn_k, self.l2 = knn_k, float(l2)
        self.max_iterations, self.tolerance = max_iterations, float(tolerance)
        self.batch_size, self.seed = batch_size, seed
        self.write_row = write_row
        self.model_name, self.workdir = model_name, workdir
        self._done = {int(s) for s in done_steps}
        self.rows: list[dict] = []  # rows of this process, in order
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._forward: TrunkFeatures | None = None

    # -- the hook -----------------------------------------------------------

    def has_run(self, step: int) -> bool:
        """True if rows of ``step`` were written (by this or an earlier process)."""
        return int(step) in self._done

    def check_model(self, model: keras.Model) -> None:
        """Fails before training if the trunk lacks one of ``endpoints``.

        Raises:
          ValueError: naming the missing endpoints and those available.
        """
        outputs = pretext_lib.get_trunk(model).output
        available = sorted(outputs) if isinstance(outputs, Mapping) else []
        missing = [e for e in self.endpoints if e not in available]
        if missing:
            raise ValueError(
                f"Online evaluation endpoints {missing} are not endpoints of the "
                f"trunk; available: {available}."
            )

    def __call__(self, step: int, model: keras.Model) -> dict[str, float]:
        """Probes the trunk of ``model`` at ``step``; writes and returns results.

        Returns:
          TensorBoard scalars ``{"<endpoint>/knn_top1": ..,
          "<endpoint>/lbfgs_top1": .., "features_seconds": ..}`` (the loop
          prefixes ``online/``).
        """
        t0 = time.perf_counter()
        data = self._subsets()
        trunk = pretext_lib.get_trunk(model)
        features = {key: self.features(trunk, x) for key, (x, _) in data.items()}
        features_seconds = time.perf_counter() - t0
        (fit_x, fit_y), (score_x, score_y) = data["fit"], data["score"]
        del fit_x, score_x  # the inputs; the features are what is probed
        num_classes = int(max(fit_y.max(), score_y.max())) + 1
        scalars = {"features_seconds": features_seconds}
        rows = []
        for endpoint in self.endpoints:
            fit_f, score_f = features["fit"][endpoint], features["score"][endpoint]
            t = time.perf_counter()
            knn_top1 = knn_lib.knn_top1(
                fit_f, fit_y, score_f, score_y, k=self.knn_k, num_classes=num_classes
            )
            knn_seconds = time.perf_counter() - t
            t = time.perf_counter()
            sweep = lbfgs.sweep_l2(
                fit_f,
                fit_y,
                score_f,
                score_y,
                l2_grid=(self.l2,),
                num_classes=num_classes,
                standardize=True,
                max_iterations=self.max_iterations,
                tolerance=self.tolerance,
                dtype=tf.float32,
            )
            lbfgs_seconds = time.perf_counter() - t
            point = sweep.best_point
            common = {"dim": int(fit_f.shape[1])}
            rows.append(self._row(step, endpoint, "knn", knn_top1, knn_seconds, common))
            rows.append(
                self._row(
                    step,
                    endpoint,
                    "lbfgs",
                    point.val_top1,
                    lbfgs_seconds,
                    {
                        **common,
                        "train_top1": point.train_top1,
                        "l2": point.l2,
                        "iterations": point.iterations,
                        "converged": bool(point.converged),
                    },
                )
            )
            scalars[f"{endpoint}/knn_top1"] = knn_top1
            scalars[f"{endpoint}/lbfgs_top1"] = point.val_top1
            _logger.info(
                "Online step %d %s: kNN(k=%d) %.2f%%, L-BFGS(l2=%.0e) %.2f%% "
                "(%d iterations%s); fit %d, score %d.",
                step,
                endpoint,
                self.knn_k,
                100 * knn_top1,
                self.l2,
                100 * point.val_top1,
                point.iterations,
                "" if point.converged else ", not converged",
                len(fit_y),
                len(score_y),
            )
        seconds = time.perf_counter() - t0
        for row in rows:
            row["call_seconds"] = seconds
            if self.write_row is not None:
                self.write_row(row)
        self.rows.extend(rows)
        self._done.add(int(step))
        return scalars

    # -- protocol and rows --------------------------------------------------

    def protocol(self, method: str) -> dict[str, Any]:
        """The protocol of ``method``'s rows (``"knn"`` or ``"lbfgs"``); no step."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
        spec: dict[str, Any] = {
            "protocol": f"online_{method}",
            fingerprint_lib.ONLINE_KEY: True,
            "dataset": self.dataset,
            "splits": dict(self.splits),
            "pp": self.pp_probe,
            "pp_export": self.pp_export,
            "pooling": features_lib.POOLING,
            "subset": {
                "num_fit": self.sizes["fit"],
                "num_score": self.sizes["score"],
                "pool_examples": self.pool_examples,
                "balanced": True,
            },
            "seed": self.seed,
            "version": __version__,
        }
        if method == "knn":
            spec["k"] = self.knn_k
        else:
            spec.update(
                l2=self.l2,
                standardize=True,
                max_iterations=self.max_iterations,
                tolerance=self.tolerance,
                precision="float32",
            )
        return spec

    def _row(self, step, endpoint, method, top1, seconds, extra) -> dict:
        protocol = self.protocol(method)
        (_, fit_y), (_, score_y) = self._data["fit"], self._data["score"]
        row = {
            "model": self.model_name,
            "endpoint": endpoint,
            "protocol": protocol["protocol"],
            fingerprint_lib.ONLINE_KEY: True,
            "step": int(step),
            "fingerprint": fingerprint_lib.protocol_fingerprint(protocol),
            "top1": float(top1),
            "n_fit": len(fit_y),
            "n_score": len(score_y),
            **extra,
            "seconds": seconds,
            "protocol_spec": protocol,
            "workdir": self.workdir,
            "version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return row

    def rows_at(self, step: int) -> list[dict]:
        """This process's rows of ``step`` (one per endpoint and method)."""
        return [r for r in self.rows if r["step"] == step]

    # -- data and features --------------------------------------------------

    def _subsets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"fit"|"score": (trunk inputs float32 [M, ...], int64 labels [M])}``."""
        if self._data is None:
            self._data = {key: self._read_subset(key) for key in self.splits}
        return self._data

    def _read_subset(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        split, size = self.splits[key], self.sizes[key]
        total = data_lib.num_examples(self.dataset, split, data_dir=self.data_dir)
        pool = min(self.pool_examples, total)
        source = data_lib.get_source(self.dataset, split, data_dir=self.data_dir)
        source = source.take(pool)
        labels = np.concatenate(
            list(source.map(lambda ex: ex["label"]).batch(4096).as_numpy_iterator())
        ).astype(np.int64)  # [pool]
        keep = subsets_lib.balanced_subset(
            labels, min(1.0, size / pool), seed=self.seed
        )  # sorted [M]
        mask = tf.constant(np.isin(np.arange(pool), keep))
        chosen = (
            source.enumerate()
            .filter(lambda i, ex: mask[i])
            .map(lambda i, ex: {"image": ex["image"], "label": ex["label"]})
        )
        batches = data_lib.make_eval_dataset(
            chosen, self._pp_probe_fn, batch_size=self.batch_size
        )
        inputs, out_labels = [], []
        for batch in batches:
            images = tf.cast(batch["image"], tf.float32)  # [B, H, W, C] in [0, 1]
            inputs.append(self._pp_export_fn({"image": images})["image"].numpy())
            out_labels.append(batch["label"].numpy())
        x = np.concatenate(inputs).astype(np.float32)  # [M, ...]
        y = np.concatenate(out_labels).astype(np.int64)  # [M]
        np.testing.assert_array_equal(y, labels[keep])  # same examples, in order
        _logger.info(
            "Online evaluation %s subset: %d examples of %s %s (first %d), %d "
            "classes, trunk input %s.",
            key,
            len(y),
            self.dataset,
            split,
            pool,
            len(np.unique(y)),
            x.shape[1:],
        )
        return x, y

    def features(self, trunk: keras.Model, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """``{endpoint: float32 [N, D]}`` of ``trunk`` (``TrunkFeatures``).

        Args:
          trunk: the live trunk (``models.pretext.get_trunk``).
          inputs: trunk inputs ``[N, H, W, C]``, or patches ``[N, P, h, w, C]``.
        """
        if self._forward is None or self._forward.trunk is not trunk:
            self._forward = TrunkFeatures(trunk, self.endpoints, self.batch_size)
        return self._forward(inputs)


class TrunkFeatures:
    """The probe's features of a Keras trunk in inference mode, batch by batch.

    One compiled forward pass (traced once per input shape) that runs
    ``trunk(x, training=False)`` and pools with ``endpoint_features``; for
    patch inputs ``[N, P, h, w, C]`` the trunk sees the ``N * P`` patches.

    Example:
      feats = TrunkFeatures(trunk, ["pre_logits"])(inputs)  # {"pre_logits": [N, D]}

    Args:
      trunk: a trunk (``models.build_trunk``): image -> endpoint dict.
      endpoints: the endpoints to return.
      batch_size: inputs per forward pass.
    """

    def __init__(
        self, trunk: keras.Model, endpoints: Sequence[str], batch_size: int = 256
    ):
        self.trunk, self.endpoints, self.batch_size = (
            trunk,
            tuple(endpoints),
            batch_size,
        )

        @tf.function(reduce_retracing=True)
        def forward(x):
            num_patches = None
            if x.shape.rank == 5:  # [N, P, h, w, C] -> [N * P, h, w, C]
                num_patches = x.shape[1]
                x = tf.reshape(x, [-1, *x.shape[2:]])
            outputs = trunk(x, training=False)
            return endpoint_features(outputs, self.endpoints, num_patches)

        self._forward = forward

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """``{endpoint: float32 [N, D]}`` of ``inputs`` (``[N, ...]`` trunk inputs)."""
        parts = {e: [] for e in self.endpoints}
        for start in range(0, len(inputs), self.batch_size):
            out = self._forward(tf.constant(inputs[start : start + self.batch_size]))
            for e in self.endpoints:
                parts[e].append(out[e].numpy())
        return {e: np.concatenate(parts[e]).astype(np.float32) for e in parts}
