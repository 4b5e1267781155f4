"""Small file helpers shared by the stages (no gin; TensorFlow only for URLs).

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

Workdirs may also be URLs (``gs://bucket/run``, ``ram://run``, any
``scheme://`` that ``tf.io.gfile`` serves): ``is_remote`` tells them apart,
and the helpers below (``absolute``, ``dirname``, ``exists``, ``isdir``,
``isfile``, ``listdir``, ``makedirs``, ``read_bytes``, ``rename_tree``,
``rmtree``) go through ``tf.io.gfile`` for them and through ``os`` for local
paths, so the NumPy-only stages need TensorFlow only when a path is a URL.
Paths stay strings: ``os.path.abspath`` turns ``ram://x`` into
``<cwd>/ram:/x``, so no helper here calls it on a URL (``os.path.join`` is
fine on one). On ``ram://`` they also correct TensorFlow's prefix matching
(``_ram_listed``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

from revisit_tf import faults

LOCK_NAME = ".lock"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Object stores: an object appears whole when its upload completes, and a
# rename is a copy plus a delete, so whole-file writes go there directly.
OBJECT_STORES = ("gs", "s3")
_logger = logging.getLogger(__name__)


def scheme(path: str | os.PathLike) -> str:
    """The URL scheme of ``path`` (``"gs"``, ``"ram"``, ...); ``""`` for local."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else ""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://``, ``ram://``, ``file://``...): it is
    read and written through ``tf.io.gfile``, never through ``os``."""
    return bool(scheme(path))


def _gfile():
    import tensorflow as tf  # only for URLs: the local paths need no TF

    return tf.io.gfile


def _local(path: str) -> str | None:
    """The OS path of a local path (a ``file://`` URL included); None for URLs."""
    if path.startswith("file://"):
        return path[len("file://") :]
    return None if is_remote(path) else path


def absolute(path: str | os.PathLike) -> str:
    """``os.path.abspath`` of a local path; a URL unchanged (``abspath`` would
    make ``ram://x`` the local ``<cwd>/ram:/x``)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def dirname(path: str | os.PathLike) -> str:
    """``os.path.dirname`` that keeps a URL a URL: ``ram://x`` -> ``ram://``
    (``os.path.dirname`` gives ``ram:``, a local relative path)."""
    path = os.fspath(path)
    head = os.path.dirname(path)
    if is_remote(path) and not is_remote(head + "/"):
        return path[: len(scheme(path)) + len("://")]
    return head


def _ram_listed(path: str) -> bool:
    """Whether ``path`` is an entry of its ``ram://`` directory's listing.

    TensorFlow's ``ram://`` file system matches names by prefix:
    ``exists``, ``isdir`` and ``stat`` of ``ram://w/export`` succeed while
    only ``ram://w/export.tmp-1`` exists (and ``listdir`` of it lists
    ``.tmp-1``). Its parent's listing is exact, but lists only directories
    that were made (``makedirs``): on ``ram://`` a directory that exists only
    because a file was written below it is in no listing, TensorFlow's own
    included, so revisit_tf makes every directory before writing into it.
    """
    gfile = _gfile()
    parent, name = dirname(path), os.path.basename(path.rstrip("/"))
    if not name or name.endswith(":"):  # the root, ram://
        return True
    try:
        return name in {n.rstrip("/") for n in gfile.listdir(parent)}
    except Exception:  # noqa: BLE001 - NotFoundError: no parent, no entry
        return False


def listdir(path: str | os.PathLike) -> list[str]:
    """The entry names of directory ``path``, sorted (local or URL).

    A URL's subdirectories come without the trailing ``/`` some object
    stores give them; on ``ram://`` the names that its prefix matching adds
    (``.tmp-1`` in ``ram://w/export`` when ``ram://w/export.tmp-1`` exists)
    are left out.

    Raises:
      FileNotFoundError: ``path`` is no directory.
    """
    path = os.fspath(path)
    if not is_remote(path):
        return sorted(os.listdir(path))
    gfile = _gfile()
    if not isdir(path):
        raise FileNotFoundError(errno.ENOENT, "No such directory", path)
    names = {n.rstrip("/") for n in gfile.listdir(path)} - {""}
    if scheme(path) == "ram":
        names = {n for n in names if gfile.exists(os.path.join(path, n))}
    return sorted(names)


def exists(path: str | os.PathLike) -> bool:
    """``os.path.exists``, or ``tf.io.gfile.exists`` for a URL (exact on
    ``ram://`` too: ``_ram_listed``)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.exists(path)
    if not _gfile().exists(path):
        return False
    return scheme(path) != "ram" or _ram_listed(path)


def isdir(path: str | os.PathLike) -> bool:
    """``os.path.isdir``, or ``tf.io.gfile.isdir`` for a URL (exact on
    ``ram://`` too)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isdir(path)
    return _gfile().isdir(path) and (scheme(path) != "ram" or _ram_listed(path))


def isfile(path: str | os.PathLike) -> bool:
    """``os.path.isfile``, or (a URL) whether it exists and is no directory."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isfile(path)
    return exists(path) and not _gfile().isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """``os.makedirs(exist_ok=True)``, or ``tf.io.gfile.makedirs`` for a URL."""
    path = os.fspath(path)
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def rmtree(path: str | os.PathLike) -> None:
    """Removes the directory ``path`` and everything below it (local or URL).

    On ``ram://``, ``tf.io.gfile.rmtree`` removes the tree and then raises
    ``NotFoundError`` for the names its prefix matching made up
    (``_ram_listed``); here the tree is removed entry by entry instead.

    Raises:
      FileNotFoundError: ``path`` does not exist.
    """
    path = os.fspath(path)
    if not is_remote(path):
        shutil.rmtree(path)
        return
    import tensorflow as tf

    if not exists(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
    if scheme(path) != "ram":
        tf.io.gfile.rmtree(path)
        return
    for name in listdir(path):
        full = os.path.join(path, name)
        if isdir(full):
            rmtree(full)
        else:
            tf.io.gfile.remove(full)
    with contextlib.suppress(tf.errors.NotFoundError):
        tf.io.gfile.rmtree(path)  # the empty directory's own entry


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole content of a file (local or URL).

    Raises:
      FileNotFoundError: no such file (for a URL too).
      OSError: it cannot be read.
    """
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such file", path) from None
    except tf.errors.OpError as e:
        raise OSError(errno.EIO, f"cannot read {path}: {e.message}") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rename_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Renames the directory ``src`` to ``dst``, which must not exist.

    Local: one ``os.rename``, atomic. A URL: file by file (``tf.io.gfile``),
    then ``src`` is removed: not atomic (a kill leaves part of the files
    under each name), but the only way that works on every gfile file
    system: ``ram://`` renames a directory's own entry and leaves its files
    behind under the old name, and ``gs://`` moves a directory object by
    object (a copy and a delete each) anyway.

    Raises:
      FileExistsError: ``dst`` exists.
      OSError: a rename failed (a URL's gfile error, as OSError).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    local_src, local_dst = _local(src), _local(dst)
    if local_src is not None and local_dst is not None:
        if os.path.exists(local_dst):
            raise FileExistsError(errno.EEXIST, "File exists", dst)
        os.rename(local_src, local_dst)
        return
    import tensorflow as tf

    gfile = tf.io.gfile
    if exists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", dst)

    def move(source: str, target: str) -> None:
        gfile.makedirs(target)
        for name in listdir(source):
            if isdir(os.path.join(source, name)):
                move(os.path.join(source, name), os.path.join(target, name))
            else:
                gfile.rename(os.path.join(source, name), os.path.join(target, name))

    try:
        move(src, dst)
        rmtree(src)
    except tf.errors.OpError as e:
        raise OSError(errno.EIO, f"cannot rename {src} to {dst}: {e.message}") from e


def write_atomic(
    path: str | os.PathLike, data: bytes | str, *, fsync: bool = True
) -> None:
    """Writes ``data`` to ``path`` through a temporary file and ``os.replace``.

    A URL goes through ``tf.io.gfile``: on an object store (``gs://``,
    ``s3://``) the object is written directly, since an upload becomes
    visible whole when it completes (a reader sees the old object or the new
    one) while a rename there is a copy plus a delete (twice the traffic, and
    a kill between the two leaves a stray copy). Elsewhere (``ram://``,
    ``hdfs://``...) a temporary ``<name>.tmp-<random>`` is written and
    renamed over ``path`` (``tf.io.gfile.rename(overwrite=True)``), atomic
    where the file system's rename is; ``fsync`` does not apply. A
    ``file://`` URL is a local path.

    Args:
      path: destination; its directory must exist (object stores have none).
      data: bytes, or text (written as UTF-8).
      fsync: flush the temporary file to disk before the rename, so that a
        power loss cannot leave an empty file under the final name.

    Raises:
      OSError: the write failed (e.g. ``ENOSPC``, a full disk); the temporary
        file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    local = _local(path)
    if local is None:
        _write_remote(path, data)
        return
    path = local
    directory, name = os.path.split(os.path.abspath(path))
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


def _write_remote(path: str, data: bytes) -> None:
    """``write_atomic`` for a URL (see there); gfile errors become OSError."""
    import tensorflow as tf

    gfile = tf.io.gfile
    direct = scheme(path) in OBJECT_STORES
    tmp = path if direct else f"{path}.tmp-{secrets.token_hex(4)}"
    try:
        with gfile.GFile(tmp, "wb") as f:
            f.write(data)
        faults.point("write_atomic.before_replace")
        if not direct:
            gfile.rename(tmp, path, overwrite=True)
    except BaseException as e:
        if not direct:
            with contextlib.suppress(Exception):
                if gfile.exists(tmp):
                    gfile.remove(tmp)
        if isinstance(e, tf.errors.OpError):
            raise OSError(errno.EIO, f"cannot write {path}: {e.message}") from e
        raise
    faults.point("write_atomic.after_replace")


def _holder_record(host: str, purpose: str) -> dict:
    """What a lock file says about its holder (``WorkdirLockedError`` shows it)."""
    return {
        "pid": os.getpid(),
        "host": host,
        "purpose": purpose,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
    }


class WorkdirLockedError(RuntimeError):
    """Another live process holds the directory's lock."""


def _record(text: bytes) -> dict:
    try:
        value = json.loads(text.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _holder(fd: int) -> dict:
    return _record(os.pread(fd, 4096, 0))


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
    logger = logger or _logger
    local = _local(os.fspath(directory))
    if local is None:
        with _remote_lock(os.fspath(directory), purpose, logger) as record:
            yield record
        return
    directory = local
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
        record = _holder_record(host, purpose)
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


_WARNED_UNLOCKABLE: set[str] = set()


@contextlib.contextmanager
def _remote_lock(directory: str, purpose: str, logger) -> Iterator[dict]:
    """``workdir_lock`` on a file system without ``flock`` (a URL).

    There is no lock to take: an object store has no advisory locks, and
    its rename or create cannot fail when the target exists, so two writers
    on two machines cannot be kept apart here. What can be done is done:

    * the holder record is written to ``<dir>/.lock`` as on a local disk
      (emptied on release), so a second run sees who holds the directory;
    * a record naming a *live* process of this host (this process included:
      a nested hold, refused as ``flock`` refuses it locally) is refused
      with ``WorkdirLockedError``;
    * any other unreleased record (another host, or a process that is gone)
      cannot be judged alive or stale: it is taken over with a warning that
      names it.

    A pid reused since its holder was killed reads as alive: the message
    says to delete the record then.
    """
    gfile = _gfile()
    gfile.makedirs(directory)
    path = os.path.join(directory, LOCK_NAME)
    if directory not in _WARNED_UNLOCKABLE:
        _WARNED_UNLOCKABLE.add(directory)
        logger.warning(
            "%s is on %s://, which has no file locks: one writer per workdir "
            "cannot be enforced there (only a live holder on this host is "
            "refused). Run one job per workdir.",
            directory,
            scheme(directory),
        )
    previous = _record(read_bytes(path)) if exists(path) else {}
    host = socket.gethostname()
    if previous:
        alive = previous.get("host") == host and _pid_alive(previous.get("pid"))
        if alive:
            raise WorkdirLockedError(
                f"{directory} is in use by {_describe(previous)}; one writer "
                "per workdir: wait for it to finish, stop it, or use another "
                f"workdir. (If that pid is no revisit_tf run, its holder was "
                f"killed and the pid reused: delete {path}.)"
            )
        logger.warning(
            "%s: taking over the lock record of %s (%s; without file locks it "
            "cannot be told whether it still runs).",
            directory,
            _describe(previous),
            "that process is gone" if previous.get("host") == host else "another host",
        )
    record = _holder_record(host, purpose)
    write_atomic(path, json.dumps(record))
    try:
        yield record
    finally:
        try:
            write_atomic(path, b"")  # released: the next holder takes it quietly
        except OSError as e:
            logger.warning("%s: could not release the lock record (%s).", path, e)
