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


def resolve_jit_compile(
    strategy: tf.distribute.Strategy, jit_compile: bool | None
) -> bool:
    """Whether the per-replica training step is XLA-compiled (``train.loop``).

    Args:
      strategy: the training strategy.
      jit_compile: True, False, or None for the default: on when every
        replica runs on a GPU, off on CPUs (there XLA lost to TensorFlow's
        oneDNN kernels: 0.68x for ResNet50 v1 at 64 px on this project's
        2-core test machine) and on TPUs (``TPUStrategy`` compiles the whole
        step with XLA anyway).

    Returns:
      The resolved flag.

    Raises:
      ValueError: ``jit_compile=True`` under a strategy with several replicas
        of which some run on a CPU: TensorFlow's Mirrored strategies only
        all-reduce inside an XLA cluster when every device is a GPU (they
        fall back to ``merge_call``, which a compiled function cannot
        contain); the message says to leave it to the default.
    """
    if jit_compile is not None and not isinstance(jit_compile, bool):
        raise ValueError(
            f"jit_compile must be True, False or None; got {jit_compile!r}."
        )
    if isinstance(strategy, tf.distribute.TPUStrategy):
        if jit_compile:
            _logger.info(
                "TPUStrategy compiles every step with XLA; jit_compile is moot."
            )
        return False
    devices = ["(placed by TensorFlow)"]
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if strategy.num_replicas_in_sync > 1 or isinstance(
        strategy, tf.distribute.OneDeviceStrategy
    ):
        devices = list(strategy.extended.worker_devices)
        on_gpu = all(
            tf.DeviceSpec.from_string(d).device_type.upper() == "GPU" for d in devices
        )
    if jit_compile is None:
        return on_gpu
    if jit_compile and strategy.num_replicas_in_sync > 1 and not on_gpu:
        raise ValueError(
            f"jit_compile=True needs every replica on a GPU under "
            f"{type(strategy).__name__} ({strategy.num_replicas_in_sync} replicas on "
            f"{devices}): TensorFlow all-reduces inside an XLA cluster only between "
            "GPUs. Leave jit_compile unset (None) or False here."
        )
    return jit_compile
