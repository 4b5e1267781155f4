"""Files shipped inside the package (no TensorFlow, no gin): the gin configs.

The gin files live in ``revisit_tf/configs/`` (the repository's top-level
``gin/`` is a link to it) and are package data, so every kind of install
finds them the same way, through ``importlib.resources``: a wheel or sdist
install, ``pip install --user``, ``pip install --target DIR`` (with ``DIR``
on ``PYTHONPATH``), an editable install and a plain checkout on
``sys.path``.
"""

from __future__ import annotations

import importlib.resources
import os

CONFIGS = "configs"


def gin_dir() -> str:
    """The directory holding the shipped gin files, e.g. ``.../revisit_tf/configs``.

    ``--gin_file imagenet/rotation.gin`` and gin ``include`` lines name files
    relative to it.

    Raises:
      FileNotFoundError: the package's configs are not a directory on disk
        (e.g. revisit_tf imported from a zip archive, which gin cannot
        search), naming where revisit_tf was imported from.
    """
    root = importlib.resources.files("revisit_tf") / CONFIGS
    path = os.fspath(root) if isinstance(root, os.PathLike) else None
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(
            f"revisit_tf's gin files are not a directory on disk ({root!r}); "
            "install revisit_tf as files (pip install, not a zip archive)."
        )
    return path


def shipped_gin_files() -> list[str]:
    """Every shipped gin file, relative to ``gin_dir()`` (``imagenet/x.gin``)."""
    root = gin_dir()
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            if name.endswith(".gin"):
                full = os.path.join(directory, name)
                found.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(found)
