"""Executors: where a chain of study jobs runs.

Contract (``Executor``): ``launch(study_dir, job_ids, resources)`` starts one
process (a subprocess, an sbatch job) that runs ``worker.run_chain`` on the
jobs in order and returns a handle; ``poll(handle)`` is None while it runs and
its exit code after; ``stop(handle)`` ends it. ``slots`` chains run at once.
Job states live in the study directory (``state.py``), not in the executor,
so a runner killed and restarted finds them whatever ran the jobs.

* ``LocalExecutor`` (default): subprocesses on this machine, each limited to
  ``threads`` CPU threads, ``slots = cpus // threads``.
* ``slurm.SlurmExecutor``: one sbatch job per chain through submitit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

EXECUTORS = ("local", "slurm")


class Executor(Protocol):
    name: str
    slots: int

    def launch(
        self, study_dir: str, job_ids: Sequence[str], resources: Mapping[str, Any]
    ) -> Any: ...

    def poll(self, handle: Any) -> int | None: ...

    def stop(self, handle: Any) -> None: ...


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps TensorFlow, oneDNN and BLAS at ``threads`` threads."""
    n = str(threads)
    return {
        "TF_NUM_INTRAOP_THREADS": n,
        "TF_NUM_INTEROP_THREADS": n,
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }


class LocalExecutor:
    """Chains as subprocesses of this machine (``python -m ...study.worker``).

    Args:
      slots: chains at once (default ``cpus // threads``, at least 1).
      threads: CPU threads per chain (default 1 when there are at least two
        CPUs: on the 2-core machine two 1-thread jobs finish a study sooner
        than one 2-thread job, since small trunks scale poorly across cores).
    """

    name = "local"

    def __init__(self, slots: int | None = None, threads: int | None = None):
        cpus = len(os.sched_getaffinity(0))
        if threads is None:
            threads = max(1, cpus // (slots or cpus))
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}.")
        self.threads = threads
        self.slots = slots if slots is not None else max(1, cpus // threads)
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1; got {self.slots}.")

    def launch(
        self, study_dir: str, job_ids: Sequence[str], resources: Mapping[str, Any]
    ) -> subprocess.Popen:
        env = {**os.environ, **thread_env(self.threads), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "revisit_tf.study.worker", study_dir, *job_ids]
        # What the worker prints outside its jobs (an import error, a crash
        # between jobs) goes next to the first job's log.
        log_dir = os.path.join(study_dir, "jobs", job_ids[0])
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "worker.log"), "ab") as log:
            # Its own session: a Ctrl-C of the runner reaches the runner only,
            # which then stops its workers (SIGTERM) so they record
            # "interrupted" and training resumes from its checkpoints.
            return subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def poll(self, handle: subprocess.Popen) -> int | None:
        return handle.poll()

    def stop(self, handle: subprocess.Popen) -> None:
        if handle.poll() is None:
            handle.send_signal(signal.SIGTERM)
            try:
                handle.wait(timeout=60)
            except subprocess.TimeoutExpired:
                handle.kill()
                handle.wait()


def make_executor(name: str, study_dir: str, **kwargs: Any) -> Executor:
    """``local`` or ``slurm`` (kwargs go to the executor's constructor)."""
    if name == "local":
        return LocalExecutor(**kwargs)
    if name == "slurm":
        from revisit_tf.study import slurm  # submitit: only when asked for

        return slurm.SlurmExecutor(os.path.join(study_dir, "slurm"), **kwargs)
    raise ValueError(f"executor must be one of {EXECUTORS}; got {name!r}.")
