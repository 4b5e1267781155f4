"""The binaries end to end on Fashion-MNIST with smoke.gin, and kill-and-resume."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import gin
from revisit_tf import cli, configurables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "demo/fashion_mnist_rotation.gin"


def _gin_files():
    return sorted(glob.glob(os.path.join(REPO, "gin", "**", "*.gin"), recursive=True))


def test_gin_files_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [os.path.realpath(p) for p in configurables.gin_search_paths()] == [
        os.path.realpath(os.path.join(REPO, "gin"))
    ]
    cli.parse_gin([DEMO, "smoke.gin"], [])
    assert gin.query_parameter("pretrain.steps") == 4
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        cli.parse_gin(["no_such.gin"], [])


@pytest.mark.parametrize("path", _gin_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_gin_file_parses_strictly(path):
    with open(path) as f:
        header = f.readline()
    assert header.startswith("#"), f"{path} needs a header comment"
    cli.parse_gin([path], [])  # skip_unknown=False inside
    cli.parse_gin([path, "smoke.gin"], [])


def test_misspelt_binding_fails_at_parse_time():
    with pytest.raises(ValueError, match="pretrain"):
        cli.parse_gin([DEMO], ["pretrain.global_batchsize = 3"])


def test_smoke_run_train_export_probe_report(tmp_path, capsys):
    workdir = str(tmp_path / "rotation")
    cli.train_main(
        ["--workdir", workdir, "--gin_file", DEMO, "--gin_file", "smoke.gin"]
    )
    ckpt = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert ckpt.endswith("ckpt-4")
    for name in ("config.gin", "operative_config.gin", "train.log"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, "operative_config.gin")) as f:
        assert "build_trunk.width = 0.25" in f.read()
    with open(os.path.join(workdir, "train.log")) as f:
        log = f.read()
    assert "step 4/4" in log and "examples/s" in log and "ETA" in log
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    (events,) = glob.glob(os.path.join(workdir, "tensorboard", "config", "events.*"))
    tags = {
        v.tag
        for e in tf.compat.v1.train.summary_iterator(events)
        for v in e.summary.value
    }
    assert tags == {"config/operative_config"}
    # Date, level and logger on every line; TF's per-checkpoint INFO chatter
    # ("Sharding callback duration") is below the default WARNING of TF.
    assert "Sharding callback duration" not in log
    stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [DIWEC] \S+\] ")
    assert all(stamped.match(line) for line in log.splitlines() if line[:1].isdigit())
    assert stamped.match(log)

    # Export and probe re-read workdir/config.gin.
    cli.export_main(["--workdir", workdir])
    assert tf.saved_model.contains_saved_model(os.path.join(workdir, "export"))
    cli.export_main(["--workdir", workdir, "--format", "keras"])
    trunk = keras.saving.load_model(os.path.join(workdir, "trunk.keras"))
    assert trunk.output["pre_logits"].shape[-1] == 128
    cli.probe_main(["--workdir", workdir])
    with open(os.path.join(workdir, "probe", "results.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    assert row["endpoint"] == "pre_logits" and row["model"] == "rotation"
    assert (row["n_train"], row["n_val"], row["n_test"]) == (200, 100, 100)
    assert 0.0 <= row["test_top1"] <= 1.0 and row["dim"] == 128

    pixels = str(tmp_path / "pixels")
    cli.probe_main(
        [
            "--workdir",
            pixels,
            "--gin_file",
            DEMO,
            "--gin_file",
            "smoke.gin",
            "--gin_bindings",
            "linear_probe.features = 'pixels'",
        ]
    )
    capsys.readouterr()
    cli.report_main([workdir, pixels, "--output", str(tmp_path / "report.md")])
    table = capsys.readouterr().out
    assert "| rotation | pre_logits |" in table
    assert "| pixels | pixels |" in table
    with open(tmp_path / "report.md") as f:
        assert f.read().strip() == table.strip()


def test_log_level_flag_and_the_final_error_in_the_log(tmp_path):
    workdir = str(tmp_path / "w")

    def failing_main(argv):
        args = cli._parser("test").parse_args(argv)
        cli._setup_logging(args.workdir, "x", args.log_level)
        logging.getLogger("revisit_tf.test").info("an info line")
        logging.getLogger("revisit_tf.test").warning("a warning line")
        logging.getLogger("tensorflow").info("tensorflow chatter")
        logging.getLogger("tensorflow").warning("tensorflow warning")
        raise RuntimeError("an unexpected bug")

    with pytest.raises(RuntimeError, match="an unexpected bug"):
        cli.run(failing_main, ["--workdir", workdir, "--log_level", "warning"])
    with open(os.path.join(workdir, "x.log")) as f:
        log = f.read()
    assert "an info line" not in log and "a warning line" in log
    assert "tensorflow chatter" not in log and "tensorflow warning" in log
    assert "C revisit_tf.cli] Unexpected error" in log
    assert "Traceback" in log and "RuntimeError: an unexpected bug" in log

    with pytest.raises(RuntimeError):
        cli.run(failing_main, ["--workdir", workdir, "--log_level", "DEBUG"])
    with open(os.path.join(workdir, "x.log")) as f:
        log = f.read()
    assert "an info line" in log and "tensorflow chatter" in log  # DEBUG: all

    with pytest.raises(SystemExit) as e:
        cli.run(failing_main, ["--workdir", workdir, "--log_level", "LOUD"])
    assert e.value.code == cli.EXIT_USAGE


def _start_train(workdir, *bindings, cwd=REPO):
    args = [sys.executable, "-m", "revisit_tf.cli", "train", "--workdir", workdir]
    args += ["--gin_file", DEMO, "--gin_file", "smoke.gin"]
    for b in bindings:
        args += ["--gin_bindings", b]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )


def _wait_for_checkpoint(workdir, proc, min_step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
        if path and int(path.rsplit("-", 1)[1]) >= min_step:
            return int(path.rsplit("-", 1)[1])
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint >= {min_step} after {timeout}s")


def test_kill_and_resume(tmp_path):
    """SIGTERM saves and exits; SIGKILL loses at most one interval; both resume.

    Also the workdir's one-writer lock through the binary: a second trainer,
    started while the first is stopped (SIGSTOP) holding the lock, exits 75
    naming the first, and the run after the SIGKILL takes the stale
    lock over. Every run starts in a directory holding ``data/`` and
    ``pretext/`` folders (issue 13 item 11: gin's include lookup crashed on
    them)."""
    workdir = str(tmp_path / "run")
    cwd = tmp_path / "cwd"
    for name in ("data", "pretext"):
        os.makedirs(cwd / name)
    total = 200
    bindings = (
        f"pretrain.steps = {total}",
        "pretrain.steps_per_loop = 2",
        "pretrain.checkpoint_every = 4",
    )
    # 1. Preemption: SIGTERM -> checkpoint at the end of the current loop,
    # exit 75 (not finished: rerun), train_metrics.json marked incomplete, and
    # one checkpoint for the stop (the interval's, or the stop's own).
    proc = _start_train(workdir, *bindings, cwd=cwd)
    _wait_for_checkpoint(workdir, proc, 4)
    # Held (SIGSTOP) while a second trainer tries the workdir: the lock is
    # the first's whatever the speed of either.
    proc.send_signal(signal.SIGSTOP)
    try:
        second = _start_train(workdir, *bindings, cwd=cwd)
        out, _ = second.communicate(timeout=300)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.returncode == cli.EXIT_RERUN, out[-3000:]
    assert f"pid {proc.pid}" in out and "in use by revisit-train" in out
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_RERUN == 75, out[-3000:]
    assert "Preempted at step" in out
    preempted = int(out.split("Preempted at step ")[1].split(";")[0])
    assert preempted < total
    with open(os.path.join(workdir, "train_metrics.json")) as f:
        partial = json.load(f)
    assert partial["complete"] is False
    assert (partial["step"], partial["total_steps"]) == (preempted, total)
    assert partial["stopped"] == "preempted (SIGTERM)"
    assert np.isfinite(partial["loss"])
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert latest.endswith(f"ckpt-{preempted}")
    saves = [line for line in out.splitlines() if "Saved checkpoint" in line]
    assert sum(f"ckpt-{preempted}" in line for line in saves) == 1, saves
    with open(os.path.join(workdir, "train.log")) as f:
        log = f.read()
    assert "Not finished (exit code 75): Preempted at step" in log

    # 2. A hard kill: the run resumes from the preempted step.
    proc = _start_train(workdir, *bindings, cwd=cwd)
    killed_after = _wait_for_checkpoint(workdir, proc, preempted + 8)
    proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert "Restored" in out and f"(step {preempted})" in out
    assert killed_after < total, "the run finished before it could be killed"

    # 3. The last run takes the killed run's lock over, resumes from the
    # newest checkpoint and ends at `total`.
    proc = _start_train(workdir, *bindings, cwd=cwd)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "taking over the stale lock" in out and "that process is gone" in out
    resumed = int(out.split("Restored ")[1].split("(step ")[1].split(")")[0])
    assert resumed >= killed_after
    assert f"step {total}/{total}" in out
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert latest.endswith(f"ckpt-{total}")
    with open(os.path.join(workdir, "train_metrics.json")) as f:
        final = json.load(f)
    assert (final["complete"], final["step"], final["total_steps"]) == (
        True,
        total,
        total,
    )


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multi_worker_two_local_processes(tmp_path):
    """MultiWorkerMirroredStrategy with 2 worker processes on this machine."""
    workdir = str(tmp_path / "mw")
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        args = [sys.executable, "-m", "revisit_tf.cli", "train", "--workdir", workdir]
        args += ["--gin_file", DEMO, "--gin_file", "smoke.gin"]
        args += ["--gin_bindings", "pretrain.strategy = 'multi_worker'"]
        procs.append(
            subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=REPO,
                env=env,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "2 replica(s) in sync" in outs[0] and "2 replica(s) in sync" in outs[1]
    # The chief alone writes checkpoints, the config and TensorBoard events;
    # the other worker's temporary checkpoint directory is gone.
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert latest.endswith("ckpt-4")
    assert os.path.exists(os.path.join(workdir, "config.gin"))
    assert os.path.exists(os.path.join(workdir, "train-worker1.log"))
    assert not os.listdir(os.path.join(workdir, ".worker_tmp"))
    # Both workers saw the same global losses (all-reduced).
    losses = [
        [
            line.split("loss ")[1].split()[0]
            for line in out.splitlines()
            if " loss " in line
        ]
        for out in outs
    ]
    assert losses[0] and losses[0] == losses[1]


def test_random_init_export_is_the_trained_trunks_initialisation(tmp_path, monkeypatch):
    """Demo baseline (b) uses the same seed, hence the very weights (a) started from."""
    from revisit_tf import experiments

    captured = {}

    def fake_train(*, model, **kwargs):
        captured["weights"] = [v.numpy() for v in model.trainable_variables]
        return {}

    monkeypatch.setattr(experiments.loop_lib, "train", fake_train)
    cli.parse_gin([DEMO, "smoke.gin"], [])
    configurables.pretrain(workdir=str(tmp_path / "a"))
    cli.parse_gin([DEMO, "smoke.gin"], ["export_model.random_init = True"])
    loaded = tf.saved_model.load(
        configurables.export_model(workdir=str(tmp_path / "b"))
    )
    exported = [v.numpy() for v in loaded.trainable_variables]
    assert len(exported) == len(captured["weights"]) > 0
    for a, b in zip(captured["weights"], exported, strict=True):
        assert (a == b).all()
    # A different seed gives a different initialisation (the check can fail).
    cli.parse_gin(
        [DEMO, "smoke.gin"],
        ["export_model.random_init = True", "export_model.seed = 1"],
    )
    loaded = tf.saved_model.load(
        configurables.export_model(workdir=str(tmp_path / "c"))
    )
    assert not (loaded.trainable_variables[0].numpy() == captured["weights"][0]).all()


def test_demo_switches_to_resnet_v2_minus_with_bindings(tmp_path):
    workdir = str(tmp_path / "v2")
    cli.train_main(
        ["--workdir", workdir, "--gin_file", DEMO, "--gin_file", "smoke.gin"]
        + ["--gin_bindings", "build_trunk.architecture = 'resnet50_v2'"]
        + ["--gin_bindings", "build_trunk.last_relu = False"]
    )
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith(
        "ckpt-4"
    )
    with open(os.path.join(workdir, "train.log")) as f:
        assert "trunk resnet14_v2 on 28x28x1 inputs" in f.read()


@pytest.mark.parametrize(
    "arch, model_name, endpoint",
    [("revnet50", "revnet14", "after_root"), ("vgg19", "vgg19", "fc6")],
)
def test_demo_switches_trunk_with_one_binding(tmp_path, arch, model_name, endpoint):
    """One binding trains and exports the demo with another trunk (issue 3)."""
    workdir = str(tmp_path / arch)
    cli.train_main(
        ["--workdir", workdir, "--gin_file", DEMO, "--gin_file", "smoke.gin"]
        + ["--gin_bindings", f"build_trunk.architecture = '{arch}'"]
    )
    with open(os.path.join(workdir, "train.log")) as f:
        assert f"trunk {model_name} on" in f.read()
    cli.export_main(["--workdir", workdir])
    loaded = tf.saved_model.load(os.path.join(workdir, "export"))
    out = loaded.signatures["representation"](images=tf.zeros([2, 28, 28, 1]))
    assert endpoint in out and "pre_logits" in out
    assert np.all(np.isfinite(out["pre_logits"].numpy()))
