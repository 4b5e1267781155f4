"""Folders of JPEG/PNG files: the listing behind the ``image_folder`` source.

Contract: ``list_image_folder(root, labels)`` walks ``root`` (any
``tf.io.gfile`` path: local, ``gs://``, ``ram://``) once and returns a
``FolderListing``: the image files in the source's fixed order, their labels
(or None) and the class names. ``data.sources`` turns it into the
``tf.data`` source; nothing here builds a dataset.

Layouts:
  * labelled: ``root/<class>/**/<file>``; the label is the index of
    ``<class>`` among the sorted class folder names that hold images;
  * unlabelled: every image under ``root`` (sub-folders included), no label.
  * ``labels="auto"``: labelled when some sub-folder holds images, else (a flat
    folder) unlabelled. Images directly in ``root`` next to class folders are
    an error (they would have no class).

Files: ``.jpg``, ``.jpeg`` and ``.png`` in any letter case; every other file,
and hidden files and folders (``.DS_Store``, macOS ``._x.jpg``,
``.ipynb_checkpoints/``), are skipped and counted in the log. Every image's
first bytes are checked once per process (a JPEG or PNG signature), so a file
that is not an image is an error naming it before anything trains.

Order: sorted paths (byte order of the relative path). Labelled folders are
then interleaved proportionally across classes: the ``i``-th of a class's
``n`` files goes to position key ``(i + 0.5) / n``; so every slice
(``train[:80%]``, ``train[-100:]``) holds about its share of every class,
which a class-by-class order would not (``train[80%:]`` would be the last
classes only). The order depends only on the file names.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
from collections.abc import Mapping

import tensorflow as tf

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("auto", "folders", "none")
# First bytes of the two formats (JPEG SOI marker + next marker; PNG signature).
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Parallel header reads: remote file systems (gs://) answer each open slowly.
_HEADER_THREADS = 16
# Digests of listings whose headers were checked (and which were logged).
_CHECKED: set[str] = set()
_LOGGED: set[tuple] = set()


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The images of one folder in the source's order.

    Attributes:
      root: The folder, as given (trailing ``/`` removed).
      paths: Full paths (``root/<relative path>``), in the source's order.
      labels: One class index per path, or None for an unlabelled listing.
      class_names: The class folder names, sorted; ``labels`` index them.
        None for an unlabelled listing.
      skipped: Why files were skipped (an extension, ``"hidden"``) -> count.
    """

    root: str
    paths: tuple[str, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    skipped: Mapping[str, int]


def _join(root: str, relative: str) -> str:
    return f"{root}{relative}" if root.endswith("/") else f"{root}/{relative}"


def _walk(root: str) -> tuple[list[str], collections.Counter]:
    """Relative posix paths of the image files under ``root``, and the skips."""
    images, skipped = [], collections.Counter()
    for dirpath, dirnames, filenames in tf.io.gfile.walk(root):
        hidden_dirs = [d for d in dirnames if d.startswith(".")]
        skipped["hidden"] += len(hidden_dirs)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative_dir = dirpath[len(root) :].strip("/")
        if any(part.startswith(".") for part in relative_dir.split("/") if part):
            continue  # a hidden folder that the walk entered anyway
        for filename in filenames:
            if filename.startswith("."):
                skipped["hidden"] += 1
                continue
            extension = "." + filename.rsplit(".", 1)[-1] if "." in filename else ""
            if extension.lower() in IMAGE_EXTENSIONS:
                images.append(
                    f"{relative_dir}/{filename}" if relative_dir else filename
                )
            else:
                skipped[extension.lower() or "no extension"] += 1
    skipped = collections.Counter({k: v for k, v in skipped.items() if v})
    return sorted(images), skipped


def _interleave(relative: list[str], labels: list[int]):
    """Proportional interleave of a class-sorted listing (module docstring)."""
    counts = collections.Counter(labels)
    seen = collections.Counter()
    keys = []
    for position, label in enumerate(labels):
        keys.append(((2 * seen[label] + 1) / (2 * counts[label]), label, position))
        seen[label] += 1
    order = [position for _, _, position in sorted(keys)]
    return [relative[i] for i in order], [labels[i] for i in order]


def _check_header(path: str) -> str | None:
    """None for a JPEG/PNG signature, else why the file is not an image."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(len(PNG_MAGIC))
    except (tf.errors.OpError, OSError) as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if head.startswith(JPEG_MAGIC) or head.startswith(PNG_MAGIC):
        return None
    if not head:
        return "is empty"
    return f"starts with {head!r}, neither a JPEG nor a PNG signature"


def _check_headers(root: str, paths: tuple[str, ...]) -> None:
    digest = hashlib.sha256("\0".join(paths).encode()).hexdigest()
    if digest in _CHECKED:
        return
    with concurrent.futures.ThreadPoolExecutor(_HEADER_THREADS) as pool:
        problems = [
            (path, why)
            for path, why in zip(paths, pool.map(_check_header, paths), strict=True)
            if why is not None
        ]
    if problems:
        shown = "\n  ".join(f"{path} {why}" for path, why in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"Image folder {root!r}: {len(problems)} of {len(paths)} image files "
            f"cannot be decoded:\n  {shown}{more}\nDelete or replace them (only "
            f"JPEG and PNG files named {'/'.join(IMAGE_EXTENSIONS)} are read)."
        )
    _CHECKED.add(digest)


def _skipped_text(skipped: Mapping[str, int]) -> str:
    if not skipped:
        return "none"
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def list_image_folder(
    root: str, labels: str = "auto", *, check_files: bool = True
) -> FolderListing:
    """Lists the images of ``root`` in the source's order (module docstring).

    Args:
      root: The folder: a local path or any ``tf.io.gfile`` URL (``gs://...``).
      labels: ``"folders"`` (labels from the class sub-folders), ``"none"``
        (unlabelled, every image under ``root``) or ``"auto"`` (``"folders"``
        if a sub-folder holds images, else ``"none"``).
      check_files: Check every file's first bytes (once per process and
        listing).

    Returns:
      The listing; its class names and skipped files are logged once.

    Raises:
      FileNotFoundError: ``root`` does not exist or is not a folder.
      ValueError: Bad ``labels``; no image file at all; with class folders,
        images directly in ``root``; ``labels="folders"`` on a flat folder;
        a file that is not a JPEG or PNG (all such files are named).
    """
    if labels not in LABEL_MODES:
        raise ValueError(
            f"image_folder labels must be one of {list(LABEL_MODES)}, got {labels!r}."
        )
    if not isinstance(root, str) or not root:
        raise ValueError(
            f"image_folder needs the folder as data_dir (gin: pretrain.data_dir = "
            f"'/path/to/images'), got {root!r}."
        )
    root = root.rstrip("/") or "/"
    if not tf.io.gfile.isdir(root):
        what = (
            "is a file, not a folder" if tf.io.gfile.exists(root) else "does not exist"
        )
        raise FileNotFoundError(f"Image folder {root!r} {what}.")
    relative, skipped = _walk(root)
    if not relative:
        raise ValueError(
            f"Image folder {root!r} holds no image file ({'/'.join(IMAGE_EXTENSIONS)}, "
            f"any case, sub-folders included); skipped: {_skipped_text(skipped)}."
        )
    nested = [p for p in relative if "/" in p]
    top = [p for p in relative if "/" not in p]
    mode = labels if labels != "auto" else ("folders" if nested else "none")
    if mode == "none":
        paths = tuple(_join(root, p) for p in relative)
        listing = FolderListing(root, paths, None, None, dict(skipped))
    else:
        if not nested:
            raise ValueError(
                f"Image folder {root!r} has no class sub-folders with images (its "
                f"{len(top)} images lie directly in it), so labels='folders' has no "
                "labels to read; use the unlabelled source (dataset "
                "'image_folder/labels=none') for label-free pretraining."
            )
        if top:
            raise ValueError(
                f"Image folder {root!r} has class sub-folders, but {len(top)} images "
                f"lie directly in it and would have no class (e.g. {top[0]!r}): move "
                "them into a class folder, or read the folder unlabelled (dataset "
                "'image_folder/labels=none')."
            )
        class_names = tuple(sorted({p.split("/", 1)[0] for p in nested}))
        index = {name: i for i, name in enumerate(class_names)}
        relative, label_list = _interleave(
            nested, [index[p.split("/", 1)[0]] for p in nested]
        )
        paths = tuple(_join(root, p) for p in relative)
        listing = FolderListing(
            root, paths, tuple(label_list), class_names, dict(skipped)
        )
    if check_files:
        _check_headers(root, listing.paths)
    key = (root, mode, len(listing.paths), listing.class_names)
    if key not in _LOGGED:
        _LOGGED.add(key)
        if listing.class_names is None:
            _logger.info(
                "Image folder %s: %d images, unlabelled; skipped files: %s.",
                root,
                len(listing.paths),
                _skipped_text(skipped),
            )
        else:
            counts = collections.Counter(listing.labels)
            _logger.info(
                "Image folder %s: %d images in %d classes (label: name, images): "
                "%s; skipped files: %s.",
                root,
                len(listing.paths),
                len(listing.class_names),
                ", ".join(
                    f"{i}: {name!r} {counts[i]}"
                    for i, name in enumerate(listing.class_names)
                ),
                _skipped_text(skipped),
            )
    return listing
