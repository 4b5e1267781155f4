"""The SLURM executor: one sbatch job per chain of study jobs, via submitit.

``SlurmExecutor.launch`` submits ``run_chain_task(study_dir, job_ids)`` with
``submitit.AutoExecutor(cluster="slurm")``; submitit's sbatch script starts it
with ``srun`` in every task of the job. Each task computes its ``TF_CONFIG``
from the SLURM environment (``tf_config_from_slurm``; several tasks form one
``MultiWorkerMirroredStrategy``, strategy ``multi_worker``) and runs
``worker.run_chain``; task 0 (the chief) alone writes the jobs' status files.

Resources (per launch; the executor's ``defaults`` and ``partition`` first):

    nodes, tasks_per_node, gpus_per_node, cpus_per_task  ints
    mem_gb                                               number (GB per node)
    timeout_min                                          int (default 24 h)
    partition                                            str
    slurm_<name>                                         any of submitit's
        SlurmExecutor parameters, passed as is (``slurm_account``,
        ``slurm_qos``, ``slurm_constraint``, ``slurm_setup``,
        ``slurm_additional_parameters``, ``slurm_srun_args``, ...)

``poll`` reads the tasks' result files first (each task's return value, or
its exception), then SLURM's state: ``sacct`` through submitit when the
cluster has accounting, else ``scontrol show job`` (clusters without
``slurmdbd``, such as the tests' private cluster). Exit codes: 0 when every
task returned 0; 1 when the chain left a job not ``done`` or a task raised;
for jobs SLURM ended, ``STATE_EXIT_CODES``.

Signals: SLURM sends submitit's USR2 90 s before the time limit (and on
preemption); ``run_chain_task`` turns it into a SIGTERM to itself, so the
worker records the running job as ``interrupted`` (training checkpoints on
SIGTERM) and the runner reruns it, instead of submitit's requeue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

GENERIC_KEYS = (
    "nodes",
    "tasks_per_node",
    "gpus_per_node",
    "cpus_per_task",
    "mem_gb",
    "timeout_min",
    "partition",
)
_INT_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "timeout_min")
DEFAULT_TIMEOUT_MIN = 24 * 60

# SLURM job states that are not final (sacct / scontrol spelling).
RUNNING_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "RESV_DEL_HOLD",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "READY",
    }
)
# Exit codes ``poll`` returns for jobs SLURM ended without the tasks' results
# (a final state not listed here: 1).
STATE_EXIT_CODES = {
    "FAILED": 1,
    "TIMEOUT": 124,  # as coreutils' timeout
    "OUT_OF_MEMORY": 137,  # 128 + SIGKILL, as the OOM killer
    "CANCELLED": 143,  # 128 + SIGTERM
    "PREEMPTED": 143,
    "DEADLINE": 124,
    "NODE_FAIL": 2,
    "BOOT_FAIL": 2,
    "LOST": 3,  # neither scontrol nor sacct knows the job (any more)
}
# A final state seen before the result files appeared: how long to wait for
# them (shared file systems show new files late) before deciding without.
RESULT_GRACE_S = 30.0

_log = logging.getLogger(__name__)


class HostlistError(ValueError):
    """A SLURM hostlist or tasks-per-node string that cannot be parsed."""


# -- the SLURM environment -------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested '[' in hostlist {text!r}.")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in hostlist {text!r}.")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unbalanced '[' in hostlist {text!r}.")
    parts.append(text[start:])
    return parts


def _expand_range(body: str, text: str) -> list[str]:
    """``01-03,7`` -> ``['01', '02', '03', '7']`` (zero padding kept)."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise HostlistError(f"bad range {item!r} in hostlist {text!r}.")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostlistError(f"descending range {item!r} in hostlist {text!r}.")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands a SLURM hostlist, as ``scontrol show hostnames`` does.

    ``node[01-03,07]`` -> ``node01 node02 node03 node07``; ``gpu-a[1-2],gpu-b3``
    -> ``gpu-a1 gpu-a2 gpu-b3``; several bracket groups in one name expand as
    their product (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``).

    Raises:
      HostlistError: unbalanced or nested brackets, or a bad range.
    """
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        part = part.strip()
        if not part:
            continue
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if body:
                names = [
                    n + literal + s for n in names for s in _expand_range(body, part)
                ]
            else:
                names = [n + literal for n in names]
        hosts.extend(names)
    return hosts


def scontrol_hostnames(hostlist: str) -> list[str]:
    """The hostlist expanded by ``scontrol show hostnames`` (needs SLURM)."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()


def parse_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` -> one count per node: ``2(x3),1`` -> [2, 2, 2, 1].

    Raises:
      HostlistError: a malformed string.
    """
    counts = []
    for item in text.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise HostlistError(f"bad tasks-per-node item {item!r} in {text!r}.")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            return value
    return None


def _rank_slots(counts: Sequence[int], distribution: str) -> list[tuple[int, int]]:
    """(node index, local index) of every rank, for block or cyclic layouts."""
    slots: list[tuple[int, int]] = []
    if distribution == "block":
        for node, n in enumerate(counts):
            slots += [(node, j) for j in range(n)]
        return slots
    placed = [0] * len(counts)
    while len(slots) < sum(counts):
        for node, n in enumerate(counts):
            if placed[node] < n:
                slots.append((node, placed[node]))
                placed[node] += 1
    return slots


def tf_config_from_slurm(
    environ: Mapping[str, str],
    *,
    port_base: int = 12000,
    port_span: int = 20000,
    expand: Callable[[str], list[str]] = expand_hostlist,
) -> dict[str, Any] | None:
    """The ``TF_CONFIG`` of this SLURM task, or None for a single-task job.

    The workers are the job step's tasks in rank order (``SLURM_PROCID``):
    the nodes of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``), each
    with its count from ``SLURM_STEP_TASKS_PER_NODE`` (else
    ``SLURM_TASKS_PER_NODE``, else ``SLURM_NTASKS_PER_NODE`` on every node),
    ranks laid out by SLURM's default ``block`` distribution (or ``cyclic``
    when ``SLURM_DISTRIBUTION`` says so). The tasks of one node get ports
    ``first, first + 1, ...``, where ``first`` is derived from
    ``SLURM_JOB_ID`` so that jobs sharing a node are unlikely to collide:
    ``port_base + (job_id % (port_span // k)) * k`` for ``k`` tasks per node
    (the default range 12000-31999 stays below Linux's ephemeral ports).

    Args:
      environ: the task's environment (``os.environ``).
      port_base, port_span: the port range used.
      expand: hostlist expansion (``expand_hostlist``, or
        ``scontrol_hostnames``).

    Returns:
      ``{"cluster": {"worker": ["host:port", ...]}, "task": {"type":
      "worker", "index": rank}}``, or None when the step has one task (or
      this is not a SLURM task).

    Raises:
      HostlistError: unparsable node list or task counts.
      ValueError: inconsistent variables (counts that do not add up to
        ``SLURM_NTASKS``, a rank out of range, a missing node list), or a
        ``plane``/``arbitrary`` distribution.
    """
    ntasks_text = _first(
        environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"
    )
    if ntasks_text is None or int(ntasks_text) <= 1:
        return None
    ntasks = int(ntasks_text)
    nodelist = _first(
        environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"
    )
    if nodelist is None:
        raise ValueError(
            f"SLURM_NTASKS={ntasks} but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST."
        )
    hosts = expand(nodelist)
    per_node = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node is not None:
        counts = parse_tasks_per_node(per_node)
    elif _first(environ, "SLURM_NTASKS_PER_NODE") is not None:
        counts = [int(environ["SLURM_NTASKS_PER_NODE"])] * len(hosts)
    elif ntasks % len(hosts) == 0:
        counts = [ntasks // len(hosts)] * len(hosts)
    else:
        raise ValueError(
            f"{ntasks} tasks on {len(hosts)} nodes and no SLURM_TASKS_PER_NODE."
        )
    if len(counts) != len(hosts):
        raise ValueError(
            f"tasks per node {counts} do not match the {len(hosts)} nodes {hosts}."
        )
    if sum(counts) != ntasks:
        raise ValueError(
            f"tasks per node {counts} add up to {sum(counts)}, not SLURM_NTASKS="
            f"{ntasks}."
        )
    rank = int(_first(environ, "SLURM_PROCID") or 0)
    if not 0 <= rank < ntasks:
        raise ValueError(f"SLURM_PROCID={rank} is not in [0, {ntasks}).")
    distribution = (environ.get("SLURM_DISTRIBUTION") or "block").split(":")[0]
    distribution = distribution.split(",")[0].strip().lower() or "block"
    if distribution not in ("block", "cyclic"):
        raise ValueError(
            f"SLURM_DISTRIBUTION={environ['SLURM_DISTRIBUTION']!r}: only block "
            "(the default) and cyclic layouts give a known rank -> node map."
        )
    block = max(counts)
    if block > port_span:
        raise ValueError(f"{block} tasks on a node exceed port_span={port_span}.")
    job_id = environ.get("SLURM_JOB_ID", "0")
    job_number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    first = port_base + (job_number % (port_span // block)) * block
    workers = [
        f"{hosts[node]}:{first + local}"
        for node, local in _rank_slots(counts, distribution)
    ]
    return {
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": rank},
    }


# -- what every task runs ----------------------------------------------------------


def _usr_signal() -> signal.Signals:
    from submitit.slurm.slurm import SlurmJobEnvironment

    return getattr(signal, "SIG" + SlurmJobEnvironment.USR_SIG)


def _sigterm_self(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def run_chain_task(
    study_dir: str,
    job_ids: Sequence[str],
    *,
    chain: Callable[..., int] | None = None,
) -> int:
    """Runs in every task of the sbatch job: TF_CONFIG, then the chain.

    Sets ``TF_CONFIG`` from the SLURM environment when the job has several
    tasks (and removes an inherited one when it has one), turns submitit's
    timeout/preemption signal into SIGTERM (the worker marks the running job
    ``interrupted``), then calls ``chain(study_dir, job_ids,
    write_status=<rank 0>)``.

    Args:
      study_dir: the study directory (on a file system the nodes share).
      job_ids: the chain's job ids, in order.
      chain: ``worker.run_chain`` unless given (tests, custom workers).

    Returns:
      The chain's return value: the number of jobs not ``done``.
    """
    environ = os.environ
    try:
        config = tf_config_from_slurm(environ)
    except HostlistError:
        config = tf_config_from_slurm(environ, expand=scontrol_hostnames)
    if config is None:
        if environ.pop("TF_CONFIG", None) is not None:
            _log.info("single-task job: removed the inherited TF_CONFIG")
        rank = 0
    else:
        environ["TF_CONFIG"] = json.dumps(config)
        rank = config["task"]["index"]
    signal.signal(_usr_signal(), _sigterm_self)
    if chain is None:
        from revisit_tf.study import worker  # TensorFlow: in the job only

        chain = worker.run_chain
    return chain(study_dir, list(job_ids), write_status=rank == 0)


# -- the executor --------------------------------------------------------------------


@dataclasses.dataclass
class SlurmHandle:
    """One submitted chain: the submitit job and what ``poll`` has seen."""

    job: Any  # submitit.Job
    study_dir: str
    job_ids: tuple[str, ...]
    submitted: float
    state: str = "PENDING"
    exit_code: int | None = None
    final_seen: float | None = None
    next_check: float = 0.0

    @property
    def job_id(self) -> str:
        """The SLURM job id."""
        return str(self.job.job_id)

    def log_paths(self) -> list[str]:
        """submitit's stdout and stderr files, task by task."""
        tasks = [self.job.task(t) for t in range(self.job.num_tasks)]
        return [str(p) for t in tasks for p in (t.paths.stdout, t.paths.stderr)]


def _check_resources(resources: Mapping[str, Any], where: str) -> dict[str, Any]:
    from submitit import SlurmExecutor as _Slurm

    slurm_keys = sorted(_Slurm._valid_parameters())
    out: dict[str, Any] = {}
    for key, value in resources.items():
        if key in _INT_KEYS:
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"{where}: {key} must be an integer; got {value!r}.")
            value = int(value)
            if value < (0 if key == "gpus_per_node" else 1):
                raise ValueError(f"{where}: {key} must be positive; got {value!r}.")
        elif key == "mem_gb":
            value = float(value)
            if value <= 0:
                raise ValueError(f"{where}: mem_gb must be positive; got {value!r}.")
        elif key == "partition":
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: partition must be a name; got {value!r}.")
        elif not (key.startswith("slurm_") and key[len("slurm_") :] in slurm_keys):
            raise ValueError(
                f"{where}: unknown resource {key!r}; allowed: "
                f"{', '.join(GENERIC_KEYS)}, and slurm_<name> for <name> in "
                f"{', '.join(slurm_keys)}."
            )
        out[key] = value
    return out


class SlurmExecutor:
    """Runs each chain as one sbatch job (submitit), ``slots`` at once.

    Args:
      folder: submitit's folder (scripts, pickles, logs: ``folder/<job id>``),
        on a file system the nodes share.
      slots: chains in the queue at once.
      partition: the default partition (a launch's ``partition`` wins).
      defaults: resources every launch starts from (see the module doc).
      chain: what each task runs instead of ``worker.run_chain`` (a
        module-level function ``chain(study_dir, job_ids, *, write_status)
        -> int``; tests and custom workers).
      python: the interpreter the jobs run (default: this one).

    Raises:
      ValueError: an unknown or malformed key in ``defaults``.
      RuntimeError: no ``srun`` on the PATH (not a SLURM machine).
    """

    name = "slurm"

    def __init__(
        self,
        folder: str,
        *,
        slots: int = 100,
        partition: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        chain: Callable[..., int] | None = None,
        python: str | None = None,
    ) -> None:
        import shutil

        if slots < 1:
            raise ValueError(f"slots must be >= 1; got {slots}.")
        if shutil.which("srun") is None:
            raise RuntimeError(
                "the slurm executor needs SLURM's srun/sbatch on the PATH; this "
                "machine has none (use the local executor)."
            )
        self.folder = os.path.abspath(folder)
        self.slots = slots
        self.defaults = _check_resources(
            {"timeout_min": DEFAULT_TIMEOUT_MIN, **(defaults or {})}, "defaults"
        )
        if partition is not None:
            self.defaults["partition"] = partition
        self.chain = chain
        self.python = python
        self._sacct: bool | None = None  # unknown until first asked

    def parameters(self, resources: Mapping[str, Any]) -> dict[str, Any]:
        """submitit ``AutoExecutor.update_parameters`` keywords for ``resources``.

        Raises:
          ValueError: an unknown resource key (naming the allowed ones) or a
            malformed value.
        """
        merged = {**self.defaults, **_check_resources(resources, "resources")}
        params: dict[str, Any] = {}
        for key, value in merged.items():
            params["slurm_partition" if key == "partition" else key] = value
        srun_args = list(params.get("slurm_srun_args") or [])
        if not any(a.startswith("--kill-on-bad-exit") for a in srun_args):
            # One task failing ends the others (a multi-worker job whose chief
            # died would otherwise wait in its collectives until the limit).
            params["slurm_srun_args"] = [*srun_args, "--kill-on-bad-exit=1"]
        return params

    def launch(
        self, study_dir: str, job_ids: Sequence[str], resources: Mapping[str, Any]
    ) -> SlurmHandle:
        """Submits one sbatch job running the chain ``job_ids``; its handle.

        Raises:
          ValueError: bad resources.
          submitit.core.utils.FailedJobError: sbatch refused the job.
        """
        import submitit

        if not job_ids:
            raise ValueError("launch needs at least one job id.")
        params = self.parameters(resources)
        kwargs = {} if self.python is None else {"slurm_python": self.python}
        executor = submitit.AutoExecutor(
            folder=os.path.join(self.folder, "%j"), cluster="slurm", **kwargs
        )
        executor.update_parameters(name=f"revisit:{job_ids[0]}", **params)
        study_dir = os.path.abspath(study_dir)
        extra = {} if self.chain is None else {"chain": self.chain}
        job = executor.submit(run_chain_task, study_dir, list(job_ids), **extra)
        _log.info("submitted %s as SLURM job %s", job_ids[0], job.job_id)
        return SlurmHandle(job, study_dir, tuple(job_ids), time.time())

    # -- poll ------------------------------------------------------------------

    def _results(self, handle: SlurmHandle) -> list[tuple[str, Any] | None]:
        """Every task's (outcome, value); None for a task without one (yet)."""
        from submitit.core import utils

        out: list[tuple[str, Any] | None] = []
        for t in range(handle.job.num_tasks):
            path = handle.job.task(t).paths.result_pickle
            try:
                out.append(utils.pickle_load(path) if path.exists() else None)
            except EOFError:  # being written
                out.append(None)
        return out

    def _sacct_works(self) -> bool:
        if self._sacct is None:
            try:
                proc = subprocess.run(
                    ["sacct", "-n", "-X", "-j", "1", "-o", "JobID"],
                    capture_output=True,
                    timeout=30,
                )
                self._sacct = proc.returncode == 0
            except (OSError, subprocess.SubprocessError):
                self._sacct = False
        return self._sacct

    def slurm_state(self, handle: SlurmHandle) -> str:
        """The job's SLURM state (``RUNNING``, ``COMPLETED``, ...; ``LOST`` when
        neither sacct nor scontrol knows it, ``UNKNOWN`` when it cannot tell)."""
        state = "UNKNOWN"
        if self._sacct_works():
            state = handle.job.state.split()[0].upper()
        if state == "UNKNOWN":
            try:
                proc = subprocess.run(
                    ["scontrol", "show", "job", "-o", handle.job_id],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            except (OSError, subprocess.SubprocessError) as e:
                _log.warning("scontrol show job %s: %s", handle.job_id, e)
                return "UNKNOWN"  # a busy controller: ask again next poll
            m = re.search(r"\bJobState=(\S+)", proc.stdout)
            if m:
                state = m.group(1).upper()
            elif (
                "Invalid job id" in proc.stderr and time.time() - handle.submitted > 10
            ):
                state = "LOST"
        return state

    def poll(self, handle: SlurmHandle) -> int | None:
        """None while the job is queued or runs, else its exit code (module doc)."""
        if handle.exit_code is not None:
            return handle.exit_code
        results = self._results(handle)
        if all(r is not None for r in results):
            ok = all(r == ("success", 0) for r in results)
            handle.exit_code = 0 if ok else 1
            if not ok:
                self._log_failure(handle, results)
            return handle.exit_code
        now = time.time()
        if now < handle.next_check:
            return None
        age = now - handle.submitted
        handle.next_check = now + min(30.0, max(1.0, age / 4))
        handle.state = self.slurm_state(handle)
        if handle.state in RUNNING_STATES or handle.state == "UNKNOWN":
            return None
        # A final state but not every task's result yet: give them a moment
        # unless SLURM says the job was killed or a task already failed.
        failed = any(r is not None and r != ("success", 0) for r in results)
        if failed:
            self._log_failure(handle, results)
            handle.exit_code = 1
            return 1
        if handle.state in ("COMPLETED", "FAILED", "LOST"):
            if handle.final_seen is None:
                handle.final_seen = now
            if now - handle.final_seen < RESULT_GRACE_S:
                handle.next_check = now + 1.0
                return None
        handle.exit_code = STATE_EXIT_CODES.get(handle.state, 1)
        _log.warning(
            "SLURM job %s (%s) ended %s without results; logs: %s",
            handle.job_id,
            handle.job_ids[0],
            handle.state,
            ", ".join(handle.log_paths()),
        )
        return handle.exit_code

    def _log_failure(
        self, handle: SlurmHandle, results: list[tuple[str, Any] | None]
    ) -> None:
        for task, result in enumerate(results):
            if result is None:
                continue
            outcome, value = result
            if outcome != "success":
                _log.warning(
                    "SLURM job %s task %d raised:\n%s", handle.job_id, task, value
                )
            elif value != 0:
                _log.info(
                    "SLURM job %s task %d: %s job(s) not done",
                    handle.job_id,
                    task,
                    value,
                )

    def stop(self, handle: SlurmHandle) -> None:
        """Cancels the job (scancel: SIGTERM, then SIGKILL after KillWait)."""
        if handle.exit_code is None:
            handle.job.cancel(check=False)
            handle.next_check = 0.0  # the next poll asks SLURM at once
