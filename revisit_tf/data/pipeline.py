"""Input pipelines: stage 1 (sources) -> stage 2 (pp) glue, per replica.

Contract: ``make_train_dataset`` and ``make_eval_dataset`` take a source
dataset of ``{"image", "label"}`` or, unlabelled, ``{"image"}``
(``data.sources.get_source``; the pipelines never look inside) and a
preprocessing function ``dict -> dict`` (a ``pp`` pipeline) and return the
batched dataset ONE input pipeline feeds to its replicas: every leaf gets a
leading per-replica batch dimension. They are meant to be called from the
``input_fn(input_context)`` given to
``strategy.distribute_datasets_from_function`` (style guide 4.5, SimCLR tf2
``data.py``):

    def input_fn(input_context):
        return make_train_dataset(
            lambda: get_source("imagenet2012", "train"), pp_fn,
            global_batch_size=1024, input_context=input_context)

    dist_ds = strategy.distribute_datasets_from_function(input_fn)

Training: shard -> [cache] -> shuffle -> repeat -> map(pp) -> batch(drop
remainder) -> prefetch (reference section 2, "input pipeline behaviour").
Evaluation: shard -> map(pp) -> batch(keep remainder) -> prefetch, one ordered
pass.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from revisit_tf.pp import rng as pp_rng

SourceLike = tf.data.Dataset | Callable[[], tf.data.Dataset]
PreprocessFn = Callable[[dict], dict]


def _default_context(
    input_context: tf.distribute.InputContext | None,
) -> tf.distribute.InputContext:
    # No strategy: one pipeline feeding one replica.
    return input_context or tf.distribute.InputContext(
        num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=1
    )


def _per_replica_batch_size(
    global_batch_size: int, input_context: tf.distribute.InputContext, what: str
) -> int:
    if (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, int)
        or global_batch_size < 1
    ):
        raise ValueError(f"{what} must be a positive int, got {global_batch_size!r}.")
    num_replicas = input_context.num_replicas_in_sync
    if global_batch_size % num_replicas:
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the "
            f"{num_replicas} replicas in sync; use a multiple of {num_replicas}."
        )
    return input_context.get_per_replica_batch_size(global_batch_size)


def _shard(ds: tf.data.Dataset, input_context: tf.distribute.InputContext):
    # Element-level sharding: each pipeline reads the whole (deterministically
    # ordered) source and keeps every n-th example, so the pipelines see
    # disjoint subsets that together cover it. File-level sharding would read
    # less, but only works when there are at least as many files as pipelines.
    if input_context.num_input_pipelines > 1:
        ds = ds.shard(
            input_context.num_input_pipelines, input_context.input_pipeline_id
        )
    return ds


def _materialize(source: SourceLike) -> tf.data.Dataset:
    ds = source() if callable(source) else source
    if not isinstance(ds, tf.data.Dataset):
        raise ValueError(
            "source must be a tf.data.Dataset or a callable returning one, got "
            f"{type(ds).__name__}."
        )
    return ds


def make_train_dataset(
    source: SourceLike,
    preprocess_fn: PreprocessFn,
    *,
    global_batch_size: int,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    cache: bool = False,
    batch_preprocess_fn: PreprocessFn | None = None,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Builds the endless, shuffled training pipeline of one input pipeline.

    With a ``seed`` the stream is a pure function of its position (exact
    resume): epoch ``e`` of this pipeline is its shard shuffled with a seed
    derived from ``(seed, e)``, and every example is preprocessed with
    stateless randomness seeded by ``(seed, pipeline, e, index in epoch)``
    (``pp.rng``); every batch for ``batch_preprocess_fn`` by ``(seed,
    pipeline, batch index)``. ``start_step=s`` then yields exactly the
    batches that the pipeline built with ``start_step=0`` yields from its
    ``s``-th global step on (whole epochs are skipped without reading them;
    at most one epoch of raw examples is read and dropped). Without a seed,
    order and augmentation are random and a resumed stream restarts.

    Args:
      source: Dataset of ``{"image", "label"}`` (or ``{"image"}``) examples,
        or a zero-argument callable building it (so that each worker builds
        its own).
      preprocess_fn: ``dict -> dict`` applied to every example after shuffling.
      global_batch_size: Examples per step over all replicas (the paper's ``B``,
        reference section 7.1); must be divisible by the number of replicas.
      input_context: From ``distribute_datasets_from_function``; ``None`` means
        one pipeline and one replica.
      shuffle_buffer: Example-level shuffle buffer; 10,000 as the reference
        (section 2, step 3).
      seed: The stream's seed (order and augmentation). With a seed the
        pipeline is a deterministic function of (seed, position); without
        one, ``map`` may also reorder elements for speed.
      cache: Cache the (sharded, not preprocessed) source in memory after the
        first epoch; for sources that fit in RAM.
      batch_preprocess_fn: ``dict -> dict`` applied to every per-replica
        batch (leaves ``[per_replica_batch_size, ...]``), for per-batch
        randomness such as the Jigsaw permutation subset that the reference
        shares among all images of a (per-replica) batch (reference 4.3).
      start_step: the global step the stream starts at (a resumed run):
        this pipeline's share of ``start_step * global_batch_size`` examples
        is skipped. Needs a ``seed`` (without one nothing could be
        reproduced, so a nonzero ``start_step`` is an error).

    Returns:
      An infinite dataset of dicts whose leaves are ``[per_replica_batch_size,
      ...]`` with a static batch dimension, ``per_replica_batch_size =
      global_batch_size / num_replicas_in_sync``.

    Raises:
      ValueError: ``global_batch_size`` not a positive multiple of the number of
        replicas, ``shuffle_buffer`` < 1, or a ``source`` that is no dataset.
    """
    input_context = _default_context(input_context)
    per_replica_batch_size = _per_replica_batch_size(
        global_batch_size, input_context, "global_batch_size"
    )
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int):
        raise ValueError(f"shuffle_buffer must be an int, got {shuffle_buffer!r}.")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}.")
    if (
        isinstance(start_step, bool)
        or not isinstance(start_step, int)
        or start_step < 0
    ):
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
    if start_step and seed is None:
        raise ValueError(
            f"start_step={start_step} needs a seed: an unseeded stream cannot be "
            "positioned (pass seed=, as pretrain always does)."
        )
    ds = _shard(_materialize(source), input_context)
    if cache:
        ds = ds.cache()
    if seed is None:
        # Shuffle BEFORE repeat (as big_vision input_pipeline.py
        # make_for_train): every example of an epoch is seen before any
        # example of the next one, which matters when training for few
        # epochs. After repeat, a buffer larger than the dataset would mix
        # epochs and show some examples twice before others once.
        # reshuffle_each_iteration gives each epoch its own order.
        ds = ds.shuffle(shuffle_buffer, reshuffle_each_iteration=True).repeat()
        ds = ds.map(
            preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
        )
    else:
        ds = _positioned_stream(
            ds,
            preprocess_fn,
            shuffle_buffer=shuffle_buffer,
            base_seed=_pipeline_seed(seed, input_context.input_pipeline_id),
            start_example=start_step
            * per_replica_batch_size
            * _replicas_per_pipeline(input_context),
        )
    # drop_remainder: a static batch dimension, needed on TPU and by ops that
    # slice the batch in Python (reference 11.2 item 8; style guide 4.3).
    ds = ds.batch(per_replica_batch_size, drop_remainder=True)
    if batch_preprocess_fn is not None:
        if seed is None:
            ds = ds.map(batch_preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            start_batch = start_step * _replicas_per_pipeline(input_context)
            batch_seed = tf.random.experimental.stateless_fold_in(
                _pipeline_seed(seed, input_context.input_pipeline_id), -1
            )

            def seeded_batch_pp(index, batch):
                with pp_rng.seeded(
                    tf.random.experimental.stateless_fold_in(batch_seed, index)
                ):
                    return batch_preprocess_fn(batch)

            ds = tf.data.Dataset.zip(
                tf.data.Dataset.range(start_batch, _FOREVER), ds
            ).map(seeded_batch_pp, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(deterministic=seed is not None))


def make_eval_dataset(
    source: SourceLike,
    preprocess_fn: PreprocessFn,
    *,
    batch_size: int,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Builds one ordered evaluation pass (no shuffle, no repeat).

    Args:
      source: As for ``make_train_dataset``.
      preprocess_fn: ``dict -> dict`` applied to every example, in order.
      batch_size: GLOBAL evaluation batch size; each replica gets
        ``batch_size / num_replicas_in_sync`` per batch (must divide).
      input_context: As for ``make_train_dataset``.

    Returns:
      A finite dataset, in source order (of this pipeline's shard), of dicts
      with leaves ``[per_replica_batch_size, ...]``; the last batch keeps the
      remainder, so the batch dimension is not static and every example is
      evaluated (unlike the reference, section 11.2 item 14). Under several
      pipelines the shards can differ in length by one batch.

    Raises:
      ValueError: As for ``make_train_dataset``.
    """
    input_context = _default_context(input_context)
    per_replica_batch_size = _per_replica_batch_size(
        batch_size, input_context, "batch_size"
    )
    ds = _shard(_materialize(source), input_context)
    ds = ds.map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_replica_batch_size, drop_remainder=False)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(deterministic=True))


_FOREVER = 2**62


def _replicas_per_pipeline(input_context: tf.distribute.InputContext) -> int:
    return max(
        input_context.num_replicas_in_sync // input_context.num_input_pipelines, 1
    )


def _pipeline_seed(seed: int, pipeline_id: int) -> tf.Tensor:
    """int64 ``[2]``: the run's seed, split per input pipeline."""
    return tf.constant([seed, pipeline_id], tf.int64)


def _positioned_stream(
    ds: tf.data.Dataset,
    preprocess_fn: PreprocessFn,
    *,
    shuffle_buffer: int,
    base_seed: tf.Tensor,
    start_example: int,
) -> tf.data.Dataset:
    """Epochs of ``ds`` shuffled per epoch and preprocessed, from an example on.

    Epoch ``e`` is ``ds.shuffle(shuffle_buffer, seed=f(base_seed, e))``; the
    ``i``-th example of epoch ``e`` is preprocessed inside
    ``pp_rng.seeded(fold_in(g(base_seed, e), i))``. The result is the
    concatenation of epochs from example ``start_example`` on (with the
    shard's size known, whole epochs are skipped without reading them).
    """
    size = int(ds.cardinality())
    if size == 0:
        raise ValueError("the training source (this pipeline's shard) is empty.")
    start_epoch, offset = 0, start_example
    if size > 0:  # known size: skip whole epochs by number
        start_epoch, offset = divmod(start_example, size)

    def epoch(e):
        # This function's own graph seed: the shuffle's seed pair is then
        # (1, shuffle_seed) whatever the process's global seed (with a global
        # seed of 0, TF's get_seed would compare a tensor seed in Python).
        tf.random.set_seed(1)
        # A 31-bit shuffle seed per epoch, a stateless function of (seed, e).
        shuffle_seed = tf.random.stateless_uniform(
            [],
            seed=tf.random.experimental.stateless_fold_in(base_seed, e),
            minval=0,
            maxval=2**31 - 1,
            dtype=tf.int64,
        )
        epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, e + _FOREVER)
        shuffled = ds.shuffle(
            shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
        )
        seeds = tf.data.Dataset.range(_FOREVER).map(
            lambda i: tf.random.experimental.stateless_fold_in(epoch_seed, i)
        )
        return tf.data.Dataset.zip(seeds, shuffled)

    def preprocess(example_seed, example):
        with pp_rng.seeded(example_seed):
            return preprocess_fn(example)

    stream = tf.data.Dataset.range(start_epoch, _FOREVER).flat_map(epoch)
    if offset:
        stream = stream.skip(offset)
    stream = stream.apply(
        tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
    )
    return stream.map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def _options(*, deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # Parallelism comes from tf.data's own map/prefetch threads; a single
    # intra-op thread per op avoids oversubscribing the host (tf.data
    # performance guide; big_vision _add_tpu_host_options does the same).
    options.threading.max_intra_op_parallelism = 1
    # Keep the shared inter-op threadpool (private_threadpool_size = 0).
    return options
