"""The Jigsaw permutation set (reference section 4.6).

Contract: :func:`get_permutations` returns the table the Jigsaw head uses,
int32 ``[num_permutations, 9]`` with 0-based patch indices; the pretext label
of a permutation is its row index. It comes either from a user-supplied file
in the original binary format (validated) or from the greedy maximal-average-
Hamming algorithm run from a fixed seed (deterministic across runs and
machines, memoised in-process and optionally cached on disk in a directory
the caller names).

The original binary format (``permutations_100_max.bin`` of Noroozi & Favaro's
JigsawPuzzleSolver, reference 4.6): little-endian int32 values, first
``num_perms`` and ``perm_len``, then ``num_perms * perm_len`` values row-major,
1-based (1..9).

A generated set is not the published one (random start and ties, reference
4.6), so pretext labels/accuracies are not comparable with the original's;
representation quality should be unaffected in expectation.

Place in the data flow: used by ``models.pretext`` (the head's table), by
``experiments.pretrain`` (which records the chosen set in the workdir) and by
the ``jigsaw_perms`` op only through ``num_permutations``. No gin, no env.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os

import numpy as np

from revisit_tf import files

_logger = logging.getLogger(__name__)

PERM_LENGTH = 9  # 3x3 grid (reference 4.3).
# Statistics of the published permutations_100_max.bin (reference 4.6).
REFERENCE_MIN_HAMMING = 2
REFERENCE_MEAN_HAMMING = 8.08
REFERENCE_SHA256 = "c329e21a1dc7c5df5e0800cab6577285e7fad9e71ac31cab2e5a7914e52975bc"
# Bump when the generator changes, so old cache files are not reused.
_GENERATOR_VERSION = 1


def generate_permutations(
    num_permutations: int = 100, *, length: int = PERM_LENGTH, seed: int = 0
) -> np.ndarray:
    """Greedy maximal-average-Hamming permutation set (reference 4.6).

    Starts from one non-identity permutation drawn uniformly (from ``seed``)
    and repeatedly adds the not-yet-chosen permutation whose summed Hamming
    distance to the chosen ones is largest; ties go to the first candidate in
    lexicographic order (``itertools.permutations`` order), so the result
    depends only on ``seed``. The identity is never chosen.

    Args:
        num_permutations: size of the set, ``1 <= n < length!``.
        length: permutation length (9 patches).
        seed: seed of the starting permutation (``numpy.random.RandomState``,
            whose stream numpy keeps stable across versions).

    Returns:
        int32 ``[num_permutations, length]``, 0-based, rows distinct.

    Raises:
        ValueError: bad ``num_permutations``/``length``/``seed``.
    """
    if not (isinstance(length, int) and 2 <= length <= 10):
        raise ValueError(f"length must be an int in [2, 10], got {length!r}.")
    total = math.factorial(length)
    if not (
        isinstance(num_permutations, int)
        and not isinstance(num_permutations, bool)
        and 1 <= num_permutations < total
    ):
        raise ValueError(
            f"num_permutations must be an int in [1, {total - 1}] (all "
            f"permutations of {length} but the identity), got {num_permutations!r}."
        )
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}.")
    # [length!, length], lexicographic; row 0 is the identity.
    candidates = np.array(list(itertools.permutations(range(length))), np.int8)
    available = np.ones(total, bool)
    available[0] = False  # the identity is excluded (reference 4.6)
    start = 1 + np.random.RandomState(seed).randint(total - 1)
    chosen = [start]
    available[start] = False
    # Summed matches (length - distance) per candidate; minimising matches is
    # maximising the summed distance. Position-major copies make each step
    # `length` contiguous byte comparisons.
    columns = np.ascontiguousarray(candidates.T)  # [length, length!]
    matches = np.zeros(total, np.int64)
    taken = 1 << 40  # far above any sum of matches: never the minimum again
    matches[~available] = taken
    while len(chosen) < num_permutations:
        last = candidates[chosen[-1]]
        for position in range(length):
            matches += columns[position] == last[position]
        matches[chosen[-1]] = taken
        best = int(np.argmin(matches))  # first minimum: deterministic ties
        chosen.append(best)
        matches[best] = taken
    return candidates[chosen].astype(np.int32)


def hamming_stats(permutations: np.ndarray) -> dict[str, float]:
    """Pairwise Hamming distances of a permutation set.

    Args:
        permutations: ``[n, length]``, ``n >= 2``.

    Returns:
        ``{"num_permutations", "length", "min_hamming", "mean_hamming",
        "max_hamming"}`` over the ``n (n - 1) / 2`` unordered pairs.
    """
    perms = np.asarray(permutations)
    n = len(perms)
    if n < 2:
        raise ValueError(f"Need at least 2 permutations, got shape {perms.shape}.")
    dist = (perms[:, None, :] != perms[None, :, :]).sum(-1)  # [n, n]
    pairs = dist[np.triu_indices(n, k=1)]
    return {
        "num_permutations": int(n),
        "length": int(perms.shape[1]),
        "min_hamming": int(pairs.min()),
        "mean_hamming": float(pairs.mean()),
        "max_hamming": int(pairs.max()),
    }


def validate_permutations(
    permutations: np.ndarray,
    *,
    length: int = PERM_LENGTH,
    num_permutations: int | None = None,
    what: str = "permutation set",
) -> np.ndarray:
    """Checks a 0-based table; returns it as int32 or raises ``ValueError``.

    Checks: rank 2 with ``length`` columns (and ``num_permutations`` rows if
    given), every row a permutation of ``0..length-1``, no duplicate rows.
    """
    perms = np.asarray(permutations)
    if perms.ndim != 2 or perms.shape[1] != length or len(perms) < 1:
        raise ValueError(
            f"{what}: expected shape [num_permutations, {length}], got "
            f"{list(perms.shape)}."
        )
    if num_permutations is not None and len(perms) != num_permutations:
        raise ValueError(
            f"{what}: expected {num_permutations} permutations, got {len(perms)}."
        )
    if not np.issubdtype(perms.dtype, np.integer):
        raise ValueError(f"{what}: expected integers, got dtype {perms.dtype}.")
    if perms.min() < 0 or perms.max() > length - 1:
        raise ValueError(
            f"{what}: values must lie in [0, {length - 1}] (0-based; the file "
            f"format is 1-based 1..{length}), got range [{perms.min()}, "
            f"{perms.max()}]."
        )
    bad = [i for i, row in enumerate(perms) if len(set(row.tolist())) != length]
    if bad:
        raise ValueError(
            f"{what}: rows {bad[:5]} are not permutations of 0..{length - 1} "
            f"(repeated values), e.g. row {bad[0]} = {perms[bad[0]].tolist()}."
        )
    _, first, counts = np.unique(perms, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = perms[first[counts > 1][0]].tolist()
        raise ValueError(
            f"{what}: {int((counts - 1).sum())} duplicate row(s), e.g. {dup}."
        )
    return perms.astype(np.int32)


def read_permutation_file(
    path: str,
    *,
    length: int = PERM_LENGTH,
    num_permutations: int | None = None,
    sha256: str | None = None,
) -> np.ndarray:
    """Reads and validates a file in the original binary format (reference 4.6).

    Args:
        path: the ``.bin`` file.
        length: expected permutation length (9).
        num_permutations: expected count, or None to accept the file's.
        sha256: optional expected SHA-256 hex digest of the file.

    Returns:
        int32 ``[n, length]``, 0-based.

    Raises:
        FileNotFoundError: no such file.
        ValueError: size, header, checksum, value range, non-permutation rows
            or duplicates, naming the file and the expected form.
    """
    raw = files.read_bytes(path)
    form = (
        "little-endian int32: num_perms, perm_len, then num_perms * perm_len "
        "values 1..perm_len, row-major"
    )
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256.lower():
            raise ValueError(
                f"Permutation file {path!r} has SHA-256 {digest}, expected {sha256}."
            )
    if len(raw) < 8 or len(raw) % 4:
        raise ValueError(
            f"Permutation file {path!r} has {len(raw)} bytes; expected {form}."
        )
    values = np.frombuffer(raw, dtype="<i4")
    n, perm_len = int(values[0]), int(values[1])
    if n < 1 or perm_len != length or len(values) != 2 + n * perm_len:
        raise ValueError(
            f"Permutation file {path!r}: header says {n} x {perm_len} but the file "
            f"holds {len(values) - 2} values; expected {form} with perm_len "
            f"{length}."
        )
    table = values[2:].reshape(n, perm_len).astype(np.int64) - 1
    return validate_permutations(
        table,
        length=length,
        num_permutations=num_permutations,
        what=f"Permutation file {path!r}",
    )


def permutation_file_bytes(permutations: np.ndarray) -> bytes:
    """A 0-based table in the original binary format (reference 4.6).

    Little-endian int32: ``num_perms``, ``perm_len``, then the rows 1-based.
    """
    perms = validate_permutations(permutations, length=np.shape(permutations)[-1])
    header = np.array(perms.shape, "<i4")
    data = np.concatenate([header, (perms + 1).reshape(-1).astype("<i4")])
    return data.astype("<i4").tobytes()


def describe_permutations(permutations: np.ndarray) -> dict:
    """Hamming statistics and file SHA-256 of a table (``permutations.json``)."""
    digest = hashlib.sha256(permutation_file_bytes(permutations)).hexdigest()
    return {
        **hamming_stats(np.asarray(permutations)),
        "sha256": digest,
        "is_reference_set": digest == REFERENCE_SHA256,
        "file": "permutations.bin (int32 LE: n, 9, then 1-based rows)",
    }


def write_permutation_file(path: str, permutations: np.ndarray) -> None:
    """Writes a 0-based table in the original 1-based binary format, atomically.

    Written through ``files.write_atomic``: a crash never leaves a
    half-written file.
    """
    data = permutation_file_bytes(permutations)
    local = not files.is_remote(path)
    files.makedirs(files.dirname(os.path.abspath(path) if local else path))
    files.write_atomic(path, data)


def file_sha256(path: str) -> str:
    """SHA-256 hex digest of a file."""
    return hashlib.sha256(files.read_bytes(path)).hexdigest()


@functools.cache
def _generated(num_permutations: int, seed: int) -> np.ndarray:
    perms = generate_permutations(num_permutations, seed=seed)
    perms.setflags(write=False)
    return perms


def get_permutations(
    num_permutations: int = 100,
    *,
    path: str | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    sha256: str | None = None,
) -> np.ndarray:
    """The Jigsaw permutation table: a user file, or the greedy set.

    Args:
        num_permutations: number of permutations (classes of the Jigsaw
            head); 100 in the paper, 1000 works (generation takes ~10 s).
        path: a file in the original binary format (e.g. the published
            ``permutations_100_max.bin``); validated, its row count must equal
            ``num_permutations``. ``None``: generate.
        seed: seed of the generated set (ignored with ``path``).
        cache_dir: where a generated set is cached as
            ``permutations_<n>_seed<seed>_v<version>.bin`` (read back and
            validated next time; written atomically). ``None``: no disk cache
            (the set is still memoised in-process).
        sha256: expected SHA-256 of ``path`` (e.g. ``REFERENCE_SHA256``).

    Returns:
        int32 ``[num_permutations, 9]``, 0-based, read-only.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a bad file or bad arguments (message names the value).
    """
    if path is not None:
        if not files.exists(path):
            raise FileNotFoundError(
                f"Permutation file {path!r} not found; pass the path of a file in "
                "the original binary format (e.g. permutations_100_max.bin) or "
                "path=None to generate the set."
            )
        perms = read_permutation_file(
            path, num_permutations=num_permutations, sha256=sha256
        )
        _logger.info(
            "Jigsaw permutations from %s (sha256 %s).", path, file_sha256(path)
        )
        perms.setflags(write=False)
        return perms
    if sha256 is not None:
        raise ValueError("sha256 checks a user file; it needs `path`.")
    if cache_dir is not None:
        name = f"permutations_{num_permutations}_seed{seed}_v{_GENERATOR_VERSION}.bin"
        cached = os.path.join(cache_dir, name)
        if files.exists(cached):
            perms = read_permutation_file(cached, num_permutations=num_permutations)
            perms.setflags(write=False)
            return perms
        perms = _generated(num_permutations, seed)
        write_permutation_file(cached, perms)
        return perms
    return _generated(num_permutations, seed)
