"""The study runner: a DAG of jobs -> an executor, resumably.

``run_study(study_dir, spec, jobs, executor)``:

1. takes the study's lock (a second runner on the same directory stops with
   ``StudyLockedError``, naming the holder);
2. compares the jobs with what the directory already holds: a job whose
   ``status.json`` says ``done`` with the same fingerprint and whose outputs
   exist is skipped; a train or export job that ran under a *different*
   fingerprint stops the study with ``StaleJobsError`` (its checkpoints would
   otherwise be resumed under another config) unless ``overwrite_stale``
   moves its cell aside to ``stale/<time>/`` first (nothing is deleted); a
   stale probe is simply rerun (its old rows stay in ``results.jsonl`` and
   the report reads only the lines each current probe job wrote);
3. launches one chain per cell (its pending jobs in order) while the
   executor has free slots, never two chains of one cell at once (probes
   share the cell's feature cache);
4. logs progress (done / running / failed / blocked, ETA) to the console and
   ``study.log`` at every change and every ``progress_seconds``;
5. returns a ``Summary``; failed jobs are listed with their log paths and
   never stop the other cells.

A killed runner leaves ``running`` statuses behind; the next run treats a job
that is not ``done`` as pending, so training resumes from its checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from revisit_tf import files
from revisit_tf.study import executors as executors_lib
from revisit_tf.study import spec as spec_lib
from revisit_tf.study import state


class StudyLockedError(RuntimeError):
    """Another runner holds the study directory."""


class StaleJobsError(RuntimeError):
    """Jobs in the directory ran under a different config than the spec's."""


@dataclasses.dataclass
class Summary:
    """What a run did (``failed``: ``(job id, error, log path)``)."""

    jobs: int
    skipped: int
    done: list[str]
    failed: list[tuple[str, str, str]]
    blocked: list[tuple[str, str]]
    wall_seconds: float
    job_seconds: float
    chain_seconds: float
    runner_cpu_seconds: float
    slots: int

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def overhead_lines(self) -> list[str]:
        """The runner's cost, as fractions of the wall time."""
        if self.wall_seconds <= 0:
            return []
        capacity = self.slots * self.wall_seconds
        return [
            f"wall {self.wall_seconds:.0f} s; inside jobs {self.job_seconds:.0f} s "
            f"over {self.slots} slot(s) = {100 * self.job_seconds / capacity:.1f}% "
            "of the slot time",
            f"worker processes outside jobs (imports, start-up) "
            f"{max(self.chain_seconds - self.job_seconds, 0):.0f} s = "
            f"{100 * max(self.chain_seconds - self.job_seconds, 0) / capacity:.1f}%",
            f"runner's own CPU {self.runner_cpu_seconds:.1f} s = "
            f"{100 * self.runner_cpu_seconds / self.wall_seconds:.2f}% of the wall "
            "time",
        ]


@contextlib.contextmanager
def study_lock(study_dir: str) -> Iterator[None]:
    """Exclusive, non-blocking lock of ``study_dir`` (``files.workdir_lock``)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(files.workdir_lock(study_dir, "revisit-study runner"))
        except files.WorkdirLockedError as e:
            raise StudyLockedError(f"in use by another runner: {e}") from None
        yield


def _is_done(study_dir: str, job: spec_lib.Job) -> bool:
    status = state.read_status(study_dir, job.id)
    return (
        status is not None
        and status.get("state") == "done"
        and status.get("fingerprint") == job.fingerprint
        and state.outputs_exist(study_dir, job.to_json())
    )


def _alive_elsewhere(study_dir: str, job: spec_lib.Job) -> bool:
    """A worker of an earlier (killed) runner is still running this job here.

    The runner's workers run in their own sessions, so a runner killed by
    SIGKILL leaves them running; the next runner waits for them instead of
    starting a second process on the same workdir.
    """
    status = state.read_status(study_dir, job.id)
    if not status or status.get("state") != "running":
        return False
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except (ProcessLookupError, PermissionError):
        return False
    return status.get("fingerprint") == job.fingerprint


def _stale(study_dir: str, jobs: Sequence[spec_lib.Job]) -> list[spec_lib.Job]:
    """Train/export jobs recorded under another fingerprint, or cells with
    checkpoints but a status of another fingerprint."""
    out = []
    for job in jobs:
        if job.kind == "probe":
            continue
        status = state.read_status(study_dir, job.id)
        if status is not None and status.get("fingerprint") != job.fingerprint:
            out.append(job)
    return out


def _move_aside(study_dir: str, cells: Sequence[str], out: Callable[[str], None]):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for cell in cells:
        for kind in ("cells", "jobs"):
            src = os.path.join(study_dir, kind, cell)
            if os.path.exists(src):
                dst = os.path.join(study_dir, "stale", stamp, kind, cell)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
                out(f"moved stale {src} -> {dst}")


def estimate_seconds(
    job: spec_lib.Job,
    spec: spec_lib.Spec,
    measured: Mapping[str, float],
    train_images: Mapping[str, float] | None = None,
) -> float | None:
    """A job's expected seconds: measured mean of its kind, else the spec's.

    Train jobs with ``spec.images_per_second`` and a known number of
    training images use images / throughput (the throughput may be given
    per level, e.g. per width, with ``default``).
    """
    if job.kind in measured:
        return measured[job.kind]
    if job.kind == "train" and spec.images_per_second and train_images:
        images = train_images.get(job.id)
        if images:
            levels = job.cell.split("/")
            ips = next(
                (
                    spec.images_per_second[lv]
                    for lv in levels
                    if lv in spec.images_per_second
                ),
                spec.images_per_second.get("default"),
            )
            if ips:
                return images / ips
    return spec.job_seconds.get(job.kind)


def _measured(study_dir: str, jobs: Sequence[spec_lib.Job]) -> dict[str, float]:
    """Mean recorded seconds of done jobs, by kind."""
    sums: dict[str, list[float]] = {}
    for job in jobs:
        status = state.read_status(study_dir, job.id)
        if status and status.get("state") == "done" and status.get("seconds"):
            sums.setdefault(job.kind, []).append(float(status["seconds"]))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def command_line(study_dir: str, job: spec_lib.Job) -> str:
    """The shell command a job amounts to (printed by ``--dry_run``)."""
    workdir = state.cell_dir(study_dir, job.cell)
    return shlex.join([f"revisit-{job.kind}", *job.argv(workdir)])


def dry_run(
    study_dir: str,
    spec: spec_lib.Spec,
    jobs: Sequence[spec_lib.Job],
    *,
    slots: int,
    train_images: Mapping[str, float] | None = None,
    out: TextIO | None = None,
) -> float | None:
    """Prints every job (state, dependencies, command, estimate) and totals.

    Returns:
      The estimated compute in job-seconds of the jobs still to run, or None
      when some job has no estimate.
    """
    out = out or sys.stdout
    measured = _measured(study_dir, jobs)
    totals: dict[str, list[float | None]] = {}
    per_cell: dict[str, float] = {}
    skipped = 0
    for job in jobs:
        done = _is_done(study_dir, job)
        skipped += done
        est = None if done else estimate_seconds(job, spec, measured, train_images)
        if not done:
            totals.setdefault(job.kind, []).append(est)
            per_cell[job.cell] = per_cell.get(job.cell, 0.0) + (est or 0.0)
        deps = ", ".join(job.deps) or "-"
        print(
            f"{'done ' if done else 'todo '} {job.id}  [after: {deps}]  "
            f"est {_fmt_seconds(est) if not done else '-'}",
            file=out,
        )
        if not done:
            print(f"      {command_line(study_dir, job)}", file=out)
    cells = len({j.cell for j in jobs})
    print(
        f"\n{len(jobs)} jobs in {cells} cells ({skipped} already done); to run:",
        file=out,
    )
    grand: float | None = 0.0
    for kind, ests in totals.items():
        known = [e for e in ests if e is not None]
        total = sum(known) if len(known) == len(ests) else None
        if kind in measured:
            source = "measured here"
        elif kind == "train" and spec.images_per_second and train_images:
            source = "the spec's images_per_second"
        else:
            source = "the spec's job_seconds"
        print(
            f"  {kind:7s} {len(ests):4d} jobs, {_fmt_seconds(total)} of compute "
            f"(from {source})",
            file=out,
        )
        grand = None if total is None or grand is None else grand + total
    if grand is None:
        print("  total: unknown (some jobs have no estimate)", file=out)
    else:
        # A cell's jobs run one after the other: its chain bounds the wall time.
        longest = max(per_cell.values(), default=0.0)
        print(
            f"  total: {grand / 3600:.1f} job-hours; about "
            f"{_fmt_seconds(max(grand / slots, longest))} of wall time with "
            f"{slots} chain(s) at once (longest cell {_fmt_seconds(longest)})",
            file=out,
        )
    return grand


def _tasks(resources: Mapping[str, Any]) -> int:
    return int(resources.get("nodes", 1)) * int(resources.get("tasks_per_node", 1))


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class _Progress:
    def __init__(self, study_dir: str, echo: TextIO | None):
        self.path = os.path.join(study_dir, "study.log")
        self.echo = echo

    def __call__(self, line: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.echo is not None:
            print(line, file=self.echo, flush=True)


def run_study(
    study_dir: str,
    spec: spec_lib.Spec,
    jobs: Sequence[spec_lib.Job],
    executor: executors_lib.Executor,
    *,
    overwrite_stale: bool = False,
    poll_seconds: float = 1.0,
    progress_seconds: float = 60.0,
    echo: TextIO | None = sys.stdout,
    study_record: Mapping[str, Any] | None = None,
) -> Summary:
    """Runs the jobs not done yet; see the module docstring.

    Args:
      study_dir: the study directory (created).
      spec: the parsed spec (for estimates).
      jobs: ``spec.expand(spec)``, in dependency order.
      executor: where chains run.
      overwrite_stale: move cells whose train/export ran under another
        config to ``stale/<time>/`` and rerun them (default: stop).
      poll_seconds, progress_seconds: polling and progress-line periods.
      echo: console stream for progress (None: only ``study.log``).
      study_record: written to ``study.json`` (the expanded spec).

    Raises:
      StudyLockedError: another runner holds the directory.
      StaleJobsError: see above.
    """
    start, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    log = _Progress(study_dir, echo)
    with study_lock(study_dir):
        stale = _stale(study_dir, jobs)
        if stale and not overwrite_stale:
            listing = "\n  ".join(
                f"{j.id} (recorded "
                f"{state.read_status(study_dir, j.id).get('fingerprint')}, "
                f"spec {j.fingerprint})"
                for j in stale[:20]
            )
            raise StaleJobsError(
                f"{len(stale)} job(s) in {study_dir} ran under a different config "
                f"than the spec's:\n  {listing}\nRestore the spec (or the gin files "
                "it names), use another study directory, or pass --overwrite_stale "
                "to move those cells to stale/ and rerun them."
            )
        if stale:
            _move_aside(study_dir, sorted({j.cell for j in stale}), log)
        if study_record is not None:
            state.write_json(os.path.join(study_dir, "study.json"), study_record)
        for job in jobs:
            state.write_job(study_dir, job.to_json())

        by_id = {j.id: j for j in jobs}
        done = {j.id for j in jobs if _is_done(study_dir, j)}
        skipped = len(done)
        finished_now: list[str] = []
        failed: dict[str, tuple[str, str]] = {}
        blocked: dict[str, str] = {}
        running: dict[str, tuple[Any, list[str], float]] = {}  # cell -> chain
        job_seconds = chain_seconds = 0.0
        measured = _measured(study_dir, jobs)
        log(
            f"study {spec.name}: {len(jobs)} jobs in "
            f"{len({j.cell for j in jobs})} cells, {skipped} already done; "
            f"executor {executor.name} with {executor.slots} slot(s)"
        )

        def settled(job_id: str) -> bool:
            return job_id in done or job_id in failed or job_id in blocked

        waiting: set[str] = set()

        def orphans() -> set[str]:
            """Cells a worker of an earlier runner is still busy with."""
            out = set()
            for job in jobs:
                if not settled(job.id) and job.cell not in running:
                    if _alive_elsewhere(study_dir, job):
                        out.add(job.cell)
                    elif job.cell in waiting and _is_done(study_dir, job):
                        done.add(job.id)
            return out

        waiting = orphans()
        if waiting:
            log(
                f"waiting for {len(waiting)} cell(s) still run by an earlier "
                f"runner's workers: {', '.join(sorted(waiting)[:5])}"
            )

        def next_chain() -> list[str] | None:
            for job in jobs:
                if settled(job.id) or job.cell in running or job.cell in waiting:
                    continue
                if any(d in failed or d in blocked for d in job.deps):
                    blocked[job.id] = next(
                        f"dependency {d} {'failed' if d in failed else 'blocked'}"
                        for d in job.deps
                        if d in failed or d in blocked
                    )
                    continue
                if not all(d in done for d in job.deps):
                    continue
                chain = [job.id]
                if _tasks(job.resources) > 1:
                    # Multi-task jobs run alone: every task then finds the
                    # job's dependencies done before it starts.
                    return chain
                for other in jobs:
                    if (
                        other.cell == job.cell
                        and other.id not in chain
                        and not settled(other.id)
                        and _tasks(other.resources) == 1
                        and all(d in done or d in chain for d in other.deps)
                    ):
                        chain.append(other.id)
                return chain
            return None

        def remaining_estimate() -> float | None:
            pending = [j for j in jobs if not settled(j.id)]
            ests = [estimate_seconds(j, spec, measured) for j in pending]
            if any(e is None for e in ests):
                return None
            return sum(ests) / max(executor.slots, 1)

        def progress(event: str = "") -> None:
            n_run = sum(len(c[1]) for c in running.values())
            log(
                f"[{len(done)}/{len(jobs)} done, {len(running)} chain(s) running "
                f"({n_run} jobs), {len(failed)} failed, {len(blocked)} blocked] "
                f"elapsed {_fmt_seconds(time.time() - start)}, "
                f"ETA {_fmt_seconds(remaining_estimate())}"
                + (f" | {event}" if event else "")
            )

        def collect(cell: str, code: int) -> None:
            nonlocal job_seconds, chain_seconds
            handle, chain, launched = running.pop(cell)
            chain_seconds += time.time() - launched
            for job_id in chain:
                status = state.read_status(study_dir, job_id) or {}
                st = status.get("state")
                if status.get("fingerprint") != by_id[job_id].fingerprint:
                    st = None
                if st == "done":
                    done.add(job_id)
                    finished_now.append(job_id)
                    job_seconds += float(status.get("seconds", 0.0))
                    progress(f"done {job_id} ({_fmt_seconds(status.get('seconds'))})")
                elif st == "blocked":
                    blocked[job_id] = status.get("error", "")
                elif st is None and any(d not in done for d in by_id[job_id].deps):
                    # never started: the worker died on a job it depends on
                    blocked[job_id] = next(
                        f"dependency {d} not done"
                        for d in by_id[job_id].deps
                        if d not in done
                    )
                else:
                    error = status.get("error") or (
                        f"the worker exited with code {code} before the job "
                        f"finished (state {st or 'never started'})"
                    )
                    if st != "failed":
                        record = {
                            **status,
                            "state": "failed",
                            "error": error,
                            "fingerprint": by_id[job_id].fingerprint,
                        }
                        record.pop("id", None)
                        state.write_status(study_dir, job_id, **record)
                    log_file = state.log_path(study_dir, job_id)
                    failed[job_id] = (error, log_file)
                    progress(f"FAILED {job_id}: {error} (log: {log_file})")
            measured.update(_measured(study_dir, [by_id[j] for j in finished_now]))

        last_progress = time.time()
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            while True:
                if waiting:
                    waiting = orphans()
                while len(running) < executor.slots:
                    chain = next_chain()
                    if chain is None:
                        break
                    cell = by_id[chain[0]].cell
                    resources = dict(by_id[chain[0]].resources)
                    for job_id in chain:
                        for k, v in by_id[job_id].resources.items():
                            resources.setdefault(k, v)
                    handle = executor.launch(study_dir, chain, resources)
                    running[cell] = (handle, chain, time.time())
                    progress(f"started {', '.join(chain)}")
                if not running and not waiting:
                    break
                for cell, (handle, _, _) in list(running.items()):
                    code = executor.poll(handle)
                    if code is not None:
                        collect(cell, code)
                if time.time() - last_progress > progress_seconds:
                    progress()
                    last_progress = time.time()
                time.sleep(poll_seconds)
        except BaseException:
            for handle, _, _ in list(running.values()):
                executor.stop(handle)
            log("runner stopped; running jobs were interrupted and rerun next time")
            raise
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous_sigterm)
        for job in jobs:  # never reached: blocked by a job failed earlier
            if not settled(job.id):
                blocked[job.id] = "dependencies not done"
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        summary = Summary(
            jobs=len(jobs),
            skipped=skipped,
            done=finished_now,
            failed=[(j, e, p) for j, (e, p) in failed.items()],
            blocked=sorted(blocked.items()),
            wall_seconds=time.time() - start,
            job_seconds=job_seconds,
            chain_seconds=chain_seconds,
            runner_cpu_seconds=(cpu1.ru_utime + cpu1.ru_stime)
            - (cpu0.ru_utime + cpu0.ru_stime),
            slots=executor.slots,
        )
        log(
            f"finished: {len(finished_now)} run, {skipped} skipped, "
            f"{len(failed)} failed, {len(blocked)} blocked"
        )
        for line in summary.overhead_lines():
            log("  " + line)
        for job_id, error, path in summary.failed:
            log(f"  FAILED {job_id}: {error}\n    log: {path}")
        for job_id, why in summary.blocked:
            log(f"  blocked {job_id}: {why}")
        state.write_json(
            os.path.join(study_dir, "last_run.json"),
            json.loads(json.dumps(dataclasses.asdict(summary))),
        )
        return summary


def accounting(study_dir: str, jobs: Sequence[spec_lib.Job]) -> list[str]:
    """What the study cost, from its status files and ``study.log``.

    Lines: job states, seconds inside jobs by kind, the span from the first
    job's start to the last job's end, the number of runner invocations, and
    the last run's overhead (``last_run.json``).
    """
    states: dict[str, int] = {}
    seconds: dict[str, float] = {}
    first, last = None, None
    for job in jobs:
        status = state.read_status(study_dir, job.id) or {}
        st = status.get("state", "not run")
        if status and status.get("fingerprint") != job.fingerprint:
            st = "not run (older config)"
        states[st] = states.get(st, 0) + 1
        if st == "done":
            seconds[job.kind] = seconds.get(job.kind, 0.0) + status.get("seconds", 0)
            first = min(first or status["started"], status["started"])
            last = max(last or status["ended"], status["ended"])
    lines = [
        f"Jobs: {len(jobs)} in {len({j.cell for j in jobs})} cells; "
        + ", ".join(f"{n} {st}" for st, n in sorted(states.items()))
        + "."
    ]
    if seconds:
        total = sum(seconds.values())
        lines.append(
            "Compute inside jobs: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(seconds.items()))
            + f"; total {total:.0f} s ({total / 3600:.2f} job-hours)."
        )
    log_path = os.path.join(study_dir, "study.log")
    runs = 0
    if os.path.exists(log_path):
        with open(log_path) as f:
            runs = sum(" jobs in " in line and " already done" in line for line in f)
    if first is not None:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(first))
        lines.append(
            f"Span: first job started {started}, "
            f"last job ended {time.strftime('%H:%M', time.localtime(last))}: "
            f"{_fmt_seconds(last - first)} of wall time over {runs} runner "
            "invocation(s)."
        )
    summary = state.read_json(os.path.join(study_dir, "last_run.json"))
    if summary:
        wall = summary["wall_seconds"]
        slots = summary["slots"]
        inside = summary["job_seconds"]
        outside = max(summary["chain_seconds"] - inside, 0.0)
        lines.append(
            f"Last runner invocation: {wall:.0f} s wall, {len(summary['done'])} jobs "
            f"run and {summary['skipped']} skipped on {slots} slot(s); inside "
            f"jobs {inside:.0f} s ({100 * inside / (slots * wall):.1f}% of the "
            f"slot time), worker start-up outside jobs {outside:.0f} s "
            f"({100 * outside / (slots * wall):.1f}%), the runner's own CPU "
            f"{summary['runner_cpu_seconds']:.1f} s "
            f"({100 * summary['runner_cpu_seconds'] / wall:.2f}% of the wall)."
        )
    return lines
