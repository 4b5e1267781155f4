"""Small file helpers shared by the stages (no TensorFlow, no gin).

``write_atomic`` is the one way revisit_tf writes a whole small file (configs,
records, study state): a reader sees the old file or the new one, never half
of either, and a crash leaves at most a stray ``*.tmp-<pid>`` next to it.
"""

from __future__ import annotations

import os


def write_atomic(
    path: str | os.PathLike, data: bytes | str, *, fsync: bool = True
) -> None:
    """Writes ``data`` to ``path`` through a temporary file and ``os.replace``.

    Args:
      path: destination; its directory must exist.
      data: bytes, or text (written as UTF-8).
      fsync: flush the temporary file to disk before the rename, so that a
        power loss cannot leave an empty file under the final name.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode) as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
