"""The ``machine`` block every benchmark's JSON carries (benchmarks.machine)."""

import os
import platform

import tensorflow as tf

from revisit_tf import __version__
from revisit_tf.benchmarks import machine

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu
"""


def test_cpu_model_reads_the_first_processor_and_its_bf16_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert machine.cpu_model(str(path)) == {
        "model": "Intel(R) Xeon(R) Platinum 8480+",
        "flags": ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile"],
    }
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: sse2 avx2\n")
    assert machine.cpu_model(str(path)) == {"model": "AMD EPYC 7B13", "flags": []}
    missing = machine.cpu_model(str(tmp_path / "absent"))
    assert missing["flags"] is None and isinstance(missing["model"], str)


def test_machine_info_is_this_machine():
    info = machine.machine_info()
    assert info["cpus"] == os.cpu_count() and info["platform"] == platform.platform()
    assert info["tensorflow"] == tf.__version__ and info["revisit_tf"] == __version__
    assert info["devices"] == [d.name for d in tf.config.list_logical_devices()]
    assert info["gpus"] == []  # the CI machines have none
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert info["cpu"]["model"] in f.read()
