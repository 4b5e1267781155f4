"""Small file helpers shared by the stages (no TensorFlow, no gin).

``write_atomic`` is the one way revisit_tf writes a whole small file (configs,
records, study state, permutation tables): a reader sees the old file or the
new one, never half of either. The temporary file has an unpredictable name
(``mkstemp``) in the destination's directory, so a crash leaves at most a
stray ``<name>.tmp-XXXXXXXX`` next to it and a second writer can never write
into the first one's temporary file.

``workdir_lock`` makes a workdir (or study directory) single-writer: an
exclusive ``flock`` on ``<dir>/.lock`` naming its holder (pid, host, what it
is doing, since when). The kernel drops the lock of a process that dies, so a
lock left by a killed process is detected as stale, said so, and taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

from revisit_tf import faults

LOCK_NAME = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(
    path: str | os.PathLike, data: bytes | str, *, fsync: bool = True
) -> None:
    """Writes ``data`` to ``path`` through a temporary file and ``os.replace``.

    Args:
      path: destination; its directory must exist.
      data: bytes, or text (written as UTF-8).
      fsync: flush the temporary file to disk before the rename, so that a
        power loss cannot leave an empty file under the final name.

    Raises:
      OSError: the write failed (e.g. ``ENOSPC``, a full disk); the temporary
        file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        faults.point("write_atomic.before_replace")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    faults.point("write_atomic.after_replace")


class WorkdirLockedError(RuntimeError):
    """Another live process holds the directory's lock."""


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    return (
        f"{holder.get('purpose', '?')} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')}: "
        f"{holder.get('command', '')})"
    )


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def workdir_lock(directory: str, purpose: str, *, logger=None) -> Iterator[dict]:
    """Holds the exclusive lock of ``directory`` for the duration of the block.

    Args:
      directory: the workdir (created if missing).
      purpose: what the holder does (``"revisit-train"``), for the message a
        second process gets.
      logger: where to say that a stale lock (its process is dead) was
        taken over; ``logging`` if None.

    Yields:
      The holder record written into the lock file.

    Raises:
      WorkdirLockedError: a live process holds it; the message names it.
      OSError: the file system supports no ``flock`` (``ENOLCK``); use a
        local or lock-capable file system for workdirs.
    """
    import logging

    logger = logger or logging.getLogger(__name__)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f"{directory} is in use by {_describe(_holder(fd))}; one writer "
                "per workdir: wait for it to finish, stop it, or use another "
                "workdir."
            ) from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(
                    e.errno,
                    f"cannot lock {path}: the file system does not support "
                    "flock; put the workdir on a local or lock-capable file "
                    "system",
                ) from e
            raise
        previous = _holder(fd)
        host = socket.gethostname()
        if previous:
            dead = previous.get("host") == host and not _pid_alive(previous.get("pid"))
            logger.warning(
                "%s: taking over the stale lock of %s (%s).",
                directory,
                _describe(previous),
                "that process is gone" if dead else "its lock was released",
            )
        record = {
            "pid": os.getpid(),
            "host": host,
            "purpose": purpose,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield record
        finally:
            # An empty file: the next holder sees a clean release, not a
            # stale lock (a killed process never gets here).
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
