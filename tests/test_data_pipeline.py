"""Tests for revisit_tf.data.pipeline (stage 1 -> 2 glue, per replica).

Sources are tiny in-memory datasets whose label is the example index, so
sharding, shuffling and ordering can be checked exactly. conftest.py provides
2 logical CPUs, on which MirroredStrategy runs 2 real replicas.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.data.pipeline import make_eval_dataset, make_train_dataset


def _source(n: int) -> tf.data.Dataset:
    """n examples {"image": uint8 [2, 2, 1] filled with i, "label": i}."""
    labels = tf.range(n, dtype=tf.int64)
    images = tf.cast(tf.fill([n, 2, 2, 1], 1), tf.uint8) * tf.cast(
        labels[:, None, None, None], tf.uint8
    )
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


def _identity(example):
    return example


def _labels(ds: tf.data.Dataset, num_batches: int | None = None) -> list[list[int]]:
    ds = ds if num_batches is None else ds.take(num_batches)
    return [batch["label"].numpy().tolist() for batch in ds]


def _context(pipeline_id: int, num_pipelines: int = 2, num_replicas: int = 2):
    return tf.distribute.InputContext(
        num_input_pipelines=num_pipelines,
        input_pipeline_id=pipeline_id,
        num_replicas_in_sync=num_replicas,
    )


def test_two_pipelines_get_disjoint_shards_covering_the_data():
    n = 20
    shards = []
    for pipeline_id in (0, 1):
        eval_ds = make_eval_dataset(
            _source(n), _identity, batch_size=4, input_context=_context(pipeline_id)
        )
        shard = [x for batch in _labels(eval_ds) for x in batch]
        assert len(shard) == len(set(shard)) == n // 2
        # The training pipeline of the same context reads the same shard: one
        # epoch of it (10 examples = 5 per-replica batches of 4 / 2).
        train_ds = make_train_dataset(
            _source(n),
            _identity,
            global_batch_size=4,
            input_context=_context(pipeline_id),
            seed=1,
        )
        epoch = [x for batch in _labels(train_ds, 5) for x in batch]
        assert sorted(epoch) == sorted(shard)
        shards.append(set(shard))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(n))


@pytest.mark.parametrize(
    "global_batch_size, num_replicas, per_replica", [(8, 1, 8), (8, 2, 4), (6, 3, 2)]
)
def test_train_batches_are_static_per_replica(
    global_batch_size, num_replicas, per_replica
):
    context = _context(0, num_pipelines=1, num_replicas=num_replicas)
    # 7 examples: no batch size above divides them, so a kept remainder would
    # show up as a dynamic batch dimension.
    ds = make_train_dataset(
        _source(7),
        _identity,
        global_batch_size=global_batch_size,
        input_context=context,
    )
    assert ds.element_spec["label"].shape == (per_replica,)
    assert ds.element_spec["image"].shape == (per_replica, 2, 2, 1)
    for batch in ds.take(5):  # Crosses several epochs: never a short batch.
        assert batch["label"].shape == (per_replica,)


@pytest.mark.parametrize("seed", [None, 3])
def test_shuffle_happens_before_repeat(seed):
    # Shuffle after repeat with the default 10,000-example buffer would mix
    # the epochs; before repeat every epoch is a permutation of the source.
    ds = make_train_dataset(_source(10), _identity, global_batch_size=5, seed=seed)
    stream = [x for batch in _labels(ds, 6) for x in batch]  # 3 epochs.
    epochs = [stream[i : i + 10] for i in range(0, 30, 10)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    if seed is not None:  # Fixed seed: check that shuffling really happens.
        assert epochs[0] != list(range(10))
        assert epochs[0] != epochs[1]  # Reshuffled each epoch.


def test_seeded_train_dataset_is_reproducible():
    def stream():
        ds = make_train_dataset(_source(30), _identity, global_batch_size=6, seed=7)
        return _labels(ds, 10)

    assert stream() == stream()


def test_cache_gives_the_same_epochs():
    ds = make_train_dataset(
        _source(10), _identity, global_batch_size=5, seed=0, cache=True
    )
    stream = [x for batch in _labels(ds, 4) for x in batch]
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))


def test_eval_dataset_is_ordered_and_keeps_the_remainder():
    ds = make_eval_dataset(_source(10), _identity, batch_size=4)
    assert ds.element_spec["label"].shape.as_list() == [None]
    assert _labels(ds) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _labels(ds) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # One pass, again.


def test_eval_dataset_per_replica_batch():
    ds = make_eval_dataset(
        _source(10), _identity, batch_size=4, input_context=_context(1)
    )
    # Pipeline 1 of 2 holds examples 1, 3, 5, 7, 9; 4 / 2 replicas = 2 each.
    assert _labels(ds) == [[1, 3], [5, 7], [9]]


def test_preprocess_fn_is_applied():
    def pp(example):
        return {
            "image": tf.cast(example["image"], tf.float32) / 2.0,
            "label": example["label"] * 10,
        }

    for ds in (
        make_eval_dataset(_source(6), pp, batch_size=3),
        make_train_dataset(_source(6), pp, global_batch_size=3, seed=0),
    ):
        batch = next(iter(ds))
        assert batch["image"].dtype == tf.float32
        labels = batch["label"].numpy()
        assert all(label % 10 == 0 for label in labels)
        np.testing.assert_allclose(
            batch["image"].numpy()[:, 0, 0, 0], labels / 10 / 2.0
        )


def test_batch_preprocess_fn_sees_whole_per_replica_batches():
    def per_batch(batch):
        # One draw per batch, broadcast to its rows (as jigsaw_perms does).
        draw = tf.random.uniform([], 0, 1000, tf.int64)
        return {**batch, "draw": tf.fill(tf.shape(batch["label"]), draw)}

    ds = make_train_dataset(
        _source(12),
        _identity,
        global_batch_size=4,
        input_context=_context(0, 1, 2),
        seed=0,
        batch_preprocess_fn=per_batch,
    )
    draws = [b["draw"].numpy() for b in ds.take(6)]
    assert all(d.shape == (2,) and d[0] == d[1] for d in draws)
    assert len({int(d[0]) for d in draws}) > 1


def test_callable_source_and_bad_source():
    ds = make_eval_dataset(lambda: _source(3), _identity, batch_size=3)
    assert _labels(ds) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="tf.data.Dataset or a callable"):
        make_eval_dataset([1, 2, 3], _identity, batch_size=3)


@pytest.mark.parametrize("global_batch_size", [5, 7])
def test_global_batch_not_divisible_by_replicas(global_batch_size):
    with pytest.raises(ValueError) as info:
        make_train_dataset(
            _source(10),
            _identity,
            global_batch_size=global_batch_size,
            input_context=_context(0),
        )
    message = str(info.value)
    assert f"global_batch_size={global_batch_size}" in message
    assert "2 replicas" in message
    with pytest.raises(ValueError, match=f"batch_size={global_batch_size} .*2 repl"):
        make_eval_dataset(
            _source(10),
            _identity,
            batch_size=global_batch_size,
            input_context=_context(0),
        )


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_bad_batch_sizes_and_buffers(bad):
    with pytest.raises(ValueError, match="global_batch_size must be a positive int"):
        make_train_dataset(_source(4), _identity, global_batch_size=bad)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        make_train_dataset(
            _source(4), _identity, global_batch_size=2, shuffle_buffer=bad
        )


def test_dataset_options():
    train = make_train_dataset(_source(4), _identity, global_batch_size=2)
    assert train.options().deterministic is False
    assert train.options().threading.max_intra_op_parallelism == 1
    seeded = make_train_dataset(_source(4), _identity, global_batch_size=2, seed=0)
    assert seeded.options().deterministic is True
    assert (
        make_eval_dataset(_source(4), _identity, batch_size=2).options().deterministic
    )


def test_mirrored_strategy_distributes_per_replica_batches():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2, "conftest.py should provide 2 logical CPUs"
    strategy = tf.distribute.MirroredStrategy(devices)
    contexts = []

    def input_fn(input_context):
        contexts.append(input_context)
        return make_train_dataset(
            _source(16),
            _identity,
            global_batch_size=8,
            input_context=input_context,
            seed=0,
        )

    dist = strategy.distribute_datasets_from_function(input_fn)
    assert [c.num_replicas_in_sync for c in contexts] == [2]
    iterator = iter(dist)
    seen = collections.Counter()
    for _ in range(2):  # 2 steps x 8 = one epoch of the 16 examples.
        batch = next(iterator)
        local = strategy.experimental_local_results(batch["label"])
        assert len(local) == 2
        for labels, device in zip(local, devices, strict=True):
            assert labels.shape == (4,)
            assert labels.device.endswith(device.split("/device:")[-1])
            seen.update(labels.numpy().tolist())
    assert seen == collections.Counter(range(16))
