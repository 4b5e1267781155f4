"""Checkpoints that survive preemption, corruption and kills (stage 4).

``tf.train.Checkpoint`` of the pretext model, its trunk (the same variables,
also reachable under the key ``trunk`` so that the export restores the trunk
alone, without building the task's head) and the optimizer (whose
``iterations`` is the global step), in ``<workdir>/checkpoints``:

    ckpt-<step>.index, ckpt-<step>.data-*   one checkpoint (TF writes each
                                            file to a temporary and renames)
    ckpt-<step>.metrics.json                the loop's metrics at that step
    checkpoint                              TF's state file (for TF tools)

Restore never guesses (reference: the original silently started from
scratch):

* the checkpoints are found by listing ``ckpt-<step>.index`` files in the
  directory; the ``checkpoint`` state file is only a hint, and an entry in it
  pointing outside the directory is ignored with a warning;
* if the newest cannot be read (a missing index, truncated data, garbage),
  the next newer readable one is restored, the unreadable ones are moved to
  ``checkpoints/unreadable/`` (never deleted) and the log says which;
* if checkpoints exist and none can be read, ``CheckpointError`` names each
  and nothing is touched: a run never writes a step-0 checkpoint into a
  directory holding other checkpoints;
* data files without an index (TF writes the index last, so these are saves
  killed half-way, never restorable) are moved to ``checkpoints/unreadable/``.

Save order: metrics file, then the checkpoint (``Checkpoint.write``), then the
state file (``files.write_atomic``), then the deletion of checkpoints beyond
``max_to_keep``; a kill between any two leaves the previous checkpoints
intact and the newest complete one restorable. Temporary ``*_temp``
directories and ``*.tmp-*`` files left by killed saves are removed when the
next run starts (under the workdir lock, so no other writer owns them).

Under ``MultiWorkerMirroredStrategy`` every worker must take part in saving;
non-chief workers write to a private temporary directory that is deleted
afterwards (the documented TF pattern).

Every file operation goes through ``tf.io.gfile``, so the workdir may be a URL
(``gs://bucket/run``, ``ram://run``). Listings never use glob patterns (a
workdir name with ``[`` or ``*`` would be one): ``_names`` lists the directory
and the names are matched here. On an object store a move (``_set_aside``) is
a copy plus a delete; a kill between them leaves a copy, never a loss.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import keras
import tensorflow as tf

from revisit_tf import faults, files

_logger = logging.getLogger(__name__)

PREFIX = "ckpt"
_INDEX = re.compile(rf"^{PREFIX}-(\d+)\.index$")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored (corrupt or mismatched)."""


def _names(directory: str) -> list[str]:
    """The entries of ``directory`` ([] if it is missing): ``files.listdir``."""
    try:
        return files.listdir(directory)
    except FileNotFoundError:
        return []


def _remove(path: str) -> None:
    """Removes a file or a directory tree; a missing one is not an error."""
    try:
        if files.isdir(path):
            files.rmtree(path)
        else:
            tf.io.gfile.remove(path)
    except (FileNotFoundError, tf.errors.NotFoundError):
        pass


def _files_of(directory: str, prefix: str, separators: str = ".") -> list[str]:
    """Paths in ``directory`` of the files of checkpoint ``prefix`` (a path):
    the names starting with its base name and one of ``separators``."""
    base = os.path.basename(prefix)
    return [
        os.path.join(directory, name)
        for name in sorted(_names(directory))
        if len(name) > len(base)
        and name.startswith(base)
        and name[len(base)] in separators
    ]


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _restore(checkpoint: tf.train.Checkpoint, path: str, *, partial: bool) -> None:
    """``checkpoint.restore(path)`` with every failure turned into CheckpointError."""
    try:
        status = checkpoint.restore(path)
        if partial:
            status = status.expect_partial()
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - TF raises OpError, IndexError, ...
        raise CheckpointError(
            f"Cannot restore checkpoint {path!r}: it is corrupt, truncated or "
            f"was written by a different model/optimizer ({type(e).__name__}: "
            f"{_first_line(e)})."
        ) from e


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the checkpoints in ``directory`` (by their index files), newest first.

    Entries of the ``checkpoint`` state file that point outside ``directory``
    are ignored (logged): a state file is never followed to another path.
    """
    names = _names(directory)
    steps = set()
    for name in names:
        match = _INDEX.match(name)
        if match and not files.isdir(os.path.join(directory, name)):
            steps.add(int(match.group(1)))
    state = os.path.join(directory, "checkpoint")
    if "checkpoint" in names and not files.isdir(state):
        with tf.io.gfile.GFile(state, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
            for quoted in re.findall(r'"([^"]*)"', text):
                target = os.path.normpath(os.path.join(directory, quoted))
                if os.path.dirname(target) != os.path.normpath(directory):
                    _logger.warning(
                        "Ignoring %r in %s: checkpoints are only read from %s.",
                        quoted,
                        state,
                        directory,
                    )
    return sorted(steps, reverse=True)


def _prefix(directory: str, step: int) -> str:
    return os.path.join(directory, f"{PREFIX}-{step}")


_DATA = re.compile(rf"^{PREFIX}-(\d+)\.data-\d+-of-\d+$")


def _orphan_data(directory: str) -> list[str]:
    """Data files of checkpoints whose index was never written (a killed save)."""
    steps = set(checkpoint_steps(directory))
    return sorted(
        name
        for name in _names(directory)
        if (match := _DATA.match(name)) and int(match.group(1)) not in steps
    )


def _restore_newest(
    checkpoint: tf.train.Checkpoint, directory: str
) -> tuple[str | None, list[tuple[str, str]]]:
    """Restores the newest readable checkpoint.

    Returns:
      ``(path or None, [(unreadable path, reason), ...] newer than it)``.

    Raises:
      CheckpointError: checkpoint files exist and none is readable.
    """
    failures = []
    for step in checkpoint_steps(directory):
        path = _prefix(directory, step)
        try:
            _restore(checkpoint, path, partial=False)
        except CheckpointError as e:
            failures.append((path, str(e)))
            continue
        return path, failures
    if failures:
        listed = "\n".join(f"  {p}: {r}" for p, r in failures)
        raise CheckpointError(
            f"{directory} holds checkpoints but none can be restored:\n{listed}\n"
            "Nothing was changed. Restore the files from a backup, move the "
            "directory away to train from scratch, or fix the model/optimizer "
            "config to match the one that wrote them."
        )
    return None, []


def restore_trunk(workdir: str, trunk: keras.Model) -> str:
    """Restores ``trunk`` from the ``trunk`` key of the newest checkpoint.

    Used by the export: the head and the optimizer slots in the checkpoint
    are ignored; every variable of ``trunk`` must be found. Unlike training,
    the export never falls back to an older checkpoint: an export of another
    step than the newest would silently stand for the finished run.

    Returns:
      The checkpoint path restored.

    Raises:
      FileNotFoundError: no checkpoint in ``workdir/checkpoints``.
      CheckpointError: the newest checkpoint is unreadable (or of another
        architecture); rerunning revisit-train resumes from the newest
        readable one and repairs it.
    """
    directory = os.path.join(workdir, "checkpoints")
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {directory!r}: train with this workdir first."
        )
    path = _prefix(directory, steps[0])
    try:
        _restore(tf.train.Checkpoint(trunk=trunk), path, partial=True)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e} The export uses the newest checkpoint only: rerun "
            "revisit-train on this workdir (it resumes from the newest readable "
            "checkpoint and writes this step again), then export."
        ) from e
    return path


_METRICS = ".metrics.json"


def _write_metrics(prefix: str, metrics: dict[str, float] | None) -> None:
    """Writes ``<prefix>.metrics.json`` atomically (a kill leaves the old one)."""
    files.write_atomic(prefix + _METRICS, json.dumps(metrics or {}, sort_keys=True))


def read_metrics(directory: str, step: int) -> dict[str, float]:
    """The metrics saved with checkpoint ``step`` ({} if none were saved)."""
    path = _prefix(directory, step) + _METRICS
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError, tf.errors.OpError):
        return {}
    return value if isinstance(value, dict) else {}


class Checkpointer:
    """Saves and restores ``model`` + ``optimizer`` in ``<workdir>/checkpoints``.

    Example:
      ckpt = Checkpointer(workdir, model=model, optimizer=optimizer,
                          trunk=pretext.get_trunk(model))
      start_step = ckpt.restore_latest()  # 0 for a fresh run
      ...
      ckpt.save(step, metrics)
    """

    def __init__(
        self,
        workdir: str,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        trunk: keras.Model | None = None,
        max_to_keep: int = 3,
        is_chief: bool = True,
        worker_id: int = 0,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}.")
        self.directory = os.path.join(workdir, "checkpoints")
        self._is_chief = is_chief
        self._optimizer = optimizer
        self._max_to_keep = max_to_keep
        objects = {"model": model, "optimizer": optimizer}
        if trunk is not None:
            objects["trunk"] = trunk
        self.checkpoint = tf.train.Checkpoint(**objects)
        # Created now so that every write holds it (``restore`` creates it,
        # and CheckpointManager-era checkpoints have it).
        _ = self.checkpoint.save_counter
        self._save_dir = self.directory
        if not is_chief:
            self._save_dir = os.path.join(workdir, ".worker_tmp", f"worker_{worker_id}")
        self.restored_metrics: dict[str, float] = {}

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint (by index file) in the directory."""
        steps = checkpoint_steps(self.directory)
        return _prefix(self.directory, steps[0]) if steps else None

    def _clean_leftovers(self) -> None:
        """Removes what killed saves leave (caller holds the workdir lock)."""
        for name in sorted(_names(self.directory)):
            path = os.path.join(self.directory, name)
            if name.endswith("_temp"):
                _logger.warning("Removing %s, left by an interrupted save.", path)
                _remove(path)
            elif ".tmp-" in name:
                _logger.warning("Removing %s, left by an interrupted write.", path)
                _remove(path)

    def restore_latest(self) -> int:
        """Restores the newest readable checkpoint, if any; returns the global step.

        Unreadable newer checkpoints are moved to ``checkpoints/unreadable/``
        (logged); ``restored_metrics`` holds the metrics saved with the one
        restored.

        Raises:
          CheckpointError: checkpoints exist but none can be restored (each
            is named); nothing is moved or deleted.
        """
        if self._is_chief:
            self._clean_leftovers()
            for name in _orphan_data(self.directory):
                # TF writes a checkpoint's index last: data without an index
                # is a save killed half-way, never a restorable checkpoint.
                self._set_aside(os.path.join(self.directory, name), exact=True)
        path, failures = _restore_newest(self.checkpoint, self.directory)
        if path is None:
            _logger.info("No checkpoint in %s: starting from scratch.", self.directory)
            return 0
        for bad, reason in failures:
            _logger.warning(
                "Newest checkpoint %s is unreadable (%s); resuming from %s.",
                bad,
                reason,
                path,
            )
            if self._is_chief:
                self._set_aside(bad)
        step = int(self._optimizer.iterations.numpy())
        self.restored_metrics = read_metrics(self.directory, step)
        _logger.info("Restored %s (step %d).", path, step)
        return step

    def _set_aside(self, prefix: str, *, exact: bool = False) -> None:
        """Moves the files of checkpoint ``prefix`` (``exact``: the file
        ``prefix`` alone) to ``checkpoints/unreadable/<time>/``."""
        target = os.path.join(
            self.directory, "unreadable", time.strftime("%Y%m%d-%H%M%S")
        )
        tf.io.gfile.makedirs(target)
        paths = [prefix] if exact else _files_of(self.directory, prefix)
        for path in paths:
            tf.io.gfile.rename(
                path, os.path.join(target, os.path.basename(path)), overwrite=True
            )
        _logger.warning("Moved the files of %s to %s.", prefix, target)

    def update_metrics(self, step: int, metrics: dict[str, float]) -> bool:
        """Rewrites the metrics of the saved checkpoint ``step`` (chief only).

        For what is measured after the save, e.g. the cost of the hooks that
        run at a checkpoint step (saved first, so that a hook that crashes
        costs no training): a run resumed from ``step`` then carries it over.
        Atomic (``files.write_atomic``): a kill leaves the old file. Returns
        False, touching nothing, off the chief or when ``step`` has no
        checkpoint.
        """
        if not self._is_chief or step not in checkpoint_steps(self.directory):
            return False
        _write_metrics(_prefix(self.directory, step), metrics)
        return True

    def save(self, step: int, metrics: dict[str, float] | None = None) -> str | None:
        """Writes a checkpoint for ``step``; returns its path on the chief.

        Raises:
          CheckpointError: ``step`` is 0 and the directory already holds
            checkpoints (a run that did not resume must never write over one
            that did).
        """
        prefix = _prefix(self._save_dir, step)
        if not self._is_chief:
            self.checkpoint.write(prefix)
            _remove(self._save_dir)
            return None
        existing = checkpoint_steps(self.directory)
        if step == 0 and existing:
            raise CheckpointError(
                f"Refusing to write a step-0 checkpoint into {self.directory}, "
                f"which holds checkpoints of steps {existing}."
            )
        tf.io.gfile.makedirs(self.directory)
        try:
            _write_metrics(prefix, metrics)
            faults.point("checkpoint.before_write")
            path = self.checkpoint.write(prefix)
        except (OSError, tf.errors.OpError) as e:
            # Not yet in the state file: remove what this save left; the
            # older checkpoints are untouched.
            for name in _files_of(self.directory, prefix, separators="._"):
                _remove(name)
            raise CheckpointError(
                f"Could not write checkpoint {prefix} ({type(e).__name__}: "
                f"{_first_line(e)}); its partial files were removed and the "
                f"checkpoints of steps {existing} are intact. A full disk? Free "
                "space and rerun to resume."
            ) from e
        faults.point("checkpoint.after_write")
        kept = sorted({step, *existing}, reverse=True)
        newest_first = [f"{PREFIX}-{s}" for s in kept[: self._max_to_keep]]
        state = f'model_checkpoint_path: "{newest_first[0]}"\n' + "".join(
            f'all_model_checkpoint_paths: "{p}"\n' for p in reversed(newest_first)
        )
        files.write_atomic(os.path.join(self.directory, "checkpoint"), state)
        faults.point("checkpoint.after_state")
        for old in kept[self._max_to_keep :]:
            for name in _files_of(self.directory, _prefix(self.directory, old)):
                tf.io.gfile.remove(name)
        faults.point("checkpoint.after_cleanup")
        _logger.info("Saved checkpoint %s", path)
        return path
