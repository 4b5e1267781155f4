"""Runs a chain of study jobs in one process: ``python -m revisit_tf.study.worker``.

An executor starts one worker per chain (a cell's train -> export -> probes,
or part of it), so TensorFlow is imported once per chain instead of once per
job. Each job runs its binary's main (``cli.train_main`` etc.) in-process
with stdout and stderr redirected to ``jobs/<id>/job.log``, and records its
state in ``jobs/<id>/status.json`` (``state.py``): ``running`` (with pid and
host) when it starts, then ``done``, ``failed`` (with the error and the log
path), ``blocked`` (a dependency is not done) or ``interrupted`` (SIGTERM or
SIGINT: the runner reruns it, and training resumes from its checkpoints).
A job that fails does not stop the chain's other jobs unless they depend on
it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence

from revisit_tf.study import state


class Interrupted(BaseException):
    """SIGTERM/SIGINT while a job runs (not an error of the job)."""


def _preempted_error() -> type[Exception]:
    from revisit_tf.train.loop import PreemptedError  # TensorFlow: lazily

    return PreemptedError


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _redirect_output(path: str) -> Iterator[None]:
    """Points file descriptors 1 and 2 (and sys.stdout/err) at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _count_lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _run_main(kind: str, argv: Sequence[str]) -> None:
    from revisit_tf import cli  # TensorFlow: imported once per worker

    mains = {
        "train": cli.train_main,
        "export": cli.export_main,
        "probe": cli.probe_main,
    }
    mains[kind](list(argv))


def _clear_session() -> None:
    import keras

    keras.backend.clear_session()


def run_job(study_dir: str, job_id: str, *, write_status: bool = True) -> str:
    """Runs one job whose ``job.json`` the runner wrote; returns its final state."""
    job = state.read_job(study_dir, job_id)
    log = state.log_path(study_dir, job_id)
    record = write_status and (lambda **kw: state.write_status(study_dir, job_id, **kw))
    for dep in job["deps"]:
        dep_status = state.read_status(study_dir, dep)
        if dep_status is None or dep_status.get("state") != "done":
            if record:
                record(
                    state="blocked",
                    fingerprint=job["fingerprint"],
                    error=f"dependency {dep} is "
                    f"{'not run' if dep_status is None else dep_status.get('state')}",
                )
            return "blocked"
    workdir = state.cell_dir(study_dir, job["cell"])
    os.makedirs(workdir, exist_ok=True)
    results = os.path.join(workdir, "probe", "results.jsonl")
    lines_before = _count_lines(results) if job["kind"] == "probe" else None
    started = time.time()
    common = dict(
        fingerprint=job["fingerprint"],
        pid=os.getpid(),
        host=socket.gethostname(),
        started=started,
        log=log,
    )
    argv = [f"--workdir={workdir}"]
    argv += [f"--gin_file={f}" for f in job["gin_files"]]
    argv += [f"--gin_bindings={b}" for b in job["gin_bindings"]]
    final: dict = {}
    try:
        if record:
            record(state="running", **common)
        try:
            with _redirect_output(log):
                print(f"== {time.strftime('%H:%M:%S')} job {job_id} ({job['kind']})")
                print("== revisit-" + job["kind"], " ".join(repr(a) for a in argv))
                try:
                    _run_main(job["kind"], argv)
                except Interrupted:
                    raise
                except _preempted_error() as e:  # the loop's own SIGTERM handler
                    raise Interrupted(str(e)) from e
                except BaseException as e:  # SystemExit from argparse included
                    traceback.print_exc()
                    error = f"{type(e).__name__}: {e}"[:2000]
                    final = {"state": "failed", "error": error}
                else:
                    final = {"state": "done"}
                print(f"== {time.strftime('%H:%M:%S')} {final['state']}")
        finally:
            _clear_session()
    except Interrupted as e:
        # A signal after the job ended (in the session cleanup, say) keeps
        # the job's own outcome; one during it records "interrupted". Either
        # way the status is written before the chain stops, never "running".
        if not final:
            final = {"state": "interrupted", "error": f"interrupted by {e}"}
        _finish(record, common, final, results, lines_before)
        raise
    _finish(record, common, final, results, lines_before)
    return final["state"]


def _finish(record, common: dict, final: dict, results: str, lines_before) -> None:
    """Writes the job's final status with SIGTERM/SIGINT held until it is on
    disk (a handler raising in the middle would leave ``running`` behind)."""
    if not record:
        return
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        if lines_before is not None and final["state"] == "done":
            final["results_lines"] = [lines_before, _count_lines(results)]
        ended = time.time()
        record(**common, **final, ended=ended, seconds=ended - common["started"])
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def run_chain(
    study_dir: str, job_ids: Sequence[str], *, write_status: bool = True
) -> int:
    """Runs ``job_ids`` in order; returns how many did not end ``done``.

    ``write_status=False`` is for the non-chief tasks of a multi-worker job:
    they run the same binaries (TF_CONFIG tells them their role) but the
    chief alone records the job's state.
    """
    previous = {
        s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        # TensorFlow's import (seconds) is the worker's cost, not the job's.
        from revisit_tf import cli  # noqa: F401

        states = [run_job(study_dir, j, write_status=write_status) for j in job_ids]
    except Interrupted:
        return len(job_ids)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return sum(s != "done" for s in states)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m revisit_tf.study.worker STUDY_DIR JOB_ID...")
        return 2
    failed = run_chain(argv[0], argv[1:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
