"""Reader for the idx file format of MNIST / Fashion-MNIST (stage 1, offline).

Contract: ``read_idx(path)`` returns the array stored in one idx file (raw or
gzip-compressed) and ``load_idx_dataset(data_dir)`` returns the official
``train`` and ``test`` splits of an MNIST-style directory as numpy arrays
``images uint8 [N, H, W, 1]`` and ``labels int64 [N]``. Both validate the files
completely and raise ``ValueError`` / ``FileNotFoundError`` naming the file and
what is wrong. ``data.sources`` wraps the arrays into ``tf.data`` (the
``fashion_mnist_idx`` source); nothing here touches TensorFlow.

This exists so that the whole stack can run offline on real images: Debian's
``dataset-fashion-mnist`` package installs the four files under
``/usr/share/datasets/fashion-mnist``. Debian re-compressed them, so TFDS's
registered checksums do not match; the content is validated here instead.

The idx format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte
magic number - two zero bytes, one dtype code (``0x08`` = unsigned byte), one
byte with the number of dimensions ``d`` - then ``d`` big-endian uint32 sizes,
then the values in C order.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import stat
import zlib

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "install the Debian package (`apt-get install dataset-fashion-mnist`, files "
    f"under {DEFAULT_FASHION_MNIST_DIR}) or pass data_dir=<directory holding "
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]>"
)
NUM_CLASSES = 10

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE_CODE = 0x08
_DTYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
# Official split -> file-name prefix (the MNIST naming Fashion-MNIST kept).
_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file, gzip-compressed or raw.

    Compression is detected from the content (gzip magic bytes ``1f 8b``), not
    from the file name. Parsed arrays are cached per (path, size, mtime), so a
    second call on an unchanged file is free; the returned array is therefore
    read-only (copy it before writing into it).

    Args:
      path: The idx file.

    Returns:
      A read-only ``uint8`` array whose shape is the header's dimensions, e.g.
      ``[60000, 28, 28]`` for ``train-images-idx3-ubyte``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is not a regular file (a device such as
        ``/dev/zero``, a fifo, a directory, or a link to one), or the
        content is not a valid uint8 idx file (bad gzip stream,
        bad magic number, dtype other than ``0x08``, 0 or more than 4
        dimensions, or a payload shorter or longer than the header says).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"idx file {path!r} does not exist.")
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(
            f"idx file {path!r} is not a regular file (a device, fifo or "
            "directory, or a link to one); reading it could block or never end."
        )
    return _read_idx_cached(os.path.abspath(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    # `size` and `mtime_ns` only take part in the cache key: a rewritten file
    # gets a new entry instead of a stale array.
    del mtime_ns
    # Non-blocking, and re-checked on the open descriptor: a file swapped for
    # a fifo or a device after the check cannot block or stream forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"idx file {path!r} is not a regular file.")
        content = f.read(size + 1)
    if len(content) != size:
        raise ValueError(f"idx file {path!r} changed while it was read; retry.")
    if content[:2] == _GZIP_MAGIC:
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(
                f"idx file {path!r} starts with the gzip magic bytes 1f 8b but "
                f"is not a valid gzip stream: {e}"
            ) from e
    return _parse_idx(content, path)


def _parse_idx(content: bytes, path: str) -> np.ndarray:
    """Validates the idx header and payload of ``content``; see ``read_idx``."""
    if len(content) < 4:
        raise ValueError(
            f"idx file {path!r} is {len(content)} bytes long, shorter than the "
            "4-byte magic number."
        )
    zero0, zero1, dtype_code, ndim = content[:4]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"idx file {path!r} has a bad magic number {content[:4].hex(' ')}: "
            "expected the first two bytes to be 00 00 (is it an idx file?)."
        )
    if dtype_code != _UBYTE_CODE:
        name = _DTYPE_NAMES.get(dtype_code, "unknown")
        raise ValueError(
            f"idx file {path!r} has dtype code 0x{dtype_code:02x} ({name}); only "
            f"0x{_UBYTE_CODE:02x} (unsigned byte) is supported."
        )
    if not 1 <= ndim <= 4:
        raise ValueError(
            f"idx file {path!r} declares {ndim} dimensions; expected 1 to 4."
        )
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(
            f"idx file {path!r} is truncated inside its header: {ndim} "
            f"dimensions need {header_size} header bytes, got {len(content)}."
        )
    shape = tuple(
        int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = math.prod(shape)
    payload = len(content) - header_size
    if payload < expected:
        raise ValueError(
            f"idx file {path!r} is truncated: header shape {list(shape)} needs "
            f"{expected} payload bytes, got {payload}."
        )
    if payload > expected:
        raise ValueError(
            f"idx file {path!r} has {payload - expected} extra bytes: header shape "
            f"{list(shape)} needs {expected} payload bytes, got {payload}."
        )
    # frombuffer over immutable bytes: the array is read-only, which keeps the
    # cached copy safe from callers.
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_file(data_dir: str, stem: str) -> str:
    """Returns ``data_dir/stem.gz`` or ``data_dir/stem``, whichever exists.

    Anything at that name counts (``read_idx`` then refuses a device or fifo
    by name instead of this saying that nothing is there).
    """
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.lexists(path):
            return path
    raise FileNotFoundError(
        f"Neither {os.path.join(data_dir, stem + '.gz')!r} nor "
        f"{os.path.join(data_dir, stem)!r} exists; {INSTALL_HINT}."
    )


def load_idx_dataset(
    data_dir: str | os.PathLike = DEFAULT_FASHION_MNIST_DIR,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads the official splits of an MNIST-style idx directory.

    Args:
      data_dir: Directory with ``{train,t10k}-images-idx3-ubyte[.gz]`` and
        ``{train,t10k}-labels-idx1-ubyte[.gz]``. Defaults to where Debian's
        ``dataset-fashion-mnist`` installs them.

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}`` with ``images``
      uint8 ``[N, H, W, 1]`` and ``labels`` int64 ``[N]`` (read-only arrays).
      For Fashion-MNIST ``N`` is 60,000 / 10,000 and ``H = W = 28``.

    Raises:
      FileNotFoundError: ``data_dir`` or one of the four files is missing.
      ValueError: A file is not valid idx (see ``read_idx``), images are not
        rank 3 or labels not rank 1 in the file, their counts differ, or a label
        lies outside ``[0, 9]``.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"idx data directory {data_dir!r} does not exist; {INSTALL_HINT}."
        )
    splits = {}
    for split, prefix in _SPLIT_PREFIXES.items():
        images_path = _find_file(data_dir, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_file(data_dir, f"{prefix}-labels-idx1-ubyte")
        splits[split] = _validated_split(images_path, labels_path)
    return splits


def _validated_split(images_path: str, labels_path: str) -> tuple[np.ndarray, ...]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(
            f"idx images file {images_path!r} has shape {list(images.shape)}; "
            "expected rank 3 [N, H, W]."
        )
    if labels.ndim != 1:
        raise ValueError(
            f"idx labels file {labels_path!r} has shape {list(labels.shape)}; "
            "expected rank 1 [N]."
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"idx images file {images_path!r} holds {images.shape[0]} images but "
            f"labels file {labels_path!r} holds {labels.shape[0]} labels; the "
            "counts must agree."
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.flatnonzero(labels >= NUM_CLASSES)[0])
        raise ValueError(
            f"idx labels file {labels_path!r} has label {int(labels[bad])} at "
            f"index {bad}; expected values in [0, {NUM_CLASSES - 1}]."
        )
    images = images[..., np.newaxis]  # [N, H, W] -> [N, H, W, 1], a view.
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return images, labels
