"""Issue 12, in process: exact resume, restore that never guesses, one writer
per workdir, configs recorded only after validation, clear early errors.

The kill tier (real processes killed at every fault point) is
tests/test_faults.py; these tests pin each behaviour on its own, fast.
"""

import json
import logging
import os
import stat

import keras
import numpy as np
import pytest
import tensorflow as tf

from revisit_tf import cli, faults, files
from revisit_tf import pp as pp_lib
from revisit_tf.data import pipeline
from revisit_tf.models import pretext
from revisit_tf.models.resnet import build_resnet
from revisit_tf.train import checkpoint as checkpoint_lib
from revisit_tf.train import loop as loop_lib
from revisit_tf.train import losses, optim
from revisit_tf.train import strategy as strategy_lib

DEMO = "demo/fashion_mnist_rotation.gin"
PP = "random_crop(12)|flip_lr|rotate4|keep('image', 'label')"
N = 36  # examples: 400 = 11 * 36 + 4, so step 50 at batch 8 is mid-epoch
BATCH = 8


def _source():
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": rng.uniform(0, 1, (N, 16, 16, 1)).astype("float32"),
            "label": np.arange(N, dtype=np.int64),
        }
    )


def _dataset_fn(seed=3):
    pp_fn = pp_lib.get_preprocess_fn(PP)

    def dataset_fn(ctx, start_step=0):
        return pipeline.make_train_dataset(
            _source(),
            pp_fn,
            global_batch_size=BATCH,
            input_context=ctx,
            shuffle_buffer=16,
            seed=seed,
            start_step=start_step,
        )

    return dataset_fn


def _stream(strategy, start_step, steps):
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: _dataset_fn()(ctx, start_step)
    )
    out = []
    for batch, _ in zip(dist, range(steps), strict=False):
        images = strategy.experimental_local_results(batch["image"])
        out.append(np.concatenate([np.asarray(x) for x in images]))
    return np.stack(out)


def _two_cpus():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return strategy_lib.make_strategy("mirrored", devices=devices)


@pytest.mark.parametrize("strategy_name", ["one_device", "mirrored"])
def test_resumed_stream_is_the_uninterrupted_one_bit_exact(strategy_name):
    strategy = (
        _two_cpus() if strategy_name == "mirrored" else tf.distribute.get_strategy()
    )
    full = _stream(strategy, 0, 100)
    resumed = _stream(strategy, 50, 50)
    assert full.shape == (100, BATCH, 4, 12, 12, 1)
    np.testing.assert_array_equal(resumed, full[50:])
    # Not trivially equal: augmentation and order vary along the stream, and
    # the same position under another seed is another stream.
    assert not np.array_equal(full[50], full[51])
    other = tf.distribute.get_strategy().distribute_datasets_from_function(
        lambda ctx: _dataset_fn(seed=4)(ctx, 50)
    )
    first = np.asarray(next(iter(other))["image"])
    if strategy_name == "one_device":
        assert not np.array_equal(first, full[50])


def test_stream_skips_whole_epochs_and_keeps_epoch_structure():
    """Every example once per epoch (shuffle before repeat), from any start."""
    pp_fn = pp_lib.get_preprocess_fn("keep('label')")

    def labels(start_step, steps):
        ds = pipeline.make_train_dataset(
            _source(),
            pp_fn,
            global_batch_size=4,
            shuffle_buffer=100,
            seed=1,
            start_step=start_step,
        )
        return np.concatenate([b["label"].numpy() for b in ds.take(steps)])

    full = labels(0, 27)  # 108 = 3 epochs of 36
    for e in range(3):
        assert sorted(full[36 * e : 36 * (e + 1)]) == list(range(N))
    np.testing.assert_array_equal(labels(9, 18), full[36:])  # from epoch 1
    np.testing.assert_array_equal(labels(10, 17), full[40:])  # mid-epoch
    with pytest.raises(ValueError, match="needs a seed"):
        pipeline.make_train_dataset(_source(), pp_fn, global_batch_size=4, start_step=3)


class _Kill(BaseException):
    pass


def _model(strategy):
    spec = pretext.example_spec(
        _dataset_fn()(tf.distribute.InputContext()).element_spec
    )
    with strategy.scope():
        model = pretext.build_pretext_model(
            spec,
            trunk_fn=lambda input_shape: build_resnet(
                width=0.125,
                units=(1, 1, 1, 1),
                num_classes=4,
                input_shape=input_shape,
                stem_stride=1,
            ),
            name="rotation",
        )
        optimizer = optim.sgd(0.05)
    return model, optimizer


def _loop(model, optimizer, workdir, total_steps, loss_fn=losses.softmax_xent):
    """``loop.train`` on one device with the test stream, 5 steps per loop."""
    return loop_lib.train(
        model=model,
        optimizer=optimizer,
        strategy=tf.distribute.get_strategy(),
        dataset_fn=_dataset_fn(),
        total_steps=total_steps,
        global_batch_size=BATCH,
        workdir=workdir,
        loss_fn=loss_fn,
        steps_per_loop=5,
        checkpoint_every=10,
    )


def _train(workdir, total_steps):
    keras.utils.set_random_seed(0)
    model, optimizer = _model(tf.distribute.get_strategy())
    return model, _loop(model, optimizer, workdir, total_steps)


def test_100_steps_equal_50_kill_50(tmp_path):
    """Training itself: a kill after the step-50 checkpoint changes nothing."""
    straight, _ = _train(str(tmp_path / "straight"), 100)

    def kill_after_step_50(name):
        if name == "checkpoint.after_cleanup" and os.path.exists(
            tmp_path / "resumed" / "checkpoints" / "ckpt-50.index"
        ):
            raise _Kill()

    faults.install(kill_after_step_50)
    try:
        with pytest.raises(_Kill):
            _train(str(tmp_path / "resumed"), 100)
    finally:
        faults.install(None)
    resumed, metrics = _train(str(tmp_path / "resumed"), 100)
    assert metrics["step"] == 100
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# --- restore never guesses (item 1) -------------------------------------


def _checkpointed(workdir, steps=(10, 20, 30)):
    model, optimizer = _model(tf.distribute.get_strategy())
    optimizer.build(model.trainable_variables)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, model=model, optimizer=optimizer, max_to_keep=5
    )
    for step in steps:
        optimizer.iterations.assign(step)
        ckpt.save(step, {"step": step, "loss": 1.0 / step})
    return os.path.join(workdir, "checkpoints")


def _fresh(workdir):
    model, optimizer = _model(tf.distribute.get_strategy())
    optimizer.build(model.trainable_variables)
    return checkpoint_lib.Checkpointer(workdir, model=model, optimizer=optimizer)


def _snapshot(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def test_missing_newest_index_falls_back_and_says_which(tmp_path, caplog):
    directory = _checkpointed(str(tmp_path))
    os.remove(os.path.join(directory, "ckpt-30.index"))
    ckpt = _fresh(str(tmp_path))
    with caplog.at_level(logging.INFO):
        assert ckpt.restore_latest() == 20
    assert ckpt.restored_metrics == {"step": 20, "loss": 0.05}
    assert "Restored" in caplog.text and "ckpt-20" in caplog.text
    # Older checkpoints are all still there.
    assert checkpoint_lib.checkpoint_steps(directory) == [20, 10]


def test_corrupt_newest_is_moved_aside_not_deleted(tmp_path, caplog):
    directory = _checkpointed(str(tmp_path))
    (data,) = [n for n in os.listdir(directory) if n.startswith("ckpt-30.data")]
    with open(os.path.join(directory, data), "r+b") as f:
        f.truncate(50)
    ckpt = _fresh(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore_latest() == 20
    assert "ckpt-30 is unreadable" in caplog.text
    moved = [
        os.path.relpath(os.path.join(r, n), directory)
        for r, _, ns in os.walk(os.path.join(directory, "unreadable"))
        for n in ns
    ]
    assert sorted(os.path.basename(m) for m in moved) == sorted(
        [data, "ckpt-30.index", "ckpt-30.metrics.json"]
    )


def test_garbage_state_file_does_not_hide_the_checkpoints(tmp_path):
    directory = _checkpointed(str(tmp_path))
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write("\x00garbage{{{")
    assert _fresh(str(tmp_path)).restore_latest() == 30


def test_state_file_is_never_followed_outside_the_directory(tmp_path, caplog):
    elsewhere = _checkpointed(str(tmp_path / "other"), steps=(90,))
    directory = _checkpointed(str(tmp_path / "run"), steps=(10,))
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{os.path.join(elsewhere, "ckpt-90")}"\n')
    with caplog.at_level(logging.WARNING):
        assert _fresh(str(tmp_path / "run")).restore_latest() == 10
    assert "Ignoring" in caplog.text


def test_no_readable_checkpoint_stops_and_touches_nothing(tmp_path):
    directory = _checkpointed(str(tmp_path), steps=(10, 20))
    for name in os.listdir(directory):
        if ".data-" in name:
            with open(os.path.join(directory, name), "r+b") as f:
                f.truncate(10)
    before = _snapshot(directory)
    with pytest.raises(checkpoint_lib.CheckpointError, match="none can be restored"):
        _fresh(str(tmp_path)).restore_latest()
    assert _snapshot(directory) == before
    # Data without an index is a save killed half-way (TF writes the index
    # last): moved aside, never deleted; with no complete checkpoint left the
    # run may start from scratch.
    for name in os.listdir(directory):
        if name.endswith(".index"):
            os.remove(os.path.join(directory, name))
    data = sorted(n for n in os.listdir(directory) if ".data-" in n)
    assert _fresh(str(tmp_path)).restore_latest() == 0
    walk = os.walk(os.path.join(directory, "unreadable"))
    assert sorted(n for _, _, names in walk for n in names) == data


def test_no_step_0_checkpoint_over_others_and_leftovers_removed(tmp_path):
    directory = _checkpointed(str(tmp_path), steps=(10,))
    os.makedirs(os.path.join(directory, "ckpt-20_temp"))
    with open(os.path.join(directory, "checkpoint.tmp-abc"), "w") as f:
        f.write("half")
    ckpt = _fresh(str(tmp_path))
    with pytest.raises(checkpoint_lib.CheckpointError, match="step-0"):
        ckpt.save(0)
    assert ckpt.restore_latest() == 10
    assert sorted(os.listdir(directory)) == sorted(
        n for n in os.listdir(directory) if "_temp" not in n and ".tmp-" not in n
    )
    assert not os.path.exists(os.path.join(directory, "ckpt-20_temp"))


def test_update_metrics_rewrites_a_saved_step_only(tmp_path):
    directory = _checkpointed(str(tmp_path), steps=(10, 20))
    ckpt = _fresh(str(tmp_path))
    assert ckpt.update_metrics(20, {"step": 20, "rec_seconds": 1.5})
    assert checkpoint_lib.read_metrics(directory, 20) == {
        "step": 20,
        "rec_seconds": 1.5,
    }
    assert checkpoint_lib.read_metrics(directory, 10) == {"step": 10, "loss": 0.1}
    before = _snapshot(directory)
    assert not ckpt.update_metrics(30, {"step": 30})  # no such checkpoint
    model, optimizer = _model(tf.distribute.get_strategy())
    worker = checkpoint_lib.Checkpointer(
        str(tmp_path), model=model, optimizer=optimizer, is_chief=False
    )
    assert not worker.update_metrics(20, {"step": 0})
    assert _snapshot(directory) == before
    assert ckpt.restore_latest() == 20
    assert ckpt.restored_metrics["rec_seconds"] == 1.5


# --- the loop's clear errors (item 12) ----------------------------------


def test_nan_learning_rate_and_late_graph_errors_are_named(tmp_path):
    strategy = tf.distribute.get_strategy()
    model, _ = _model(strategy)
    with strategy.scope():
        optimizer = optim.sgd(float("nan"))
    with pytest.raises(FloatingPointError, match="learning rate is nan at step 0"):
        _loop(model, optimizer, str(tmp_path / "nan"), 2)

    def per_row(batch, outputs):  # [B * 4] instead of [B]: fails in the graph
        return losses.xent_rows(batch["label"], outputs["logits"])

    model, optimizer = _model(strategy)
    with pytest.raises(ValueError, match=r"first training step failed.*\[B\] values"):
        _loop(model, optimizer, str(tmp_path / "rows"), 2, loss_fn=per_row)


# --- the binaries: config, lock, metrics (items 3, 4, 10, 11, 12, 13) ---


def _smoke(workdir, *bindings):
    """revisit-train's argv for the smoke Rotation run, plus bindings."""
    argv = ["--workdir", workdir, "--gin_file", DEMO, "--gin_file", "smoke.gin"]
    for binding in bindings:
        argv += ["--gin_bindings", binding]
    return argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("nothing_lost") / "rotation")
    cli.train_main(_smoke(workdir))
    return workdir


def _files(workdir):
    return {
        n: os.path.getmtime(os.path.join(workdir, n))
        for n in os.listdir(workdir)
        if os.path.isfile(os.path.join(workdir, n))
        and not n.endswith(".log")
        and n != files.LOCK_NAME
    }


def test_changed_config_on_trained_workdir_is_refused(trained):
    with open(os.path.join(trained, "config.gin")) as f:
        config = f.read()
    before = _files(trained)
    args = _smoke(trained)
    with pytest.raises(cli.ConfigChangedError, match="build_trunk.width"):
        cli.train_main([*args, "--gin_bindings", "build_trunk.width = 0.5"])
    with pytest.raises(cli.ConfigChangedError):
        cli.export_main([*args, "--gin_bindings", "build_trunk.width = 0.5"])
    with open(os.path.join(trained, "config.gin")) as f:
        assert f.read() == config
    assert _files(trained) == before  # nothing written, nothing replaced


def test_force_keeps_the_old_config_named(tmp_path):
    workdir = str(tmp_path / "w")
    args = _smoke(workdir)
    cli.train_main(args)
    with open(os.path.join(workdir, "config.gin")) as f:
        old = f.read()
    cli.train_main([*args, "--gin_bindings", "pretrain.steps = 6", "--force"])
    (backup,) = [n for n in os.listdir(workdir) if n.startswith("config.gin.")]
    with open(os.path.join(workdir, backup)) as f:
        assert f.read() == old
    with open(os.path.join(workdir, "config.gin")) as f:
        assert "pretrain.steps = 6" in f.read()
    assert checkpoint_lib.checkpoint_steps(os.path.join(workdir, "checkpoints"))[0] == 6


def test_failing_run_records_no_config(tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(ValueError, match="larger than the 256 examples"):
        cli.train_main(_smoke(workdir, "pretrain.global_batch_size = 512"))
    assert not os.path.exists(os.path.join(workdir, "config.gin"))
    for binding, message in (
        ("pretrain.steps = 0", "at least one step"),
        ("reference_schedule.lr = 1e400", "learning rate is inf at step 0"),
    ):
        with pytest.raises(ValueError, match=message):
            cli.train_main(_smoke(workdir, binding))
    assert not os.path.exists(os.path.join(workdir, "config.gin"))


def test_rerun_with_nothing_to_train_rewrites_train_metrics(trained):
    path = os.path.join(trained, "train_metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    os.remove(path)  # as a kill after the last checkpoint leaves it
    cli.train_main(_smoke(trained))
    with open(path) as f:
        assert json.load(f) == metrics
    assert metrics["step"] == 4


def test_second_writer_is_refused_naming_the_holder(trained):
    with files.workdir_lock(trained, "test holder") as holder:
        for main in (cli.train_main, cli.export_main, cli.probe_main):
            with pytest.raises(files.WorkdirLockedError, match="test holder"):
                main(["--workdir", trained])
        assert holder["pid"] == os.getpid()
        assert cli.run(cli.export_main, ["--workdir", trained]) == cli.EXIT_RERUN
    mode = stat.S_IMODE(os.stat(os.path.join(trained, files.LOCK_NAME)).st_mode)
    assert mode & 0o111 == 0, oct(mode)  # not executable


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    with open(tmp_path / files.LOCK_NAME, "w") as f:
        json.dump(
            {
                "pid": 2**22 + 12345,
                "host": os.uname().nodename,
                "purpose": "revisit-train",
            },
            f,
        )
    with caplog.at_level(logging.WARNING), files.workdir_lock(str(tmp_path), "me"):
        pass
    assert "stale lock" in caplog.text and "that process is gone" in caplog.text


def test_write_atomic_temp_names_are_unpredictable(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(a), real(a, b)))
    files.write_atomic(tmp_path / "x.json", "{}")
    files.write_atomic(tmp_path / "x.json", "{}")
    assert len(set(seen)) == 2 and all(str(os.getpid()) not in s for s in seen)
    mode = stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_gin_imports_and_includes_from_elsewhere_are_said(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    os.makedirs("pretext")
    with open("pretext/rotation.gin", "w") as f:  # shadows the shipped one
        f.write("pretrain.steps = 3\n")
    with open("run.gin", "w") as f:
        f.write("import logging\ninclude 'pretext/rotation.gin'\n")
    with caplog.at_level(logging.WARNING):
        cli.parse_gin(["run.gin"], [])
    assert "imports module 'logging'" in caplog.text
    assert "not a shipped or given gin file" in caplog.text
