"""The ``revisit-*`` console scripts: flags -> gin -> one ``experiments`` root.

Each main takes ``--workdir``, ``--gin_file`` (repeatable) and
``--gin_bindings`` (repeatable) and passes only ``workdir`` to its root: every
other argument comes from gin (style guide 4.2). Gin files are looked up in the
shipped ``gin/`` directory, so ``--gin_file=demo/fashion_mnist_rotation.gin``
works from any working directory.

``revisit-train`` records the parsed config in ``workdir/config.gin`` and
gin's operative config in ``workdir/operative_config.gin`` once the first loop
has run (the config is then known to work). ``revisit-export`` and
``revisit-probe`` re-read ``workdir/config.gin`` when no ``--gin_file`` is
given, so the usual sequence needs the config only once.

Nothing lost (issue 12):

* one writer per workdir: train, export and probe hold ``workdir/.lock``
  (``files.workdir_lock``); a second process stops with exit code 75 naming
  the holder (pid, host, command);
* a config that differs from the one a trained workdir recorded is refused
  (the message shows the changed lines) unless ``--force``, which keeps the
  old one as ``config.gin.<time>``;
* gin runs the ``import`` lines of a config and follows its ``include``
  lines: both are logged, and an include resolved from the working directory
  rather than the shipped ``gin/`` or a given file is warned about. Treat a
  workdir's ``config.gin`` like code: do not export or probe a workdir you do
  not trust.

Exit codes (``EXIT_CODES``): 0 done; 1 failed, with a named error on stderr
and in the log; 2 bad command line; 75 (EX_TEMPFAIL) not finished, rerun
later: preempted after saving a checkpoint, or the workdir is locked by
another live process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels on every x86 CPU: TensorFlow turns them on by default only on
# some Intel CPUs. On an AMD EPYC they made the demo's training step 1.95x
# faster (310 vs 159 examples/s), and without them CPU convolutions cannot run
# channels_first trunks at all. TF_ENABLE_ONEDNN_OPTS=0 turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import gin  # noqa: E402
from revisit_tf import (
    configurables,  # noqa: E402
    experiments,  # noqa: E402
    faults,  # noqa: E402
    files,  # noqa: E402
)
from revisit_tf.study import collect as study_collect  # noqa: E402
from revisit_tf.study import executors as study_executors  # noqa: E402
from revisit_tf.study import runner as study_runner  # noqa: E402
from revisit_tf.study import spec as study_spec  # noqa: E402
from revisit_tf.train import checkpoint as checkpoint_lib  # noqa: E402
from revisit_tf.train import loop as loop_lib  # noqa: E402
from revisit_tf.train import summaries  # noqa: E402

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.gin"
OPERATIVE_CONFIG_NAME = "operative_config.gin"

EXPORT_FORMATS = ("saved_model", "keras")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RERUN = 0, 1, 2, 75
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_FAILED: "failed: a named error (stderr and the workdir's log)",
    EXIT_USAGE: "bad command line (argparse)",
    EXIT_RERUN: "not finished, rerun later: preempted after saving a checkpoint, "
    "or the workdir is locked by another live process",
}


class ConfigChangedError(ValueError):
    """The config differs from the one a trained workdir recorded."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Libraries whose INFO lines drown the run's own (a "Sharding callback
# duration" line per checkpoint, TFDS' dataset-info lines): WARNING and up,
# unless --log_level DEBUG.
CHATTY_LOGGERS = ("tensorflow", "absl", "tensorflow_datasets", "h5py", "matplotlib")
# A remote workdir's log is written locally and copied there this often.
REMOTE_LOG_UPLOAD_SECONDS = 30.0


def _parser(description: str, *, force: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--workdir",
        required=True,
        help="Output directory: a local path or any tf.io.gfile URL (gs://, ram://).",
    )
    parser.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="Gin file (repeatable): a path, or a name under the shipped gin/ "
        "directory such as demo/fashion_mnist_rotation.gin. Later files override "
        "earlier ones; include smoke.gin last to shrink a run.",
    )
    parser.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        help='Gin binding (repeatable), e.g. "pretrain.steps = 100".',
    )
    parser.add_argument(
        "--log_level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="Level of revisit_tf's own lines (default INFO). TensorFlow, TFDS "
        "and absl log WARNING and up, or everything with DEBUG.",
    )
    if force:
        parser.add_argument(
            "--force",
            action="store_true",
            help="Accept a config that differs from the one this trained "
            "workdir recorded (the old one is kept as config.gin.<time>).",
        )
    return parser


def _drop_gin_path_probes(record: logging.LogRecord) -> bool:
    """Gin logs every search-path probe (and misses as errors) on the root logger."""
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


class _RemoteLogHandler(logging.FileHandler):
    """Logs to a local file and copies it to a remote workdir's log.

    Object stores have no append: the whole local file is copied to
    ``remote`` at most every ``REMOTE_LOG_UPLOAD_SECONDS``, on every error,
    and on close (the end of ``run``).
    """

    def __init__(self, remote: str):
        fd, local = tempfile.mkstemp(prefix="revisit_tf-", suffix=".log")
        os.close(fd)
        super().__init__(local)
        self.remote = remote
        self._uploaded = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        now = time.monotonic()
        if record.levelno >= logging.ERROR or (
            now - self._uploaded >= REMOTE_LOG_UPLOAD_SECONDS
        ):
            self._upload(now)

    def _upload(self, now: float) -> None:
        import tensorflow as tf  # already imported by experiments

        self.flush()
        try:
            tf.io.gfile.copy(self.baseFilename, self.remote, overwrite=True)
        except (OSError, tf.errors.OpError) as e:
            sys.stderr.write(f"could not copy the log to {self.remote}: {e}\n")
        self._uploaded = now

    def close(self) -> None:
        if self.stream is not None:
            self._upload(time.monotonic())
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.baseFilename)


def _setup_logging(workdir: str, name: str, level: str = "INFO") -> None:
    """Logs to stdout and ``workdir/<name>.log`` (appended; gfile URLs too)."""
    import tensorflow as tf  # already imported by experiments

    tf.io.gfile.makedirs(workdir)
    fmt = logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)
    root = logging.getLogger()
    root.setLevel(level)
    _close_log_handlers()
    log_path = os.path.join(workdir, f"{name}.log")
    if files.is_remote(workdir):
        file_handler = _RemoteLogHandler(log_path)
        if tf.io.gfile.exists(log_path):  # keep what earlier runs logged
            tf.io.gfile.copy(log_path, file_handler.baseFilename, overwrite=True)
    else:
        file_handler = logging.FileHandler(log_path)
    for handler in (logging.StreamHandler(sys.stdout), file_handler):
        handler.setFormatter(fmt)
        handler.addFilter(_drop_gin_path_probes)
        root.addHandler(handler)
    chatty = logging.DEBUG if level == "DEBUG" else max(logging.WARNING, root.level)
    for logger_name in CHATTY_LOGGERS:
        logger = logging.getLogger(logger_name)
        logger.setLevel(chatty)
        # Through the root's handlers (so into the log file), once.
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _close_log_handlers() -> None:
    """Removes (and closes, so a remote log is copied) the root's handlers."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            handler.close()


def _worker_suffix() -> str:
    """ "" for the chief; "-worker1" etc. for other multi-worker tasks.

    Under MultiWorkerMirroredStrategy every worker runs the same command with
    the same workdir; only the chief records configs, and each task logs to
    its own file. The task comes from ``TF_CONFIG`` (read here, at the edge).
    """
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind is None or kind == "chief" or (kind == "worker" and index == 0):
        return ""
    return f"-{kind}{index}"


def _local_copy(path: str) -> str:
    """``path`` itself if local, else a local copy (gin reads local files only)."""
    if not files.is_remote(path):
        return path
    fd, local = tempfile.mkstemp(prefix="revisit_tf-", suffix=".gin")
    with os.fdopen(fd, "wb") as f:
        f.write(files.read_bytes(path))
    return local


def parse_gin(
    gin_files: Sequence[str], gin_bindings: Sequence[str], workdir: str | None = None
) -> list[str]:
    """Parses gin files and bindings (``skip_unknown=False``).

    Without ``gin_files``, ``workdir/config.gin`` (written by revisit-train) is
    used; gin reads local files only, so a URL workdir's is parsed from a
    temporary local copy, removed afterwards. Returns the list of files
    parsed (that one by its workdir path).

    Raises:
      FileNotFoundError: a gin file is neither a path nor a shipped name.
    """
    gin.clear_config()
    for path in configurables.gin_search_paths():
        gin.add_config_file_search_path(path)
    paths = list(gin_files)
    if not paths and workdir is not None:
        saved = os.path.join(workdir, CONFIG_NAME)
        if not files.exists(saved):
            raise FileNotFoundError(
                f"No --gin_file given and no {saved!r}: pass the gin file(s) of "
                "the run (e.g. --gin_file=demo/fashion_mnist_rotation.gin)."
            )
        local = _local_copy(saved)
        try:
            _parse_gin_files([local], gin_bindings)
        finally:
            if local != saved:
                os.remove(local)
        return [saved]
    _parse_gin_files(paths, gin_bindings)
    return paths


def _parse_gin_files(paths: list[str], gin_bindings: Sequence[str]) -> None:
    """``parse_gin``'s parse of local ``paths``: named errors, the include log."""
    for name in paths:
        if not os.path.exists(name) and not any(
            os.path.exists(os.path.join(p, name))
            for p in configurables.gin_search_paths()
        ):
            raise FileNotFoundError(
                f"Gin file {name!r} not found in the working directory nor in "
                f"{configurables.gin_search_paths()}."
            )
    try:
        parsed = gin.parse_config_files_and_bindings(
            paths, gin_bindings, skip_unknown=False
        )
    except TypeError as e:
        # gin's package-resource lookup of an include crashes on a namespace
        # package (a plain folder named like the include's first component on
        # sys.path, e.g. ./pretext under ``python -m``).
        raise ValueError(
            f"gin could not resolve an include of {paths} ({e}): a folder named "
            "like the include's first component (e.g. ./data or ./pretext) is "
            "on the Python path; run from another directory."
        ) from e
    _log_includes_and_imports(parsed, given=paths)


def _log_includes_and_imports(parsed, *, given: Sequence[str]) -> None:
    """Logs what gin imported and included; warns about files from elsewhere.

    gin looks an include up in the working directory first, then in the
    shipped ``gin/``: an include resolved outside the shipped directories and
    the files given on the command line is said so, as is every imported
    module outside ``revisit_tf``.
    """
    shipped = [os.path.realpath(p) for p in configurables.gin_search_paths()]
    trusted = {os.path.realpath(p) for p in given if os.path.exists(p)}

    def resolve(name: str) -> str | None:
        for prefix in ["", *configurables.gin_search_paths()]:
            path = os.path.join(prefix, name)
            if os.path.isfile(path):
                return os.path.realpath(path)
        return None

    def visit(node) -> None:
        for module in node.imports:
            if module.split(".")[0] != "revisit_tf":
                _logger.warning(
                    "gin: %s imports module %r; its code ran.", node.filename, module
                )
        for child in node.includes:
            path = resolve(child.filename)
            inside = path is not None and (
                path in trusted
                or any(path.startswith(root + os.sep) for root in shipped)
            )
            if not inside:
                _logger.warning(
                    "gin: %s includes %r, read from %s (not a shipped or given "
                    "gin file).",
                    node.filename,
                    child.filename,
                    path,
                )
            visit(child)

    for node in parsed or ():
        visit(node)


def _config_recorder(workdir: str, *, force: bool) -> Callable[[], None]:
    """Checks the parsed config against ``workdir/config.gin``; returns the writer.

    Call the returned function once the config is known to work (it writes
    nothing if the recorded config is the same). A differing config on a
    workdir that has checkpoints is refused now, before anything runs,
    unless ``force``; the old config is then kept as ``config.gin.<time>``.

    Raises:
      ConfigChangedError: the config differs from a trained workdir's and
        not ``force``; the message shows the changed lines.
    """
    path = os.path.join(workdir, CONFIG_NAME)
    text = "import revisit_tf.configurables\n\n" + gin.config_str()
    old = None
    if files.exists(path):
        old = files.read_bytes(path).decode("utf-8", errors="replace")
    if old == text:
        return lambda: None
    if old is not None and not force:
        steps = checkpoint_lib.checkpoint_steps(os.path.join(workdir, "checkpoints"))
        if steps:
            diff = [
                line
                for line in difflib.unified_diff(
                    old.splitlines(), text.splitlines(), lineterm="", n=0
                )
                if line[:1] in "+-" and not line.startswith(("+++", "---"))
            ]
            shown = "\n  ".join(diff[:12]) + ("\n  ..." if len(diff) > 12 else "")
            raise ConfigChangedError(
                f"The config differs from {path}, which trained the checkpoints "
                f"of steps {steps} in this workdir (- recorded, + now):\n  "
                f"{shown}\nUse the recorded config (omit --gin_file), another "
                "workdir, or --force to replace it (the old one is kept)."
            )
    done = []

    def record() -> None:
        if done:
            return
        done.append(True)
        if old is not None:
            backup = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}"
            files.write_atomic(backup, old)
            _logger.warning("The config changed; the previous one is in %s", backup)
        files.write_atomic(path, text)

    return record


def train_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-train``: pretext training (``experiments.pretrain``).

    Raises:
      loop_lib.PreemptedError: SIGTERM; a checkpoint was saved (exit code 75).
    """
    args = _parser("Pretext training (revisit_tf).", force=True).parse_args(argv)
    suffix = _worker_suffix()
    _setup_logging(args.workdir, "train" + suffix, args.log_level)
    parse_gin(args.gin_file, args.gin_bindings)
    chief = not suffix
    # Multi-worker tasks share the chief's workdir: the chief holds the lock.
    lock = (
        files.workdir_lock(args.workdir, "revisit-train")
        if chief
        else contextlib.nullcontext()
    )
    with lock:
        record_config = _config_recorder(args.workdir, force=args.force)

        def on_first_loop():
            record_config()
            config = gin.operative_config_str()
            files.write_atomic(
                os.path.join(args.workdir, OPERATIVE_CONFIG_NAME), config
            )
            try:  # A picture never stops training.
                summaries.write_config_text(
                    os.path.join(args.workdir, "tensorboard", "config"), config
                )
            except Exception:  # noqa: BLE001
                _logger.warning(
                    "Could not write the config to TensorBoard.", exc_info=True
                )

        configurables.pretrain(
            workdir=args.workdir, on_first_loop=on_first_loop if chief else None
        )
        if chief:
            record_config()  # a rerun with nothing to train (or --force) too


def export_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-export``: SavedModel from the newest checkpoint."""
    parser = _parser("Export the trained trunk (revisit_tf).", force=True)
    parser.add_argument(
        "--format",
        default=None,
        choices=EXPORT_FORMATS,
        help="saved_model (default, or gin's export_model.export_format): "
        "workdir/export, a SavedModel for every TensorFlow consumer; keras: "
        "workdir/trunk.keras, the trunk alone.",
    )
    args = parser.parse_args(argv)
    _setup_logging(args.workdir, "export", args.log_level)
    parse_gin(args.gin_file, args.gin_bindings, workdir=args.workdir)
    with files.workdir_lock(args.workdir, "revisit-export"):
        record_config = (
            _config_recorder(args.workdir, force=args.force)
            if args.gin_file or args.gin_bindings
            else lambda: None
        )
        print(
            configurables.export_model(
                workdir=args.workdir,
                force=args.force,
                # The flag, when given, wins over a gin binding.
                **({"export_format": args.format} if args.format else {}),
            )
        )
        record_config()


def probe_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-probe``: probes of the export (or of pixels), from gin."""
    args = _parser("Linear probe (revisit_tf).").parse_args(argv)
    _setup_logging(args.workdir, "probe", args.log_level)
    parse_gin(args.gin_file, args.gin_bindings, workdir=args.workdir)
    with files.workdir_lock(args.workdir, "revisit-probe"):
        rows = configurables.linear_probe(workdir=args.workdir)
    print(experiments.tables.report_tables(rows))


def _install_faults() -> None:
    """The kill tier's hook (``faults``), from the process environment."""
    hook = faults.hook_from_spec(
        os.environ.get("REVISIT_TF_FAULT"), os.environ.get("REVISIT_TF_FAULT_TRACE")
    )
    if hook is not None:
        faults.install(hook)


def run(main_fn: Callable[[Sequence[str] | None], None], argv=None) -> int:
    """Runs a main under the exit-code contract (``EXIT_CODES``).

    Named errors print one line (``error: ...``) and return 1; a preempted
    run or a locked workdir returns 75; anything else keeps its traceback.
    Every way out is in the workdir's log too (the error with its
    traceback), and the log is closed (a remote one copied) on the way out.
    """
    _install_faults()
    try:
        main_fn(argv)
    except (loop_lib.PreemptedError, files.WorkdirLockedError) as e:
        _logger.warning("Not finished (exit code %d): %s", EXIT_RERUN, e)
        print(f"not finished: {e}", file=sys.stderr)
        return EXIT_RERUN
    except (
        ConfigChangedError,
        checkpoint_lib.CheckpointError,
        FileNotFoundError,
        ValueError,
        FloatingPointError,
        OSError,
    ) as e:
        _logger.error("%s: %s", type(e).__name__, e, exc_info=True)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except SystemExit:
        raise  # argparse (exit code 2) and --help
    except KeyboardInterrupt:
        _logger.warning("Interrupted (KeyboardInterrupt).")
        raise
    except BaseException:
        _logger.critical("Unexpected error; the traceback follows.", exc_info=True)
        raise
    finally:
        _close_log_handlers()
    return EXIT_OK


def _console(main_fn):
    def entry() -> None:
        sys.exit(run(main_fn))

    entry.__doc__ = main_fn.__doc__
    return entry


def report_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-report <workdir or results.jsonl>... [--table KIND]``: markdown."""
    parser = argparse.ArgumentParser(description="Probe results as a table.")
    parser.add_argument("paths", nargs="*", help="Workdirs or results.jsonl files.")
    parser.add_argument(
        "--study",
        help="A revisit-study directory: (re)write its report (tables, figures, "
        "findings) under STUDY/report instead.",
    )
    parser.add_argument("--output", help="Also write the table to this file.")
    parser.add_argument(
        "--table",
        choices=experiments.tables.REPORT_KINDS,
        default="auto",
        help="probe: one line per result; endpoints: model x endpoint (Fig. 5); "
        "subsets: model x fraction of labels (Fig. 7); auto (default): the "
        "probe table plus each of the others with more than one column.",
    )
    args = parser.parse_args(argv)
    if args.study:
        if args.paths:
            parser.error("give either --study DIR or result paths, not both.")
        spec, jobs, _ = load_study([_recorded_spec(args.study)], [])
        print(write_study_report(args.study, spec, jobs))
        return
    if not args.paths:
        parser.error("give workdirs or results.jsonl files, or --study DIR.")
    table = experiments.report(args.paths, kind=args.table)
    print(table)
    if args.output:
        files.write_atomic(args.output, table + "\n")


STUDY_SPEC_NAME = "spec.gin"


def load_study(
    spec_files: Sequence[str], spec_bindings: Sequence[str]
) -> tuple[study_spec.Spec, list[study_spec.Job], dict[str, float]]:
    """Parses a study spec, expands it and parses every job's gin config.

    Returns:
      ``(spec, jobs, train_images)``: ``train_images`` maps train-job ids to
      the images their config trains on (for ``--dry_run`` estimates).

    Raises:
      study_spec.SpecError: a malformed spec, or a job config that does not
        parse (a misspelt binding), before anything runs.
    """
    parse_gin(spec_files, spec_bindings)
    try:
        spec = configurables.study()
    except TypeError as e:
        raise study_spec.SpecError(
            f"the study spec {list(spec_files)} is incomplete: {e} (bind "
            "study.name, study.axes and study.probes)."
        ) from e
    # The spec as written (gin.config_str() would sort the axes' and levels'
    # dict keys, and their order is the study's: cell ids, table order).
    parts = []
    for name in spec_files:
        path = study_spec.resolve_gin_file(name, configurables.gin_search_paths())
        with open(path) as f:
            parts.append(f"# --spec {name}\n{f.read()}")
    if spec_bindings:
        parts.append("# --gin_bindings\n" + "\n".join(spec_bindings))
    spec_text = "\n".join(parts) + "\n"
    jobs = study_spec.expand(spec, configurables.gin_search_paths())
    images: dict[study_spec.GinPart, float] = {}

    def parse(part: study_spec.GinPart) -> None:
        parse_gin(part.files, part.bindings)
        images[part] = _train_images(spec.train_examples)

    study_spec.validate_gin(jobs, parse)
    gin.clear_config()
    train_images = {
        j.id: images[j.gin] for j in jobs if j.kind == "train" and images.get(j.gin)
    }
    return dataclasses.replace(spec, text=spec_text), jobs, train_images


def _train_images(train_examples: int | None) -> float | None:
    """Images a parsed training config trains on (steps, examples or epochs)."""

    def query(name):
        try:
            return gin.query_parameter(name)
        except ValueError:
            return None

    steps, batch = query("pretrain.steps"), query("pretrain.global_batch_size")
    if steps and batch:
        return float(steps * batch)
    if query("pretrain.examples"):
        return float(query("pretrain.examples"))
    if query("pretrain.epochs") and train_examples:
        return float(query("pretrain.epochs") * train_examples)
    return None


def study_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-study``: run (or ``--dry_run``) a study, then write its report."""
    parser = argparse.ArgumentParser(
        description="Run a study: a grid of train -> export -> probe jobs "
        "(gin/study/*.gin), then its report."
    )
    parser.add_argument("--study_dir", required=True, help="Study directory.")
    parser.add_argument(
        "--spec",
        action="append",
        default=[],
        help="Study spec gin file (repeatable), e.g. study/fashion_mnist_mini.gin; "
        "default: the study_dir's recorded spec.gin.",
    )
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--executor", default="local", help="local (default) or slurm.")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="Local: chains at once (default: cpus / threads).",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="Local: CPU threads per job."
    )
    parser.add_argument("--partition", default=None, help="Slurm partition.")
    parser.add_argument(
        "--dry_run", action="store_true", help="Print the jobs and the estimate."
    )
    parser.add_argument(
        "--overwrite_stale",
        action="store_true",
        help="Move cells trained under another config to study_dir/stale/ and "
        "rerun them.",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="Only (re)write the report."
    )
    parser.add_argument(
        "--no_report",
        action="store_true",
        help="Do not write the report after the run.",
    )
    args = parser.parse_args(argv)
    if args.executor not in study_executors.EXECUTORS:
        parser.error(
            f"--executor must be one of {study_executors.EXECUTORS}; "
            f"got {args.executor!r}."
        )
    spec_files = args.spec or [_recorded_spec(args.study_dir)]
    spec, jobs, train_images = load_study(spec_files, args.gin_bindings)
    if args.executor == "local":
        executor = study_executors.make_executor(
            "local", args.study_dir, slots=args.jobs, threads=args.threads
        )
    else:
        executor = study_executors.make_executor(
            "slurm", args.study_dir, partition=args.partition
        )
    if args.dry_run:
        study_runner.dry_run(
            args.study_dir, spec, jobs, slots=executor.slots, train_images=train_images
        )
        return
    if not args.report_only:
        os.makedirs(args.study_dir, exist_ok=True)
        files.write_atomic(os.path.join(args.study_dir, STUDY_SPEC_NAME), spec.text)
        summary = study_runner.run_study(
            args.study_dir,
            spec,
            jobs,
            executor,
            overwrite_stale=args.overwrite_stale,
            study_record={
                "name": spec.name,
                "spec_files": spec_files,
                "gin_bindings": args.gin_bindings,
                "jobs": [j.to_json() for j in jobs],
            },
        )
    if not args.no_report:
        print(write_study_report(args.study_dir, spec, jobs))
    if not args.report_only and not summary.ok:
        raise SystemExit(1)


def _recorded_spec(study_dir: str) -> str:
    path = os.path.join(study_dir, STUDY_SPEC_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No --spec given and no {path!r}: pass the study's spec, e.g. "
            "--spec=study/fashion_mnist_mini.gin."
        )
    return path


def write_study_report(
    study_dir: str, spec: study_spec.Spec, jobs: Sequence[study_spec.Job]
) -> str:
    """Collects the records, writes ``study_dir/report/``; returns its README."""
    from revisit_tf.study import report as study_report  # matplotlib

    records, notes = study_collect.collect(study_dir, spec, jobs)
    summary_path = os.path.join(study_dir, "last_run.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            last = json.load(f)
        notes = [
            *notes,
            *(
                f"job {j} failed: {e} (log {os.path.relpath(p, study_dir)})"
                for j, e, p in last["failed"]
            ),
        ]
    notes = [*study_runner.accounting(study_dir, jobs), *notes]
    out_dir = os.path.join(study_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    study_report.write_report(
        records,
        out_dir,
        title=f"Study {spec.name}",
        notes=notes,
        main_probes=[next(iter(spec.probes))],  # the spec's first probe
    )
    return os.path.join(out_dir, "README.md")


train = _console(train_main)
export = _console(export_main)
probe = _console(probe_main)
report = _console(report_main)
study = _console(study_main)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m revisit_tf.cli {train,export,probe,report,study} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": train_main,
        "export": export_main,
        "probe": probe_main,
        "report": report_main,
        "study": study_main,
    }
    if not argv or argv[0] not in commands:
        raise SystemExit(
            f"usage: python -m revisit_tf.cli {{{','.join(commands)}}} ..."
        )
    sys.exit(run(commands[argv[0]], argv[1:]))


if __name__ == "__main__":
    # ``python -m`` puts the working directory first on sys.path, where a
    # folder such as ./data or ./pretext would shadow the package resources
    # gin resolves includes with; revisit_tf itself is already imported.
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    main()
