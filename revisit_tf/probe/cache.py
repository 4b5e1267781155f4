"""Feature cache: features extracted once, stored as checked shards on disk.

Place in the data flow (stage 6): ``probe/features.py`` runs a SavedModel over
a split; this module stores the resulting ``[N, D]`` matrix of every endpoint
as row shards, so that every probe (L-BFGS, SGD, MLP, k-NN, label subsets) and
every later run reads the same bytes instead of running the trunk again.

Contract:
  * an entry is keyed by ``spec_key(spec)``: a SHA-256 of the canonical JSON
    of a ``spec`` mapping that names everything the features depend on (the
    SavedModel's content hash, endpoint, pooling, preprocessing, dataset and
    split; see ``experiments.linear_probe``);
  * ``FeatureCache.get_or_build(specs, build)`` returns one ``CachedFeatures``
    per endpoint, building the missing ones from ``build()``, an iterable of
    ``({endpoint: float32 [B, D]}, int [B])`` batches;
  * ``CachedFeatures`` gives shards (``shard(i)``: ``[n_i, D]`` float32 and
    ``[n_i]`` int32), all labels, or the whole matrix (``load()``).

Layout of an entry ``<root>/<key>/``: ``shard-00000.npy`` ... (float32
``[n_i, D]``), ``labels.npy`` (int32 ``[N]``) and ``manifest.json`` (the spec,
N, D, and per file its byte size and CRC-32).

Crash safety. An entry is written into ``<root>/<key>.partial-<pid>-<random>/``
(each file through a temporary file with a random name, renamed in once
written and fsync-ed) and the directory is renamed to ``<root>/<key>`` only
after every file and the manifest are in; a rename is atomic, so a reader sees
a whole entry or none. The commit is marked by the fault points
``cache.shards_written`` (shards and labels in, no manifest yet),
``cache.manifest_written`` and ``cache.entry_committed`` (``revisit_tf.faults``).
Builders of one key serialise on ``<root>/<key>.lock`` (``flock``), and the lock
holder deletes partial directories that crashed builders left behind. A write
that fails (a full disk, a quota) removes the partial directory and raises
``CacheWriteError`` naming the file and the bytes being written; entries
already cached are never touched.

Checks. An entry is checked when opened: the manifest's structure (every
field with its type and range, shard names ``shard-00000.npy`` ... in order,
rows summing to N), the same spec, and every file against it: a regular file
(never a link or a device), of the recorded size, whose ``.npy`` header holds
the recorded shape (``[n_i, D]`` float32 shards, ``[N]`` int32 labels). Every
file's CRC-32 is checked the first time it is read. Anything that fails a
check is reported (the warning names the entry and what is wrong), deleted and
rebuilt by ``get_or_build``; it is never silently used.

Local disks only. The entries rely on what an object store lacks (``flock``,
``O_NOFOLLOW``, ``fsync``, atomic directory renames), so ``FeatureCache``
refuses a URL root; a workdir that is a URL (``gs://``, ``ram://``) keeps its
features in ``local_cache_dir()`` instead (entries are keyed by content, so
workdirs can share it). ``hash_directory`` reads a URL too (an export on
``gs://``), giving the same digest as a local copy.

NumPy only (TensorFlow only to hash a URL), so the cache can be inspected and
tested cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import logging
import mmap
import os
import secrets
import shutil
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from revisit_tf import faults, files
from revisit_tf.probe import arrays

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
# 64 MiB shards: big enough that per-shard overhead (file open, one solver
# step per shard) is negligible, small enough that a streamed objective holds
# only a few in memory (one per replica plus read-ahead).
DEFAULT_SHARD_BYTES = 64 << 20
_LOG_EVERY_SECONDS = 30.0
# A manifest is a few KB per thousand shards; anything far larger is not one.
_MAX_MANIFEST_BYTES = 64 << 20
_WRITE_CHUNK = 4 << 20
_SHARD_NAME = "shard-{:05d}.npy"

_logger = logging.getLogger(__name__)


class CacheError(ValueError):
    """A cache entry is incomplete, corrupt or does not match its spec."""


class CacheWriteError(OSError):
    """Writing a cache entry failed (full disk, quota, I/O error).

    The partial entry has been removed; entries already cached are untouched.
    ``errno`` is that of the failed write (``ENOSPC`` for a full disk).
    """


class UnsafeFileError(ValueError):
    """A directory to fingerprint holds a link out of it or a non-regular file."""


def _kind(mode: int) -> str:
    """Human name of the file type in ``mode`` (``st_mode``)."""
    for test, name in [
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ]:
        if test(mode):
            return name
    return "special file"


def _open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    Never follows a symbolic link at ``path`` and never blocks (a fifo is
    opened non-blocking, then refused), so no read through it can hang or be
    unbounded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeFileError: ``path`` is a link, a device, a fifo, ...
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UnsafeFileError(
            f"{path} is a symbolic link (to {os.readlink(path)!r}), not a regular file."
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is a {_kind(mode)}, not a regular file.")
    return fd


def canonical_json(value: Any) -> str:
    """Sorted-key, whitespace-free JSON: the text that keys and fingerprints hash.

    Tuples become lists and NumPy scalars Python numbers, so equal values give
    equal text whatever their container types.

    Raises:
        ValueError: for a value JSON cannot represent (the message names it).
    """

    def convert(v: Any) -> Any:
        if hasattr(v, "tolist") and callable(v.tolist):
            v = v.tolist()
        if isinstance(v, Mapping):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [convert(x) for x in v]
        if v is None or isinstance(v, bool | int | float | str):
            return v
        raise ValueError(
            f"{v!r} ({type(v).__name__}) cannot be part of a cache key or "
            "fingerprint; use numbers, strings, bools, None, lists or dicts."
        )

    return json.dumps(convert(value), sort_keys=True, separators=(",", ":"))


def spec_key(spec: Mapping[str, Any]) -> str:
    """The entry name of ``spec``: 24 hex digits of SHA-256 of its canonical JSON."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"spec must be a non-empty mapping; got {spec!r}.")
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:24]


def hash_directory(path: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and contents of every file under ``path``.

    Used as the identity of a SavedModel in feature specs: re-exporting a
    different model to the same path changes it, so a stale cache is never
    used. Reads every byte once (about a second per GB).

    Only regular files are read. A symbolic link to a regular file inside
    ``path`` is hashed as that file (under the link's name); a link that points
    outside ``path`` or to anything but a regular file (a directory, a device
    such as ``/dev/zero``, a fifo), and any such file itself, is refused:
    hashing it could read without end, block, or make the identity depend on
    files outside the export. An unreadable subdirectory is an error, never
    skipped.

    Returns:
        64 hex digits.

    Raises:
        FileNotFoundError: if ``path`` is not a directory.
        UnsafeFileError: for a link or file as above (the message names it).
        OSError: for a directory or file that cannot be read.
    """
    path = os.fspath(path)
    if files.is_remote(path):
        return _hash_remote_directory(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory.")
    root = os.path.realpath(path)

    def refuse(full: str, what: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"{full} {what}; {path} may hold only regular files and directories "
            "(and links to regular files inside it). Remove it, or copy the "
            "file it stands for into the export."
        )

    def raise_error(error: OSError) -> None:
        raise error

    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path, onerror=raise_error):
        dirnames.sort()
        for name in dirnames:  # os.walk lists links to directories here
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise refuse(
                    full, f"is a symbolic link to a directory ({os.readlink(full)!r})"
                )
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            file = full
            if stat.S_ISLNK(mode):
                file = os.path.realpath(full)
                if os.path.commonpath([root, file]) != root:
                    raise refuse(full, f"links to {file}, outside the directory")
                if not os.path.exists(file):
                    raise refuse(full, f"is a broken link (to {file})")
                mode = os.stat(file).st_mode
                if not stat.S_ISREG(mode):
                    raise refuse(full, f"links to a {_kind(mode)} ({file})")
            elif not stat.S_ISREG(mode):
                raise refuse(full, f"is a {_kind(mode)}")
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            fd = _open_regular(file)  # re-checked on the open descriptor
            try:
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
            finally:
                os.close(fd)
            digest.update(b"\0")
    return digest.hexdigest()


def _hash_remote_directory(path: str) -> str:
    """``hash_directory`` of a URL: the same walk (files sorted, then each
    subdirectory sorted, depth first), hence the same digest as a local copy.
    A URL file system has no links or devices to refuse."""
    import tensorflow as tf

    gfile = tf.io.gfile
    if not files.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory.")
    digest = hashlib.sha256()

    def visit(directory: str, relative: str) -> None:
        subdirs = []
        for name in files.listdir(directory):  # sorted
            full = os.path.join(directory, name)
            if files.isdir(full):
                subdirs.append(name)
                continue
            digest.update((relative + name).encode() + b"\0")
            with gfile.GFile(full, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
        for name in subdirs:
            visit(os.path.join(directory, name), relative + name + "/")

    try:
        visit(path, "")
    except tf.errors.OpError as e:
        raise OSError(f"cannot read {path}: {e.message}") from e
    return digest.hexdigest()


def local_cache_dir() -> str:
    """``~/.cache/revisit_tf/feature_cache``: the feature cache of URL workdirs.

    ``FeatureCache`` needs a local disk (flock, fsync, atomic directory
    renames), so a ``gs://`` workdir caches here unless ``linear_probe``'s
    ``cache_dir`` names another local directory. Entries are keyed by
    content, so workdirs can share it.
    """
    return os.path.join(
        os.path.expanduser("~"), ".cache", "revisit_tf", "feature_cache"
    )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: str, nbytes: int, written: int, error: OSError) -> OSError:
    """The ``CacheWriteError`` for a failed write of ``nbytes`` to ``path``."""
    directory = os.path.dirname(path) or "."
    try:
        free = f"{shutil.disk_usage(directory).free} bytes are free there"
    except OSError:
        free = "the free space there is unknown"
    # numpy reports a short write as "N requested and M written", no errno.
    short = error.errno is None and "requested and" in str(error)
    if short or error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        message = (
            f"Feature cache: the disk is full at {path} (or a quota or file-size "
            f"limit was hit): writing {nbytes} bytes ({nbytes / 2**20:.1f} MiB) "
            f"stopped after {written} ({error}); {free}. Free space, or point "
            "the cache (cache_dir) at a larger disk. The partial entry was "
            "removed; entries already cached are untouched."
        )
    else:
        message = (
            f"Feature cache: writing {nbytes} bytes to {path} failed after "
            f"{written} ({error}). The partial entry was removed; entries "
            "already cached are untouched."
        )
    out = CacheWriteError(message)
    out.errno = error.errno if error.errno is not None else errno.ENOSPC
    return out


def _npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` header ``np.save`` writes for ``array`` (format 1.0, or 2.0)."""
    header = io.BytesIO()
    data = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, data)
    except ValueError:  # a header over 64 KiB needs format 2.0
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, data)
    return header.getvalue()


def _save_npy(path: str, array: np.ndarray) -> dict[str, int]:
    """Writes ``array`` as ``np.save`` would, durably; returns ``{"bytes", "crc32"}``.

    Streams the header and the data in 4 MiB chunks into a temporary file with
    a random name next to ``path`` (created exclusively, so never a file or
    link someone else made), fsyncs it and renames it to ``path``. The CRC-32
    is that of the bytes written. On any failure the temporary file is
    removed and nothing is left at ``path``.

    Raises:
        CacheWriteError: the write failed (a full disk says so, with the size).
    """
    array = np.ascontiguousarray(array)
    header = _npy_header(array)
    payload = array.reshape(-1).view(np.uint8)
    nbytes = len(header) + payload.size
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")
    written, crc = 0, 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            chunks = [header] + [
                payload[i : i + _WRITE_CHUNK]
                for i in range(0, payload.size, _WRITE_CHUNK)
            ]
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    if n <= 0:  # a short write that made no progress
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += n
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, nbytes, written, e) from e
        raise
    return {"bytes": nbytes, "crc32": crc}


def _is_int(value: Any, low: int, high: int | None = None) -> bool:
    """Whether ``value`` is a JSON integer (not a bool) in ``[low, high)``."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value < high)
    )


_FILE_INFO = '{"bytes": int >= 0, "crc32": int in [0, 2**32)}'


def _check_file_info(info: Any, where: str, field: str, rows: bool) -> None:
    expected = _FILE_INFO[:-1] + ', "rows": int >= 1}' if rows else _FILE_INFO
    if not isinstance(info, dict):
        raise CacheError(f"{where}: {field} is {info!r}; expected {expected}.")
    for key, ok in [
        ("bytes", _is_int(info.get("bytes"), 0)),
        ("crc32", _is_int(info.get("crc32"), 0, 2**32)),
        *([("rows", _is_int(info.get("rows"), 1))] if rows else []),
    ]:
        if not ok:
            raise CacheError(
                f"{where}: {field}.{key} is {info.get(key)!r}; expected {expected}."
            )


def _check_manifest(manifest: Any, where: str) -> None:
    """Checks the structure of a parsed manifest; raises ``CacheError`` naming
    the first wrong field and the expected form."""
    if not isinstance(manifest, dict):
        raise CacheError(
            f"{where}: expected a JSON object; got {type(manifest).__name__}."
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"{where}: format version {manifest.get('version')!r}; "
            f"expected {FORMAT_VERSION}."
        )
    if not isinstance(manifest.get("spec"), dict) or not manifest["spec"]:
        raise CacheError(
            f"{where}: spec is {manifest.get('spec')!r}; expected a non-empty object."
        )
    for key in ("num_examples", "dim"):
        if not _is_int(manifest.get(key), 1):
            raise CacheError(
                f"{where}: {key} is {manifest.get(key)!r}; expected an int >= 1."
            )
    _check_file_info(manifest.get("labels"), where, "labels", rows=False)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise CacheError(
            f"{where}: shards is {shards!r:.200}; expected a non-empty list of "
            '["shard-00000.npy", {"bytes", "crc32", "rows"}] pairs.'
        )
    for i, pair in enumerate(shards):
        name = _SHARD_NAME.format(i)
        if not (isinstance(pair, list) and len(pair) == 2):
            raise CacheError(
                f"{where}: shards[{i}] is {pair!r:.200}; expected "
                f'["{name}", {{"bytes", "crc32", "rows"}}].'
            )
        if pair[0] != name:
            raise CacheError(
                f"{where}: shards[{i}] names {pair[0]!r}; expected {name!r}."
            )
        _check_file_info(pair[1], where, f"shards[{i}] ({name})", rows=True)
    total = sum(info["rows"] for _, info in shards)
    if total != manifest["num_examples"]:
        raise CacheError(
            f"{where}: the shards' rows sum to {total}; num_examples is "
            f"{manifest['num_examples']}."
        )


def _read_manifest(path: str) -> Any:
    """The parsed ``manifest.json`` at ``path`` (bounded read, regular file)."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        raise CacheError(
            f"{os.path.dirname(path)}: no {MANIFEST} (incomplete entry)."
        ) from None
    except (OSError, UnsafeFileError) as e:
        raise CacheError(f"{path}: unreadable ({e}).") from None
    try:
        with os.fdopen(fd, "rb") as f:
            content = f.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise CacheError(f"{path}: unreadable ({e}).") from None
    if len(content) > _MAX_MANIFEST_BYTES:
        raise CacheError(f"{path}: over {_MAX_MANIFEST_BYTES} bytes; not a manifest.")
    try:
        return json.loads(content.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
        raise CacheError(f"{path}: unreadable ({e}).") from None


def _check_npy(file: str, nbytes: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Checks that ``file`` is a regular ``.npy`` file of ``nbytes`` bytes holding
    a C-order ``dtype`` array of ``shape`` (reads its header only)."""
    try:
        fd = _open_regular(file)
    except FileNotFoundError:
        raise CacheError(
            f"{file}: missing; the manifest says {nbytes} bytes."
        ) from None
    except UnsafeFileError as e:
        raise CacheError(str(e)) from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != nbytes:
            raise CacheError(f"{file}: {size} bytes; the manifest says {nbytes} bytes.")
        file_shape, fortran, file_dtype = _read_npy_header(f, file)
        data_start = f.tell()
    if tuple(file_shape) != shape:
        axes = "(rows, columns)" if len(shape) == 2 else "(rows,)"
        raise CacheError(
            f"{file}: the file holds an array of shape {tuple(file_shape)}; the "
            f"manifest says {shape} {axes}."
        )
    if file_dtype != dtype or fortran:
        raise CacheError(
            f"{file}: holds {file_dtype} ({'Fortran' if fortran else 'C'} order); "
            f"expected C-order {np.dtype(dtype)}."
        )
    expected = data_start + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size != expected:
        raise CacheError(
            f"{file}: {size} bytes, but its header ({shape} {np.dtype(dtype)}) "
            f"needs {expected}."
        )


def _read_npy_header(f, file: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` header at ``f``'s
    position; ``f`` is left at the first data byte."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
    except (ValueError, OSError) as e:
        raise CacheError(f"{file}: not a readable .npy file ({e}).") from None
    return tuple(shape), fortran, dtype


def _expect_header(f, file: str, shape: tuple[int, ...], dtype) -> None:
    """Reads ``f``'s ``.npy`` header (``f`` left at the first data byte) and
    checks it holds C-ordered ``dtype`` ``shape``."""
    header_shape, fortran, header_dtype = _read_npy_header(f, file)
    if header_shape != tuple(shape) or header_dtype != np.dtype(dtype) or fortran:
        raise CacheError(
            f"{file}: holds {header_dtype} {header_shape}; the manifest says "
            f"{np.dtype(dtype)} {tuple(shape)}."
        )


def _read_aligned(f, file: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The ``.npy`` array of open file ``f`` read straight into an aligned buffer.

    One copy from the page cache (``readinto``), no second one: the result
    is ``arrays.aligned_empty``, which a streamed probe hands to TensorFlow
    without copying it again (``arrays.as_tensor``).
    """
    _expect_header(f, file, shape, dtype)
    out = arrays.aligned_empty(tuple(shape), dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CacheError(f"{file}: {got} of {len(view)} data bytes (truncated).")
        got += n
    return out


def _open_entry_file(file: str):
    """``file`` opened for reading (binary) if it is a regular file, else a
    ``CacheError`` naming it (missing, a link, a device, ...)."""
    try:
        fd = _open_regular(file)
    except FileNotFoundError:
        raise CacheError(f"{file}: missing (removed while in use).") from None
    except UnsafeFileError as e:
        raise CacheError(str(e)) from None
    return os.fdopen(fd, "rb")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced, resized or written to."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _map_npy(file: str, size: int, shape: tuple[int, ...], dtype):
    """``(_identity, array, mmap)`` of a private mapping of the ``.npy`` file
    ``file`` (``size`` bytes), its array checked to be ``shape``."""
    with _open_entry_file(file) as f:
        st = os.fstat(f.fileno())
        if st.st_size != size:
            raise CacheError(f"{file}: size changed while in use.")
        _expect_header(f, file, shape, dtype)
        offset = f.tell()
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(mapping, dtype, count=count, offset=offset).reshape(shape)
    return _identity(st), array, mapping


class CachedFeatures:
    """One complete, checked cache entry: the ``[N, D]`` features of one split.

    Opening checks the manifest's structure and every file against it
    (regular file, size, ``.npy`` header shape and dtype: cheap, headers
    only); reading a shard checks its CRC-32 (one pass over bytes that are
    read anyway) and its shape.

    Example:
        >>> entry = cache.get_or_build({"pre_logits": spec}, build)["pre_logits"]
        >>> entry.num_examples, entry.dim, entry.num_shards
        (50000, 2048, 7)
        >>> for x, y in entry.iter_shards(): ...   # x: [n_i, D], y: [n_i]
    """

    def __init__(self, path: str, spec: Mapping[str, Any] | None = None):
        """Opens the entry at ``path``.

        Args:
            path: the entry directory.
            spec: if given, the manifest's spec must equal it.

        Raises:
            CacheError: missing/unreadable manifest, one of the wrong
                structure (the message names the field and the expected
                form), other format version, different spec, or a file that
                is missing, not a regular file, of the wrong size, or whose
                header holds another shape than the manifest (e.g. a wrong
                row count).
        """
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        manifest = _read_manifest(manifest_path)
        _check_manifest(manifest, manifest_path)
        if spec is not None and canonical_json(manifest["spec"]) != canonical_json(
            spec
        ):
            raise CacheError(f"{manifest_path}: written for a different spec.")
        num_examples, dim = manifest["num_examples"], manifest["dim"]
        # Against the files themselves: a wrong row count would pair rows
        # with the wrong labels in the streamed path.
        _check_npy(
            os.path.join(self.path, LABELS),
            manifest["labels"]["bytes"],
            (num_examples,),
            np.dtype(np.int32),
        )
        for name, info in manifest["shards"]:
            _check_npy(
                os.path.join(self.path, name),
                info["bytes"],
                (info["rows"], dim),
                np.dtype(np.float32),
            )
        self.manifest = manifest
        self.spec = manifest["spec"]
        self.num_examples = int(num_examples)
        self.dim = int(dim)
        self._shards = [(name, info) for name, info in manifest["shards"]]
        self.shard_rows = [int(info["rows"]) for _, info in self._shards]
        self._starts = list(itertools.accumulate(self.shard_rows, initial=0))
        self._labels: np.ndarray | None = None
        self._verified: set[str] = set()
        # name -> (file identity (_identity), array viewing the mapping, mmap).
        self._maps: dict[str, tuple[tuple[int, ...], np.ndarray, Any]] = {}

    @property
    def num_shards(self) -> int:
        """Number of row shards."""
        return len(self._shards)

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 feature matrix (``4 N D``)."""
        return 4 * self.num_examples * self.dim

    def _read(
        self,
        name: str,
        info: Mapping[str, int],
        shape: tuple[int, ...],
        dtype: type[np.generic],
    ) -> np.ndarray:
        """Loads a file; its CRC-32 is checked the first time this object reads it.

        A streamed probe reads every shard at every objective evaluation;
        re-checking the CRC each time would cost about as much as the read.
        The file must still be a regular file (never a link or a device), is
        read at most to its recorded size, and must hold ``shape``/``dtype``.
        """
        file = os.path.join(self.path, name)
        with _open_entry_file(file) as f:
            if name in self._verified:
                if os.fstat(f.fileno()).st_size != info["bytes"]:
                    raise CacheError(f"{file}: size changed while in use.")
                array = _read_aligned(f, file, shape, dtype)
            else:
                content = f.read(info["bytes"] + 1)
                if (
                    len(content) != info["bytes"]
                    or zlib.crc32(content) != info["crc32"]
                ):
                    raise CacheError(f"{file}: CRC-32 mismatch (corrupt file).")
                array = np.load(io.BytesIO(content), allow_pickle=False)
        if array.shape != shape or array.dtype != dtype:
            raise CacheError(
                f"{file}: holds {array.dtype} {array.shape}; the manifest says "
                f"{np.dtype(dtype)} {shape}."
            )
        self._verified.add(name)
        return array

    @property
    def labels(self) -> np.ndarray:
        """int32 ``[N]`` labels (read and checked once)."""
        if self._labels is None:
            self._labels = self._read(
                LABELS, self.manifest["labels"], (self.num_examples,), np.int32
            )
        return self._labels

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns shard ``index``: float32 ``[n_i, D]`` and int32 ``[n_i]``.

        Raises:
            IndexError: bad index.
            CacheError: the shard's bytes fail their CRC-32 or its shape.
        """
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} of {self.num_shards}.")
        name, info = self._shards[index]
        x = self._read(name, info, (self.shard_rows[index], self.dim), np.float32)
        start = self._starts[index]
        return x, self.labels[start : start + x.shape[0]]

    def mapped_shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``index`` as a memory map of its file: ``shard`` without a copy.

        The first call maps the file for the life of this object and checks
        the CRC-32 of the mapped bytes. Later calls cost a ``stat``:
        a streamed probe's passes then read the page cache in place instead of
        copying it (on a 2-core CPU a pass of ``X W`` over 60000 x 784 went from
        0.070 s to 0.030 s, against 0.028 s for the same shards in memory;
        ``revisit-benchmark probe``), and the pages are the kernel's (clean
        file pages, reclaimed under memory pressure and read again from disk),
        not this process's private memory. ``MADV_WILLNEED`` starts the
        kernel's read-ahead of the shard at every call.

        The mapping is private (copy-on-write), so the array is writeable and
        ``arrays.as_tensor`` shares it with TensorFlow; nothing writes to it.
        Reading a mapped file that was truncated would kill the process
        (SIGBUS) and one rewritten in place would change under the mapping, so
        every call checks that the path is still the mapped file, unmodified
        (device, inode, size, modification and change times), and raises
        ``CacheError`` otherwise. Prefer
        ``shard`` on filesystems whose read errors would surface as SIGBUS
        (network filesystems).

        Raises:
            IndexError: bad index.
            CacheError: as ``shard``, or the file changed since it was mapped.
        """
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} of {self.num_shards}.")
        name, info = self._shards[index]
        file = os.path.join(self.path, name)
        shape = (self.shard_rows[index], self.dim)
        if name not in self._maps:
            mapped = _map_npy(file, info["bytes"], shape, np.float32)
            if zlib.crc32(mapped[2]) != info["crc32"]:  # the mapped bytes
                raise CacheError(f"{file}: CRC-32 mismatch (corrupt file).")
            self._verified.add(name)
            self._maps[name] = mapped
        identity, array, mapping = self._maps[name]
        try:
            st = os.stat(file)
        except FileNotFoundError:
            raise CacheError(f"{file}: missing (removed while in use).") from None
        if _identity(st) != identity:
            raise CacheError(f"{file}: replaced or modified while mapped.")
        if hasattr(mmap, "MADV_WILLNEED"):
            mapping.madvise(mmap.MADV_WILLNEED)
        start = self._starts[index]
        return array, self.labels[start : start + shape[0]]

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields every shard in row order (see ``shard``)."""
        for i in range(self.num_shards):
            yield self.shard(i)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole float32 ``[N, D]`` matrix and int32 ``[N]`` labels (in memory)."""
        # Aligned, so that the probes hand it to TensorFlow without a copy.
        out = arrays.aligned_empty((self.num_examples, self.dim), np.float32)
        start = 0
        for x, _ in self.iter_shards():
            out[start : start + len(x)] = x
            start += len(x)
        return out, self.labels

    def verify(self) -> None:
        """Reads every file and checks its CRC-32 (again, if read before).

        Raises:
            CacheError: on the first corrupt file.
        """
        self._verified.clear()
        self._labels = None
        _ = self.labels  # reads and checks labels.npy
        for index in range(self.num_shards):
            self.shard(index)


class _EntryWriter:
    """Accumulates rows of one endpoint into shards inside a partial directory."""

    def __init__(self, path: str, spec: Mapping[str, Any], shard_bytes: int):
        self.path, self.spec, self.shard_bytes = path, spec, shard_bytes
        os.mkdir(path)  # exclusive: fails if anything is already there
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[tuple[str, dict[str, int]]] = []
        self.dim: int | None = None
        self.num_examples = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"features must be [B, D]; got shape {x.shape}.")
        if self.dim is None:
            self.dim = int(x.shape[1])
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {x.shape}.")
        if not np.isfinite(x).all():
            raise ValueError(
                f"non-finite features for {self.spec.get('endpoint', '?')!r}; "
                "they would poison every probe."
            )
        self.pending.append(x.astype(np.float32, copy=False))
        self.pending_rows += len(x)
        self.num_examples += len(x)
        rows_per_shard = max(1, self.shard_bytes // (4 * max(1, self.dim)))
        while self.pending_rows >= rows_per_shard:
            block = np.concatenate(self.pending)
            self._write_shard(block[:rows_per_shard])
            rest = block[rows_per_shard:]
            self.pending = [rest] if len(rest) else []
            self.pending_rows = len(rest)

    def _write_shard(self, block: np.ndarray) -> None:
        name = _SHARD_NAME.format(len(self.shards))
        info = _save_npy(os.path.join(self.path, name), block)
        info["rows"] = int(len(block))
        self.shards.append((name, info))

    def finish(self, labels: np.ndarray) -> None:
        if self.num_examples == 0:
            raise ValueError(
                f"no examples to cache for dataset {self.spec.get('dataset', '?')!r},"
                f" split {self.spec.get('split', '?')!r} (endpoint "
                f"{self.spec.get('endpoint', '?')!r}): the split is empty."
            )
        if self.pending_rows:
            self._write_shard(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        labels_info = _save_npy(os.path.join(self.path, LABELS), labels)
        _fsync_dir(self.path)
        faults.point("cache.shards_written")
        manifest = {
            "version": FORMAT_VERSION,
            "spec": json.loads(canonical_json(self.spec)),
            "num_examples": self.num_examples,
            "dim": self.dim,
            "labels": labels_info,
            "shards": self.shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = os.path.join(self.path, MANIFEST)
        data = json.dumps(manifest, indent=1).encode()
        try:
            files.write_atomic(path, data, fsync=True)
        except OSError as e:
            raise _write_error(path, len(data), 0, e) from e
        _fsync_dir(self.path)
        faults.point("cache.manifest_written")


class FeatureCache:
    """A directory of feature entries keyed by ``spec_key(spec)``.

    Example:
        >>> cache = FeatureCache("/data/feature_cache")
        >>> entries = cache.get_or_build(
        ...     {"pre_logits": {"model": model_hash, "endpoint": "pre_logits",
        ...                     "split": "train", ...}},
        ...     lambda: extractor.iter_batches(dataset))
        >>> x, y = entries["pre_logits"].load()   # [N, D], [N]
    """

    def __init__(
        self, root: str | os.PathLike, *, shard_bytes: int = DEFAULT_SHARD_BYTES
    ):
        """Args:
        root: the cache directory (created if missing).
        shard_bytes: target size of a feature shard (>= 4 KiB).

        Raises:
            ValueError: for ``shard_bytes`` below 4096, or a ``root`` that is
                a URL (the cache needs a local disk: ``local_cache_dir()``).
        """
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int):
            raise ValueError(f"shard_bytes must be an int; got {shard_bytes!r}.")
        if shard_bytes < 4096:
            raise ValueError(f"shard_bytes must be >= 4096; got {shard_bytes}.")
        self.root = os.fspath(root)
        if files.is_remote(self.root):
            raise ValueError(
                f"The feature cache must be on a local disk (it needs flock, "
                f"fsync and atomic directory renames); got {self.root!r}. Bind "
                "linear_probe.cache_dir to a local directory, or leave it unset "
                f"(a URL workdir then caches in {local_cache_dir()})."
            )
        self.shard_bytes = shard_bytes
        os.makedirs(self.root, exist_ok=True)

    def path(self, spec: Mapping[str, Any]) -> str:
        """The entry directory of ``spec`` (which may not exist yet)."""
        return os.path.join(self.root, spec_key(spec))

    def lookup(self, spec: Mapping[str, Any]) -> CachedFeatures | None:
        """Opens the entry of ``spec``; None if it is missing or fails a check.

        A failing entry is logged and left in place (``get_or_build`` deletes
        and rebuilds it under the key's lock).
        """
        path = self.path(spec)
        if not os.path.isdir(path):
            return None
        try:
            return CachedFeatures(path, spec)
        except CacheError as e:
            _logger.warning("Feature cache entry is not usable: %s", e)
            return None

    def _checked(self, spec: Mapping[str, Any], verify: bool) -> CachedFeatures | None:
        """``lookup``, plus a full CRC pass when ``verify``."""
        entry = self.lookup(spec)
        if entry is not None and verify:
            try:
                entry.verify()
            except CacheError as e:
                _logger.warning("Feature cache entry is not usable: %s", e)
                return None
        return entry

    @contextlib.contextmanager
    def _locked(self, key: str):
        fd = os.open(
            os.path.join(self.root, key + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o666,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _clean(self, key: str) -> None:
        """Deletes partial dirs and an unusable entry of ``key`` (under its lock)."""
        for name in os.listdir(self.root):
            if name.startswith(key + ".partial-"):
                _logger.warning(
                    "Feature cache: removing %s left by an interrupted build.", name
                )
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        path = os.path.join(self.root, key)
        if os.path.isdir(path):
            _logger.warning("Feature cache: rebuilding %s.", path)
            shutil.rmtree(path)

    def get_or_build(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        build: Callable[[], Iterable[tuple[Mapping[str, np.ndarray], np.ndarray]]],
        *,
        verify: bool = False,
    ) -> dict[str, CachedFeatures]:
        """Returns a checked entry per name of ``specs``, building missing ones.

        Args:
            specs: ``{endpoint: spec}``; the specs must differ (each names its
                endpoint).
            build: called at most once, with no arguments, if some entry is
                missing or unusable; returns an iterable of
                ``({endpoint: [B, D] features}, [B] labels)`` batches covering
                the whole split in order (it may yield more endpoints than
                needed).
            verify: also check every shard's CRC-32 of entries found on disk
                now (otherwise shards are checked when read).

        Returns:
            ``{endpoint: CachedFeatures}``.

        Raises:
            ValueError: a batch lacks an endpoint, has rows that do not match
                its labels, a non-finite value, or the split is empty (the
                message names the spec's dataset and split).
            CacheError: an entry written by this call fails its own check.
            CacheWriteError: a write failed (a full disk: the message says so,
                with the file and its size); nothing was committed and the
                entries already cached are untouched.
        """
        keys = {name: spec_key(spec) for name, spec in specs.items()}
        if len(set(keys.values())) != len(keys):
            raise ValueError(f"specs must differ per endpoint; got {dict(specs)!r}.")
        found: dict[str, CachedFeatures] = {}
        for name, spec in specs.items():
            entry = self._checked(spec, verify)
            if entry is not None:
                found[name] = entry
        missing = [name for name in specs if name not in found]
        if not missing:
            _logger.info("Feature cache: using %s.", ", ".join(keys.values()))
            return found
        with contextlib.ExitStack() as stack:
            for name in sorted(missing, key=keys.get):  # one lock order
                stack.enter_context(self._locked(keys[name]))
            # Another process may have built them while we waited.
            still_missing = []
            for name in missing:
                entry = self._checked(specs[name], verify)
                if entry is None:
                    still_missing.append(name)
                    self._clean(keys[name])
                else:
                    found[name] = entry
            if still_missing:
                found.update(self._build(specs, keys, still_missing, build))
        return {name: found[name] for name in specs}

    def _build(self, specs, keys, names, build) -> dict[str, CachedFeatures]:
        # Unpredictable: nobody can prepare a file or link at this path.
        nonce = f"{os.getpid()}-{secrets.token_hex(8)}"
        writers = {
            name: _EntryWriter(
                os.path.join(self.root, f"{keys[name]}.partial-{nonce}"),
                specs[name],
                self.shard_bytes,
            )
            for name in names
        }
        labels: list[np.ndarray] = []
        start = last_log = time.perf_counter()
        seen = 0
        try:
            for features, batch_labels in build():
                batch_labels = np.asarray(batch_labels)
                for name, writer in writers.items():
                    if name not in features:
                        raise ValueError(
                            f"the feature batch has no {name!r}; it has "
                            f"{sorted(features)}."
                        )
                    x = features[name]
                    if len(x) != len(batch_labels):
                        raise ValueError(
                            f"{name!r} has {len(x)} rows but the batch has "
                            f"{len(batch_labels)} labels."
                        )
                    writer.add(x)
                labels.append(batch_labels.astype(np.int32))
                seen += len(batch_labels)
                now = time.perf_counter()
                if now - last_log > _LOG_EVERY_SECONDS:
                    last_log = now
                    _logger.info(
                        "Feature cache: %d examples written (%.0f/s).",
                        seen,
                        seen / (now - start),
                    )
            all_labels = np.concatenate(labels) if labels else np.zeros([0], np.int32)
            out = {}
            for name, writer in writers.items():
                writer.finish(all_labels)
                final = os.path.join(self.root, keys[name])
                os.rename(writer.path, final)
                _fsync_dir(self.root)
                faults.point("cache.entry_committed")
                out[name] = CachedFeatures(final, specs[name])
                _logger.info(
                    "Feature cache: wrote %s (%s, %d x %d, %d shards) in %.1fs.",
                    keys[name],
                    name,
                    out[name].num_examples,
                    out[name].dim,
                    out[name].num_shards,
                    time.perf_counter() - start,
                )
            return out
        except BaseException:
            for writer in writers.values():
                shutil.rmtree(writer.path, ignore_errors=True)
            raise
