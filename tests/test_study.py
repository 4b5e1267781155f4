"""The study stage: spec expansion, the runner (resume, locks, failures,
stale configs), collect, and a tiny study end to end with its report."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from revisit_tf import cli
from revisit_tf.report import results as results_lib
from revisit_tf.study import collect as collect_lib
from revisit_tf.study import executors as executors_lib
from revisit_tf.study import runner as runner_lib
from revisit_tf.study import spec as spec_lib
from revisit_tf.study import state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN = os.path.join(ROOT, "gin")


def _spec(**overrides):
    kwargs = dict(
        axes={
            "pretext": {"rot": ("a.gin",), "ex": ("b.gin", "x.y = 1")},
            "trunk": {"r": ("t = 'r'",), "v": ("t = 'v'",)},
            "seed": {"0": ("SEED = 0",), "1": ("SEED = 1",)},
        },
        probes={"linear": ("p = 1",)},
        base=("base.gin",),
        final=("smoke.gin", "linear_probe.batch_size = 8"),
    )
    kwargs.update(overrides)
    return spec_lib.make_spec("s", **kwargs)


@pytest.fixture
def gin_dir(tmp_path):
    for name in ("a.gin", "b.gin", "base.gin", "smoke.gin"):
        (tmp_path / name).write_text(f"# {name}\nq = '{name}'\n")
    return str(tmp_path)


# --- spec expansion -----------------------------------------------------------


def test_full_product_and_gin_order(gin_dir):
    spec = _spec()
    cells = spec_lib.cells(spec)
    assert [c.id for c in cells] == [
        f"{p}/{t}/{s}" for p in ("rot", "ex") for t in ("r", "v") for s in ("0", "1")
    ]
    jobs = spec_lib.expand(spec, [gin_dir])
    assert len(jobs) == 8 * 3
    train = next(j for j in jobs if j.id == "ex/v/1/train")
    # base files, level files in axis order, final files; then every binding.
    assert train.gin.files == ("base.gin", "b.gin", "smoke.gin")
    assert train.gin.bindings == (
        "x.y = 1",
        "t = 'v'",
        "SEED = 1",
        "linear_probe.batch_size = 8",
    )
    probe = next(j for j in jobs if j.id == "ex/v/1/probe-linear")
    assert probe.deps == ("ex/v/1/export",)
    assert probe.gin.bindings[-2:] == ("p = 1", "linear_probe.batch_size = 8")
    export = next(j for j in jobs if j.id == "ex/v/1/export")
    assert export.deps == ("ex/v/1/train",)
    assert train.deps == ()


def test_grids_union_without_duplicates_and_probe_where(gin_dir):
    spec = _spec(
        grids={
            "main": {"seed": ("0",)},
            "extra": {"pretext": ("rot",), "trunk": ("r",)},
        },
        probes={
            "linear": ("p = 1",),
            "mlp": {"gin": ("p = 2",), "where": {"trunk": ("v",)}},
        },
    )
    cells = {c.id: c.grids for c in spec_lib.cells(spec)}
    assert cells == {
        "rot/r/0": ("main", "extra"),
        "rot/v/0": ("main",),
        "ex/r/0": ("main",),
        "ex/v/0": ("main",),
        "rot/r/1": ("extra",),
    }
    jobs = {j.id for j in spec_lib.expand(spec, [gin_dir])}
    assert "rot/v/0/probe-mlp" in jobs and "rot/r/0/probe-mlp" not in jobs


def test_baselines_take_their_axes_from_the_grid(gin_dir):
    spec = _spec(
        baselines={
            "random_init": {"gin": ("a.gin", "ri = 1"), "over": ("trunk", "seed")},
            "pixels": {"gin": ("a.gin",), "over": (), "export": False},
        }
    )
    cells = [c for c in spec_lib.cells(spec) if c.baseline]
    assert [c.id for c in cells] == [
        "random_init/r/0",
        "random_init/r/1",
        "random_init/v/0",
        "random_init/v/1",
        "pixels",
    ]
    assert cells[0].levels == {"pretext": "random_init", "trunk": "r", "seed": "0"}
    jobs = spec_lib.expand(spec, [gin_dir])
    kinds = {j.id.rsplit("/", 1)[1] for j in jobs if j.cell == "pixels"}
    assert kinds == {"probe-linear"}
    ri = [j for j in jobs if j.cell == "random_init/v/1"]
    assert [j.kind for j in ri] == ["export", "probe"]
    assert ri[0].gin.bindings[:3] == ("ri = 1", "t = 'v'", "SEED = 1")


def test_fingerprints_change_exactly_where_the_config_does(gin_dir, tmp_path):
    base = {j.id: j.fingerprint for j in spec_lib.expand(_spec(), [gin_dir])}
    # A probe-root binding does not reach training or export.
    probe_only = _spec(final=("smoke.gin", "linear_probe.batch_size = 16"))
    after = {j.id: j.fingerprint for j in spec_lib.expand(probe_only, [gin_dir])}
    changed = {k for k in base if base[k] != after[k]}
    assert changed == {k for k in base if k.endswith("probe-linear")}
    # A level's binding reaches that level's cells only, all their jobs.
    axes = dict(_spec().axes)
    level = _spec(
        axes={
            "pretext": {"rot": ("a.gin",), "ex": ("b.gin", "x.y = 2")},
            "trunk": {"r": ("t = 'r'",), "v": ("t = 'v'",)},
            "seed": {"0": ("SEED = 0",), "1": ("SEED = 1",)},
        }
    )
    assert axes  # (the default spec above)
    after = {j.id: j.fingerprint for j in spec_lib.expand(level, [gin_dir])}
    assert {k for k in base if base[k] != after[k]} == {
        k for k in base if k.startswith("ex/")
    }
    # Editing a file's settings changes every job; editing a comment does not.
    (tmp_path / "b.gin").write_text("# another comment\n\nq = 'b.gin'\n")
    same = {j.id: j.fingerprint for j in spec_lib.expand(_spec(), [gin_dir])}
    assert same == base
    (tmp_path / "b.gin").write_text("q = 'changed'\n")
    edited = {j.id: j.fingerprint for j in spec_lib.expand(_spec(), [gin_dir])}
    assert {k for k in base if base[k] != edited[k]} == {
        k for k in base if k.startswith("ex/")
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grids": {"g": {"trunkk": ("r",)}}}, "unknown axis 'trunkk'"),
        ({"grids": {"g": {"trunk": ("x",)}}}, "unknown level(s) ['x']"),
        ({"grids": {"g": {"trunk": ()}}}, "is empty"),
        ({"axes": {"pretext": {}}}, "axis 'pretext' has no levels"),
        ({"axes": {}}, "study.axes is empty"),
        ({"probes": {}}, "at least one probe"),
        ({"probes": {"p": {"gin": (), "wher": {}}}}, "unknown key(s) ['wher']"),
        ({"probes": {"p": {"where": {"seedz": ("0",)}}}}, "unknown axis 'seedz'"),
        (
            {"baselines": {"ri": {"gin": (), "over": ("trunkk",)}}},
            "unknown axis 'trunkk'",
        ),
        ({"axes": {"pretext": {"a b": ()}}}, "'a b' must be a non-empty name"),
        ({"job_seconds": {"training": 1}}, "unknown job kind 'training'"),
        ({"probes": {"p": 3}}, "must be a list of gin files"),
    ],
)
def test_bad_specs_fail_with_a_named_error(overrides, message):
    with pytest.raises(spec_lib.SpecError) as err:
        _spec(**overrides)
    assert message in str(err.value)


def test_missing_gin_file_is_a_spec_error(gin_dir):
    spec = _spec(base=("nowhere.gin",))
    with pytest.raises(spec_lib.SpecError, match="'nowhere.gin' not found"):
        spec_lib.expand(spec, [gin_dir])


def _write_spec(tmp_path, body):
    path = tmp_path / "spec.gin"
    path.write_text("import revisit_tf.configurables\n" + body)
    return str(path)


TINY_AXES = """
study.name = 'unit'
study.final = ('smoke.gin',)
study.axes = {
    'pretext': {'rotation': ('demo/fashion_mnist_rotation.gin',)},
    'trunk': {'resnet50_v1': (%s,)},
    'seed': {'0': ('SEED = 0',)},
}
study.probes = {'linear': ()}
"""


def test_misspelt_binding_fails_before_any_job_runs(tmp_path):
    spec = _write_spec(tmp_path, TINY_AXES % '"build_trunk.widht = 1"')
    study_dir = tmp_path / "study"
    with pytest.raises(spec_lib.SpecError) as err:
        cli.study_main([f"--study_dir={study_dir}", f"--spec={spec}"])
    assert "rotation/resnet50_v1/0/train" in str(err.value)
    assert "widht" in str(err.value)
    assert not study_dir.exists()


def test_unknown_executor_and_incomplete_spec(tmp_path, capsys):
    spec = _write_spec(tmp_path, TINY_AXES % '"build_trunk.width = 1"')
    with pytest.raises(SystemExit):
        cli.study_main(
            [f"--study_dir={tmp_path / 's'}", f"--spec={spec}", "--executor=lsf"]
        )
    assert "--executor must be one of ('local', 'slurm'); got 'lsf'" in (
        capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="executor must be one of"):
        executors_lib.make_executor("lsf", str(tmp_path))
    incomplete = _write_spec(tmp_path, "study.name = 'x'\n")
    with pytest.raises(spec_lib.SpecError, match="incomplete"):
        cli.load_study([incomplete], [])


def test_dry_run_prints_jobs_commands_and_estimate(tmp_path, capsys):
    spec = _write_spec(
        tmp_path,
        TINY_AXES % '"build_trunk.width = 1"'
        + "study.images_per_second = 2\n"
        + "study.job_seconds = {'export': 10, 'probe': 20}\n",
    )
    cli.study_main([f"--study_dir={tmp_path / 's'}", f"--spec={spec}", "--dry_run"])
    out = capsys.readouterr().out
    assert "revisit-train --workdir=" in out and "--gin_file=smoke.gin" in out
    # smoke.gin: 4 steps x 8 images = 32 images at 2 images/s.
    assert re.search(
        r"train +1 jobs, 16s of compute \(from the spec's images_per_second\)", out
    )
    assert "3 jobs in 1 cells (0 already done)" in out
    assert re.search(r"export +1 jobs, 10s", out)
    assert re.search(r"probe +1 jobs, 20s", out)
    assert not (tmp_path / "s" / "jobs").exists()


# --- the runner, with a stand-in executor -----------------------------------


class FakeExecutor:
    """Runs chains in threads, writing what a worker would (state.py).

    ``behaviour``: job id -> "fail" (the job fails) or "crash" (the worker
    dies before the job ends: no final status).
    """

    name = "fake"

    def __init__(self, behaviour=None, slots=2, delay=0.0):
        self.behaviour = behaviour or {}
        self.slots = slots
        self.delay = delay
        self.launched = []

    def _run(self, study_dir, job_ids, result):
        for job_id in job_ids:
            job = state.read_job(study_dir, job_id)
            deps = [state.read_status(study_dir, d) or {} for d in job["deps"]]
            common = {"fingerprint": job["fingerprint"]}
            if any(d.get("state") != "done" for d in deps):
                state.write_status(study_dir, job_id, state="blocked", **common)
                continue
            what = self.behaviour.get(job_id)
            if what == "crash":
                state.write_status(study_dir, job_id, state="running", **common)
                result.append(1)
                return
            time.sleep(self.delay)
            if what == "fail":
                state.write_status(
                    study_dir, job_id, state="failed", error="Boom: bad", **common
                )
                continue
            workdir = state.cell_dir(study_dir, job["cell"])
            os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
            os.makedirs(os.path.join(workdir, "probe"), exist_ok=True)
            if job["kind"] == "train":
                with open(os.path.join(workdir, "train_metrics.json"), "w") as f:
                    f.write("{}")
            elif job["kind"] == "export":
                with open(os.path.join(workdir, "export", "saved_model.pb"), "w"):
                    pass
            else:
                results_lib.append_result(
                    results_lib.results_path(workdir),
                    {"model": job["cell"], "endpoint": "pre_logits", "test_top1": 0.5},
                )
            state.write_status(
                study_dir,
                job_id,
                state="done",
                seconds=0.01,
                results_lines=[0, 1],
                **common,
            )
        result.append(0)

    def launch(self, study_dir, job_ids, resources):
        self.launched.append(list(job_ids))
        result = []
        thread = threading.Thread(target=self._run, args=(study_dir, job_ids, result))
        thread.start()
        return thread, result

    def poll(self, handle):
        thread, result = handle
        return None if thread.is_alive() else result[0]

    def stop(self, handle):
        handle[0].join()


def _run(study_dir, spec, jobs, executor, **kwargs):
    return runner_lib.run_study(
        str(study_dir), spec, jobs, executor, poll_seconds=0.01, echo=None, **kwargs
    )


def test_runner_runs_each_cell_as_one_chain_and_skips_done_jobs(gin_dir, tmp_path):
    spec = _spec()
    jobs = spec_lib.expand(spec, [gin_dir])
    executor = FakeExecutor()
    summary = _run(tmp_path / "s", spec, jobs, executor)
    assert summary.ok and len(summary.done) == 24 and summary.skipped == 0
    assert sorted(len(c) for c in executor.launched) == [3] * 8
    again = FakeExecutor()
    summary = _run(tmp_path / "s", spec, jobs, again)
    assert summary.skipped == 24 and not again.launched and not summary.done
    # A done job whose outputs vanished runs again (and only it).
    os.remove(
        tmp_path / "s" / "cells" / "rot" / "r" / "0" / "export" / "saved_model.pb"
    )
    third = FakeExecutor()
    summary = _run(tmp_path / "s", spec, jobs, third)
    assert third.launched == [["rot/r/0/export"]]
    log = (tmp_path / "s" / "study.log").read_text()
    assert "24 already done" in log and "ETA" in log


def test_a_failing_job_does_not_stop_the_others(gin_dir, tmp_path):
    spec = _spec()
    jobs = spec_lib.expand(spec, [gin_dir])
    executor = FakeExecutor({"rot/r/0/train": "fail", "ex/v/1/export": "crash"})
    summary = _run(tmp_path / "s", spec, jobs, executor)
    failed = {j: (e, p) for j, e, p in summary.failed}
    assert set(failed) == {"rot/r/0/train", "ex/v/1/export"}
    assert failed["rot/r/0/train"][0] == "Boom: bad"
    assert failed["rot/r/0/train"][1].endswith("jobs/rot/r/0/train/job.log")
    assert "exited with code 1 before the job finished" in failed["ex/v/1/export"][0]
    blocked = dict(summary.blocked)
    assert set(blocked) == {
        "rot/r/0/export",
        "rot/r/0/probe-linear",
        "ex/v/1/probe-linear",
    }
    assert len(summary.done) == 24 - 2 - 3  # ex/v/1/train ran
    assert not summary.ok
    # The crashed job's status was completed by the runner, not left running.
    assert state.read_status(str(tmp_path / "s"), "ex/v/1/export")["state"] == "failed"
    # A rerun retries exactly the failed and blocked jobs.
    retry = FakeExecutor()
    summary = _run(tmp_path / "s", spec, jobs, retry)
    assert summary.ok and summary.skipped == 19
    assert sorted(map(tuple, retry.launched)) == [
        ("ex/v/1/export", "ex/v/1/probe-linear"),
        ("rot/r/0/train", "rot/r/0/export", "rot/r/0/probe-linear"),
    ]


def test_changed_training_config_stops_unless_moved_aside(gin_dir, tmp_path):
    spec = _spec()
    jobs = spec_lib.expand(spec, [gin_dir])
    assert _run(tmp_path / "s", spec, jobs, FakeExecutor()).ok
    changed = _spec(
        axes={
            "pretext": {"rot": ("a.gin", "lr = 2"), "ex": ("b.gin", "x.y = 1")},
            "trunk": {"r": ("t = 'r'",), "v": ("t = 'v'",)},
            "seed": {"0": ("SEED = 0",), "1": ("SEED = 1",)},
        }
    )
    new_jobs = spec_lib.expand(changed, [gin_dir])
    with pytest.raises(runner_lib.StaleJobsError) as err:
        _run(tmp_path / "s", changed, new_jobs, FakeExecutor())
    assert "8 job(s)" in str(err.value) and "--overwrite_stale" in str(err.value)
    assert (
        tmp_path / "s" / "cells" / "rot" / "r" / "0" / "train_metrics.json"
    ).exists()
    summary = _run(
        tmp_path / "s", changed, new_jobs, FakeExecutor(), overwrite_stale=True
    )
    assert summary.ok and summary.skipped == 12 and len(summary.done) == 12
    moved = list((tmp_path / "s" / "stale").glob("*/cells/rot/r/0/train_metrics.json"))
    assert len(moved) == 1  # nothing lost
    # A probe-only change reruns the probes and keeps training and export.
    probe_changed = _spec(probes={"linear": ("p = 2",)})
    jobs3 = spec_lib.expand(probe_changed, [gin_dir])
    executor = FakeExecutor()
    summary = _run(tmp_path / "s2", spec, jobs, FakeExecutor())
    summary = _run(tmp_path / "s2", probe_changed, jobs3, executor)
    assert summary.ok and summary.skipped == 16
    assert all(len(c) == 1 and c[0].endswith("probe-linear") for c in executor.launched)


def test_multi_task_jobs_run_alone(gin_dir, tmp_path):
    spec = _spec(resources={"train": {"nodes": 2, "gpus_per_node": 8}})
    jobs = spec_lib.expand(spec, [gin_dir])
    executor = FakeExecutor()
    assert _run(tmp_path / "s", spec, jobs, executor).ok
    trains = [c for c in executor.launched if c[0].endswith("/train")]
    assert len(trains) == 8 and all(len(c) == 1 for c in trains)
    assert sorted(len(c) for c in executor.launched if len(c) > 1) == [2] * 8


def test_workers_of_a_killed_runner_are_waited_for(gin_dir, tmp_path):
    """A runner killed by SIGKILL leaves its workers running (own sessions);
    the next runner must not start a second process on their cells."""
    spec = _spec(axes={"pretext": {"rot": ("a.gin",)}, "trunk": {"r": (), "v": ()}})
    jobs = spec_lib.expand(spec, [gin_dir])
    study_dir = str(tmp_path / "s")
    orphan = subprocess.Popen(["sleep", "1.5"])
    train = next(j for j in jobs if j.id == "rot/r/train")
    state.write_status(
        study_dir,
        train.id,
        state="running",
        fingerprint=train.fingerprint,
        pid=orphan.pid,
        host=socket.gethostname(),
    )
    executor = FakeExecutor()
    start = time.time()
    launched_at = {}
    launch = executor.launch

    def timed_launch(study_dir, job_ids, resources):
        launched_at[job_ids[0]] = time.time() - start
        return launch(study_dir, job_ids, resources)

    executor.launch = timed_launch
    # Reap the sleep when it ends, as its real parent (the old runner) would.
    threading.Thread(target=orphan.wait, daemon=True).start()
    summary = _run(study_dir, spec, jobs, executor)
    assert summary.ok
    assert launched_at["rot/v/train"] < 1.0
    assert launched_at["rot/r/train"] >= 1.4  # only after the orphan ended
    log = _read(os.path.join(study_dir, "study.log"))
    assert (
        "waiting for 1 cell(s) still run by an earlier runner's workers: rot/r" in log
    )


def test_a_second_runner_is_refused(gin_dir, tmp_path):
    spec = _spec()
    jobs = spec_lib.expand(spec, [gin_dir])
    with (
        runner_lib.study_lock(str(tmp_path / "s")),
        pytest.raises(runner_lib.StudyLockedError, match="in use by another"),
    ):
        _run(tmp_path / "s", spec, jobs, FakeExecutor())


def test_collect_reads_only_the_current_jobs_rows(gin_dir, tmp_path):
    spec = _spec(axes={"pretext": {"rot": ("a.gin",)}, "trunk": {"r": ()}})
    jobs = spec_lib.expand(spec, [gin_dir])
    study_dir = str(tmp_path / "s")
    assert _run(study_dir, spec, jobs, FakeExecutor()).ok
    workdir = state.cell_dir(study_dir, "rot/r")
    path = results_lib.results_path(workdir)
    # An older spec's row before ours, and this job's status claiming line 1.
    older = {"model": "rot/r", "endpoint": "pre_logits", "test_top1": 0.9}
    ours = results_lib.read_results([path])[0]
    os.remove(path)
    results_lib.append_result(path, older)
    results_lib.append_result(path, ours)
    status = state.read_status(study_dir, "rot/r/probe-linear")
    state.write_status(
        study_dir, "rot/r/probe-linear", **{**status, "results_lines": [1, 2]}
    )
    records, notes = collect_lib.collect(study_dir, spec, jobs)
    assert [r["test_top1"] for r in records] == [0.5]
    assert records[0]["levels"] == {"pretext": "rot", "trunk": "r"}
    assert any(
        "1 row(s) of cells/rot/r/probe/results.jsonl were left out" in n for n in notes
    )
    # A probe job of another config yields a note, not its rows.
    state.write_status(
        study_dir, "rot/r/probe-linear", **{**status, "fingerprint": "old"}
    )
    records, notes = collect_lib.collect(study_dir, spec, jobs)
    assert records == []
    assert notes[0].startswith(
        "1 probe job(s) without results (run under an older config)"
    )


# --- end to end: a tiny study on the real binaries ----------------------------


def _read(path):
    with open(path) as f:
        return f.read()


def _statuses(study_dir):
    out = {}
    for root, _, files in os.walk(os.path.join(study_dir, "jobs")):
        if "status.json" in files:
            with open(os.path.join(root, "status.json")) as f:
                status = json.load(f)
            out[status["id"]] = status["state"]
    return out


def test_tiny_study_end_to_end_with_kill_resume_and_report(tmp_path):
    """study/tiny.gin cut to one pretext and one trunk (Rotation x VGG19 x 2
    seeds, the random-init and raw-pixel baselines) with a probe that crashes
    on one cell; the runner is stopped (SIGTERM) once four jobs are done, then
    rerun to the end, and the report is written. (The whole tiny.gin grid
    runs the same code 10 more times; test_study_report covers the report's
    other shapes.)"""
    study_dir = str(tmp_path / "tiny")
    broken = (
        "study.probes = {'linear': (\"linear_probe.endpoints = 'all'\",), "
        "'broken': {'gin': (\"linear_probe.protocols = ('nope',)\",), "
        "'where': {'pretext': ('rotation',), 'trunk': ('vgg19',), "
        "'seed': ('0',)}}}"
    )
    argv = [
        sys.executable,
        "-m",
        "revisit_tf.cli",
        "study",
        f"--study_dir={study_dir}",
        "--spec=study/tiny.gin",
        f"--gin_bindings={broken}",
        "--gin_bindings=study.axes = {"
        "'pretext': {'rotation': ('demo/fashion_mnist_rotation.gin',)}, "
        "'trunk': {'vgg19': (\"build_trunk.architecture = 'vgg19'\",)}, "
        "'seed': {'0': ('SEED = 0',), '1': ('SEED = 1',)}}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        states = _statuses(study_dir) if os.path.exists(study_dir) else {}
        if sum(s == "done" for s in states.values()) >= 4:
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0
    assert "runner stopped" in out
    first = _statuses(study_dir)
    assert "running" not in first.values(), first
    done_before = {j for j, s in first.items() if s == "done"}
    assert len(done_before) >= 4

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 1, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = _read(os.path.join(study_dir, "study.log"))
    assert f"{len(done_before)} already done" in log
    final = _statuses(study_dir)
    # 2 cells x 3 jobs, 2 random-init cells x 2, the pixel probe and the
    # broken probe.
    assert len(final) == 12
    assert [j for j in final if j.endswith("probe-broken")] == [
        "rotation/vgg19/0/probe-broken"
    ]
    assert final["rotation/vgg19/0/probe-broken"] == "failed"
    assert sum(s == "done" for s in final.values()) == 11
    assert "FAILED rotation/vgg19/0/probe-broken" in log
    assert "protocols must be among" in log
    assert os.path.exists(state.log_path(study_dir, "rotation/vgg19/0/probe-broken"))

    report = os.path.join(study_dir, "report", "README.md")
    text = _read(report)
    assert "probe-broken failed" in text
    assert "Jobs: 12 in 5 cells; 11 done, 1 failed." in text
    assert "over 2 runner invocation(s)" in text
    figures = sorted(
        f for f in os.listdir(os.path.dirname(report)) if f.endswith(".png")
    )
    assert figures, text
    for name in figures:
        assert os.path.getsize(os.path.join(study_dir, "report", name)) > 1000
        assert os.path.exists(os.path.join(study_dir, "report", name[:-4] + ".svg"))
    # revisit-report --study rewrites it from the recorded spec.
    os.remove(report)
    cli.report_main([f"--study={study_dir}"])
    assert _read(report) == text


def test_probe_scopes_name_every_registered_protocol():
    """Probe bindings stay out of train/export fingerprints: spec's list of
    the probe's gin scopes covers every protocol class."""
    from revisit_tf.probe import protocols

    classes = {c.__name__ for c in protocols.REGISTRY.values()}
    # configurables wraps the classes in gin subclasses of the same name.
    assert {s[:-1] for s in spec_lib.PROBE_SCOPES} == classes | {"linear_probe"}


def _signal_job(study_dir, kind="probe"):
    job = {
        "id": "c/probe-x",
        "cell": "c",
        "kind": kind,
        "deps": [],
        "fingerprint": "f",
        "gin_files": [],
        "gin_bindings": [],
    }
    state.write_job(study_dir, job)
    return job["id"]


@pytest.mark.parametrize("when", ["during_the_job", "after_the_job"])
def test_a_sigterm_never_leaves_a_running_status(tmp_path, monkeypatch, when):
    """SIGTERM in the job records ``interrupted``; SIGTERM after it ended (in
    the session cleanup, where the last CI run caught one) keeps ``done``;
    either way the chain stops and no status says ``running``."""
    from revisit_tf.study import worker

    study_dir = str(tmp_path)
    job_id = _signal_job(study_dir)

    def sigterm_self(*_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(
        worker, "_run_main", sigterm_self if when == "during_the_job" else lambda *a: 0
    )
    monkeypatch.setattr(
        worker, "_clear_session", sigterm_self if when == "after_the_job" else lambda: 0
    )
    before = signal.getsignal(signal.SIGTERM)
    assert worker.run_chain(study_dir, [job_id]) == 1
    status = state.read_status(study_dir, job_id)
    expected = "interrupted" if when == "during_the_job" else "done"
    assert status["state"] == expected, status
    assert status["seconds"] >= 0 and status["ended"] >= status["started"]
    # The handler run_chain installed is gone again.
    assert signal.getsignal(signal.SIGTERM) == before
