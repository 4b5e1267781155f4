"""Shared test setup.

The CPU is split into 2 logical devices before TensorFlow initialises, so that
MirroredStrategy runs with 2 real replicas on a CPU-only machine (TF's own
"mirrored_strategy_with_two_cpus" trick).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the revisit-* binaries (revisit_tf/cli.py): oneDNN on every x86 CPU, so
# that channels_first convolutions and CPU allocator statistics (the RevNet
# memory test) exist on CPUs where TensorFlow leaves it off (e.g. AMD EPYC).
# Subprocesses of the tests inherit it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import gin  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config(clear_constants=True)


@pytest.fixture
def seeded():
    """TF's global seed fixed for one test (the pp op tests' random draws)."""
    tf.random.set_seed(1234)
    yield
    tf.random.set_seed(None)
