"""The SLURM executor (revisit_tf/study/slurm.py).

(a) ``tf_config_from_slurm`` and the hostlist / tasks-per-node parsers against
hand-derived values (pure, no SLURM). (b) ``SlurmExecutor`` against a real
private single-node SLURM cluster (tests/slurm_cluster.py: munged, slurmctld
and slurmd started for this module, stopped after it): chains that succeed,
return a failure count, raise, are cancelled, and the real worker; (c) a
2-task job whose tasks each see a TF_CONFIG of 2 workers with their own index,
and form a MultiWorkerMirroredStrategy that all-reduces on CPU.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import cloudpickle
import pytest
import slurm_cluster

from revisit_tf.study import slurm

# The chains the jobs run live in tests/slurm_cluster.py; pickled by value, the
# job's python needs no path to them.
cloudpickle.register_pickle_by_value(slurm_cluster)


# -- (a) pure functions -------------------------------------------------------------


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("vm", ["vm"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("a[08-10],b", ["a08", "a09", "a10", "b"]),
        ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
        ("n[1],m[3-4]-ib", ["n1", "m3-ib", "m4-ib"]),
        ("host.example.org,h2", ["host.example.org", "h2"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert slurm.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "bad", ["node[01-03", "node01]", "node[a-b]", "node[3-1]", "n[[1]]", "n[1-]"]
)
def test_expand_hostlist_rejects(bad):
    with pytest.raises(slurm.HostlistError, match=re.escape(bad)):
        slurm.expand_hostlist(bad)


@pytest.mark.parametrize(
    "text, counts",
    [("2", [2]), ("2(x3),1", [2, 2, 2, 1]), ("1,4(x2)", [1, 4, 4])],
)
def test_parse_tasks_per_node(text, counts):
    assert slurm.parse_tasks_per_node(text) == counts


@pytest.mark.parametrize("bad", ["2(x)", "x", "2,(x3)", ""])
def test_parse_tasks_per_node_rejects(bad):
    with pytest.raises(slurm.HostlistError):
        slurm.parse_tasks_per_node(bad)


BASE_ENV = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
}


def test_tf_config_two_nodes_two_tasks_each():
    # 2 tasks per node: ports in blocks of 2; 20000 // 2 = 10000 blocks;
    # first = 12000 + (1234 % 10000) * 2 = 14468.
    for rank in range(4):
        config = slurm.tf_config_from_slurm({**BASE_ENV, "SLURM_PROCID": str(rank)})
        assert config == {
            "cluster": {
                "worker": [
                    "node01:14468",
                    "node01:14469",
                    "node02:14468",
                    "node02:14469",
                ]
            },
            "task": {"type": "worker", "index": rank},
        }


def test_tf_config_cyclic_distribution():
    env = {**BASE_ENV, "SLURM_PROCID": "1", "SLURM_DISTRIBUTION": "cyclic"}
    config = slurm.tf_config_from_slurm(env)
    assert config["cluster"]["worker"] == [
        "node01:14468",
        "node02:14468",
        "node01:14469",
        "node02:14469",
    ]
    assert config["task"] == {"type": "worker", "index": 1}
    with pytest.raises(ValueError, match="plane"):
        slurm.tf_config_from_slurm({**env, "SLURM_DISTRIBUTION": "plane=2"})


def test_tf_config_uneven_tasks_and_port_base():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "gpu-a[1-2],gpu-b3",
        "SLURM_NTASKS": "5",
        "SLURM_TASKS_PER_NODE": "2(x2),1",
        "SLURM_PROCID": "4",
    }
    # block 2: first = 100 + (7 % (1000 // 2)) * 2 = 114.
    config = slurm.tf_config_from_slurm(env, port_base=100, port_span=1000)
    assert config == {
        "cluster": {
            "worker": [
                "gpu-a1:114",
                "gpu-a1:115",
                "gpu-a2:114",
                "gpu-a2:115",
                "gpu-b3:114",
            ]
        },
        "task": {"type": "worker", "index": 4},
    }


def test_tf_config_prefers_the_step_and_ntasks_per_node():
    # Inside srun the step's variables describe the tasks that exist.
    env = {
        **BASE_ENV,
        "SLURM_JOB_NODELIST": "x[1-4]",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NODELIST": "x[3-4]",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_PROCID": "1",
    }
    config = slurm.tf_config_from_slurm(env)
    # block 1: first = 12000 + 1234 % 20000.
    assert config["cluster"]["worker"] == ["x3:13234", "x4:13234"]
    only_ntasks_per_node = {
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "a,b",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
    }
    assert slurm.tf_config_from_slurm(only_ntasks_per_node)["cluster"] == {
        "worker": ["a:12001", "b:12001"]
    }


def test_tf_config_ports_of_neighbouring_jobs_differ():
    ports = set()
    for job in ("1000", "1001", "1002"):
        env = {**BASE_ENV, "SLURM_JOB_ID": job, "SLURM_PROCID": "0"}
        workers = slurm.tf_config_from_slurm(env)["cluster"]["worker"]
        ports |= {w.split(":")[1] for w in workers}
    assert len(ports) == 6


def test_tf_config_single_task_or_no_slurm_is_none():
    assert slurm.tf_config_from_slurm({}) is None
    one = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "vm", "SLURM_NTASKS": "1"}
    assert slurm.tf_config_from_slurm(one) is None


@pytest.mark.parametrize(
    "change, match",
    [
        ({"SLURM_TASKS_PER_NODE": "3(x2)"}, "add up to 6"),
        ({"SLURM_TASKS_PER_NODE": "2(x3)"}, "do not match the 2 nodes"),
        ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is not in \[0, 4\)"),
        ({"SLURM_JOB_NODELIST": ""}, "no SLURM_STEP_NODELIST"),
    ],
)
def test_tf_config_inconsistent_environment(change, match):
    env = {**BASE_ENV, "SLURM_PROCID": "0", **change}
    with pytest.raises(ValueError, match=match):
        slurm.tf_config_from_slurm(env)


def test_run_chain_task_sets_tf_config_and_chief(monkeypatch):
    seen = []

    def chain(study_dir, job_ids, *, write_status):
        seen.append((os.environ.get("TF_CONFIG"), write_status, job_ids))
        return 3

    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    for key, value in {**BASE_ENV, "SLURM_PROCID": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TF_CONFIG", "stale")
    assert slurm.run_chain_task("/s", ("a", "b"), chain=chain) == 3
    config = json.loads(seen[0][0])
    assert config["task"]["index"] == 2 and seen[0][1:] == (False, ["a", "b"])
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    slurm.run_chain_task("/s", ["a"], chain=chain)
    assert seen[1] == (None, True, ["a"])  # single task: inherited TF_CONFIG gone


# -- resources ----------------------------------------------------------------------


@pytest.fixture
def executor(tmp_path) -> slurm.SlurmExecutor:
    if slurm_cluster.unavailable():
        pytest.skip(slurm_cluster.unavailable())
    return slurm.SlurmExecutor(
        str(tmp_path / "sub"),
        partition=slurm_cluster.PARTITION,
        chain=slurm_cluster.record_chain,
    )


def test_resources_map_to_submitit(tmp_path):
    if slurm_cluster.unavailable():
        pytest.skip(slurm_cluster.unavailable())
    ex = slurm.SlurmExecutor(
        str(tmp_path), partition="cpu", defaults={"cpus_per_task": 2, "mem_gb": 4}
    )
    params = ex.parameters(
        {
            "nodes": 2,
            "tasks_per_node": 4,
            "gpus_per_node": 1.0,
            "timeout_min": 90,
            "mem_gb": 16,
            "partition": "gpu",
            "slurm_qos": "high",
            "slurm_srun_args": ["--cpu-bind=none"],
        }
    )
    assert params == {
        "nodes": 2,
        "tasks_per_node": 4,
        "gpus_per_node": 1,
        "cpus_per_task": 2,
        "timeout_min": 90,
        "mem_gb": 16.0,
        "slurm_partition": "gpu",
        "slurm_qos": "high",
        "slurm_srun_args": ["--cpu-bind=none", "--kill-on-bad-exit=1"],
    }
    assert ex.parameters({})["timeout_min"] == slurm.DEFAULT_TIMEOUT_MIN
    assert ex.parameters({})["slurm_partition"] == "cpu"


@pytest.mark.parametrize(
    "resources, match",
    [
        ({"gpus": 1}, r"unknown resource 'gpus'; allowed: nodes, tasks_per_node"),
        ({"slurm_bogus": 1}, r"unknown resource 'slurm_bogus'.*slurm_<name>.*qos"),
        ({"nodes": 1.5}, "nodes must be an integer"),
        ({"tasks_per_node": 0}, "tasks_per_node must be positive"),
        ({"mem_gb": -1}, "mem_gb must be positive"),
    ],
)
def test_resources_rejected(tmp_path, resources, match):
    if slurm_cluster.unavailable():
        pytest.skip(slurm_cluster.unavailable())
    ex = slurm.SlurmExecutor(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        ex.parameters(resources)
    with pytest.raises(ValueError, match="defaults: unknown resource 'gpus'"):
        slurm.SlurmExecutor(str(tmp_path), defaults={"gpus": 1})


# -- (b), (c) on a real cluster -------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[slurm_cluster.SlurmCluster]:
    yield from slurm_cluster.cluster_fixture()


def tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-2000:]


def wait(ex: slurm.SlurmExecutor, handle, timeout: float = 90) -> int:
    """Polls like the runner until the chain ends; its exit code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = ex.poll(handle)
        if code is not None:
            return code
        time.sleep(0.2)
    ex.stop(handle)
    raise AssertionError(
        f"SLURM job {handle.job_id} still {handle.state} after {timeout}s; logs: "
        + "\n".join(tail(p) for p in handle.log_paths() if os.path.exists(p))
    )


def read_task(study, rank: int) -> dict:
    with open(study / f"task-{rank}.json") as f:
        return json.load(f)


def test_hostlist_parser_agrees_with_scontrol(cluster):
    for hostlist in (
        "node[01-03,07]",
        "gpu-a[1-2],gpu-b3",
        "r[1-2]n[08-09]",
        "a[8-10]",
    ):
        expected = cluster.run("scontrol", "show", "hostnames", hostlist).split()
        assert slurm.expand_hostlist(hostlist) == expected
        assert slurm.scontrol_hostnames(hostlist) == expected


def test_chain_runs_as_a_slurm_job(cluster, executor, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    handle = executor.launch(
        str(study), ["ok", "sleep:0.1"], {"timeout_min": 7, "cpus_per_task": 1}
    )
    assert re.fullmatch(r"\d+", handle.job_id)
    assert wait(executor, handle) == 0
    seen = read_task(study, 0)
    assert seen["job_ids"] == ["ok", "sleep:0.1"]
    assert seen["write_status"] is True and seen["tf_config"] is None
    assert seen["env"]["SLURM_JOB_ID"] == handle.job_id
    assert seen["env"]["SLURM_JOB_PARTITION"] == slurm_cluster.PARTITION
    # The results come before the job's end: SLURM may still say RUNNING.
    deadline = time.monotonic() + 30
    while "JobState=COMPLETED" not in (
        info := cluster.run("scontrol", "show", "job", "-o", handle.job_id)
    ):
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert "TimeLimit=00:07:00" in info and "NumCPUs=1 " in info
    assert executor.poll(handle) == 0  # cached


def test_chain_failures_give_nonzero_exit_codes(cluster, executor, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "x").mkdir()
    returns = executor.launch(str(tmp_path / "r"), ["ok", "return:2"], {})
    raises = executor.launch(str(tmp_path / "x"), ["raise"], {})
    assert wait(executor, returns) == 1
    assert wait(executor, raises) == 1
    assert read_task(tmp_path / "x", 0)["job_ids"] == ["raise"]


def test_stop_cancels_the_job(cluster, executor, tmp_path):
    handle = executor.launch(str(tmp_path), ["sleep:300"], {})
    deadline = time.monotonic() + 60
    while not (tmp_path / "task-0.json").exists():  # running
        assert time.monotonic() < deadline, "the job never started"
        assert executor.poll(handle) is None
        time.sleep(0.2)
    executor.stop(handle)
    assert wait(executor, handle) == slurm.STATE_EXIT_CODES["CANCELLED"]
    assert handle.state == "CANCELLED"


def test_real_worker_runs_in_the_job(cluster, tmp_path):
    # The real worker.run_chain: a job whose dependency never ran ends
    # "blocked" (in the job, without TensorFlow), so the chain returns 1.
    from revisit_tf.study import state

    study = str(tmp_path / "study")
    state.write_job(
        study,
        {
            "id": "c/probe",
            "kind": "probe",
            "cell": "c",
            "deps": ["c/export"],
            "fingerprint": "f",
            "gin_files": [],
            "gin_bindings": [],
        },
    )
    ex = slurm.SlurmExecutor(str(tmp_path / "sub"))
    handle = ex.launch(study, ["c/probe"], {})
    assert wait(ex, handle) == 1
    status = state.read_status(study, "c/probe")
    assert status["state"] == "blocked" and "c/export" in status["error"]


def test_two_tasks_get_two_workers_and_their_index(cluster, executor, tmp_path):
    handle = executor.launch(str(tmp_path), ["ok"], {"tasks_per_node": 2})
    assert wait(executor, handle) == 0
    seen = [read_task(tmp_path, rank) for rank in (0, 1)]
    configs = [json.loads(s["tf_config"]) for s in seen]
    # One node, 2 tasks: ports first, first + 1 with
    # first = 12000 + (job id % 10000) * 2.
    first = 12000 + (int(handle.job_id) % 10000) * 2
    workers = [f"{cluster.hostname}:{first}", f"{cluster.hostname}:{first + 1}"]
    for rank, (s, config) in enumerate(zip(seen, configs, strict=True)):
        assert config == {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": rank},
        }
        assert s["env"]["SLURM_PROCID"] == str(rank)
        assert s["write_status"] is (rank == 0)


def test_two_tasks_all_reduce_with_multi_worker_mirrored(cluster, tmp_path):
    ex = slurm.SlurmExecutor(
        str(tmp_path / "sub"), chain=slurm_cluster.all_reduce_chain
    )
    handle = ex.launch(
        str(tmp_path), ["reduce"], {"tasks_per_node": 2, "timeout_min": 3}
    )
    assert wait(ex, handle, timeout=150) == 0
    for rank in (0, 1):
        with open(tmp_path / f"reduce-{rank}.json") as f:
            out = json.load(f)
        # Replica values 1 and 2, summed across the two processes.
        assert out == {
            "sum": 3.0,
            "replicas": 2,
            "chief": rank == 0,
            "write_status": rank == 0,
        }


def test_slurm_executor_runs_a_2_job_study_end_to_end(cluster, tmp_path):
    # One cell of two jobs, the random-init baseline of a smoke-sized study:
    # export a freshly initialised trunk, then probe it, in one sbatch job
    # through the runner and the real worker (TensorFlow in the job).
    from revisit_tf import configurables
    from revisit_tf.study import executors, runner, state
    from revisit_tf.study import spec as spec_lib

    spec = spec_lib.make_spec(
        "slurm_e2e",
        axes={"pretext": {"rotation": ["demo/fashion_mnist_rotation.gin"]}},
        probes={"linear": []},
        baselines={
            "random_init": {
                "gin": [
                    "demo/fashion_mnist_rotation.gin",
                    "export_model.random_init = True",
                ],
                "over": [],
                "export": True,
            }
        },
        final=["smoke.gin"],
        resources={"export": {"timeout_min": 10}},
    )
    jobs = [
        j
        for j in spec_lib.expand(spec, configurables.gin_search_paths())
        if j.cell == "random_init"
    ]
    assert [j.id for j in jobs] == ["random_init/export", "random_init/probe-linear"]
    study = str(tmp_path / "study")
    ex = executors.make_executor("slurm", study, partition=slurm_cluster.PARTITION)
    summary = runner.run_study(study, spec, jobs, ex, poll_seconds=0.2, echo=None)
    logs = {j.id: state.log_path(study, j.id) for j in jobs}
    assert summary.ok, (summary.failed, [tail(p) for p in logs.values()])
    assert sorted(summary.done) == sorted(logs)
    for job in jobs:
        status = state.read_status(study, job.id)
        assert status["state"] == "done" and status["fingerprint"] == job.fingerprint
        assert status["host"] == cluster.hostname
    cell = state.cell_dir(study, "random_init")
    assert os.path.isdir(os.path.join(cell, "export"))
    with open(os.path.join(cell, "probe", "results.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows and {r["endpoint"] for r in rows} == {"pre_logits"}
    lines = state.read_status(study, "random_init/probe-linear")["results_lines"]
    assert lines == [0, len(rows)]
    assert os.listdir(os.path.join(study, "slurm"))  # submitit's job folders
