"""JSON-lines result files: crash-safe append and strict read.

Place in the data flow: the probe stage calls ``append_result`` once per
(model, endpoint) to add a line to ``<workdir>/probe/results.jsonl``; the
report stage calls ``read_results`` on any mix of such files and workdirs and
hands the rows to ``revisit_tf.report.tables``.

File format: UTF-8, one JSON object per line, every line terminated by
``"\\n"``. Files are only ever appended to, so a later line is a newer result.

Crash safety. A line is written with a single ``os.write`` (looping only if
the kernel accepts a partial write) on an ``O_APPEND`` descriptor, then
``fsync``-ed, under an exclusive ``flock`` so concurrent writers on one
machine never interleave. The only damage a crash can do is therefore an
incomplete *last* line. ``append_result`` repairs that before writing (a tail
that is complete JSON only lacking its newline gets the newline; anything else
is truncated, with a warning), so a torn line is never followed by valid ones;
``read_results`` skips a torn last line with a warning and rejects any other
malformed line, naming the file and the 1-based line number.

Online rows. ``probe.online`` (kNN / L-BFGS probes of the live trunk during
pretraining) appends its rows to ``<workdir>/online/results.jsonl``
(``online_results_path``), a file of its own: ``read_results(<workdir>)``
reads only the offline ``probe/results.jsonl``, so a workdir's report and the
study's collected records never see online rows unless that file is named;
when it is, ``tables.report_tables`` puts them in a table of their own.

Remote files. A URL (``gs://``, ``ram://``: ``files.is_remote``) has no
append, ``fsync`` or ``flock``: ``append_result`` reads the file, repairs a
torn tail the same way, adds the line and writes the whole file back with
``files.write_atomic`` (a reader sees the file before or after the line).
Two writers at once could lose a line; one writer per workdir is the rule
(``files.workdir_lock``, which on a URL refuses only holders it can see).

Field types. ``read_results`` also checks the top-level fields the tables
print as numbers (``NUMERIC_FIELDS`` and every key ending in ``top1``/``top5``,
which must be fractions in [0, 1]) and ``converged`` (a bool): each must have
its type or be null. A wrong type is rejected, naming file, line and field,
rather than shown: the probe writes only numbers there, so a string such as
``"0.84"`` means a hand-edited or foreign line, and printed verbatim under a
``test top-1 (%)`` header it would read as 0.84%.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from revisit_tf import files

RESULTS_RELPATH = os.path.join("probe", "results.jsonl")
ONLINE_RESULTS_RELPATH = os.path.join("online", "results.jsonl")
# Top-level fields that are numbers (or null) in every result row; keys ending
# in top1/top5 are accuracies, also numbers (fractions in [0, 1]).
NUMERIC_FIELDS = ("l2", "iterations", "n_train", "n_val", "n_test", "seconds")
BOOL_FIELDS = ("converged",)

_logger = logging.getLogger(__name__)


def results_path(workdir: str | os.PathLike) -> str:
    """The probe results file of a workdir: ``<workdir>/probe/results.jsonl``."""
    return os.path.join(os.fspath(workdir), RESULTS_RELPATH)


def online_results_path(workdir: str | os.PathLike) -> str:
    """The online-evaluation rows of a training workdir (``online/results.jsonl``)."""
    return os.path.join(os.fspath(workdir), ONLINE_RESULTS_RELPATH)


def _to_json(value: Any, where: str) -> Any:
    """Converts ``value`` to plain JSON types; ``where`` names it in errors.

    NumPy scalars and arrays (and anything with a ``.numpy()`` method, such as
    an eager ``tf.Tensor``) become Python numbers and lists. Non-finite floats
    are rejected: strict JSON has no NaN/Infinity, and a NaN accuracy is a bug
    to surface, not a number to tabulate.
    """
    if hasattr(value, "numpy") and callable(value.numpy):
        value = value.numpy()
    if hasattr(value, "tolist") and callable(value.tolist):  # NumPy scalar/array
        value = value.tolist()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"{where} is {value!r}; results must be finite numbers (JSON has "
                "no NaN/Infinity)."
            )
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}.")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{where} has type {type(value).__name__}, which is not JSON-serialisable;"
        " use numbers, strings, bools, None, lists or dicts."
    )


def _repair_tail(fd: int, path: str) -> bytes:
    """Returns the prefix the next line needs after a torn last line.

    Reads the bytes after the last newline. Complete JSON missing only its
    newline -> b"\\n" is returned. Anything else (a half-written line) is
    truncated away and b"" returned.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    # Scan backwards for the last newline, 64 KiB at a time.
    end, tail_start = size, 0
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        index = chunk.rfind(b"\n")
        if index >= 0:
            tail_start = start + index + 1
            break
        end = start
    if tail_start == size:
        return b""  # ends with a newline: nothing to repair
    tail = os.pread(fd, size - tail_start, tail_start)
    try:
        json.loads(tail.decode("utf-8"))
        return b"\n"
    except (UnicodeDecodeError, json.JSONDecodeError):
        _logger.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted write.",
            path,
            size - tail_start,
        )
        os.ftruncate(fd, tail_start)
        return b""


def append_result(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Appends ``row`` as one JSON line to ``path``; durable when it returns.

    Creates missing parent directories. NumPy scalars/arrays are converted to
    Python numbers/lists; key order is kept.

    Args:
        path: the JSON-lines file (usually ``results_path(workdir)``).
        row: a mapping with string keys and JSON-serialisable values.

    Raises:
        ValueError: if ``row`` is not a mapping, has a non-string key, a
            non-finite float, a value that cannot be serialised or a field of
            the wrong type (``check_row_types``); the message names the key.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"row must be a mapping (dict); got {type(row).__name__}.")
    converted = _to_json(row, "row")
    check_row_types(converted, f"row for {os.fspath(path)}")
    line = json.dumps(converted, allow_nan=False) + "\n"
    data = line.encode("utf-8")  # json.dumps escapes non-ASCII: one line only
    path = os.fspath(path)
    if files.is_remote(path):
        _append_remote(path, data)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    created = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()
        view = memoryview(_repair_tail(fd, path) + data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # make the new directory entry durable too
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _append_remote(path: str, data: bytes) -> None:
    """``append_result`` on a URL: read, repair the tail, rewrite atomically."""
    files.makedirs(files.dirname(path))
    content = files.read_bytes(path) if files.exists(path) else b""
    cut = content.rfind(b"\n") + 1  # 0 when there is no newline
    if cut < len(content):
        tail = content[cut:]
        try:
            json.loads(tail.decode("utf-8"))
            content += b"\n"
        except (UnicodeDecodeError, json.JSONDecodeError):
            _logger.warning(
                "%s: dropping a torn last line (%d bytes) left by an interrupted "
                "write.",
                path,
                len(tail),
            )
            content = content[:cut]
    files.write_atomic(path, content + data)


def _is_accuracy(key: str) -> bool:
    return key.endswith(("top1", "top5"))


def check_row_types(row: Mapping[str, Any], where: str) -> None:
    """Checks the types of a row's numeric and bool fields (module docstring).

    Args:
        row: one parsed result row.
        where: how to name the row in errors, e.g. ``"<file>:<line>"``.

    Raises:
        ValueError: ``"<where>: field 'test_top1' is '0.84' (str); expected a
            number (a fraction in [0, 1]) or null."`` and the like.
    """
    for key, value in row.items():
        if value is None:
            continue
        accuracy = _is_accuracy(key)
        if accuracy or key in NUMERIC_FIELDS:
            expected = (
                "a number (a fraction in [0, 1]) or null"
                if accuracy
                else "a number or null"
            )
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise ValueError(
                    f"{where}: field {key!r} is {value!r} ({type(value).__name__});"
                    f" expected {expected}."
                )
            if accuracy and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{where}: field {key!r} is {value!r}; expected a fraction "
                    "in [0, 1] (accuracies are stored as fractions, not percent)."
                )
        elif key in BOOL_FIELDS and not isinstance(value, bool):
            raise ValueError(
                f"{where}: field {key!r} is {value!r} ({type(value).__name__}); "
                "expected true, false or null."
            )


def _read_file(path: str) -> list[dict]:
    content = files.read_bytes(path)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}).") from None
    lines = text.split("\n")
    # After the split, the last element is "" when the file ends with "\n";
    # otherwise it is an unterminated last line.
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_unterminated_last = number == len(lines)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if is_unterminated_last:
                _logger.warning(
                    "%s:%d: skipping a torn last line (interrupted write).",
                    path,
                    number,
                )
                continue
            raise ValueError(
                f"{path}:{number}: malformed JSON line ({e.msg} at column "
                f"{e.colno}): {line[:80]!r}"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}:{number}: expected a JSON object per line; got "
                f"{type(row).__name__}."
            )
        check_row_types(row, f"{path}:{number}")
        rows.append(row)
    return rows


def read_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Reads result rows from JSON-lines files and/or workdirs, in order.

    Args:
        paths: each either a JSON-lines file or a workdir holding
            ``probe/results.jsonl``. Rows from a workdir get
            ``row["workdir"] = <path>`` unless they already name one.

    Returns:
        All rows, path by path and line by line (so later means newer).

    Raises:
        FileNotFoundError: for a path that is neither a file nor a directory
            with ``probe/results.jsonl``.
        ValueError: for a malformed line (message ``<file>:<line>: ...``), a
            line that is not a JSON object, a field of the wrong type
            (``<file>:<line>: field 'test_top1' is '0.84' ...``, see
            ``check_row_types``), or ``paths`` given as one string.
    """
    if isinstance(paths, str | bytes | os.PathLike):
        raise ValueError(f"paths must be a sequence of paths; got {paths!r}.")
    rows: list[dict] = []
    for path in map(os.fspath, paths):
        if files.isdir(path):
            file = results_path(path)
            if not files.isfile(file):
                raise FileNotFoundError(
                    f"{path} is a directory without {RESULTS_RELPATH}; expected a "
                    "JSON-lines file or a workdir the probe has written to."
                )
            for row in _read_file(file):
                row.setdefault("workdir", path)
                rows.append(row)
        elif files.isfile(path):
            rows.extend(_read_file(path))
        else:
            raise FileNotFoundError(
                f"{path} does not exist; expected a JSON-lines file or a workdir "
                f"containing {RESULTS_RELPATH}."
            )
    return rows
