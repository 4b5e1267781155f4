"""A real, private, single-node SLURM cluster for the tests (munge included).

``SlurmCluster`` starts ``munged``, ``slurmctld`` and ``slurmd`` from Debian's
``munge`` and ``slurm-wlm`` packages (``tools/setup_slurm.sh`` installs them)
as child processes of the test run, each by pid and in the foreground, with
every file (munge key and socket, ``slurm.conf``, state, spool, logs) in one
temporary directory and on free ports, so that it neither needs nor touches a
system SLURM or munge. Clients (``sbatch``, ``squeue``, ``scancel``, submitit)
find it through ``SLURM_CONF``; ``env()`` gives that, and ``activate()`` sets
it in ``os.environ`` for the process (jobs inherit it through ``sbatch``).

There is no accounting (no ``slurmdbd``), so ``sacct`` fails there, as on
clusters without accounting; ``revisit_tf.study.slurm`` then falls back on
``scontrol show job``.

``running_cluster()`` is a context manager around start/stop;
``cluster_fixture()`` the body of a pytest fixture that skips when the
binaries are missing or the process is not root (``slurmd`` must be root to
start jobs), unless ``REVISIT_TF_REQUIRE_SLURM=1``, which turns the skip into a
failure. Starting takes under a second or two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

PARTITION = "debug"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    """The SLURM / munge binaries that are not installed."""
    return [b for b in BINARIES if _which(b) is None]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class SlurmClusterError(RuntimeError):
    """The cluster did not come up; the message holds the daemons' logs."""


class SlurmCluster:
    """One controller and one compute node (this host) in ``root``.

    Args:
      root: an empty directory for all the cluster's files (a temporary one
        if None; removed at ``stop()`` only then).
      cpus: the node's CPUs (default: ``os.cpu_count()``).
      partition: the one partition's name (default and only).
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        cpus: int | None = None,
        partition: str = PARTITION,
    ) -> None:
        self._own_root = root is None
        self.root = os.path.abspath(root or tempfile.mkdtemp(prefix="slurm-"))
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.partition = partition
        self.conf = os.path.join(self.root, "etc", "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "run", "munge.socket")
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, IO[bytes]] = {}

    # -- files ---------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _write_munge_key(self) -> str:
        # munged checks permissions: the key 0600 and owned by its user, its
        # directories not writable by others, the socket's directory 0755.
        os.makedirs(self._path("munge", "etc"), mode=0o700, exist_ok=True)
        os.makedirs(self._path("munge", "run"), mode=0o755, exist_ok=True)
        os.chmod(self._path("munge", "run"), 0o755)
        os.chmod(self.root, 0o755)
        key = self._path("munge", "etc", "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(1024))
        finally:
            os.close(fd)
        return key

    def slurm_conf_text(self, ctld_port: int, slurmd_port: int) -> str:
        """The generated ``slurm.conf`` (a minimal one-node cluster)."""
        mem = max(256, int(_mem_mb() * 0.9))
        p = self._path
        lines = {
            "ClusterName": "revisit-test",
            "SlurmctldHost": self.hostname,
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": p("state"),
            "SlurmdSpoolDir": p("spool"),
            "SlurmctldPidFile": p("run", "slurmctld.pid"),
            "SlurmdPidFile": p("run", "slurmd.pid"),
            "SlurmctldLogFile": p("log", "slurmctld.log"),
            "SlurmdLogFile": p("log", "slurmd.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/builtin",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "LaunchType": "launch/slurm",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "ReturnToService": 2,
            "SlurmdTimeout": 30,
            "InactiveLimit": 0,
            "KillWait": 5,
            "MinJobAge": 300,
            "PlugStackConfig": p("etc", "plugstack.conf"),
        }
        text = "\n".join(f"{k}={v}" for k, v in lines.items())
        text += (
            f"\nNodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={mem} State=UNKNOWN\n"
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=NO\n"
        )
        return text

    # -- processes -------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment variables clients need (``SLURM_CONF``)."""
        return {"SLURM_CONF": self.conf}

    def activate(self) -> None:
        """Points this process (and the jobs it submits) at the cluster."""
        os.environ.update(self.env())

    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        log = open(self._path("log", f"{name}.out"), "ab")  # noqa: SIM115 (closed at stop)
        self._logs[name] = log
        env = {**os.environ, **self.env()}
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self._procs[name] = proc
        return proc

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        """Runs a SLURM client (``sinfo``, ...) against the cluster; its stdout."""
        proc = subprocess.run(
            list(argv),
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout

    def logs(self) -> str:
        """The tail of every daemon log (for error messages)."""
        out = []
        for name in sorted(os.listdir(self._path("log"))):
            with open(self._path("log", name), errors="replace") as f:
                tail = f.read()[-3000:]
            out.append(f"--- {name}\n{tail}")
        return "\n".join(out)

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmClusterError(
                    f"{name} exited with {proc.returncode} while starting.\n"
                    + self.logs()
                )

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except (SlurmClusterError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"timed out after {timeout:.0f}s waiting for {what}.\n"
                    + self.logs()
                )
            time.sleep(0.2)

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Starts munged, slurmctld and slurmd; returns once the node is idle.

        Raises:
          SlurmClusterError: a daemon exited or the node did not become idle
            within ``timeout`` seconds (the message holds the logs).
        """
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(
                f"missing {missing}; run tools/setup_slurm.sh (Debian's slurm-wlm "
                "and munge)."
            )
        for d in ("etc", "state", "spool", "run", "log"):
            os.makedirs(self._path(d), exist_ok=True)
        key = self._write_munge_key()
        with open(self._path("etc", "plugstack.conf"), "w") as f:
            f.write("# no SPANK plugins\n")
        ctld_port, slurmd_port = free_ports(2)
        with open(self.conf, "w") as f:
            f.write(self.slurm_conf_text(ctld_port, slurmd_port))
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={key}",
                    f"--log-file={self._path('log', 'munged.log')}",
                    f"--pid-file={self._path('munge', 'run', 'munged.pid')}",
                    f"--seed-file={self._path('munge', 'etc', 'munged.seed')}",
                ],
            )
            self._wait("munged's socket", lambda: os.path.exists(self.munge_socket), 15)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            self._wait("slurmctld", lambda: bool(self.run("scontrol", "ping")), timeout)
            self._spawn(
                "slurmd", [_which("slurmd"), "-D", "-N", self.hostname, "-f", self.conf]
            )
            self._wait("the node to be idle", self._node_idle, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        state = self.run("sinfo", "-h", "-N", "-o", "%T", timeout=10).strip()
        return state in ("idle", "mixed", "allocated")

    def job_ids(self) -> list[str]:
        """Ids of the jobs the cluster still has pending or running."""
        out = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
        return out.split()

    def stop(self) -> None:
        """Cancels the jobs left, stops the daemons by pid, removes a temp root."""
        if "slurmd" in self._procs and self._procs["slurmd"].poll() is None:
            try:
                ids = self.job_ids()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + 15
                    while self.job_ids() and time.monotonic() < deadline:
                        time.sleep(0.2)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unavailable() -> str | None:
    """Why a private cluster cannot start here, or None."""
    missing = missing_binaries()
    if missing:
        return f"SLURM binaries {missing} missing; run tools/setup_slurm.sh"
    if os.geteuid() != 0:
        return "a private SLURM cluster needs root (slurmd starts the jobs)"
    return None


@contextlib.contextmanager
def running_cluster(**kwargs: Any) -> Iterator[SlurmCluster]:
    """A started cluster with ``SLURM_CONF`` set in ``os.environ``; both undone
    at exit."""
    old = os.environ.get("SLURM_CONF")
    cluster = SlurmCluster(**kwargs).start()
    cluster.activate()
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def cluster_fixture() -> Iterator[SlurmCluster]:
    """Body of a pytest fixture: skips (or, with ``REVISIT_TF_REQUIRE_SLURM=1``,
    fails) when no cluster can start, else yields a running one."""
    import pytest

    reason = unavailable()
    if reason:
        if os.environ.get("REVISIT_TF_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (REVISIT_TF_REQUIRE_SLURM=1)")
        pytest.skip(reason)
    with running_cluster() as cluster:
        yield cluster


# -- chains the test jobs run (in place of worker.run_chain) -------------------
#
# The tests pickle these by value (cloudpickle.register_pickle_by_value), so a
# job's python needs revisit_tf and submitit but not this file on its path.
# Each job id is an instruction: "ok" (return 0), "return:N", "raise",
# "sleep:S"; every task records what it saw in <study_dir>/task-<rank>.json.


def record_chain(study_dir: str, job_ids: Sequence[str], *, write_status: bool) -> int:
    """Records TF_CONFIG and the task's SLURM identity, then obeys the job ids."""
    import json

    rank = os.environ.get("SLURM_PROCID", "?")
    seen = {
        "job_ids": list(job_ids),
        "write_status": write_status,
        "tf_config": os.environ.get("TF_CONFIG"),
        "env": {k: v for k, v in os.environ.items() if k.startswith("SLURM")},
    }
    with open(os.path.join(study_dir, f"task-{rank}.json"), "w") as f:
        json.dump(seen, f)
    code = 0
    for job in job_ids:
        if job == "raise":
            raise RuntimeError("record_chain was told to raise")
        if job.startswith("return:"):
            code = int(job.split(":")[1])
        if job.startswith("sleep:"):
            time.sleep(float(job.split(":")[1]))
    return code


def all_reduce_chain(
    study_dir: str, job_ids: Sequence[str], *, write_status: bool
) -> int:
    """Joins a MultiWorkerMirroredStrategy and all-reduces (rank + 1) on CPU."""
    import json

    import tensorflow as tf

    from revisit_tf.train import strategy as strategies

    strategy = strategies.make_strategy("multi_worker")

    @tf.function
    def value() -> tf.Tensor:
        ctx = tf.distribute.get_replica_context()
        return tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1.0

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(value), axis=None)
    rank = os.environ["SLURM_PROCID"]
    out = {
        "sum": float(total.numpy()),
        "replicas": strategy.num_replicas_in_sync,
        "chief": strategies.is_chief(strategy),
        "write_status": write_status,
    }
    with open(os.path.join(study_dir, f"reduce-{rank}.json"), "w") as f:
        json.dump(out, f)
    return 0
