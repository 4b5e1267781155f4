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

Crash safety. An entry is written into ``<root>/<key>.partial-<pid>-<nonce>/``
and renamed to ``<root>/<key>`` only after every file and the manifest are
written and fsync-ed; a rename is atomic, so a reader sees a whole entry or
none. Builders of one key serialise on ``<root>/<key>.lock`` (``flock``), and
the lock holder deletes partial directories that crashed builders left behind.
An entry is also checked when opened (manifest present and parseable, same
spec, every file with its recorded size) and every file's CRC-32 the first
time it is read. Anything that fails a check is reported, deleted and rebuilt by
``get_or_build``; it is never silently used.

NumPy only (no TensorFlow), so the cache can be inspected and tested cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from revisit_tf.probe import arrays

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
# 64 MiB shards: big enough that per-shard overhead (file open, one solver
# step per shard) is negligible, small enough that a streamed objective holds
# only a few in memory (one per replica plus read-ahead).
DEFAULT_SHARD_BYTES = 64 << 20
_LOG_EVERY_SECONDS = 30.0

_logger = logging.getLogger(__name__)


class CacheError(ValueError):
    """A cache entry is incomplete, corrupt or does not match its spec."""


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

    Raises:
        FileNotFoundError: if ``path`` is not a directory.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory.")
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def _crc32_file(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: str, array: np.ndarray) -> dict[str, int]:
    """Writes ``array`` as .npy, fsyncs it, returns ``{"bytes", "crc32"}``."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "crc32": _crc32_file(path)}


class CachedFeatures:
    """One complete, checked cache entry: the ``[N, D]`` features of one split.

    Opening checks the manifest and the file sizes (cheap); reading a shard
    checks its CRC-32 (one pass over bytes that are read anyway).

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
            CacheError: missing/unreadable manifest, other format version,
                different spec, or a missing file or one of the wrong size.
        """
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise CacheError(
                f"{self.path}: no {MANIFEST} (incomplete entry)."
            ) from None
        except (OSError, ValueError) as e:
            raise CacheError(f"{manifest_path}: unreadable ({e}).") from None
        if manifest.get("version") != FORMAT_VERSION:
            raise CacheError(
                f"{manifest_path}: format version {manifest.get('version')!r}; "
                f"expected {FORMAT_VERSION}."
            )
        if spec is not None and canonical_json(manifest.get("spec")) != canonical_json(
            spec
        ):
            raise CacheError(f"{manifest_path}: written for a different spec.")
        for name, info in [(LABELS, manifest["labels"]), *manifest["shards"]]:
            file = os.path.join(self.path, name)
            size = os.path.getsize(file) if os.path.isfile(file) else None
            if size != info["bytes"]:
                raise CacheError(
                    f"{file}: {'missing' if size is None else f'{size} bytes'}; "
                    f"the manifest says {info['bytes']} bytes."
                )
        self.manifest = manifest
        self.spec = manifest["spec"]
        self.num_examples = int(manifest["num_examples"])
        self.dim = int(manifest["dim"])
        self._shards = [(name, info) for name, info in manifest["shards"]]
        self.shard_rows = [int(info["rows"]) for _, info in self._shards]
        self._labels: np.ndarray | None = None
        self._verified: set[str] = set()

    @property
    def num_shards(self) -> int:
        """Number of row shards."""
        return len(self._shards)

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 feature matrix (``4 N D``)."""
        return 4 * self.num_examples * self.dim

    def _read(self, name: str, info: Mapping[str, int]) -> np.ndarray:
        """Loads a file; its CRC-32 is checked the first time this object reads it.

        A streamed probe reads every shard at every objective evaluation;
        re-checking the CRC each time would cost about as much as the read.
        """
        file = os.path.join(self.path, name)
        if name in self._verified:
            array = np.load(file, allow_pickle=False)
            if os.path.getsize(file) != info["bytes"]:
                raise CacheError(f"{file}: size changed while in use.")
            return array
        with open(file, "rb") as f:
            content = f.read()
        if len(content) != info["bytes"] or zlib.crc32(content) != info["crc32"]:
            raise CacheError(f"{file}: CRC-32 mismatch (corrupt file).")
        self._verified.add(name)
        return np.load(io.BytesIO(content), allow_pickle=False)

    @property
    def labels(self) -> np.ndarray:
        """int32 ``[N]`` labels (read and checked once)."""
        if self._labels is None:
            self._labels = self._read(LABELS, self.manifest["labels"])
        return self._labels

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns shard ``index``: float32 ``[n_i, D]`` and int32 ``[n_i]``.

        Raises:
            IndexError: bad index.
            CacheError: the shard's bytes fail their CRC-32.
        """
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} of {self.num_shards}.")
        name, info = self._shards[index]
        x = self._read(name, info)
        start = sum(self.shard_rows[:index])
        return x, self.labels[start : start + x.shape[0]]

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
        self._read(LABELS, self.manifest["labels"])
        for name, info in self._shards:
            self._read(name, info)


class _EntryWriter:
    """Accumulates rows of one endpoint into shards inside a partial directory."""

    def __init__(self, path: str, spec: Mapping[str, Any], shard_bytes: int):
        self.path, self.spec, self.shard_bytes = path, spec, shard_bytes
        os.makedirs(path)
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
        name = f"shard-{len(self.shards):05d}.npy"
        info = _save_npy(os.path.join(self.path, name), block)
        info["rows"] = int(len(block))
        self.shards.append((name, info))

    def finish(self, labels: np.ndarray) -> None:
        if self.pending_rows:
            self._write_shard(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self.num_examples == 0:
            raise ValueError("no examples: the split is empty.")
        manifest = {
            "version": FORMAT_VERSION,
            "spec": json.loads(canonical_json(self.spec)),
            "num_examples": self.num_examples,
            "dim": self.dim,
            "labels": _save_npy(os.path.join(self.path, LABELS), labels),
            "shards": self.shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = os.path.join(self.path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, MANIFEST))
        _fsync_dir(self.path)


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
            ValueError: for ``shard_bytes`` below 4096.
        """
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int):
            raise ValueError(f"shard_bytes must be an int; got {shard_bytes!r}.")
        if shard_bytes < 4096:
            raise ValueError(f"shard_bytes must be >= 4096; got {shard_bytes}.")
        self.root = os.fspath(root)
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
        fd = os.open(os.path.join(self.root, key + ".lock"), os.O_RDWR | os.O_CREAT)
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
                its labels, a non-finite value, or the split is empty.
            CacheError: an entry written by this call fails its own check.
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
        nonce = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
