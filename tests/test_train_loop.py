"""The training loop: 2-replica parity, step counting, checkpoints, errors."""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf.models import heads, pretext
from revisit_tf.models.resnet import build_resnet
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import contrastive, losses, optim  # noqa: F401 (script)
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import strategy as strategy_lib

GLOBAL_BATCH = 8  # source images
VIEWS = 4  # rotations per image


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (GLOBAL_BATCH, VIEWS, 16, 16, 1)).astype("float32"),
        "label": np.tile(np.arange(VIEWS, dtype=np.int32), (GLOBAL_BATCH, 1)),
    }


SPEC = {
    "image": tf.TensorSpec([VIEWS, 16, 16, 1]),
    "label": tf.TensorSpec([VIEWS], tf.int32),
}


def _trunk_fn(width=0.25, sync_batchnorm=True):
    def trunk_fn(input_shape):
        return build_resnet(
            width=width,
            units=(1, 1, 1, 1),
            num_classes=VIEWS,
            input_shape=input_shape,
            stem_stride=1,
            sync_batchnorm=sync_batchnorm,
        )

    return trunk_fn


def _model_and_optimizer(strategy, *, sync_batchnorm=True, weights=None, width=0.25):
    """A Rotation-shaped pretext model (4 views) and SGD, under ``strategy``."""
    with strategy.scope():
        model = pretext.build_pretext_model(
            SPEC, trunk_fn=_trunk_fn(width, sync_batchnorm), name="rotation"
        )
        if weights is not None:
            model.set_weights(weights)
        optimizer = optim.sgd(0.1)
    return model, optimizer


def _simclr_model(strategy, weights=None):
    """A SimCLR-shaped pretext model (2 views, projection head), sync BN."""
    with strategy.scope():
        model = pretext.build_pretext_model(
            {"image": tf.TensorSpec([2, 16, 16, 1], keras.config.floatx())},
            trunk_fn=lambda input_shape: build_resnet(
                width=0.25,
                units=(1, 1, 1, 1),
                input_shape=input_shape,
                stem_stride=1,
                sync_batchnorm=True,
            ),
            head_fn=functools.partial(
                heads.projection_head, output_dim=8, sync_batchnorm=True
            ),
            name="simclr",
        )
        if weights is not None:
            model.set_weights(weights)
    return model


def _first_step(strategy, model, batch, loss_fn=losses.softmax_xent):
    """Global loss and summed gradients of one step, as the loop computes them."""
    dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))

    @tf.function
    def run(b):
        def fn(b):
            loss, _, grads, _ = loop_lib.loss_and_gradients(
                model, loss_fn, b, global_batch_size=GLOBAL_BATCH
            )
            return loss, grads

        loss, grads = strategy.run(fn, (b,))
        return strategy.reduce("SUM", loss, None), [
            strategy.reduce("SUM", g, None) for g in grads
        ]

    loss, grads = run(next(iter(dist)))
    return float(loss), [g.numpy() for g in grads]


def _two_cpus():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2, "conftest should create 2 logical CPUs"
    return strategy_lib.make_strategy("mirrored", devices=devices)


_PARITY_SCRIPT = """
import json, sys
import keras, numpy as np, tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
logical = [tf.config.LogicalDeviceConfiguration()] * 2
tf.config.set_logical_device_configuration(cpus[0], logical)
keras.config.set_floatx("float64")
keras.config.set_dtype_policy("float64")
sys.path.insert(0, sys.argv[1])
import test_train_loop as t
batch = {k: v.astype("float64") if v.dtype.kind == "f" else v
         for k, v in t._batch().items()}
single = tf.distribute.get_strategy()
mirrored = t._two_cpus()
out = {"replicas": mirrored.num_replicas_in_sync}
model1, _ = t._model_and_optimizer(single)
weights = model1.get_weights()
loss1, grads1 = t._first_step(single, model1, batch)
out["dtype"] = str(grads1[0].dtype)
out["num_grads"] = [len(grads1), len(model1.trainable_variables)]
for sync in (True, False):
    model2, _ = t._model_and_optimizer(mirrored, sync_batchnorm=sync, weights=weights)
    loss2, grads2 = t._first_step(mirrored, model2, batch)
    out[f"sync={sync}"] = {
        "loss_rel_diff": abs(loss2 - loss1) / abs(loss1),
        "grad_rel_diff": max(
            float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
            for a, b in zip(grads1, grads2, strict=True)
        ),
    }
# SimCLR: NT-Xent's negatives are the whole global batch on every replica.
views = {"image": batch["image"][:, :2]}
simclr1 = t._simclr_model(single)
loss1, grads1 = t._first_step(single, simclr1, views, t.contrastive.nt_xent)
simclr2 = t._simclr_model(mirrored, weights=simclr1.get_weights())
loss2, grads2 = t._first_step(mirrored, simclr2, views, t.contrastive.nt_xent)
out["simclr"] = {
    "loss": loss1,
    "loss_rel_diff": abs(loss2 - loss1) / abs(loss1),
    "grad_rel_diff": max(
        float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
        for a, b in zip(grads1, grads2, strict=True)
    ),
}
print("RESULT" + json.dumps(out))
"""


def test_mirrored_two_replicas_match_one_device():
    """2 logical CPUs with synchronized BN == 1 device, same global batch.

    Runs in float64 so the comparison can be tight (in float32, BN's
    E[x^2] - E[x]^2 and the summation order differ by ~1e-5 relative). It runs
    in a subprocess because collective ops of different strategies in one
    process share instance keys, which must keep one dtype.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _PARITY_SCRIPT, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    out = json.loads(line[len("RESULT") :])
    assert out["replicas"] == 2 and out["dtype"] == "float64"
    assert out["num_grads"][0] == out["num_grads"][1] > 0
    assert out["sync=True"]["loss_rel_diff"] < 1e-12
    assert out["sync=True"]["grad_rel_diff"] < 1e-9
    # Without synchronized BN each replica normalises with its own half-batch
    # statistics, so the same comparison fails: the check above can fail.
    assert out["sync=False"]["loss_rel_diff"] > 1e-5
    assert out["sync=False"]["grad_rel_diff"] > 1e-3
    # A whole SimCLR step (sync BN, projection head, NT-Xent over the global
    # batch): 2 replicas = 1 device. With per-replica negatives the loss of 8
    # images would be that of two batches of 4 (tests/test_contrastive.py
    # shows that variant differs by ~0.5 in loss).
    assert out["simclr"]["loss"] > 0
    assert out["simclr"]["loss_rel_diff"] < 1e-12
    assert out["simclr"]["grad_rel_diff"] < 1e-9


def _dataset_fn(batch):
    def dataset_fn(ctx, start_step=0):
        del start_step  # one repeated batch: every position is the same
        per_replica = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
        return tf.data.Dataset.from_tensor_slices(batch).batch(per_replica).repeat()

    return dataset_fn


def _train(model, opt, strategy, batch, workdir, total_steps, **kwargs):
    kwargs.setdefault("loss_fn", losses.softmax_xent)
    kwargs.setdefault("metric_fn", losses.accuracy_metrics)
    return loop_lib.train(
        model=model,
        optimizer=opt,
        strategy=strategy,
        dataset_fn=_dataset_fn(batch),
        total_steps=total_steps,
        global_batch_size=GLOBAL_BATCH,
        workdir=workdir,
        **kwargs,
    )


def test_train_updates_equal_on_two_replicas(tmp_path):
    batch = _batch(1)
    single = tf.distribute.get_strategy()
    model1, opt1 = _model_and_optimizer(single)
    initial = model1.get_weights()
    mirrored = _two_cpus()
    model2, opt2 = _model_and_optimizer(mirrored, weights=initial)
    for name, model, opt, strategy in (
        ("one", model1, opt1, single),
        ("two", model2, opt2, mirrored),
    ):
        metrics = _train(model, opt, strategy, batch, str(tmp_path / name), 1)
        assert metrics["step"] == 1
    # Compare the updates w - w0 of one real (float32) step, per tensor, in
    # norm. One device uses the fused BN kernel and two replicas Keras'
    # synchronized moments, so channels with near-zero variance (1x1 maps
    # here) can differ by a few percent of the update (measured: up to 5%);
    # replica-local BN statistics give 150-500% (measured with
    # sync_batchnorm=False). The float64 test above is the tight check.
    trained = zip(initial, model1.get_weights(), model2.get_weights(), strict=True)
    for w0, w1, w2 in trained:
        update1, update2 = w1 - w0, w2 - w0
        norm = np.linalg.norm(update1)
        if norm > 0:
            assert np.linalg.norm(update1 - update2) <= 0.2 * norm


def test_train_counts_steps_checkpoints_and_resumes(tmp_path):
    batch = _batch(2)
    workdir = str(tmp_path / "run")
    strategy = tf.distribute.get_strategy()
    calls = []

    def run(total_steps):
        keras.utils.set_random_seed(0)
        model, opt = _model_and_optimizer(strategy)
        metrics = _train(
            model,
            opt,
            strategy,
            batch,
            workdir,
            total_steps,
            steps_per_loop=2,
            checkpoint_every=3,
            on_first_loop=lambda: calls.append(total_steps),
        )
        return model, opt, metrics

    _, opt, metrics = run(5)
    assert int(opt.iterations.numpy()) == 5
    assert metrics["step"] == 5
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    ckpts = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
    steps = sorted(int(p.rsplit("-", 1)[1]) for p in ckpts.all_model_checkpoint_paths)
    assert steps == [3, 5]  # every 3 steps and at the end
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    # A longer run in the same workdir resumes from step 5, not from 0.
    model, opt, metrics = run(7)
    assert int(opt.iterations.numpy()) == 7 and metrics["step"] == 7
    assert calls == [5, 7]
    # Nothing to do once the step is reached: the metrics saved with the
    # newest checkpoint come back (a kill before train_metrics.json loses
    # nothing).
    _, opt, again = run(7)
    assert again == metrics and int(opt.iterations.numpy()) == 7


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    batch = _batch(3)
    workdir = str(tmp_path / "run")
    strategy = tf.distribute.get_strategy()
    model, opt = _model_and_optimizer(strategy)
    _train(model, opt, strategy, batch, workdir, 1)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    (data_file,) = [f for f in os.listdir(ckpt_dir) if ".data-" in f]
    with open(os.path.join(ckpt_dir, data_file), "r+b") as f:
        f.truncate(100)
    model, opt = _model_and_optimizer(strategy)
    ckpt = checkpoint_lib.Checkpointer(workdir, model=model, optimizer=opt)
    with strategy.scope():
        opt.build(model.trainable_variables)
    with pytest.raises(checkpoint_lib.CheckpointError, match="ckpt-1"):
        ckpt.restore_latest()


def test_mismatched_checkpoint_gives_clear_error(tmp_path):
    batch = _batch(4)
    workdir = str(tmp_path / "run")
    strategy = tf.distribute.get_strategy()
    model, opt = _model_and_optimizer(strategy)
    _train(model, opt, strategy, batch, workdir, 1)
    other, opt = _model_and_optimizer(strategy, width=0.5)
    with pytest.raises(checkpoint_lib.CheckpointError, match="different model"):
        _train(other, opt, strategy, batch, workdir, 2)


def test_loss_must_be_one_value_per_source_example():
    """The loop's only contract with a task: ``loss_fn -> [B]``."""
    model, _ = _model_and_optimizer(tf.distribute.get_strategy())
    batch = _batch()

    def per_row(batch, outputs):  # [B * 4]: not reduced per example
        return losses.xent_rows(batch["label"], outputs["logits"])

    def per_pixel(batch, outputs):  # [B, 4]: a map, not a vector
        return tf.reshape(per_row(batch, outputs), [GLOBAL_BATCH, VIEWS])

    with pytest.raises(tf.errors.InvalidArgumentError, match="\\[B\\] values"):
        loop_lib.loss_and_gradients(model, per_row, batch, global_batch_size=8)
    with pytest.raises(ValueError, match=r"shape \[B\]; got shape \(8, 4\)"):
        loop_lib.loss_and_gradients(model, per_pixel, batch, global_batch_size=8)
    with pytest.raises(ValueError, match="metric_fn must return a dict"):
        loop_lib.loss_and_gradients(
            model,
            losses.softmax_xent,
            batch,
            global_batch_size=8,
            metric_fn=lambda b, o: o["logits"],
        )
    # The global batch in source examples is the denominator: 2 replicas'
    # halves with global_batch_size=8 sum to the mean over the 8 examples.
    _, task_loss, _, sums = loop_lib.loss_and_gradients(
        model,
        losses.softmax_xent,
        batch,
        global_batch_size=16,
        metric_fn=losses.accuracy_metrics,
    )
    _, full_task_loss, _, _ = loop_lib.loss_and_gradients(
        model, losses.softmax_xent, batch, global_batch_size=8
    )
    np.testing.assert_allclose(2 * float(task_loss), float(full_task_loss), rtol=1e-6)
    assert 0 <= float(sums["accuracy"]) <= GLOBAL_BATCH


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="Unknown strategy 'mirored'"):
        strategy_lib.make_strategy("mirored")
