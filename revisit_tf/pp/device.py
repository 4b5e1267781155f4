"""Pretext batches built on the accelerator: a pipeline split in two (stage 2).

Every pretext multiplies its image before the trunk sees it: Rotation
stacks 4 rotated copies (reference 4.1), Jigsaw and Relative Patch Location
cut 9 jittered patches (reference 3.3). Built per example on the host, in
``tf.data``, that work and the 4x larger tensors fall on the host's cores,
which on a multi-GPU host is the usual bottleneck. :func:`split` cuts a
training pipeline at its first *batch pretext op*: the ops before it stay in
``tf.data`` (decode, the per-image crop), the rest run on each per-replica
batch ``[B, ...]`` inside the (compiled) training step.

**The batches are the same.** The host part records each example's seed (as
the int32 ``pp.rng.row_key``) and draw count (``pp.rng.position``); the
batch part continues every row's draws from there (``pp.rng.seeded_rows``),
and the batch pp ops (``pretrain.pp_train_batch``, e.g. ``jigsaw_perms``) run
after it under their batch's seed (``pp.rng.seeded_key``). So for a seeded
stream (``pretrain`` always seeds it) a step sees the same inputs whichever
side builds them: bit for bit in a plain graph, and under XLA up to the
rounding of fused arithmetic (``value_range``, ``standardize``: 1e-7), since
the batch part draws only integers, which XLA draws as TensorFlow's kernels
do (``pp.rng.ALG``). Exact resume is unchanged.

Batch ops (``DEVICE_OPS``): ``rotate4`` and ``crop_patches`` start the batch
part; it may go on with ``standardize``, ``value_range`` and a final
``keep``. Exemplar's and SimCLR's ``copies`` are not among them: each copy is
an Inception crop of the variable-size decoded image, which does not exist
as a batch (a fixed-size host resize first would change the recipe).

Place in the data flow: ``data`` -> ``pp`` (host part, batched) -> the
training step (``train.loop``: ``device_preprocess_fn``, this module's batch
part) -> ``models``. No gin here: ``experiments.pretrain`` binds it
(``pretrain.pretext_on_device``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from revisit_tf.pp import builder, rng

# Ops that start the batch part (the pretext's multiplication) and those
# that may follow it there: each works on a batch [B, ...] and, under
# rng.seeded_rows, draws what it would draw per example.
START_OPS = ("rotate4", "crop_patches")
DEVICE_OPS = (*START_OPS, "standardize", "value_range", "keep")

# Batch features the host part adds and the batch part consumes.
SEED_KEY = "_pp_seed"  # int32 [B]: each example's rng.row_key
DRAWS_KEY = "_pp_draws"  # int32 [B]: its draws made on the host
BATCH_SEED_KEY = "_pp_batch_seed"  # int32 []: the batch pp ops' rng.row_key
PRIVATE_KEYS = (SEED_KEY, DRAWS_KEY, BATCH_SEED_KEY)

PreprocessFn = Callable[[dict], dict]


@dataclasses.dataclass(frozen=True)
class Split:
    """A training pipeline cut at its first batch pretext op.

    Attributes:
      host: the per-example part, run in ``tf.data`` (e.g.
        ``'decode|inception_preprocess(224)'``).
      device: the per-batch part, run in the training step (e.g.
        ``'rotate4|keep("image", "label")'``).
      keep: the keys of the pipeline's final ``keep`` (None without one); the
        host part keeps those of them it has, so no string or
        variable-size feature reaches the batch.
    """

    host: str
    device: str
    keep: tuple[str, ...] | None


def split(pp_train: str) -> Split:
    """Cuts ``pp_train`` before its first op in ``START_OPS``.

    Raises:
      ValueError: no op of ``START_OPS`` in the pipeline (naming the ones
        that exist and why ``copies`` is not one), or an op after the cut
        that does not run on a batch (naming it and ``DEVICE_OPS``).
    """
    ops = builder.split_pipeline(pp_train) if pp_train.strip() else []
    names = [builder.parse_op(op)[0] if op else "" for op in ops]
    starts = [i for i, name in enumerate(names) if name in START_OPS]
    if not starts:
        raise ValueError(
            f"pretext_on_device: the pipeline {pp_train!r} has none of the batch "
            f"pretext ops {START_OPS}, so nothing could move to the device "
            "(Exemplar's and SimCLR's copies crop the variable-size decoded image "
            "and stay on the host); set pretext_on_device = False."
        )
    cut = starts[0]
    for name in names[cut:]:
        if name not in DEVICE_OPS:
            raise ValueError(
                f"pretext_on_device: {name!r} comes after {names[cut]!r} in "
                f"{pp_train!r} but does not run on a batch; only {DEVICE_OPS} may "
                "follow the cut (move the op before it, or keep the pipeline on the "
                "host)."
            )
    keep = None
    if names[-1] == "keep":
        keep = tuple(builder.parse_op(ops[-1])[1])
    return Split(host="|".join(ops[:cut]), device="|".join(ops[cut:]), keep=keep)


def host_example_fn(parts: Split) -> PreprocessFn:
    """The per-example host part: ``parts.host``, the keep, the seed keys.

    Inside ``pp.rng.seeded`` (the seeded training stream) it writes the
    example's seed and draw count for the batch part; unseeded, it writes
    nothing and the batch part draws unseeded too.
    """
    fn = builder.get_preprocess_fn(parts.host)

    def host_fn(data: dict) -> dict:
        out = fn(data)
        if parts.keep is not None:
            out = {k: v for k, v in out.items() if k in parts.keep}
        here = rng.position()
        if here is not None:
            out[SEED_KEY] = rng.row_key(here[0])
            out[DRAWS_KEY] = tf.constant(here[1], tf.int32)
        return out

    return host_fn


def host_batch_fn(batch: dict) -> dict:
    """Records the seed the input pipeline gives this batch's batch ops."""
    here = rng.position()
    if here is None:
        return batch
    return {**batch, BATCH_SEED_KEY: rng.row_key(here[0])}


def device_batch_fn(parts: Split, batch_fn: PreprocessFn | None = None) -> PreprocessFn:
    """The per-replica batch part: ``parts.device``, then ``batch_fn``.

    Args:
      parts: the split pipeline.
      batch_fn: the batch pp ops (``pretrain.pp_train_batch``, per ghost
        group), run after the batch part under the batch's own seed, as the
        host pipeline runs them after batching.

    Returns:
      ``fn(batch) -> batch`` for ``[B, ...]`` dicts made by the host part;
      the private seed keys are consumed.
    """
    fn = builder.get_preprocess_fn(parts.device)

    def device_fn(batch: dict) -> dict:
        batch = dict(batch)
        keys = batch.pop(SEED_KEY, None)
        draws = batch.pop(DRAWS_KEY, None)
        batch_seed = batch.pop(BATCH_SEED_KEY, None)
        if keys is not None and draws is not None:
            with rng.seeded_rows(keys, draws):
                batch = fn(batch)
        else:
            batch = fn(batch)
        if batch_fn is not None:
            if batch_seed is not None:
                with rng.seeded_key(batch_seed):
                    batch = batch_fn(batch)
            else:
                batch = batch_fn(batch)
        return batch

    return device_fn


def output_spec(device_fn: PreprocessFn, element_spec: dict) -> dict:
    """The ``tf.TensorSpec``s of ``device_fn``'s output for batches of ``element_spec``.

    Traced once without data, so a model can be built for the batches the
    training step will make (``experiments.pretrain``).
    """
    traced = tf.function(device_fn).get_concrete_function(element_spec)
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), traced.structured_outputs
    )
