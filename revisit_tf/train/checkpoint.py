"""Checkpoints that survive preemption (stage 4, training).

``tf.train.Checkpoint`` of the pretext model, its trunk (the same variables,
also reachable under the key ``trunk`` so that the export restores the trunk
alone, without building the task's head) and the optimizer (whose
``iterations`` is the global step) under a ``CheckpointManager`` in
``<workdir>/checkpoints``. TF
writes each checkpoint to temporary files and renames them, and updates the
``checkpoint`` state file atomically, so a run killed at any moment leaves the
previous checkpoints intact; the next run resumes from the newest one.

Under ``MultiWorkerMirroredStrategy`` every worker must take part in saving;
non-chief workers write to a private temporary directory that is deleted
afterwards (the documented TF pattern).
"""

from __future__ import annotations

import logging
import os
import shutil

import keras
import tensorflow as tf


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored (corrupt or mismatched)."""


def _restore(checkpoint: tf.train.Checkpoint, path: str, *, partial: bool) -> None:
    """``checkpoint.restore(path)`` with every failure turned into CheckpointError."""
    try:
        status = checkpoint.restore(path)
        if partial:
            status = status.expect_partial()
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - TF raises OpError, IndexError, ...
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"Cannot restore checkpoint {path!r}: it is corrupt, truncated or "
            f"was written by a different model/optimizer ({type(e).__name__}: "
            f"{first_line}). Move it (and its line in the 'checkpoint' file "
            "beside it) away to use an older checkpoint, or use a fresh workdir."
        ) from e


def restore_trunk(workdir: str, trunk: keras.Model) -> str:
    """Restores ``trunk`` from the ``trunk`` key of the newest checkpoint.

    Used by the export: the head and the optimizer slots in the checkpoint
    are ignored; every variable of ``trunk`` must be found.

    Returns:
      The checkpoint path restored.

    Raises:
      FileNotFoundError: no checkpoint in ``workdir/checkpoints``.
      CheckpointError: corrupt or mismatched checkpoint.
    """
    directory = os.path.join(workdir, "checkpoints")
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(
            f"No checkpoint in {directory!r}: train with this workdir first."
        )
    _restore(tf.train.Checkpoint(trunk=trunk), path, partial=True)
    return path


class Checkpointer:
    """Saves and restores ``model`` + ``optimizer`` in ``<workdir>/checkpoints``.

    Example:
      ckpt = Checkpointer(workdir, model=model, optimizer=optimizer,
                          trunk=pretext.get_trunk(model))
      start_step = ckpt.restore_latest()  # 0 for a fresh run
      ...
      ckpt.save(step)
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
        objects = {"model": model, "optimizer": optimizer}
        if trunk is not None:
            objects["trunk"] = trunk
        self.checkpoint = tf.train.Checkpoint(**objects)
        save_dir = self.directory
        if not is_chief:
            save_dir = os.path.join(workdir, ".worker_tmp", f"worker_{worker_id}")
        self._save_dir = save_dir
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, save_dir, max_to_keep=max_to_keep
        )

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint in the chief's directory."""
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self) -> int:
        """Restores the newest checkpoint, if any; returns the global step.

        Raises:
          CheckpointError: the newest checkpoint is unreadable (truncated or
            corrupt files) or does not match the model/optimizer (another
            architecture). The message names the checkpoint; nothing is
            deleted, so the user can move it away and resume from an older one.
        """
        path = self.latest
        if path is None:
            logging.info("No checkpoint in %s: starting from scratch.", self.directory)
            return 0
        _restore(self.checkpoint, path, partial=False)
        step = int(self._optimizer.iterations.numpy())
        logging.info("Restored %s (step %d).", path, step)
        return step

    def save(self, step: int) -> str | None:
        """Writes a checkpoint for ``step``; returns its path on the chief."""
        path = self.manager.save(checkpoint_number=step)
        if not self._is_chief:
            shutil.rmtree(self._save_dir, ignore_errors=True)
            return None
        logging.info("Saved checkpoint %s", path)
        return path
