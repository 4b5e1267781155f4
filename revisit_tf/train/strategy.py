"""Distribution strategies by name (stage 4, training).

This is the only module that touches cluster resolvers. Everything else gets a
``tf.distribute.Strategy`` and uses ``strategy.scope()``,
``strategy.distribute_datasets_from_function`` and ``strategy.run``, so the same
loop runs on one CPU, N GPUs (``mirrored``), several hosts (``multi_worker``)
and TPUs (``tpu``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import tensorflow as tf

_logger = logging.getLogger(__name__)

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def make_strategy(
    name: str = "default",
    *,
    devices: Sequence[str] | None = None,
    tpu: str | None = None,
) -> tf.distribute.Strategy:
    """Returns the ``tf.distribute`` strategy called ``name``.

    Args:
      name: one of ``STRATEGIES``:
        ``default`` - TF's default strategy (one device, no replication);
        ``one_device`` - ``OneDeviceStrategy`` on ``devices[0]`` (or the first
        GPU, else CPU);
        ``mirrored`` - ``MirroredStrategy`` over ``devices`` (default: all local
        GPUs, or the CPU when there is none; logical CPU devices count too);
        ``multi_worker`` - ``MultiWorkerMirroredStrategy``; the cluster comes
        from the ``TF_CONFIG`` environment variable as usual;
        ``tpu`` - ``TPUStrategy`` on the TPU named by ``tpu`` (``""`` or None
        means the local / environment-configured TPU).
      devices: optional device names for ``one_device`` / ``mirrored``.
      tpu: TPU name or address for ``tpu``.

    Returns:
      The strategy. Its replica count is logged.

    Raises:
      ValueError: unknown ``name``.
    """
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        if devices:
            device = devices[0]
        else:
            device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        strategy = tf.distribute.OneDeviceStrategy(device)
    elif name == "mirrored":
        if not devices and not tf.config.list_logical_devices("GPU"):
            # MirroredStrategy() with no GPU uses one CPU; the logical CPU
            # devices (tests, CPU-only hosts) are only used when named.
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices or None)
    elif name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
        )
    _logger.info(
        "Strategy %s with %d replica(s) in sync.",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
    )
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes summaries, configs and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return (
        task_type is None
        or task_type == "chief"
        or (task_type == "worker" and task_id == 0)
    )
