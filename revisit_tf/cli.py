"""The ``revisit-*`` console scripts: flags -> gin -> one ``experiments`` root.

Each main takes ``--workdir``, ``--gin_file`` (repeatable) and
``--gin_bindings`` (repeatable) and passes only ``workdir`` to its root: every
other argument comes from gin (style guide 4.2). Gin files are looked up in the
shipped ``gin/`` directory, so ``--gin_file=demo/fashion_mnist_rotation.gin``
works from any working directory.

``revisit-train`` writes the parsed config to ``workdir/config.gin`` before it
starts and gin's operative config to ``workdir/operative_config.gin`` after the
first loop. ``revisit-export`` and ``revisit-probe`` re-read
``workdir/config.gin`` when no ``--gin_file`` is given, so the usual sequence
needs the config only once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

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
)

CONFIG_NAME = "config.gin"
OPERATIVE_CONFIG_NAME = "operative_config.gin"


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="Output directory.")
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
    return parser


def _drop_gin_path_probes(record: logging.LogRecord) -> bool:
    """Gin logs every search-path probe (and misses as errors) on the root logger."""
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


def _setup_logging(workdir: str, name: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(os.path.join(workdir, f"{name}.log")),
    ):
        handler.setFormatter(fmt)
        handler.addFilter(_drop_gin_path_probes)
        root.addHandler(handler)
    # absl/TF loggers otherwise duplicate lines through their own handlers.
    logging.getLogger("tensorflow").propagate = False


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


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_gin(
    gin_files: Sequence[str], gin_bindings: Sequence[str], workdir: str | None = None
) -> list[str]:
    """Parses gin files and bindings (``skip_unknown=False``).

    Without ``gin_files``, ``workdir/config.gin`` (written by revisit-train) is
    used. Returns the list of files parsed.

    Raises:
      FileNotFoundError: a gin file is neither a path nor a shipped name.
    """
    gin.clear_config()
    for path in configurables.gin_search_paths():
        gin.add_config_file_search_path(path)
    files = list(gin_files)
    if not files and workdir is not None:
        saved = os.path.join(workdir, CONFIG_NAME)
        if not os.path.exists(saved):
            raise FileNotFoundError(
                f"No --gin_file given and no {saved!r}: pass the gin file(s) of "
                "the run (e.g. --gin_file=demo/fashion_mnist_rotation.gin)."
            )
        files = [saved]
    for name in files:
        if not os.path.exists(name) and not any(
            os.path.exists(os.path.join(p, name))
            for p in configurables.gin_search_paths()
        ):
            raise FileNotFoundError(
                f"Gin file {name!r} not found in the working directory nor in "
                f"{configurables.gin_search_paths()}."
            )
    gin.parse_config_files_and_bindings(files, gin_bindings, skip_unknown=False)
    return files


def _record_config(workdir: str) -> None:
    """Writes gin's full config to ``workdir/config.gin`` (keeps a differing one)."""
    path = os.path.join(workdir, CONFIG_NAME)
    text = "import revisit_tf.configurables\n\n" + gin.config_str()
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            backup = f"{path}.{int(os.path.getmtime(path))}"
            os.replace(path, backup)
            logging.warning("The config changed; the previous one is in %s", backup)
    _write_atomic(path, text)


def train_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-train``: pretext training (``experiments.pretrain``)."""
    args = _parser("Pretext training (revisit_tf).").parse_args(argv)
    suffix = _worker_suffix()
    _setup_logging(args.workdir, "train" + suffix)
    parse_gin(args.gin_file, args.gin_bindings)
    if not suffix:
        _record_config(args.workdir)

    def write_operative_config():
        _write_atomic(
            os.path.join(args.workdir, OPERATIVE_CONFIG_NAME),
            gin.operative_config_str(),
        )

    configurables.pretrain(workdir=args.workdir, on_first_loop=write_operative_config)


def export_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-export``: SavedModel from the newest checkpoint."""
    args = _parser("Export a SavedModel (revisit_tf).").parse_args(argv)
    _setup_logging(args.workdir, "export")
    parse_gin(args.gin_file, args.gin_bindings, workdir=args.workdir)
    if args.gin_file or args.gin_bindings:
        _record_config(args.workdir)
    print(configurables.export_model(workdir=args.workdir))


def probe_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-probe``: probes of the export (or of pixels), from gin."""
    args = _parser("Linear probe (revisit_tf).").parse_args(argv)
    _setup_logging(args.workdir, "probe")
    parse_gin(args.gin_file, args.gin_bindings, workdir=args.workdir)
    rows = configurables.linear_probe(workdir=args.workdir)
    print(experiments.tables.report_tables(rows))


def report_main(argv: Sequence[str] | None = None) -> None:
    """``revisit-report <workdir or results.jsonl>... [--table KIND]``: markdown."""
    parser = argparse.ArgumentParser(description="Probe results as a table.")
    parser.add_argument("paths", nargs="+", help="Workdirs or results.jsonl files.")
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
    table = experiments.report(args.paths, kind=args.table)
    print(table)
    if args.output:
        _write_atomic(args.output, table + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m revisit_tf.cli {train,export,probe,report} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": train_main,
        "export": export_main,
        "probe": probe_main,
        "report": report_main,
    }
    if not argv or argv[0] not in commands:
        raise SystemExit(
            f"usage: python -m revisit_tf.cli {{{','.join(commands)}}} ..."
        )
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
