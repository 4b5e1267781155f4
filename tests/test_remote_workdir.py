"""Issue 13.5: workdirs that are URLs (``gs://``, tested here with ``ram://``).

Every workdir file goes through ``tf.io.gfile`` (``revisit_tf.files``), so a
``ram://`` workdir trains, resumes, exports, probes and reports end to end,
and nothing lands in a local folder literally named ``ram:``. ``ram://`` is
TensorFlow's in-process file system, so everything runs in this process; each
test uses its own root and runs from an empty working directory, which must
stay empty.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import uuid

import numpy as np
import pytest
import tensorflow as tf

import gin
from revisit_tf import cli, files
from revisit_tf.probe import cache as cache_lib
from revisit_tf.report import results as results_lib
from revisit_tf.train import checkpoint as checkpoint_lib

GIN = ["--gin_file", "demo/fashion_mnist_rotation.gin", "--gin_file", "smoke.gin"]


@pytest.fixture
def ram(tmp_path, monkeypatch):
    """A fresh ``ram://`` root; the test runs in ``tmp_path``, which stays empty
    (no ``ram:`` folder), with the feature cache of URL workdirs under it."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = f"ram://test-{uuid.uuid4().hex[:8]}"
    files.makedirs(root)
    yield root
    assert os.listdir(work) == [], "a local file was written for a ram:// path"
    files.rmtree(root)
    assert not files.exists(root)


def _read(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def _metrics(workdir):
    metrics = json.loads(_read(os.path.join(workdir, "train_metrics.json")))
    metrics.pop("examples_per_sec")
    return metrics


def test_paths_stay_urls():
    assert files.is_remote("ram://a") and files.is_remote("gs://b/c")
    assert not files.is_remote("/tmp/x") and not files.is_remote("rel/x")
    assert files.absolute("ram://a/b") == "ram://a/b"
    assert files.absolute("rel") == os.path.abspath("rel")
    assert files.dirname("ram://a") == "ram://"  # os.path.dirname: "ram:"
    assert files.dirname("gs://bucket/a/b") == "gs://bucket/a"


def test_write_atomic_on_ram_replaces_whole_and_leaves_no_temporary(ram):
    path = f"{ram}/record.json"
    files.write_atomic(path, '{"a": 1}')
    files.write_atomic(path, b'{"a": 2}')
    assert _read(path) == b'{"a": 2}'
    assert files.listdir(ram) == ["record.json"]


def test_ram_prefix_matching_is_corrected(ram):
    # TF's ram:// matches names by prefix: with only export.tmp-1 present,
    # tf.io.gfile says "export" exists and lists ".tmp-1" in it.
    files.makedirs(f"{ram}/export.tmp-1/variables")
    files.write_atomic(f"{ram}/export.tmp-1/saved_model.pb", "m")
    assert not files.exists(f"{ram}/export")
    assert not files.isdir(f"{ram}/export")
    assert files.isdir(f"{ram}/export.tmp-1")
    assert files.isfile(f"{ram}/export.tmp-1/saved_model.pb")
    assert not files.isfile(f"{ram}/export.tmp-1/saved_model")
    assert files.listdir(f"{ram}/export.tmp-1") == ["saved_model.pb", "variables"]
    files.makedirs(f"{ram}/export")
    assert files.listdir(f"{ram}/export") == []
    with pytest.raises(FileNotFoundError):
        files.listdir(f"{ram}/nothing")


def test_rename_tree_moves_every_file(ram):
    # ram:// renames only a directory's own entry: its files stay behind.
    for name in ("a.pb", "variables/v.data", "assets/x"):
        files.makedirs(files.dirname(f"{ram}/src/{name}"))
        files.write_atomic(f"{ram}/src/{name}", name)
    files.makedirs(f"{ram}/src/empty")
    files.rename_tree(f"{ram}/src", f"{ram}/dst")
    assert not files.exists(f"{ram}/src")
    assert files.listdir(f"{ram}/dst") == ["a.pb", "assets", "empty", "variables"]
    assert _read(f"{ram}/dst/variables/v.data") == b"variables/v.data"
    with pytest.raises(FileExistsError):
        files.makedirs(f"{ram}/other")
        files.rename_tree(f"{ram}/other", f"{ram}/dst")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_on_ram_warns_once_refuses_a_live_holder_takes_over_others(ram, caplog):
    workdir = f"{ram}/w"
    lock = f"{workdir}/.lock"
    with caplog.at_level(logging.WARNING, logger="revisit_tf.files"):
        with files.workdir_lock(workdir, "revisit-train") as record:
            assert json.loads(_read(lock)) == record
            assert record["pid"] == os.getpid()
            nested = files.workdir_lock(workdir, "revisit-probe")
            with pytest.raises(files.WorkdirLockedError, match="revisit-train"):
                nested.__enter__()
        assert _read(lock) == b""  # released
        with files.workdir_lock(workdir, "revisit-export"):
            pass
    warned = [r for r in caplog.records if "cannot be enforced" in r.message]
    assert len(warned) == 1 and "ram://" in warned[0].message

    # A killed holder (dead pid, this host) and another host's record are
    # taken over, each with a warning naming it; nothing crashes.
    for holder, reason in [
        ({"pid": _dead_pid(), "host": socket.gethostname()}, "is gone"),
        ({"pid": 1, "host": "some-other-host"}, "another host"),
    ]:
        files.write_atomic(lock, json.dumps({**holder, "purpose": "old-run"}))
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="revisit_tf.files"),
            files.workdir_lock(workdir, "revisit-train"),
        ):
            assert json.loads(_read(lock))["pid"] == os.getpid()
        (message,) = [r.message for r in caplog.records if "taking over" in r.message]
        assert "old-run" in message and reason in message


def test_results_append_repairs_and_reads_on_ram(ram, caplog):
    path = results_lib.results_path(f"{ram}/w")
    results_lib.append_result(path, {"model": "a", "test_top1": np.float32(0.5)})
    with tf.io.gfile.GFile(path, "ab") as f:  # a torn line (killed mid-write)
        f.write(b'{"model": "torn", "te')
    results_lib.append_result(path, {"model": "b", "test_top1": 0.25})
    rows = results_lib.read_results([f"{ram}/w"])
    assert [r["model"] for r in rows] == ["a", "b"]
    assert rows[0]["workdir"] == f"{ram}/w"
    assert "torn last line" in caplog.text
    assert files.listdir(files.dirname(path)) == ["results.jsonl"]
    with pytest.raises(FileNotFoundError):
        results_lib.read_results([f"{ram}/nothing"])


def test_export_hash_is_the_same_on_ram_and_on_disk(ram, tmp_path):
    local = tmp_path / "export"
    for name, data in [("saved_model.pb", b"m" * 5), ("variables/v", b"v" * 7)]:
        (local / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        files.makedirs(files.dirname(f"{ram}/export/{name}"))
        files.write_atomic(f"{ram}/export/{name}", data)
    # A sibling that ram://'s prefix matching would mix in.
    files.write_atomic(f"{ram}/export.tmp-1", b"x")
    assert cache_lib.hash_directory(f"{ram}/export") == cache_lib.hash_directory(local)
    files.write_atomic(f"{ram}/export/variables/v", b"changed")
    assert cache_lib.hash_directory(f"{ram}/export") != cache_lib.hash_directory(local)


def test_feature_cache_refuses_a_url(ram, tmp_path):
    with pytest.raises(ValueError, match="local disk"):
        cache_lib.FeatureCache(f"{ram}/cache")
    assert cache_lib.local_cache_dir() == str(
        tmp_path / "home" / ".cache" / "revisit_tf" / "feature_cache"
    )


def test_workdir_config_on_ram_is_parsed_from_a_copy_that_is_removed(
    ram, tmp_path, monkeypatch
):
    local_tmp = tmp_path / "tmp"
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))
    files.write_atomic(f"{ram}/run/{cli.CONFIG_NAME}", b"pretrain.steps = 7\n")
    assert cli.parse_gin([], [], workdir=f"{ram}/run") == [f"{ram}/run/config.gin"]
    assert gin.query_parameter("pretrain.steps") == 7
    assert os.listdir(local_tmp) == []
    # A config that does not parse: the named error, and no copy left either.
    files.write_atomic(f"{ram}/bad/{cli.CONFIG_NAME}", b"pretrain.nope = 1\n")
    with pytest.raises(ValueError, match="nope"):
        cli.parse_gin([], [], workdir=f"{ram}/bad")
    assert os.listdir(local_tmp) == []


def test_ram_workdir_train_resume_export_probe_report(ram, tmp_path, capsys):
    workdir = f"{ram}/rotation"
    assert cli.run(cli.train_main, ["--workdir", workdir, *GIN]) == cli.EXIT_OK
    for name in (
        "config.gin",
        "operative_config.gin",
        "train.log",
        "train_metrics.json",
        "trunk_config.json",
    ):
        assert len(_read(os.path.join(workdir, name))) > 0, name
    assert files.listdir(os.path.join(workdir, "tensorboard"))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert checkpoint_lib.checkpoint_steps(ckpt_dir) == [4, 2]
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
    uninterrupted = _metrics(workdir)

    # Resume from a ram:// checkpoint: the newest is corrupt (moved aside),
    # killed saves left a temporary file and directory (removed); the run
    # resumes from step 2 and ends where the uninterrupted one did.
    files.write_atomic(os.path.join(ckpt_dir, "ckpt-4.index"), b"garbage")
    files.write_atomic(os.path.join(ckpt_dir, "checkpoint.tmp-deadbeef"), b"x")
    files.makedirs(os.path.join(ckpt_dir, "ckpt-6_temp"))
    files.write_atomic(os.path.join(workdir, "train_metrics.json"), b"{}")
    assert cli.run(cli.train_main, ["--workdir", workdir, *GIN]) == cli.EXIT_OK
    assert "Restored ram://" in _read(os.path.join(workdir, "train.log")).decode()
    assert checkpoint_lib.checkpoint_steps(ckpt_dir) == [4, 2]
    (aside,) = files.listdir(os.path.join(ckpt_dir, "unreadable"))
    moved = files.listdir(os.path.join(ckpt_dir, "unreadable", aside))
    assert "ckpt-4.index" in moved and "ckpt-4.metrics.json" in moved
    names = files.listdir(ckpt_dir)
    assert not [n for n in names if ".tmp-" in n or n.endswith("_temp")], names
    assert _metrics(workdir) == uninterrupted

    # Export and probe re-read workdir/config.gin from ram://.
    assert cli.run(cli.export_main, ["--workdir", workdir]) == cli.EXIT_OK
    assert tf.saved_model.contains_saved_model(os.path.join(workdir, "export"))
    assert cli.run(cli.probe_main, ["--workdir", workdir]) == cli.EXIT_OK
    (row,) = results_lib.read_results([workdir])
    assert row["workdir"] == workdir and row["model"] == "rotation"
    assert (row["n_train"], row["n_val"], row["n_test"]) == (200, 100, 100)
    assert 0.0 <= row["test_top1"] <= 1.0
    # The features were cached on the local disk (a URL workdir has none).
    assert os.listdir(tmp_path / "home" / ".cache" / "revisit_tf" / "feature_cache")
    assert not files.exists(os.path.join(workdir, "probe", "feature_cache"))

    capsys.readouterr()
    assert cli.run(cli.report_main, [workdir]) == cli.EXIT_OK
    assert "| rotation | pre_logits |" in capsys.readouterr().out
