"""The kill tier (issue 12): real binaries killed at their fault points,
files corrupted, the disk filled, two trainers on one workdir; after each,
the next run ends correct and nothing good is lost.

"Correct" is the uninterrupted chain's result, computed once here
(``reference``): the smoke Rotation run is seeded and its input stream is a
function of its position, so a killed-and-resumed chain must end with the same
final metrics, the same exported features and the same probe accuracy.

Kill points come from tracing the reference chain (``faults.trace_to``): the
names the library marks with ``faults.point`` and how often each is reached.
The default tier (CI) kills each kind of writer once at its riskiest point
(train: a checkpoint's state written, after the first checkpoint, i.e. a
resume mid-run, and inside a metrics write; export: between moving the old
export aside and the new one in; probe: a cache entry's shards written, its
manifest not): 5 kills, and one rename; the full disk and the corruptions
(two trainers on one workdir: see ``test_cli.py::test_kill_and_resume``).
``REVISIT_TF_FAULT_TIER=ci`` kills every point name at its last occurrence,
plus once after the first checkpoint: 16 kills, every rename, and the two
trainers; ``REVISIT_TF_FAULT_TIER=full`` kills every
occurrence of every point: 43 kills. (The smaller default keeps CI within
its 30 minutes; ``bash tools/test.sh`` with the variable set runs the rest.)
Each kill is a SIGKILL the process sends itself at that point
(``REVISIT_TF_FAULT=NAME@N``): no ``finally``, no flush.
"""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from revisit_tf import cli, faults
from revisit_tf.train import checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = ["--gin_file", "demo/fashion_mnist_rotation.gin", "--gin_file", "smoke.gin"]
TIER = os.environ.get("REVISIT_TF_FAULT_TIER", "smoke")
if TIER not in ("smoke", "ci", "full"):
    raise ValueError(f"REVISIT_TF_FAULT_TIER must be smoke, ci or full; got {TIER!r}.")
FULL = TIER == "full"
# The default tier's kills: (kind, point, occurrence).
SMOKE_KILLS = (
    ("train", "checkpoint.after_state", 1),
    ("train", "write_atomic.before_replace", 8),
    ("export", "export.old_moved_aside", 1),
    ("probe", "cache.shards_written", 3),
    ("probe", "write_atomic.after_replace", 3),
)
KINDS = ("train", "export", "probe")
MAINS = {"train": cli.train_main, "export": cli.export_main, "probe": cli.probe_main}
TALLY = collections.Counter()  # printed at the end: what the tier tried


def _argv(kind, workdir):
    return ["--workdir", workdir, *(GIN if kind == "train" else [])]


def _run_in_process(kind, workdir):
    assert cli.run(MAINS[kind], _argv(kind, workdir)) == cli.EXIT_OK, kind


def _spawn(kind, workdir, env=None, prefix=()):
    argv = [*prefix, sys.executable, "-m", "revisit_tf.cli", kind]
    return subprocess.Popen(
        [*argv, *_argv(kind, workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def _state(workdir):
    """What a finished chain leaves, for comparison with the reference."""
    out = {}
    path = os.path.join(workdir, "train_metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            metrics = json.load(f)
        out["metrics"] = {k: v for k, v in metrics.items() if k != "examples_per_sec"}
    out["steps"] = checkpoint_lib.checkpoint_steps(os.path.join(workdir, "checkpoints"))
    results = os.path.join(workdir, "probe", "results.jsonl")
    if os.path.exists(results):
        with open(results) as f:
            rows = [json.loads(line) for line in f]  # every line whole
        out["test_top1"] = sorted({r["test_top1"] for r in rows})
    return out


def _features(workdir):
    import tensorflow as tf

    model = tf.saved_model.load(os.path.join(workdir, "export"))
    images = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype("float32")
    return model.signatures["serving_default"](tf.constant(images))[
        "pre_logits"
    ].numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted chain, run once in process with every point traced."""
    root = tmp_path_factory.mktemp("faults")
    workdir = str(root / "reference")
    trace = {}
    stages = {}
    for kind in KINDS:
        path = str(root / f"{kind}.trace")
        if kind == "export":  # trace a re-export, as the kill runs do
            _run_in_process(kind, workdir)
        faults.install(faults.trace_to(path))
        try:
            _run_in_process(kind, workdir)
        finally:
            faults.install(None)
        with open(path) as f:
            trace[kind] = collections.Counter(line.strip() for line in f)
        stages[kind] = str(root / f"after_{kind}")
        shutil.copytree(workdir, stages[kind])
    state = _state(workdir)
    assert state["steps"][0] == 4 and state["metrics"]["step"] == 4
    return {
        "root": root,
        "trace": trace,
        "stages": stages,
        "state": state,
        "features": _features(workdir),
    }


def _kill_points():
    """(kind, point, occurrence) to kill at, from a trace of the smoke chain.

    The counts of the smoke chain are fixed by its config (4 steps, a
    checkpoint every 2): listing them here keeps test ids stable; the
    ``test_trace_matches_the_kill_plan`` test fails when the library's points
    change, so the plan cannot silently go stale.
    """
    if TIER == "smoke":
        return list(SMOKE_KILLS)
    plan = []
    for kind, counts in PLAN.items():
        for name, n in counts.items():
            # CI: each point at its last occurrence, plus a kill after the
            # first checkpoint (a resume mid-training); full: every occurrence.
            occurrences = (
                range(1, n + 1)
                if FULL
                else sorted({n, 1} if name == "checkpoint.after_state" else {n})
            )
            for occurrence in occurrences:
                plan.append((kind, name, occurrence))
    return plan


# Points reached by each binary of the smoke chain, and how often.
PLAN = {
    "train": {
        "write_atomic.before_replace": 8,
        "write_atomic.after_replace": 8,
        "checkpoint.before_write": 2,
        "checkpoint.after_write": 2,
        "checkpoint.after_state": 2,
        "checkpoint.after_cleanup": 2,
    },
    "export": {
        "export.tmp_written": 1,
        "export.old_moved_aside": 1,
        "export.new_moved_in": 1,
        "export.leftovers_removed": 1,
    },
    "probe": {
        "write_atomic.before_replace": 3,
        "write_atomic.after_replace": 3,
        "cache.shards_written": 3,
        "cache.manifest_written": 3,
        "cache.entry_committed": 3,
    },
}


def test_trace_matches_the_kill_plan(reference):
    for kind in KINDS:
        assert dict(reference["trace"][kind]) == PLAN[kind], kind
    for kind, name, occurrence in SMOKE_KILLS:  # the default tier is a subset
        assert 1 <= occurrence <= PLAN[kind][name], (kind, name)


def _prepare(reference, kind, name):
    """A workdir as the binary ``kind`` finds it in the chain."""
    workdir = str(reference["root"] / f"kill-{kind}-{time.monotonic_ns()}")
    if kind == "export":
        # An export exists already (a re-export): the renames have an old one
        # to move aside and must never lose both.
        shutil.copytree(reference["stages"]["export"], workdir)
    elif kind == "probe":
        shutil.copytree(reference["stages"]["export"], workdir)
    return workdir


def _check_correct(reference, workdir, kind):
    """The state the uninterrupted chain has after ``kind``, bit for bit."""
    state = _state(workdir)
    assert state["steps"][0] == 4
    assert state["metrics"] == reference["state"]["metrics"]
    if kind == "train":
        ours = _checkpoint_arrays(workdir)
        theirs = _checkpoint_arrays(reference["stages"]["train"])
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
    if kind == "export":
        np.testing.assert_allclose(_features(workdir), reference["features"], atol=1e-6)
    if kind == "probe":
        assert state["test_top1"] == reference["state"]["test_top1"]


def _checkpoint_arrays(workdir):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints", "ckpt-4"))
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if "save_counter" not in k and "OBJECT_GRAPH" not in k
    }


@pytest.mark.parametrize("kind,name,occurrence", _kill_points(), ids=lambda v: str(v))
def test_killed_at_a_point_the_next_run_ends_correct(reference, kind, name, occurrence):
    workdir = _prepare(reference, kind, name)
    proc = _spawn(kind, workdir, env={"REVISIT_TF_FAULT": f"{name}@{occurrence}"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    # Nothing good lost: every checkpoint there now stays restorable, an
    # export exists whenever one existed before (possibly as export.old-*,
    # which the next run restores), and results.jsonl has only whole lines.
    before = checkpoint_lib.checkpoint_steps(os.path.join(workdir, "checkpoints"))
    if kind != "train":
        assert before[0] == 4
        assert any(n.startswith("export") for n in os.listdir(workdir))
    _run_in_process(kind, workdir)
    after = checkpoint_lib.checkpoint_steps(os.path.join(workdir, "checkpoints"))
    assert not before or after[0] >= before[0]
    _check_correct(reference, workdir, kind)
    TALLY["kill points"] += 1


# Inside TensorFlow's own checkpoint write: strace's syscall fault injection
# SIGKILLs the process on entering its N-th rename(2). The smoke run renames 14
# times: 1-4 our records (trunk_config, config.gin, operative config, the
# step-2 metrics), 5-7 TF's save of ckpt-2 (its part files, then the data file
# into place; the index is written after), 8 the state file, 9 the step-4
# metrics, 10-12 TF's save of ckpt-4, 13 the state file, 14 train_metrics.
RENAMES = range(1, 15) if FULL else (7, 12)


@pytest.mark.parametrize("rename", RENAMES if TIER != "smoke" else RENAMES[-1:])
def test_killed_inside_a_rename_the_next_run_ends_correct(reference, rename):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (tools/test.sh installs it as root)")
    workdir = str(reference["root"] / f"strace-{rename}")
    inject = f"inject=rename,renameat,renameat2:signal=KILL:when={rename}"
    proc = _spawn(
        "train", workdir, prefix=[strace, "-f", "-qq", "-o", "/dev/null", "-e", inject]
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    _run_in_process("train", workdir)
    _check_correct(reference, workdir, "train")
    TALLY["kills inside renames"] += 1


# --- corrupted files: the next run repairs what it can and never starts over


def _paths(workdir, pattern):
    import glob

    paths = sorted(glob.glob(os.path.join(workdir, pattern), recursive=True))
    assert paths, pattern
    return paths


def _truncate(pattern, size=20):
    def damage(workdir):
        for path in _paths(workdir, pattern):
            with open(path, "r+b") as f:
                f.truncate(size)

    return damage


def _garbage(pattern, data=b"\x00\xffgarbage{{{"):
    def damage(workdir):
        for path in _paths(workdir, pattern):
            with open(path, "wb") as f:
                f.write(data)

    return damage


def _delete(pattern):
    def damage(workdir):
        for path in _paths(workdir, pattern):
            os.remove(path)

    return damage


def _append(pattern, data):
    def damage(workdir):
        for path in _paths(workdir, pattern):
            with open(path, "ab") as f:
                f.write(data)

    return damage


# name: (stage the workdir is copied at, damage, binary rerun, expected).
# "ok": the rerun ends as the uninterrupted chain did. An exception class:
# the rerun stops with that named error and the workdir is left as it was.
CACHE = "probe/feature_cache/**/"
CORRUPTIONS = {
    "newest ckpt index deleted": ("train", _delete("checkpoints/ckpt-4.index"), "ok"),
    "newest ckpt data truncated": (
        "train",
        _truncate("checkpoints/ckpt-4.data-*"),
        "ok",
    ),
    "ckpt state file garbage": ("train", _garbage("checkpoints/checkpoint"), "ok"),
    "ckpt metrics garbage": (
        "train",
        _garbage("checkpoints/ckpt-4.metrics.json"),
        "ok",
    ),
    "train_metrics.json deleted": ("train", _delete("train_metrics.json"), "ok"),
    "lock file garbage": ("train", _garbage(".lock"), "ok"),
    "every ckpt truncated": (
        "train",
        _truncate("checkpoints/*.data-*"),
        checkpoint_lib.CheckpointError,
    ),
    "config.gin garbage": ("train", _garbage("config.gin"), cli.ConfigChangedError),
    "saved_model.pb truncated": ("export", _truncate("export/saved_model.pb"), "ok"),
    "export variables truncated": (
        "export",
        _truncate("export/variables/variables.data-*"),
        "ok",
    ),
    "cache manifests wrong structure": (
        "probe",
        _garbage(CACHE + "manifest.json", b'{"shards": 3}'),
        "ok",
    ),
    "cache manifests garbage": ("probe", _garbage(CACHE + "manifest.json"), "ok"),
    "cache shards truncated": ("probe", _truncate(CACHE + "shard-*.npy", 100), "ok"),
    "results.jsonl half a line": (
        "probe",
        _append("probe/results.jsonl", b'{"model": "rot'),
        "ok",
    ),
}


def _snapshot(workdir):
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            if name.endswith(".log") or name == ".lock":
                continue
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), workdir)] = f.read()
    return out


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_file_the_next_run_ends_correct_or_stops_named(reference, name):
    stage, damage, expected = CORRUPTIONS[name]
    workdir = str(reference["root"] / f"corrupt-{time.monotonic_ns()}")
    shutil.copytree(reference["stages"][stage], workdir)
    damage(workdir)
    if expected == "ok":
        _run_in_process(stage, workdir)
        _check_correct(reference, workdir, stage)
    else:
        before = _snapshot(workdir)
        with pytest.raises(expected):
            MAINS[stage](_argv(stage, workdir))
        assert _snapshot(workdir) == before
    TALLY["corruptions"] += 1


# --- a full disk, two trainers ------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root only: mount needs it), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mountpoint = str(tmp_path / "disk")
    os.makedirs(mountpoint)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", mountpoint], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", mountpoint], check=False)


def test_full_disk_stops_named_and_loses_nothing(reference, small_disk):
    """Training onto a disk that fills up: a named error, every checkpoint
    left readable; with space again the run resumes and ends correct."""
    workdir = os.path.join(small_disk, "run")
    code = cli.run(cli.train_main, _argv("train", workdir))
    assert code == cli.EXIT_FAILED
    directory = os.path.join(workdir, "checkpoints")
    left = checkpoint_lib.checkpoint_steps(directory)
    assert not [n for n in os.listdir(directory) if "_temp" in n or ".tmp-" in n]
    subprocess.run(["mount", "-o", "remount,size=64m", small_disk], check=True)
    _run_in_process("train", workdir)
    assert checkpoint_lib.checkpoint_steps(directory)[0] == 4
    if left:  # the checkpoints written before the disk filled were resumed
        with open(os.path.join(workdir, "train.log")) as f:
            assert f"(step {left[0]})" in f.read()
    _check_correct(reference, workdir, "train")
    TALLY["full disks"] += 1


@pytest.mark.skipif(
    TIER == "smoke",
    reason="REVISIT_TF_FAULT_TIER=ci|full (2 minutes); by default "
    "test_cli.py::test_kill_and_resume runs a second trainer, the stale-lock "
    "takeover and the data/ + pretext/ directory through the binary, and "
    "test_nothing_lost.py tests the lock in process",
)
def test_two_trainers_one_workdir_from_a_directory_with_data_and_pretext(
    reference, tmp_path
):
    """Second trainer: exit 75 naming the first; the first killed, the next
    run takes the stale lock over, resumes and ends correct. Both run as
    ``python -m`` from a directory holding ``data/`` and ``pretext/`` folders
    (issue item 11: gin's include lookup crashed on them)."""
    cwd = tmp_path / "cwd"
    for name in ("data", "pretext"):
        os.makedirs(cwd / name)
    workdir = str(tmp_path / "run")
    slow = ["--gin_bindings", "pretrain.steps = 400"]

    def spawn(*extra):
        argv = [sys.executable, "-m", "revisit_tf.cli", "train"]
        return subprocess.Popen(
            [*argv, *_argv("train", workdir), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )

    first = spawn(*slow)
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 120
    while time.time() < deadline:  # until the first holds the lock
        if os.path.exists(lock) and os.path.getsize(lock):
            break
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.1)
    second = spawn(*slow)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == cli.EXIT_RERUN, out[-3000:]
    assert f"pid {first.pid}" in out and "in use by revisit-train" in out
    while not checkpoint_lib.checkpoint_steps(os.path.join(workdir, "checkpoints")):
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.2)
    first.kill()
    first.communicate(timeout=60)
    third = spawn(*slow)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == cli.EXIT_OK, out[-3000:]
    assert "taking over the stale lock" in out and "that process is gone" in out
    assert "Restored" in out and "step 400/400" in out
    TALLY["two trainers"] += 1


def test_zz_tally(reference):
    """What the tier tried (runs last in this file; -s shows it)."""
    print(f"\nfault tier: {dict(TALLY)}")
    assert TALLY["kill points"] + TALLY["corruptions"] > 0
