"""The machine a benchmark ran on: the ``machine`` block of every JSON result.

Ratios are measured within one run, but whether they carry over to another
machine depends on what this one is: the CPU model (it varies between hosts
of the same name), its core count, whether it has bfloat16 matrix units
(AMX: the bfloat16/float32 ratio on a CPU hinges on them), the accelerators
and the library versions.
"""

from __future__ import annotations

import os
import platform

import keras
import tensorflow as tf

from revisit_tf import __version__

_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """``{"model": str, "flags": [...]}`` of the first CPU in ``cpuinfo``.

    ``flags`` lists which of ``avx512f``, ``avx512_bf16``, ``amx_bf16`` and
    ``amx_tile`` it has. Off Linux (no ``cpuinfo``) the model is
    ``platform.processor()`` and the flags are unknown (None).
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {"model": platform.processor() or "unknown", "flags": None}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or "unknown",
        "flags": [f for f in _CPU_FLAGS if f in flags],
    }


def machine_info() -> dict[str, object]:
    """The platform, CPU, core count, devices and versions, as JSON values."""
    gpus = [
        tf.config.experimental.get_device_details(g).get("device_name", g.name)
        for g in tf.config.list_physical_devices("GPU")
    ]
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "revisit_tf": __version__,
    }
